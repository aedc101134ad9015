//! A real multipath Linux host on a three-server cluster (QEMU guest from
//! shared/tools/nvme-host-vm, kernel NVMe/TCP initiator with native multipath): it connects
//! to every server's portal, sees one optimized and two inaccessible paths of a volume with
//! three copies, and runs fio with verify while the primary's server is killed (kill -9):
//! the leader promotes a replica, the host's I/O moves to it with no error and verify
//! passes, and the volume is `Degraded`; the killed server returns, is rebuilt, the volume
//! is `FullyProtected` again and the data still verifies. Then the primary's server is
//! disabled under fio: the volume is handed over with no I/O error, and protection returns.
//! The guest side is `tests/host_vm/cluster.sh`.
//! `EVSTOR_SKIP_HOST_VM=1` skips it (printed).

mod common;

use common::cluster::{holders, member, server_id, Etcd};
use common::{vm, Server};
use serde_json::json;
use std::time::{Duration, Instant};

const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:e7570b00-0000-4000-8000-00000000c105";
const GUEST_TIMEOUT_S: u64 = 600;
const EXPECTED: &[&str] = &[
    "multipath-one-optimized-two-inaccessible",
    "fio-verify-across-primary-kill",
    "failover-path-optimized",
    "verify-after-rebuild",
    "fio-verify-across-disable",
    "disconnect",
];

struct Cluster {
    servers: Vec<Server>,
    uuid: String,
    killed: Option<usize>,
    problems: Vec<String>,
}

impl Cluster {
    fn path(&self) -> String {
        format!("/api/v2/projects/default/volumes/{}", self.uuid)
    }

    /// Index of the volume's primary as a live server sees it.
    fn primary(&self) -> usize {
        let ask = (0..3).find(|i| Some(*i) != self.killed).unwrap_or(0);
        holders(&self.servers, ask, &self.uuid)
            .first()
            .copied()
            .expect("the primary's server")
    }

    fn on_request(&mut self, name: &str) {
        match name {
            "kill-primary" => {
                let p = self.primary();
                self.servers[p].kill9();
                self.killed = Some(p);
            }
            "check-degraded" => {
                let live = (0..3).find(|i| Some(*i) != self.killed).unwrap_or(0);
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    let v = self.servers[live].admin().get(&self.path()).1;
                    if v["protectionState"] == "Degraded" {
                        break;
                    }
                    if Instant::now() > deadline {
                        self.problems.push(format!("volume not Degraded: {v}"));
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                if Some(self.primary()) == self.killed {
                    self.problems
                        .push("the killed server is still the primary".into());
                }
            }
            "disable-primary" => {
                let p = self.primary();
                let ask = (p + 1) % 3;
                let path = format!("/api/v2/servers/{}/disable", server_id(&self.servers[p]));
                let (status, body) = self.servers[ask].admin().post(&path, &json!({}));
                if status != 200 {
                    self.problems.push(format!("disable: {status} {body}"));
                }
            }
            "restart-killed-and-wait-protected" | "wait-protected" => {
                if let Some(k) = self.killed.take() {
                    self.servers[k].start_again();
                }
                let deadline = Instant::now() + Duration::from_secs(120);
                loop {
                    let v = self.servers[0].admin().get(&self.path()).1;
                    if v["protectionState"] == "FullyProtected" {
                        break;
                    }
                    if Instant::now() > deadline {
                        self.problems
                            .push(format!("not FullyProtected after the restart: {v}"));
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
            other => self.problems.push(format!("unknown guest request {other}")),
        }
    }
}

#[test]
fn a_multipath_host_rides_through_the_death_of_the_primary() {
    if vm::skipped("host_vm_cluster") {
        return;
    }
    let etcd = Etcd::start(3);
    let servers: Vec<Server> = ["s1", "s2", "s3"]
        .iter()
        .map(|n| member(&etcd, n, &[]))
        .collect();
    let c = servers[0].admin();
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.get("/api/v2/servers").1["servers"]
        .as_array()
        .is_none_or(|s| s.iter().filter(|s| s["state"] == "Enabled").count() < 3)
    {
        assert!(Instant::now() < deadline, "three servers never enabled");
        std::thread::sleep(Duration::from_millis(200));
    }
    let nqn = c.get("/api/v2/clusterinfo").1["subsystemNQN"]
        .as_str()
        .expect("subsystemNQN")
        .to_string();
    let body = json!({"name": "mp", "size": "64 MiB", "replicaCount": 3,
                      "acl": {"values": ["ALLOW_ANY"]}});
    let (status, v) = c.post("/api/v2/projects/default/volumes", &body);
    assert_eq!(status, 200, "{v}");
    let uuid = v["UUID"].as_str().expect("UUID").to_string();
    let v = servers[0].wait_for(
        &format!("/api/v2/projects/default/volumes/{uuid}"),
        |_, v| v["state"] == "Available",
    );
    let nsid = v["nsid"].as_u64().expect("nsid");
    let ports: Vec<String> = servers.iter().map(|s| s.nvme_port.to_string()).collect();
    let mut cluster = Cluster {
        servers,
        uuid,
        killed: None,
        problems: Vec::new(),
    };
    let run = vm::run_guest_with(
        &mut cluster,
        "cluster.sh",
        HOSTNQN,
        &[
            ("NQN", nqn),
            ("PORTS", ports.join(" ")),
            ("NSID", nsid.to_string()),
        ],
        GUEST_TIMEOUT_S,
        |c, name, _| c.on_request(name),
    );
    let live = (0..3).find(|i| Some(*i) != cluster.killed).unwrap_or(0);
    run.assert_checks(EXPECTED, &cluster.servers[live]);
    assert!(
        cluster.problems.is_empty(),
        "REST-side problems: {:?}",
        cluster.problems
    );
}
