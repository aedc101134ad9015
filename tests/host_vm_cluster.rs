//! A real multipath Linux host on a three-server cluster (QEMU guest from
//! shared/tools/nvme-host-vm, kernel NVMe/TCP initiator with native multipath): it connects
//! to every server's portal, sees one optimized and two inaccessible paths of a volume with
//! three copies, and runs fio with verify while the primary's server is killed (kill -9):
//! the leader promotes a replica, the host's I/O moves to it with no error and verify
//! passes, and the volume is `Degraded`; the killed server returns, is rebuilt, the volume
//! is `FullyProtected` again, having copied only what fio changed (the chunks the copies
//! changed around the failover and since), and the data still verifies. Then the primary's server is
//! stopped (SIGSTOP) under fio until a replica took over, then resumed: fio sees no error
//! and verifies (the deposed primary acknowledges nothing). Then the primary's server is
//! disabled under fio: the volume is handed over with no I/O error, and protection returns.
//! At the end the three servers' copies are identical.
//! The guest side is `tests/host_vm/cluster.sh`.
//! `EVSTOR_SKIP_HOST_VM=1` skips it (printed).

mod common;

use common::cluster::{events, holders, image_blocks, member, open_store, server_id, Etcd};
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
    "fio-verify-across-primary-stop",
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

    /// SIGSTOP the primary's server until the leader promoted a replica (its lease ran
    /// out), then SIGCONT: it resumes as a deposed primary.
    fn stop_primary_until_replaced(&mut self) {
        let p = self.primary();
        self.servers[p].signal(libc::SIGSTOP);
        let ask = (p + 1) % 3;
        let deadline = Instant::now() + Duration::from_secs(60);
        while holders(&self.servers, ask, &self.uuid).first() == Some(&p) {
            if Instant::now() > deadline {
                self.problems
                    .push("no replica took over from the stopped primary".into());
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.servers[p].signal(libc::SIGCONT);
    }

    /// The killed primary's rebuild: fio wrote the first 24 MiB of the 64 MiB volume, so a
    /// rebuild from what changed copies at most that much.
    fn check_rebuild_copied_only_what_changed(&mut self) {
        let copied: Vec<u64> = events(&self.servers[self.primary()])
            .iter()
            .filter(|e| e["type"] == "VolumeReplicaInSync")
            .map(|e| &e["event"]["Volume"]["VolumeReplicaInSync"])
            .filter(|b| b["uuid"] == self.uuid.as_str())
            .filter_map(|b| b["copied_bytes"].as_u64())
            .collect();
        eprintln!("host_vm_cluster: rebuilds of the volume copied {copied:?} bytes");
        // (Any other rebuild so far, of a replica dropped under load, copies fio's chunks
        // too.)
        if copied.iter().all(|c| *c == 0) || copied.iter().any(|c| *c > 24 << 20) {
            self.problems.push(format!(
                "the deposed primary's rebuild copied {copied:?} bytes, not only what fio changed"
            ));
        }
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
            "stop-primary" => self.stop_primary_until_replaced(),
            "disable-primary" => {
                let p = self.primary();
                let ask = (p + 1) % 3;
                let path = format!("/api/v2/servers/{}/disable", server_id(&self.servers[p]));
                let (status, body) = self.servers[ask].admin().post(&path, &json!({}));
                if status != 200 {
                    self.problems.push(format!("disable: {status} {body}"));
                }
            }
            "restart-killed-and-wait-protected"
            | "wait-protected-after-stop"
            | "wait-protected" => {
                let restarted = self.killed.take();
                if let Some(k) = restarted {
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
                if restarted.is_some() {
                    self.check_rebuild_copied_only_what_changed();
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
    run.assert_checks(EXPECTED, &cluster.servers.iter().collect::<Vec<_>>());
    assert!(
        cluster.problems.is_empty(),
        "REST-side problems: {:?}",
        cluster.problems
    );
    // Every copy is in sync at the end: all three images are the same, block for block.
    for s in cluster.servers.iter_mut() {
        s.stop();
    }
    let blocks = (64 << 20) / 4096;
    let images: Vec<Vec<u8>> = cluster
        .servers
        .iter()
        .map(|s| image_blocks(s, &cluster.uuid, blocks))
        .collect();
    assert!(
        images.iter().any(|i| i.iter().any(|b| *b != 0)),
        "fio wrote something"
    );
    let differ: Vec<String> = (1..images.len())
        .filter(|i| images[*i] != images[0])
        .map(|i| format!("server {i}: {}", differences(&images[0], &images[i])))
        .collect();
    if !differ.is_empty() {
        for (i, s) in cluster.servers.iter().enumerate() {
            eprintln!("----- server {i} log -----\n{}", s.log());
            eprintln!(
                "server {i}: {}",
                unmapped_data(s, &cluster.uuid, &images[i], &images)
            );
        }
        panic!("copies differ from server 0's: {differ:?}");
    }
}

/// For the blocks `own` reads as zeroes where another copy holds data: whether that data
/// is in the server's pool device all the same (written, then its mapping lost) or nowhere
/// (never written there). fio's verify header (magic 0xacca, then the block's offset at
/// byte 16) identifies a block; raw blocks sit at any sector.
fn unmapped_data(s: &Server, uuid: &str, own: &[u8], all: &[Vec<u8>]) -> String {
    const BLOCK: usize = 4096;
    let wanted: std::collections::HashSet<u64> = (0..own.len() / BLOCK)
        .filter(|i| own[i * BLOCK..(i + 1) * BLOCK].iter().all(|x| *x == 0))
        .filter(|i| {
            all.iter()
                .any(|img| img[i * BLOCK..(i + 1) * BLOCK].iter().any(|x| *x != 0))
        })
        .map(|i| (i * BLOCK) as u64)
        .collect();
    if wanted.is_empty() {
        return "no block it lacks".into();
    }
    // The pool device is sparse and may be large: its first GiBs hold what this test wrote.
    const SCAN_BYTES: u64 = 4 << 30;
    let dev = s.data_dir().join("devices").join("dev0.img");
    let Ok(file) = std::fs::File::open(&dev) else {
        return format!("cannot read {}", dev.display());
    };
    let mut found = std::collections::HashSet::new();
    let mut r = std::io::Read::take(file, SCAN_BYTES);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let mut got = 0;
        while got < buf.len() {
            match std::io::Read::read(&mut r, &mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(_) => break,
            }
        }
        if got == 0 {
            break;
        }
        for c in buf[..got].chunks_exact(512) {
            if c[0] == 0xca && c[1] == 0xac {
                let off = u64::from_le_bytes(c[16..24].try_into().expect("8 bytes"));
                if wanted.contains(&off) {
                    found.insert(off);
                }
            }
        }
    }
    let store = open_store(s);
    let usage = uuid.parse().ok().map(|u| store.usage(u));
    format!(
        "{} blocks it reads as zeroes hold data elsewhere; {} of them are in its pool device \
         (unmapped), {} nowhere in it; the pool: {:?}; the image: {usage:?}",
        wanted.len(),
        found.len(),
        wanted.len() - found.len(),
        store.stats(),
    )
}

/// Where image `b` differs from image `a`, block by block: how many blocks, and the first
/// few with what each copy holds (all zero, or the offset in fio's verify header, which
/// names the block the data was written for).
fn differences(a: &[u8], b: &[u8]) -> String {
    const BLOCK: usize = 4096;
    let what = |blk: &[u8]| {
        if blk.iter().all(|x| *x == 0) {
            "zeroes".to_string()
        } else {
            // fio's verify header: magic (2), verify type (2), length (4), rand seed (8),
            // offset (8), ...
            let off = u64::from_le_bytes(blk[16..24].try_into().expect("8 bytes"));
            format!("data for offset {off}")
        }
    };
    let diff: Vec<usize> = (0..a.len() / BLOCK)
        .filter(|i| a[i * BLOCK..(i + 1) * BLOCK] != b[i * BLOCK..(i + 1) * BLOCK])
        .collect();
    let first: Vec<String> = diff
        .iter()
        .take(6)
        .map(|i| {
            let r = i * BLOCK..(i + 1) * BLOCK;
            format!(
                "block at {}: {} vs {}",
                i * BLOCK,
                what(&a[r.clone()]),
                what(&b[r])
            )
        })
        .collect();
    format!("{} blocks, {first:?}", diff.len())
}
