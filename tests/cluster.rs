//! Cluster mode end to end: three etcd members and three `evstor serve --etcd` processes on
//! loopback. Bootstrap by the first and join of the others; one journal ordered by etcd and
//! applied by every server (same head hash everywhere); volumes placed on distinct servers
//! and visible from all; the shared root key; NVMe/TCP on the primary; health of a killed
//! server and its catch-up after a restart.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::cluster::{member, same_head, server_id, Etcd};
use common::Server;
use evstor_datapath::initiator::Session;
use serde_json::{json, Value};

const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:0c0c0c0c-0000-4000-8000-00000000c1c1";
/// Longest a change on one server may take to show on another, or health to change.
const CONVERGE: Duration = Duration::from_secs(30);

fn volume_body(name: &str, replicas: u32) -> Value {
    json!({"name": name, "size": "64 MiB", "acl": {"values": ["ALLOW_ANY"]},
           "replicaCount": replicas})
}

/// Polls GET `path` on `s` until `done`, at most [`CONVERGE`].
fn eventually(s: &Server, path: &str, done: impl Fn(u16, &Value) -> bool) -> Value {
    let c = s.admin();
    let deadline = Instant::now() + CONVERGE;
    loop {
        let (status, body) = c.get(path);
        if done(status, &body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "timed out on {path}: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Server states by name, as `s` lists them.
fn states(s: &Server) -> Vec<(String, String)> {
    let (status, body) = s.admin().get("/api/v2/servers");
    assert_eq!(status, 200, "{body}");
    let mut out: Vec<(String, String)> = body["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .map(|x| {
            (
                x["name"].as_str().unwrap_or_default().to_string(),
                x["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

fn all_enabled(names: &[&str]) -> Vec<(String, String)> {
    names
        .iter()
        .map(|n| (n.to_string(), "Enabled".to_string()))
        .collect()
}

/// Three servers in two failure domains, all seen `Enabled` by all.
fn three(etcd: &Etcd) -> Vec<Server> {
    let servers = vec![
        member(etcd, "s1", &["--failure-domain", "rack-a"]),
        member(etcd, "s2", &["--failure-domain", "rack-a"]),
        member(etcd, "s3", &["--failure-domain", "rack-b"]),
    ];
    for s in &servers {
        eventually(s, "/api/v2/servers", |_, _| {
            states(s) == all_enabled(&["s1", "s2", "s3"])
        });
    }
    servers
}

/// Node uuid → server index, from the nodes API.
fn node_owner(s: &Server, servers: &[Server]) -> std::collections::BTreeMap<String, usize> {
    let (_, nodes) = s.admin().get("/api/v2/nodes");
    let ids: Vec<String> = servers.iter().map(server_id).collect();
    nodes["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            let server = n["serverUUID"].as_str().unwrap_or_default();
            let owner = ids
                .iter()
                .position(|i| i == server)
                .expect("a known server");
            (n["UUID"].as_str().unwrap_or_default().to_string(), owner)
        })
        .collect()
}

#[test]
fn three_servers_one_journal_volumes_everywhere() {
    let etcd = Etcd::start(3);
    let servers = three(&etcd);
    // The root key is the cluster's: one member's admin token works on every member.
    let token = servers[0].admin_token();
    for s in &servers[1..] {
        let (status, body) = s.admin().with_token(&token).get("/api/v2/clusterinfo");
        assert_eq!(status, 200, "{body}");
    }
    // Volumes of 1, 2 and 3 copies, each created through another server.
    let mut uuids = Vec::new();
    for (i, replicas) in [(0usize, 1u32), (1, 2), (2, 3)] {
        let (status, v) = servers[i].admin().post(
            "/api/v2/projects/default/volumes",
            &volume_body(&format!("v{replicas}"), replicas),
        );
        assert_eq!(status, 200, "{v}");
        uuids.push((v["UUID"].as_str().expect("UUID").to_string(), replicas));
    }
    let owners = node_owner(&servers[0], &servers);
    for (uuid, replicas) in &uuids {
        let path = format!("/api/v2/projects/default/volumes/{uuid}");
        let seen: Vec<Value> = servers
            .iter()
            .map(|s| eventually(s, &path, |st, v| st == 200 && v["state"] == "Available"))
            .collect();
        for v in &seen[1..] {
            for field in [
                "UUID",
                "nsid",
                "nodeList",
                "primaryNodeUUID",
                "ETag",
                "size",
            ] {
                assert_eq!(v[field], seen[0][field], "{field} differs between servers");
            }
        }
        let nodes: Vec<&str> = seen[0]["nodeList"]
            .as_array()
            .expect("nodeList")
            .iter()
            .map(|n| n.as_str().unwrap_or_default())
            .collect();
        assert_eq!(nodes.len(), *replicas as usize, "{}", seen[0]);
        assert_eq!(nodes[0], seen[0]["primaryNodeUUID"]);
        let on: BTreeSet<usize> = nodes.iter().map(|n| owners[*n]).collect();
        assert_eq!(
            on.len(),
            nodes.len(),
            "copies on distinct servers: {nodes:?}"
        );
        if *replicas == 2 {
            // s1 and s2 share rack-a: two copies take both racks.
            assert!(on.contains(&2), "distinct failure domains: {on:?}");
        }
        let protection = if *replicas == 1 {
            "FullyProtected"
        } else {
            "Degraded"
        };
        assert_eq!(seen[0]["protectionState"], protection);
    }
    // The single-copy volume is served over NVMe/TCP by its primary's target.
    let (uuid, _) = &uuids[0];
    let v = servers[0]
        .admin()
        .get(&format!("/api/v2/projects/default/volumes/{uuid}"))
        .1;
    let primary = &servers[owners[v["primaryNodeUUID"].as_str().expect("primary")]];
    let nqn = primary.admin().get("/api/v2/clusterinfo").1["subsystemNQN"]
        .as_str()
        .expect("NQN")
        .to_string();
    let addr = SocketAddr::from(([127, 0, 0, 1], primary.nvme_port));
    let mut host = Session::connect(addr, &nqn, HOSTNQN).expect("NVMe/TCP connect");
    let nsid = v["nsid"].as_u64().expect("nsid") as u32;
    host.write(nsid, 3, &[0xc1; 4096]).expect("write");
    assert_eq!(host.read(nsid, 3, 1).expect("read"), vec![0xc1; 4096]);
    // One journal: every server verifies and stands on the same head.
    let refs: Vec<&Server> = servers.iter().collect();
    let (seq, _) = same_head(&refs, CONVERGE);
    assert!(seq > 10, "bootstrap, joins and volumes are in the journal");
}

#[test]
fn a_killed_server_fails_then_catches_up_after_restart() {
    let etcd = Etcd::start(3);
    let mut servers = three(&etcd);
    servers[2].kill9();
    for s in &servers[..2] {
        eventually(s, "/api/v2/servers", |_, _| {
            states(s).contains(&("s3".to_string(), "Failed".to_string()))
        });
    }
    // Changes while it is down, through both live servers.
    std::thread::scope(|scope| {
        for (w, s) in servers[..2].iter().enumerate() {
            let c = s.admin();
            scope.spawn(move || {
                for i in 0..50 {
                    let body = json!({"name": format!("p{w}-{i}"), "description": "x"});
                    let (status, v) = c
                        .try_post("/api/v2/projects", &body)
                        .unwrap_or_else(|e| panic!("{e}; the server's log:\n{}", s.log()));
                    assert_eq!(status, 200, "{v}");
                }
            });
        }
    });
    servers[2].start_again();
    for s in &servers {
        eventually(s, "/api/v2/servers", |_, _| {
            states(s) == all_enabled(&["s1", "s2", "s3"])
        });
    }
    let refs: Vec<&Server> = servers.iter().collect();
    same_head(&refs, CONVERGE);
    let (_, projects) = servers[2].admin().get("/api/v2/projects?limit=1000");
    let names = projects.to_string();
    assert!(
        names.contains("p0-49") && names.contains("p1-49"),
        "{projects}"
    );
}
