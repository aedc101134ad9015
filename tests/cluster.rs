//! Cluster mode end to end: three etcd members and three `evstor serve --etcd` processes on
//! loopback. Bootstrap by the first and join of the others; one journal ordered by etcd and
//! applied by every server (same head hash everywhere); volumes placed on distinct servers
//! and visible from all; the shared root key; NVMe/TCP on the primary; health of a killed
//! server and its catch-up after a restart.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::cluster::{
    events, image_blocks, member, member_with, member_with_env, node_owner, open_store, same_head,
    server_id, Etcd,
};
use common::Server;
use evstor_datapath::initiator::Session;
use evstor_datapath::nvme::Status;
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
    three_with_env(etcd, &[])
}

/// As [`three`], with extra environment.
fn three_with_env(etcd: &Etcd, env: &[(&str, &str)]) -> Vec<Server> {
    let servers = vec![
        member_with_env(etcd, "s1", &["--failure-domain", "rack-a"], env),
        member_with_env(etcd, "s2", &["--failure-domain", "rack-a"], env),
        member_with_env(etcd, "s3", &["--failure-domain", "rack-b"], env),
    ];
    for s in &servers {
        eventually(s, "/api/v2/servers", |_, _| {
            states(s) == all_enabled(&["s1", "s2", "s3"])
        });
    }
    servers
}

/// What `evstor serve --name x` with `extra` arguments printed on stderr when it refused to
/// start (it must).
fn refused_at_start(extra: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("data dir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_evstor"))
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .args(["--name", "x"])
        .args(extra)
        .output()
        .expect("run evstor");
    assert!(!out.status.success(), "{extra:?} was accepted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// etcd that takes only TLS clients with a certificate from its CA: servers given the CA,
/// their certificate and key (`--etcd-cacert`, `--etcd-cert`, `--etcd-key`) make one
/// cluster through it, ordering the journal there; TLS options beside plain-HTTP
/// endpoints, or a certificate without its key, are refused at start with a clear error.
#[test]
fn servers_make_one_cluster_through_etcd_over_tls() {
    let etcd = Etcd::start_tls(1);
    assert!(etcd.endpoints().starts_with("https://"));
    let servers = vec![member(&etcd, "t1", &[]), member(&etcd, "t2", &[])];
    for s in &servers {
        eventually(s, "/api/v2/servers", |_, _| {
            states(s) == all_enabled(&["t1", "t2"])
        });
    }
    let uuid = create_volume(&servers[0], "over-tls", 2);
    let path = format!("/api/v2/projects/default/volumes/{uuid}");
    eventually(&servers[1], &path, |st, v| {
        st == 200 && v["protectionState"] == "FullyProtected"
    });
    assert!(
        etcd.log_batches() > 0,
        "the journal's order is kept in etcd"
    );
    let serve = refused_at_start;
    let ca = etcd.tls_args()[1].clone();
    let err = serve(&["--etcd", "http://127.0.0.1:1", "--etcd-cacert", &ca]);
    assert!(err.contains("are for https:// etcd endpoints"), "{err}");
    let err = serve(&["--etcd", &etcd.endpoints(), "--etcd-cert", &ca]);
    assert!(err.contains("--etcd-key"), "{err}");
}

/// etcd with authentication on: servers signed in as an etcd user who may only read and
/// write the cluster's prefix (`--etcd-user`, `--etcd-password-file`) make one cluster
/// through it; a wrong password stops a server at start with etcd's reason.
#[test]
fn servers_make_one_cluster_as_an_etcd_user() {
    let mut etcd = Etcd::start(1);
    let password = etcd.enable_auth("evstor", "s3cret");
    let args = ["--etcd-user", "evstor", "--etcd-password-file", &password];
    let servers = vec![member(&etcd, "u1", &args), member(&etcd, "u2", &args)];
    for s in &servers {
        eventually(s, "/api/v2/servers", |_, _| {
            states(s) == all_enabled(&["u1", "u2"])
        });
    }
    let uuid = create_volume(&servers[1], "as-a-user", 2);
    let path = format!("/api/v2/projects/default/volumes/{uuid}");
    eventually(&servers[0], &path, |st, v| {
        st == 200 && v["protectionState"] == "FullyProtected"
    });
    assert!(
        etcd.log_batches() > 0,
        "the journal's order is kept in etcd"
    );

    let dir = tempfile::tempdir().expect("dir");
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "not-it\n").expect("password file");
    let wrong = wrong.to_string_lossy();
    let err = refused_at_start(&[
        "--etcd",
        &etcd.endpoints(),
        "--etcd-user",
        "evstor",
        "--etcd-password-file",
        &wrong,
    ]);
    assert!(
        err.contains("\"evstor\"") && err.contains("authentication failed"),
        "{err}"
    );
}

/// A server that cannot listen on its ports refuses to start before it joins: its name
/// stays free, and the same name joins from another data directory afterwards.
#[test]
fn a_server_that_cannot_listen_does_not_join() {
    let etcd = Etcd::start(1);
    let first = member(&etcd, "p1", &[]);
    let taken = format!("127.0.0.1:{}", first.nvme_port);
    let (api, discovery) = (
        format!("127.0.0.1:{}", common::free_port()),
        format!("127.0.0.1:{}", common::free_port()),
    );
    let err = refused_at_start(&[
        "--etcd",
        &etcd.endpoints(),
        "--nvme-addr",
        &taken,
        "--api-addr",
        &api,
        "--discovery-addr",
        &discovery,
    ]);
    assert!(
        err.contains(&taken) && err.contains("not joining the cluster"),
        "{err}"
    );
    // refused_at_start's name, now from a fresh directory on free ports.
    let second = member(&etcd, "x", &[]);
    for s in [&first, &second] {
        eventually(s, "/api/v2/servers", |_, _| {
            states(s) == all_enabled(&["p1", "x"])
        });
    }
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
        // Every copy receives the primary's writes from the start.
        assert_eq!(seen[0]["protectionState"], "FullyProtected");
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
    // A disabled server takes no new volume (three copies need it); enabled, it does again.
    // It may hold the only copy of v1 (placement is by load, then id), so the disable is
    // forced: an unforced one would be refused as a risk of service loss then.
    let s3 = format!("/api/v2/servers/{}", server_id(&servers[2]));
    let (status, body) = servers[0]
        .admin()
        .post(&format!("{s3}/disable"), &json!({"ForceDisable": true}));
    assert_eq!(
        (status, &body["state"]),
        (200, &json!("Disabled")),
        "{body}"
    );
    eventually(&servers[1], &s3, |_, v| v["state"] == "Disabled");
    let (status, body) = servers[1]
        .admin()
        .post("/api/v2/projects/default/volumes", &volume_body("v3b", 3));
    assert_eq!((status, &body["code"]), (400, &json!(3)), "{body}");
    let (status, body) = servers[1].admin().post(&format!("{s3}/enable"), &json!({}));
    assert_eq!((status, &body["state"]), (200, &json!("Enabled")), "{body}");
    // A running server holding volumes is not deleted.
    let (status, body) = servers[0].admin().delete(&s3);
    assert_eq!((status, &body["code"]), (409, &json!(10)), "{body}");
    // One journal: every server verifies and stands on the same head.
    let refs: Vec<&Server> = servers.iter().collect();
    let (seq, _) = same_head(&refs, CONVERGE);
    assert!(seq > 10, "bootstrap, joins and volumes are in the journal");
}

/// A killed server is recorded `Failed` within seconds (a peer that finds its ports closed
/// ends its etcd lease); volumes show it at once (the one
/// whose only copy it held is `NotAvailable` and the cluster's health an error; one of
/// three copies is `Degraded` before anything is written); back, it catches up on what was
/// appended meanwhile and its volumes are whole again.
#[test]
fn a_killed_server_fails_then_catches_up_after_restart() {
    let etcd = Etcd::start(3);
    let mut servers = three(&etcd);
    // Single-copy volumes spread over the three servers: the one on s3 has no other copy.
    let owners = node_owner(&servers[0], &servers);
    let on_s3 = (0..3)
        .map(|i| create_volume(&servers[0], &format!("one{i}"), 1))
        .find(|u| {
            let path = format!("/api/v2/projects/default/volumes/{u}");
            let v = servers[0].admin().get(&path).1;
            owners.get(v["primaryNodeUUID"].as_str().unwrap_or_default()) == Some(&2)
        })
        .expect("three single-copy volumes, one on each server");
    let vol_path = format!("/api/v2/projects/default/volumes/{on_s3}");
    let three_path = format!(
        "/api/v2/projects/default/volumes/{}",
        create_volume(&servers[0], "three", 3)
    );
    servers[2].kill9();
    for s in &servers[..2] {
        eventually(s, "/api/v2/servers", |_, _| {
            states(s).contains(&("s3".to_string(), "Failed".to_string()))
        });
        // Its only copy is gone with it: not available, and the cluster says so.
        let v = s.admin().get(&vol_path).1;
        assert_eq!(v["protectionState"], "NotAvailable", "{v}");
        // A copy of three is on the failed server: degraded at once, written to or not.
        let v = s.admin().get(&three_path).1;
        assert_eq!(v["protectionState"], "Degraded", "{v}");
        let health = &s.admin().get("/api/v2/cluster").1["health"];
        assert_eq!(health["state"], "Error", "{health}");
        assert_eq!(health["numNotAvailableVolumes"], 1, "{health}");
        let nodes = s.admin().get("/api/v2/nodes").1;
        let s3_node = nodes["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .find(|n| n["serverUUID"] == json!(server_id(&servers[2])))
            .cloned()
            .expect("s3's node");
        assert_eq!(s3_node["state"], "Inactive", "{s3_node}");
    }
    // Its ports refuse connections, so a peer ended its etcd lease at once rather than
    // leaving it to expire (which a hung server's does).
    assert!(
        servers[..2].iter().any(|s| s
            .log()
            .contains("the process is gone; ending its etcd lease")),
        "no peer saw s3's process gone"
    );
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
    let v = servers[0].admin().get(&vol_path).1;
    assert_eq!(v["protectionState"], "FullyProtected", "{v}");
    eventually(&servers[0], &three_path, |_, v| {
        v["protectionState"] == "FullyProtected"
    });
    let (_, projects) = servers[2].admin().get("/api/v2/projects?limit=1000");
    let names = projects.to_string();
    assert!(
        names.contains("p0-49") && names.contains("p1-49"),
        "{projects}"
    );
}

/// The volume updates that make `count` events fast: concurrent relabels of one volume,
/// spread over `servers`; returns how many were acknowledged.
fn relabel_many(servers: &[&Server], volume: &str, count: usize, writers: usize) -> usize {
    let path = format!("/api/v2/projects/default/volumes/{volume}");
    let done = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for w in 0..writers {
            let c = servers[w % servers.len()].admin();
            let (path, done) = (&path, &done);
            scope.spawn(move || {
                for i in (w..count).step_by(writers) {
                    let body = json!({"labels": [{"key": "n", "value": format!("v{i}")}]});
                    let (status, v) = c.put(path, &body);
                    assert_eq!(status, 200, "{v}");
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    done.into_inner()
}

fn create_volume(s: &Server, name: &str, replicas: u32) -> String {
    let (status, v) = s.admin().post(
        "/api/v2/projects/default/volumes",
        &volume_body(name, replicas),
    );
    assert_eq!(status, 200, "{v}");
    let uuid = v["UUID"].as_str().expect("UUID").to_string();
    eventually(
        s,
        &format!("/api/v2/projects/default/volumes/{uuid}"),
        |_, v| v["state"] == "Available",
    );
    uuid
}

/// 10 000 events while a server is down; it catches up on restart from the etcd log.
#[test]
fn a_server_down_while_ten_thousand_events_are_appended_catches_up() {
    const EVENTS: usize = 10_000;
    let etcd = Etcd::start(3);
    let mut servers = three(&etcd);
    let volume = create_volume(&servers[0], "busy", 1);
    servers[2].kill9();
    let before = common::cluster::verified_head(&servers[0]).0;
    let live: Vec<&Server> = servers[..2].iter().collect();
    let acknowledged = relabel_many(&live, &volume, EVENTS, 32);
    assert_eq!(acknowledged, EVENTS);
    servers[2].start_again();
    let refs: Vec<&Server> = servers.iter().collect();
    let (seq, _) = same_head(&refs, Duration::from_secs(120));
    assert!(seq >= before + EVENTS as u64, "{seq} < {before} + {EVENTS}");
    let v = servers[2]
        .admin()
        .get(&format!("/api/v2/projects/default/volumes/{volume}"))
        .1;
    assert_eq!(v["state"], "Available", "{v}");
}

/// With a tiny etcd tail, a restarted server and a new one are behind it: both catch up
/// from a peer's checkpoint and reach the same head.
#[test]
fn servers_behind_the_etcd_tail_catch_up_from_a_peer_checkpoint() {
    let etcd = Etcd::start(3);
    let tail = ["--etcd-log-tail-batches", "3"];
    let mut servers = vec![
        member(&etcd, "s1", &tail),
        member(&etcd, "s2", &tail),
        member(&etcd, "s3", &tail),
    ];
    for s in &servers {
        eventually(s, "/api/v2/servers", |_, _| {
            states(s) == all_enabled(&["s1", "s2", "s3"])
        });
    }
    let volume = create_volume(&servers[0], "tail", 1);
    servers[2].kill9();
    // One request at a time: every change is a batch of its own.
    relabel_many(&[&servers[0]], &volume, 40, 1);
    let deadline = Instant::now() + CONVERGE;
    while etcd.log_batches() > 4 {
        assert!(
            Instant::now() < deadline,
            "the leader never trimmed the log"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    servers[2].start_again();
    servers.push(member(&etcd, "s4", &tail));
    for s in &servers[2..] {
        assert!(
            s.log().contains("installed a journal checkpoint"),
            "{}",
            s.log()
        );
    }
    relabel_many(&[&servers[0]], &volume, 5, 1);
    let refs: Vec<&Server> = servers.iter().collect();
    same_head(&refs, CONVERGE);
    for s in &servers {
        eventually(s, "/api/v2/servers", |_, _| {
            states(s) == all_enabled(&["s1", "s2", "s3", "s4"])
        });
    }
}

/// Two servers started at once on an empty prefix: one bootstraps, the other joins. The
/// root key is put in etcd beforehand so neither spends a random time generating one, which
/// makes both decide a bootstrap against the empty log most of the time; attempts go on
/// until one lost that race (at most `ATTEMPTS`), and every attempt must end in one cluster.
#[test]
fn servers_racing_to_bootstrap_make_one_cluster() {
    const ATTEMPTS: usize = 5;
    use rsa::pkcs8::{EncodePrivateKey, LineEnding};
    let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).expect("RSA key");
    let pem = key.to_pkcs8_pem(LineEnding::LF).expect("PEM").to_string();
    for attempt in 1..=ATTEMPTS {
        let etcd = Etcd::start(1);
        let root = format!("{}root-key", common::cluster::PREFIX);
        let put = evstor_control::cluster::etcd::Op::Put {
            key: root.into_bytes(),
            value: pem.clone().into_bytes(),
            lease: 0,
        };
        etcd.client()
            .txn(&[], &[put], &[])
            .expect("seed the root key");
        let (a, b) = std::thread::scope(|scope| {
            let a = scope.spawn(|| member(&etcd, "a", &[]));
            let b = scope.spawn(|| member(&etcd, "b", &[]));
            (a.join().expect("a"), b.join().expect("b"))
        });
        for s in [&a, &b] {
            eventually(s, "/api/v2/servers", |_, _| {
                states(s) == all_enabled(&["a", "b"])
            });
        }
        same_head(&[&a, &b], CONVERGE);
        let inits = common::cluster::events(&a)
            .iter()
            .filter(|e| e["type"] == "ClusterInitialized")
            .count();
        assert_eq!(inits, 1, "exactly one bootstrap");
        let raced = [&a, &b]
            .iter()
            .any(|s| s.log().contains("bootstrapped the cluster first"));
        if raced {
            return;
        }
        eprintln!("attempt {attempt}: the two bootstraps did not overlap");
    }
}

/// Orchestrator events (leader records and health) in journal order, with their epochs.
fn orchestrator_epochs(s: &Server) -> Vec<(String, u64)> {
    common::cluster::events(s)
        .iter()
        .filter_map(|e| {
            let inner = e["event"]
                .as_object()?
                .values()
                .next()?
                .as_object()?
                .values()
                .next()?;
            let epoch = inner.get("epoch")?.as_u64()?;
            Some((e["type"].as_str().unwrap_or_default().to_string(), epoch))
        })
        .collect()
}

/// No orchestrator event of an epoch appears after the first event of a newer epoch.
fn epochs_never_go_back(s: &Server) -> Vec<(String, u64)> {
    let seen = orchestrator_epochs(s);
    let mut newest = 0;
    for (kind, epoch) in &seen {
        assert!(
            *epoch >= newest,
            "{kind} of epoch {epoch} after epoch {newest}: {seen:?}"
        );
        newest = newest.max(*epoch);
    }
    seen
}

/// Index of the server holding the leader key, once one does (and it is not `not`).
fn leader_index(etcd: &Etcd, servers: &[Server], not: Option<usize>) -> usize {
    let ids: Vec<String> = servers.iter().map(server_id).collect();
    let deadline = Instant::now() + CONVERGE;
    loop {
        if let Some(i) =
            common::cluster::leader_id(etcd).and_then(|l| ids.iter().position(|i| *i == l))
        {
            if Some(i) != not {
                return i;
            }
        }
        assert!(Instant::now() < deadline, "no new leader");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The newest epoch recorded in `s`'s journal, waiting until it is newer than `than`.
fn recorded_epoch_above(s: &Server, than: u64) -> u64 {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let newest = orchestrator_epochs(s)
            .iter()
            .filter(|(k, _)| k == "LeaderElected")
            .map(|(_, e)| *e)
            .max()
            .unwrap_or(0);
        if newest > than {
            return newest;
        }
        assert!(
            Instant::now() < deadline,
            "no LeaderElected above epoch {than}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A stopped leader (SIGSTOP past its lease) is replaced; when it resumes it does not act
/// on its old epoch. `ignore_lease` arms the failpoint that makes it try anyway: then its
/// appends must be refused by fencing.
fn stopped_leader_is_fenced(ignore_lease: bool) {
    let etcd = Etcd::start(3);
    let env: &[(&str, &str)] = if ignore_lease {
        &[("EVSTOR_FAILPOINT", "orchestrator-ignore-lease")]
    } else {
        &[]
    };
    // The first server campaigns first and leads.
    let servers = vec![
        common::cluster::member_with_env(&etcd, "s1", &[], env),
        member(&etcd, "s2", &[]),
        member(&etcd, "s3", &[]),
    ];
    let old = leader_index(&etcd, &servers, None);
    assert_eq!(old, 0, "the first server leads");
    let old_epoch = recorded_epoch_above(&servers[1], 0);
    servers[old].signal(libc::SIGSTOP);
    let new = leader_index(&etcd, &servers, Some(old));
    let observer = &servers[3 - old - new];
    let new_epoch = recorded_epoch_above(observer, old_epoch);
    servers[old].signal(libc::SIGCONT);
    // The resumed server catches up and steps down (after a refused append, with the
    // failpoint); every server stays up.
    let deadline = Instant::now() + CONVERGE;
    // Without the failpoint it stops on its lease deadline, before trying anything.
    let wanted = if ignore_lease {
        "append refused"
    } else {
        "the lease may have expired"
    };
    while !servers[old].log().contains(wanted) {
        assert!(Instant::now() < deadline, "{}", servers[old].log());
        std::thread::sleep(Duration::from_millis(200));
    }
    for s in &servers {
        eventually(s, "/api/v2/servers", |_, _| {
            states(s) == all_enabled(&["s1", "s2", "s3"])
        });
    }
    let refs: Vec<&Server> = servers.iter().collect();
    same_head(&refs, CONVERGE);
    if !ignore_lease {
        assert!(
            !servers[old].log().contains("append refused"),
            "{}",
            servers[old].log()
        );
    }
    let seen = epochs_never_go_back(&servers[old]);
    assert!(
        seen.iter()
            .any(|(k, e)| k == "LeaderElected" && *e == new_epoch),
        "{seen:?}"
    );
}

#[test]
fn a_stopped_leader_steps_down_when_it_resumes() {
    stopped_leader_is_fenced(false);
}

#[test]
fn a_stopped_leader_that_ignores_its_lease_is_fenced() {
    stopped_leader_is_fenced(true);
}

#[test]
fn a_killed_leader_is_replaced() {
    let etcd = Etcd::start(3);
    let mut servers = three(&etcd);
    let old = leader_index(&etcd, &servers, None);
    let observer = (old + 1) % 3;
    let old_epoch = recorded_epoch_above(&servers[observer], 0);
    servers[old].kill9();
    let new = leader_index(&etcd, &servers, Some(old));
    assert_ne!(new, old);
    recorded_epoch_above(&servers[observer], old_epoch);
    // The new leader records the old one's failure.
    let name = format!("s{}", old + 1);
    eventually(&servers[observer], "/api/v2/servers", |_, _| {
        states(&servers[observer]).contains(&(name.clone(), "Failed".to_string()))
    });
    epochs_never_go_back(&servers[observer]);
}

/// etcd loses one member: nothing changes. It loses quorum: mutations get 503 with the
/// JSON error body, reads and NVMe/TCP I/O go on. Quorum back: mutations work, and every
/// acknowledged one is on every server.
#[test]
fn etcd_quorum_loss_stops_mutations_only() {
    let mut etcd = Etcd::start(3);
    let servers = three(&etcd);
    let volume = create_volume(&servers[0], "io", 1);
    let path = format!("/api/v2/projects/default/volumes/{volume}");
    let v = servers[0].admin().get(&path).1;
    let owners = node_owner(&servers[0], &servers);
    let primary = &servers[owners[v["primaryNodeUUID"].as_str().expect("primary")]];
    let nqn = primary.admin().get("/api/v2/clusterinfo").1["subsystemNQN"]
        .as_str()
        .expect("NQN")
        .to_string();
    let nsid = v["nsid"].as_u64().expect("nsid") as u32;
    let mut host = Session::connect(
        SocketAddr::from(([127, 0, 0, 1], primary.nvme_port)),
        &nqn,
        HOSTNQN,
    )
    .expect("NVMe/TCP connect");
    let mut acknowledged = Vec::new();
    let mut project = |s: &Server, name: &str| {
        let r = s
            .admin()
            .try_post("/api/v2/projects", &json!({"name": name}))
            .expect("an answer");
        if r.0 == 200 {
            acknowledged.push(name.to_string());
        }
        r
    };
    etcd.kill(0);
    for (i, s) in servers.iter().enumerate() {
        let (status, body) = project(s, &format!("one-down-{i}"));
        assert_eq!(status, 200, "{body}");
    }
    etcd.kill(1);
    for (i, s) in servers.iter().enumerate() {
        let (status, body) = project(s, &format!("no-quorum-{i}"));
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["code"], 14, "{body}");
        assert!(
            body["message"].as_str().is_some_and(|m| m.contains("etcd")),
            "{body}"
        );
        let (status, body) = s.admin().get(&path);
        assert_eq!(
            (status, &body["state"]),
            (200, &json!("Available")),
            "{body}"
        );
    }
    host.write(nsid, 7, &[0x7e; 4096])
        .expect("write without quorum");
    assert_eq!(host.read(nsid, 7, 1).expect("read"), vec![0x7e; 4096]);
    etcd.restart(0);
    etcd.restart(1);
    etcd.wait_ready();
    let deadline = Instant::now() + CONVERGE;
    for (i, s) in servers.iter().enumerate() {
        loop {
            let (status, body) = project(s, &format!("back-{i}"));
            if status == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "{status} {body}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let refs: Vec<&Server> = servers.iter().collect();
    same_head(&refs, CONVERGE);
    for s in &servers {
        let listed = s.admin().get("/api/v2/projects?limit=1000").1.to_string();
        for name in &acknowledged {
            assert!(
                listed.contains(&format!("\"{name}\"")),
                "{name} missing: {listed}"
            );
        }
    }
}

/// A snapshot schedule in a cluster (test clock: an hourly slot every second): each slot
/// fires once, whichever servers' agents look at it, the snapshots appear on every server,
/// and every server reaches the same head. (Retention is 48 test hours, 48 s: with 2 the
/// snapshots could all expire before a slow machine had listed them.)
#[test]
fn a_snapshot_schedule_fires_each_slot_once_in_a_cluster() {
    let etcd = Etcd::start(1);
    let env = [("EVSTOR_SCHEDULE_CLOCK_SCALE", "3600")];
    let servers: Vec<Server> = ["s1", "s2", "s3"]
        .iter()
        .map(|n| member_with_env(&etcd, n, &[], &env))
        .collect();
    for s in &servers {
        eventually(s, "/api/v2/servers", |_, _| {
            states(s) == all_enabled(&["s1", "s2", "s3"])
        });
    }
    let vol = create_volume(&servers[1], "scheduled", 1);
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let body = json!({"name": "every-hour", "resourceUUID": vol,
        "schedulePolicy": {"snapshotSchedulePolicy": {"hourlySchedule": {
            "startTime": evstor_control::api::json::rfc3339(secs * 1_000_000_000),
            "hoursInCycle": 1}}, "retentionTime": "48h"}});
    let (status, p) = servers[2]
        .admin()
        .post("/api/v2/projects/default/resourcePolicies", &body);
    assert_eq!(status, 200, "{p}");
    let slots = |s: &Server| -> Vec<u64> {
        events(s)
            .iter()
            .filter_map(|e| e["event"]["Schedule"]["ResourcePolicyFired"]["slot_unix_ns"].as_u64())
            .collect()
    };
    let deadline = Instant::now() + CONVERGE;
    while slots(&servers[0]).len() < 5 {
        assert!(
            Instant::now() < deadline,
            "the schedule did not fire 5 times"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let (status, v) = servers[0].admin().delete(&format!(
        "/api/v2/projects/default/resourcePolicies/{}",
        p["UUID"].as_str().expect("UUID")
    ));
    assert_eq!(status, 200, "{v}");
    let refs: Vec<&Server> = servers.iter().collect();
    same_head(&refs, CONVERGE);
    let fired = slots(&servers[0]);
    assert!(
        fired.windows(2).all(|w| w[1] > w[0]),
        "a slot fired twice: {fired:?}"
    );
    for s in &servers {
        let (_, list) = s
            .admin()
            .get("/api/v2/projects/default/snapshots?showAll=true");
        let text = list.to_string();
        assert!(
            text.contains("every-hour-"),
            "no scheduled snapshot on a server: {text}"
        );
    }
}

/// The primary's host session on volume `uuid`, as server `ask` knows it: (session, nsid,
/// primary's index).
fn host_on_primary(servers: &[Server], ask: usize, uuid: &str) -> (Session, u32, usize) {
    let v = eventually(
        &servers[ask],
        &format!("/api/v2/projects/default/volumes/{uuid}"),
        |st, v| st == 200 && v["state"] == "Available",
    );
    let owners = node_owner(&servers[ask], servers);
    let p = owners[v["primaryNodeUUID"].as_str().expect("primary")];
    let nqn = servers[p].admin().get("/api/v2/clusterinfo").1["subsystemNQN"]
        .as_str()
        .expect("NQN")
        .to_string();
    let addr = SocketAddr::from(([127, 0, 0, 1], servers[p].nvme_port));
    let host = Session::connect(addr, &nqn, HOSTNQN).expect("NVMe/TCP connect");
    (host, v["nsid"].as_u64().expect("nsid") as u32, p)
}

fn block(seed: u8) -> Vec<u8> {
    (0..4096u32)
        .map(|i| (i as u8).wrapping_mul(7) ^ seed)
        .collect()
}

/// Writes to a volume of three copies land on all three servers before they are
/// acknowledged; a replica killed mid-stream is recorded out of sync (the volume turns
/// `Degraded`) and the primary's writes go on; when it returns it is rebuilt from the
/// chunks it missed (`FullyProtected` again), and all three copies are identical.
#[test]
fn writes_reach_every_copy_and_a_dead_replica_is_rebuilt_when_it_returns() {
    let etcd = Etcd::start(3);
    let mut servers = three(&etcd);
    let uuid = create_volume(&servers[1], "r3", 3);
    let (mut host, nsid, p) = host_on_primary(&servers, 0, &uuid);
    for b in 0..16u64 {
        host.write(nsid, b, &block(b as u8))
            .expect("replicated write");
    }
    host.write_fua(nsid, 16, &block(16)).expect("FUA write");
    host.flush(nsid).expect("flush");
    // Kill one replica: the next writes wait until it is recorded out of sync, then go on.
    let dead = (p + 1) % 3;
    let live = (p + 2) % 3;
    servers[dead].kill9();
    for b in 17..24u64 {
        host.write(nsid, b, &block(b as u8))
            .unwrap_or_else(|e| panic!("write after a replica died: {e}\n{}", servers[p].log()));
    }
    let path = format!("/api/v2/projects/default/volumes/{uuid}");
    let v = eventually(&servers[live], &path, |_, v| {
        v["protectionState"] == "Degraded"
    });
    assert_eq!(v["state"], "Available", "{v}");
    assert_eq!(
        v["rebuildProgress"], "0",
        "its server is down: no rebuild yet"
    );
    let recorded = events(&servers[p])
        .into_iter()
        .filter(|e| e["type"] == "VolumeReplicaOutOfSync")
        .count();
    assert_eq!(recorded, 1, "one replica recorded out of sync");
    // The dead replica comes back and is rebuilt from what it missed (one 1 MiB chunk of
    // the 64 MiB volume), while the host writes on.
    servers[dead].start_again();
    host.write(nsid, 24, &block(24))
        .expect("write during the rebuild");
    let v = eventually(&servers[live], &path, |_, v| {
        v["protectionState"] == "FullyProtected"
    });
    assert_eq!(v["state"], "Available", "{v}");
    // Empty (so left out, as proto3 JSON leaves defaults out): nothing to rebuild.
    assert_eq!(v["rebuildProgress"].as_str().unwrap_or_default(), "", "{v}");
    let rebuilt: Vec<Value> = events(&servers[p])
        .into_iter()
        .filter(|e| e["type"] == "VolumeReplicaInSync")
        .collect();
    assert_eq!(rebuilt.len(), 1, "one rebuild: {rebuilt:?}");
    let copied = rebuilt[0]["event"]["Volume"]["VolumeReplicaInSync"]["copied_bytes"]
        .as_u64()
        .expect("copied_bytes");
    assert!(
        copied > 0 && copied <= 2 << 20,
        "the rebuild copied {copied} bytes, not only what changed"
    );
    host.write(nsid, 25, &block(25))
        .expect("write after the rebuild");
    drop(host);
    for s in servers.iter_mut() {
        s.stop();
    }
    let want: Vec<u8> = (0..26u8).flat_map(block).collect();
    assert_eq!(image_blocks(&servers[p], &uuid, 26), want, "primary");
    assert_eq!(
        image_blocks(&servers[live], &uuid, 26),
        want,
        "replica in sync"
    );
    assert_eq!(
        image_blocks(&servers[dead], &uuid, 26),
        want,
        "rebuilt replica"
    );
}

/// A rebuilt replica takes every write from the end of its rebuild on, also when the
/// state changes (a publication) before the control plane records it in sync: the primary
/// must not drop it then, or the replica is counted in sync while it takes no writes. The
/// failpoint holds the record back 3 s while projects are created, each a publication.
#[test]
fn a_replica_rebuilt_while_the_state_changes_takes_the_writes_after() {
    let etcd = Etcd::start(1);
    let mut servers = three_with_env(
        &etcd,
        &[("EVSTOR_FAILPOINT", "rebuilt-record-delay-ms:3000")],
    );
    let uuid = create_volume(&servers[0], "gap", 2);
    let (mut host, nsid, p) = host_on_primary(&servers, 0, &uuid);
    let path = format!("/api/v2/projects/default/volumes/{uuid}");
    let v = eventually(&servers[p], &path, |_, v| {
        v["protectionState"] == "FullyProtected"
    });
    let owners = node_owner(&servers[p], &servers);
    let r = v["nodeList"]
        .as_array()
        .expect("nodeList")
        .iter()
        .map(|n| owners[n.as_str().expect("node")])
        .find(|s| *s != p)
        .expect("a replica");
    host.write(nsid, 0, &block(0)).expect("replicated write");
    servers[r].kill9();
    host.write(nsid, 1, &block(1))
        .unwrap_or_else(|e| panic!("write after the replica died: {e}\n{}", servers[p].log()));
    eventually(&servers[p], &path, |_, v| {
        v["protectionState"] == "Degraded"
    });
    servers[r].start_again();
    let admin = servers[p].admin();
    let mut made = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while admin.get(&path).1["protectionState"] != "FullyProtected" {
        assert!(
            Instant::now() < deadline,
            "never rebuilt\n{}",
            servers[p].log()
        );
        let (st, body) = admin.post("/api/v2/projects", &json!({"name": format!("p{made}")}));
        assert_eq!(st, 200, "{body}");
        made += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        made >= 8,
        "the record came {made} publications after the rebuild, not 3 s"
    );
    for b in 2..10u64 {
        host.write(nsid, b, &block(b as u8))
            .expect("write after the rebuild");
    }
    drop(host);
    for s in servers.iter_mut() {
        s.stop();
    }
    let want: Vec<u8> = (0..10u8).flat_map(block).collect();
    assert_eq!(image_blocks(&servers[p], &uuid, 10), want, "primary");
    assert!(
        image_blocks(&servers[r], &uuid, 10) == want,
        "the rebuilt replica lacks writes made after its rebuild"
    );
}

/// Sessions to every server's portal for `nqn` (a multipath host), in server order.
fn sessions(servers: &[Server], nqn: &str) -> Vec<Session> {
    servers
        .iter()
        .map(|s| {
            Session::connect(
                SocketAddr::from(([127, 0, 0, 1], s.nvme_port)),
                nqn,
                HOSTNQN,
            )
            .expect("NVMe/TCP connect")
        })
        .collect()
}

fn status_of<T: std::fmt::Debug>(
    r: Result<T, evstor_datapath::initiator::InitiatorError>,
) -> Status {
    match r {
        Err(e) => e
            .status()
            .unwrap_or_else(|| panic!("expected an NVMe status, got {e}")),
        Ok(v) => panic!("expected an NVMe status, got Ok({v:?})"),
    }
}

/// Every server exposes a replicated volume: ANA Optimized on the primary, Inaccessible on
/// the replicas (I/O refused with a path error), with controller IDs unique across servers.
/// When the primary is killed, the leader promotes an in-sync replica (a new epoch): the
/// host's path to it turns optimized, reads what was acknowledged and writes on. The killed
/// server, restarted, is rebuilt from what changed, not copied whole.
#[test]
fn a_killed_primary_fails_over_to_an_in_sync_replica() {
    let etcd = Etcd::start(3);
    let mut servers = three(&etcd);
    let uuid = create_volume(&servers[0], "fo", 3);
    let (_, nsid, p) = host_on_primary(&servers, 0, &uuid);
    let nqn = servers[0].admin().get("/api/v2/clusterinfo").1["subsystemNQN"]
        .as_str()
        .expect("NQN")
        .to_string();
    let path = format!("/api/v2/projects/default/volumes/{uuid}");
    // Replicas expose the namespace once they hold its image.
    let deadline = Instant::now() + CONVERGE;
    let mut hosts = loop {
        let mut hosts = sessions(&servers, &nqn);
        if hosts
            .iter_mut()
            .all(|h| h.active_namespaces().is_ok_and(|n| n.contains(&nsid)))
        {
            break hosts;
        }
        assert!(
            Instant::now() < deadline,
            "not every server exposes nsid {nsid}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let cntlids: BTreeSet<u16> = hosts.iter().map(Session::cntlid).collect();
    assert_eq!(
        cntlids.len(),
        3,
        "controller IDs unique across servers: {cntlids:?}"
    );
    for b in 0..8u64 {
        hosts[p]
            .write(nsid, b, &block(b as u8))
            .expect("write on the primary");
    }
    for (i, h) in hosts.iter_mut().enumerate().filter(|(i, _)| *i != p) {
        assert_eq!(
            status_of(h.read(nsid, 0, 1)),
            Status::ANA_INACCESSIBLE,
            "server {i} is a replica"
        );
    }
    let epoch_before = servers[(p + 1) % 3].admin().get(&path).1["ETag"].clone();
    servers[p].kill9();
    let live: Vec<usize> = (0..3).filter(|i| *i != p).collect();
    let v = eventually(&servers[live[0]], &path, |_, v| {
        v["primaryNodeUUID"] != json!(null)
            && node_owner(&servers[live[0]], &servers)
                .get(v["primaryNodeUUID"].as_str().unwrap_or_default())
                .is_some_and(|o| *o != p)
    });
    assert_ne!(v["ETag"], epoch_before);
    assert_eq!(v["protectionState"], "Degraded", "{v}");
    let owners = node_owner(&servers[live[0]], &servers);
    let q = owners[v["primaryNodeUUID"].as_str().expect("primary")];
    // The new primary's path turns optimized: acknowledged data is there, writes go on.
    let deadline = Instant::now() + CONVERGE;
    let got = loop {
        match hosts[q].read(nsid, 0, 8) {
            Ok(d) => break d,
            Err(e) if e.status() == Some(Status::ANA_INACCESSIBLE) => {
                assert!(Instant::now() < deadline, "the new primary never served");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("read on the new primary: {e}"),
        }
    };
    let want: Vec<u8> = (0..8u8).flat_map(block).collect();
    assert_eq!(got, want, "acknowledged writes survive the failover");
    hosts[q]
        .write(nsid, 8, &block(8))
        .expect("write after failover");
    let other = live
        .iter()
        .copied()
        .find(|i| *i != q)
        .expect("a third server");
    assert_eq!(
        status_of(hosts[other].read(nsid, 0, 1)),
        Status::ANA_INACCESSIBLE
    );
    // The killed server comes back: its copy held every acknowledged write when it was
    // deposed, so it is rebuilt from what the copies changed around the failover and
    // since (chunk 0 of the 64 MiB volume), not copied whole.
    servers[p].start_again();
    eventually(&servers[q], &path, |_, v| {
        v["protectionState"] == "FullyProtected"
    });
    let (_, copied) = volume_events(&servers[q], &uuid);
    assert!(
        copied.len() == 1 && copied[0] > 0 && copied[0] <= 2 << 20,
        "the deposed primary's rebuild copied {copied:?} bytes, not only what changed"
    );
    drop(hosts);
    for s in servers.iter_mut() {
        s.stop();
    }
    let want: Vec<u8> = (0..9u8).flat_map(block).collect();
    assert_eq!(image_blocks(&servers[q], &uuid, 9), want, "new primary");
    assert_eq!(
        image_blocks(&servers[other], &uuid, 9),
        want,
        "replica in sync"
    );
    assert_eq!(
        image_blocks(&servers[p], &uuid, 9),
        want,
        "deposed primary, rebuilt"
    );
}

/// A primary stopped (SIGSTOP) past its lease is replaced; when it resumes, a read that
/// waited for it never returns data the new primary overwrote (its read lease ran out, and
/// the replicas it asks answer that a newer primary exists), a write sent to it is never
/// acknowledged (its replicas fence its epoch, then it learns it is a replica), and the
/// copies in sync hold exactly what was acknowledged.
#[test]
fn a_stopped_primary_that_resumes_acknowledges_nothing() {
    let etcd = Etcd::start(3);
    let mut servers = three(&etcd);
    let uuid = create_volume(&servers[0], "fence", 3);
    let (mut old, nsid, p) = host_on_primary(&servers, 0, &uuid);
    for b in 0..4u64 {
        old.write(nsid, b, &block(b as u8))
            .expect("write on the primary");
    }
    let path = format!("/api/v2/projects/default/volumes/{uuid}");
    servers[p].signal(libc::SIGSTOP);
    let live: Vec<usize> = (0..3).filter(|i| *i != p).collect();
    let owners = node_owner(&servers[live[0]], &servers);
    let v = eventually(&servers[live[0]], &path, |_, v| {
        owners
            .get(v["primaryNodeUUID"].as_str().unwrap_or_default())
            .is_some_and(|o| *o != p)
    });
    let q = owners[v["primaryNodeUUID"].as_str().expect("primary")];
    let (mut new, _, q2) = host_on_primary(&servers, live[0], &uuid);
    assert_eq!(q, q2);
    let deadline = Instant::now() + CONVERGE;
    loop {
        match new.write(nsid, 4, &block(4)) {
            Ok(()) => break,
            Err(e) if e.status() == Some(Status::ANA_INACCESSIBLE) => {
                assert!(Instant::now() < deadline, "the new primary never served");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("write on the new primary: {e}"),
        }
    }
    new.write(nsid, 1, &block(0x11))
        .expect("overwrite on the new primary");
    // A read sent to the stopped primary waits in its socket and is the first thing it
    // sees when it resumes (before it learns it was deposed): it must not return block 1
    // as it was before the new primary overwrote it.
    let reader = std::thread::spawn(move || {
        let r = old.read(nsid, 1, 1);
        (old, r)
    });
    std::thread::sleep(Duration::from_millis(300));
    servers[p].signal(libc::SIGCONT);
    let (mut old, stale_read) = reader.join().expect("reader");
    match stale_read {
        Ok(d) => assert!(d == block(0x11), "a deposed primary served stale data"),
        Err(e) => assert_eq!(e.status(), Some(Status::ANA_INACCESSIBLE), "{e}"),
    }
    // The stale primary's write must fail, whichever way it is refused. (It goes to a
    // chunk nothing else writes: if the stale primary applied it to its own copy, only
    // that copy's record of its changes can tell its rebuild to undo it.)
    let stale = old.write(nsid, STALE_LBA, &block(0xee));
    assert!(stale.is_err(), "a deposed primary acknowledged a write");
    let other = live
        .iter()
        .copied()
        .find(|i| *i != q)
        .expect("a third server");
    eventually(&servers[p], &path, |_, v| {
        owners
            .get(v["primaryNodeUUID"].as_str().unwrap_or_default())
            .is_some_and(|o| *o == q)
    });
    drop((old, new));
    // The deposed primary is rebuilt from what it changed since its replicas last took
    // its writes (its stale write to block 0 included), not copied whole.
    eventually(&servers[q], &path, |_, v| {
        v["protectionState"] == "FullyProtected"
    });
    let (_, copied) = volume_events(&servers[q], &uuid);
    assert!(
        copied.last().is_some_and(|c| *c <= 4 << 20),
        "the resumed primary's rebuild copied {copied:?} bytes of a 64 MiB volume"
    );
    for s in servers.iter_mut() {
        s.stop();
    }
    let want: Vec<u8> = [0, 0x11, 2, 3, 4].into_iter().flat_map(block).collect();
    assert_eq!(image_blocks(&servers[q], &uuid, 5), want, "new primary");
    assert_eq!(
        image_blocks(&servers[other], &uuid, 5),
        want,
        "replica in sync"
    );
    let rebuilt = image_blocks(&servers[p], &uuid, STALE_LBA + 1);
    assert_eq!(rebuilt[..5 * 4096], want, "the deposed primary, rebuilt");
    assert!(
        rebuilt[STALE_LBA as usize * 4096..].iter().all(|b| *b == 0),
        "the deposed primary kept the write it never got acknowledged"
    );
}

/// Where [`a_stopped_primary_that_resumes_acknowledges_nothing`]'s stale write goes: chunk 5.
const STALE_LBA: u64 = 5 * 256 + 7;

/// Disabling the server of a volume's primary hands the volume over to an in-sync replica:
/// the new primary serves only after the old one confirmed it stopped, the old path answers
/// with a path error (a multipath host retries elsewhere, no I/O error), and no
/// acknowledged write is lost.
#[test]
fn disabling_the_primarys_server_hands_the_volume_over() {
    let etcd = Etcd::start(3);
    let servers = three(&etcd);
    let uuid = create_volume(&servers[0], "ho", 3);
    let (mut old, nsid, p) = host_on_primary(&servers, 0, &uuid);
    for b in 0..4u64 {
        old.write(nsid, b, &block(b as u8))
            .expect("write on the primary");
    }
    let ask = (p + 1) % 3;
    let s = format!("/api/v2/servers/{}", server_id(&servers[p]));
    let (status, body) = servers[ask]
        .admin()
        .post(&format!("{s}/disable"), &json!({}));
    assert_eq!(status, 200, "{body}");
    let path = format!("/api/v2/projects/default/volumes/{uuid}");
    let owners = node_owner(&servers[ask], &servers);
    let v = eventually(&servers[ask], &path, |_, v| {
        owners
            .get(v["primaryNodeUUID"].as_str().unwrap_or_default())
            .is_some_and(|o| *o != p)
    });
    let q = owners[v["primaryNodeUUID"].as_str().expect("primary")];
    let (mut new, _, q2) = host_on_primary(&servers, ask, &uuid);
    assert_eq!(q, q2);
    let deadline = Instant::now() + CONVERGE;
    let got = loop {
        match new.read(nsid, 0, 4) {
            Ok(d) => break d,
            Err(e) if e.status() == Some(Status::ANA_INACCESSIBLE) => {
                assert!(Instant::now() < deadline, "the new primary never served");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("read on the new primary: {e}"),
        }
    };
    assert_eq!(got, (0..4u8).flat_map(block).collect::<Vec<u8>>());
    new.write(nsid, 4, &block(4))
        .expect("write on the new primary");
    assert_eq!(
        status_of(old.write(nsid, 5, &block(5))),
        Status::ANA_INACCESSIBLE,
        "the old primary's path is a path error, not an I/O error"
    );
    let kinds: Vec<String> = events(&servers[q])
        .into_iter()
        .filter_map(|e| e["type"].as_str().map(str::to_string))
        .filter(|t| t.starts_with("VolumePrimary"))
        .collect();
    assert_eq!(kinds, ["VolumePrimaryHandedOver", "VolumePrimaryReleased"]);
}

/// An eviction whose copies have nowhere to go (three copies on three servers) keeps
/// trying and says why; once it moved nothing for `EvictionNoProgressTimeout` the leader
/// ends it `Failed` (event `ServerEvictionFailed`), and the server keeps its copies.
#[test]
fn an_eviction_without_progress_fails_after_its_timeout() {
    let etcd = Etcd::start(1);
    let servers = three(&etcd);
    let uuid = create_volume(&servers[0], "stuck", 3);
    let c = servers[1].admin();
    let (status, body) = c.put(
        "/api/v2/clusterConfig/EvictionNoProgressTimeout",
        &json!({"configParam": {"name": "EvictionNoProgressTimeout", "value": "2s"}}),
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = disable(&servers, 1, 0, json!({"evictData": true}));
    assert_eq!(status, 200, "{body}");
    let path = format!("/api/v2/servers/{}", server_id(&servers[0]));
    let s = eventually(&servers[1], &path, |_, s| {
        s["LastEviction"]["status"] == "Failed"
    });
    let e = &s["LastEviction"];
    assert!(e["endTime"].as_str().is_some_and(|t| !t.is_empty()), "{e}");
    let failed = events(&servers[1])
        .into_iter()
        .filter(|e| e["type"] == "ServerEvictionFailed")
        .count();
    assert_eq!(failed, 1, "one failure recorded");
    let holders = common::cluster::holders(&servers, 1, &uuid);
    assert_eq!(holders.len(), 3, "the server keeps its copy: {holders:?}");
}

/// The servers of the eviction and node-replacement tests: B, the one data leaves, A and C.
const B: usize = 0;
const A: usize = 1;
const C: usize = 2;

/// Placement by hand for the eviction and node-replacement tests: with only B enabled, a
/// volume `one` of one copy goes there; with A and B, `name` (two copies) goes to both, the
/// less loaded A first (its primary); then C is enabled too. Returns both volumes' UUIDs
/// and every server's node, by index.
fn one_on_b_two_on_a_and_b(servers: &[Server], name: &str) -> (String, String, Vec<String>) {
    for i in [A, C] {
        assert_eq!(disable(servers, B, i, json!({})).0, 200);
    }
    let one = create_volume(&servers[B], "one", 1);
    assert_eq!(enable(servers, B, A).0, 200);
    let two = create_volume(&servers[B], name, 2);
    assert_eq!(enable(servers, B, C).0, 200);
    let owners = node_owner(&servers[B], servers);
    let nodes: Vec<String> = (0..servers.len())
        .map(|i| {
            owners
                .iter()
                .find(|(_, o)| **o == i)
                .expect("a node")
                .0
                .clone()
        })
        .collect();
    let path = format!("/api/v2/projects/default/volumes/{two}");
    let v = servers[B].admin().get(&path).1;
    assert_eq!(v["nodeList"], json!([nodes[A], nodes[B]]), "{v}");
    (one, two, nodes)
}

/// A block whose content names `seed` (distinct for every write of the eviction test).
fn pattern(seed: u32) -> Vec<u8> {
    let b = seed.to_le_bytes();
    (0..4096usize).map(|i| b[i % 4] ^ (i as u8)).collect()
}

/// POST `/disable` of server `i` with `body`, asked of server `ask`.
fn disable(servers: &[Server], ask: usize, i: usize, body: Value) -> (u16, Value) {
    let path = format!("/api/v2/servers/{}/disable", server_id(&servers[i]));
    servers[ask].admin().post(&path, &body)
}

/// POST `/enable` of server `i`, asked of server `ask`.
fn enable(servers: &[Server], ask: usize, i: usize) -> (u16, Value) {
    let path = format!("/api/v2/servers/{}/enable", server_id(&servers[i]));
    servers[ask].admin().post(&path, &json!({}))
}

/// The event types of volume `uuid` in `s`'s journal after its creation, in order, and
/// the bytes its `VolumeReplicaInSync` events copied.
fn volume_events(s: &Server, uuid: &str) -> (Vec<String>, Vec<u64>) {
    let mut kinds = Vec::new();
    let mut copied = Vec::new();
    for e in events(s) {
        let kind = e["type"].as_str().unwrap_or_default().to_string();
        let body = &e["event"]["Volume"][&kind];
        // Its life after it became available: the moves (progress reports come at the
        // pace of the copy; `rebuild_progress` checks them).
        if body["uuid"] != uuid
            || kind == "VolumeBecameAvailable"
            || kind == "VolumeRebuildProgressed"
        {
            continue;
        }
        if let Some(c) = body["copied_bytes"].as_u64() {
            copied.push(c);
        }
        kinds.push(kind);
    }
    (kinds, copied)
}

/// The rebuild progress of volume `uuid` that `s`'s journal recorded, in order: each a
/// tenth, rising, below 100.
fn rebuild_progress(s: &Server, uuid: &str) -> Vec<u64> {
    let percents: Vec<u64> = events(s)
        .into_iter()
        .filter(|e| e["type"] == "VolumeRebuildProgressed")
        .map(|e| e["event"]["Volume"]["VolumeRebuildProgressed"].clone())
        .filter(|b| b["uuid"] == uuid)
        .filter_map(|b| b["percent"].as_u64())
        .collect();
    assert!(
        percents.windows(2).all(|w| w[0] < w[1])
            && percents.iter().all(|p| p % 10 == 0 && *p > 0 && *p < 100),
        "rebuild progress {percents:?}"
    );
    percents
}

/// Disabling a server with `evictData` moves every copy it holds elsewhere, make before
/// break, while a host writes on: the replica of a two-copy volume moves to the free
/// server (a full copy, then the old one leaves in the decision that records the new one
/// in sync; `FullyProtected` throughout), and a one-copy volume it is the primary of gets
/// a copy elsewhere and is handed over to it. The eviction completes (`LastEviction`), the
/// server releases its images, and the new copies hold every acknowledged write. Disabling
/// it without flags while it holds the only copy of a volume is refused first.
#[test]
fn evicting_a_server_moves_its_copies_make_before_break() {
    let etcd = Etcd::start(3);
    let mut servers = three(&etcd);
    let (b, a, c) = (B, A, C);
    let (one, ev, nodes) = one_on_b_two_on_a_and_b(&servers, "ev");
    let node = |i: usize| nodes[i].clone();
    let ev_path = format!("/api/v2/projects/default/volumes/{ev}");
    let one_path = format!("/api/v2/projects/default/volumes/{one}");
    let (mut host, nsid, p) = host_on_primary(&servers, b, &ev);
    assert_eq!(p, a);
    for k in 0..16u32 {
        host.write(nsid, k.into(), &pattern(k))
            .expect("write before the eviction");
    }
    let (mut one_host, one_nsid, q) = host_on_primary(&servers, b, &one);
    assert_eq!(q, b);
    for k in 0..4u32 {
        one_host
            .write(one_nsid, k.into(), &pattern(1_000_000 + k))
            .expect("write to the one-copy volume");
    }
    drop(one_host);
    // B holds the only copy of `one`: a plain disable is refused and changes nothing.
    let b_path = format!("/api/v2/servers/{}", server_id(&servers[b]));
    let before = servers[a].admin().get(&b_path).1;
    assert_eq!(
        before["RiskOfServiceLossState"],
        "SourceOfRiskOfServiceLoss"
    );
    let (status, err) = disable(&servers, a, b, json!({}));
    assert_eq!((status, &err["code"]), (400, &json!(9)), "{err}");
    assert!(
        err["message"].as_str().unwrap_or_default().contains(&one),
        "{err}"
    );
    assert_eq!(servers[a].admin().get(&b_path).1["state"], "Enabled");
    let b_node_path = format!("/api/v2/nodes/{}", node(b));
    let stats = servers[b].admin().get(&b_node_path).1;
    assert!(
        !stats["statistics"]["logicalUsedStorage"].is_null(),
        "{stats}"
    );
    let (status, body) = disable(&servers, a, b, json!({"evictData": true}));
    assert_eq!(
        (status, &body["state"]),
        (200, &json!("Disabled")),
        "{body}"
    );
    assert_eq!(body["LastEviction"]["status"], "Evicting", "{body}");
    // Writes once the move started (the new copy is being rebuilt, or already in sync):
    // each must reach the new copy, and the volume stays `FullyProtected`.
    eventually(&servers[a], &ev_path, |_, v| {
        v["nodeList"]
            .as_array()
            .is_some_and(|n| n.contains(&json!(node(c))))
    });
    for k in 16..48u32 {
        host.write(nsid, k.into(), &pattern(k))
            .expect("write during the eviction");
        if k % 8 == 0 {
            let v = servers[a].admin().get(&ev_path).1;
            assert_eq!(v["protectionState"], "FullyProtected", "{v}");
        }
    }
    let e = eventually(&servers[a], &b_path, |_, s| {
        s["LastEviction"]["status"] == "Completed"
    })["LastEviction"]
        .clone();
    assert_eq!(e["progress"], 100, "{e}");
    assert!(
        e["startTime"].is_string() && e["endTime"].is_string(),
        "{e}"
    );
    host.write(nsid, 48, &pattern(48))
        .expect("write after the eviction");
    // B released both images (its pool holds nothing now).
    eventually(&servers[b], &b_node_path, |_, n| {
        n["statistics"]["logicalUsedStorage"].is_null()
    });
    let v = servers[b].admin().get(&ev_path).1;
    assert_eq!(v["nodeList"], json!([node(a), node(c)]), "{v}");
    assert_eq!(v["protectionState"], "FullyProtected", "{v}");
    let o = eventually(&servers[b], &one_path, |_, o| {
        o["primaryNodeUUID"] != json!(node(b)) && o["protectionState"] == "FullyProtected"
    });
    let x = nodes
        .iter()
        .position(|n| o["primaryNodeUUID"] == json!(n))
        .expect("the primary's server");
    assert_eq!(o["nodeList"], json!([node(x)]), "{o}");
    let after = servers[c].admin().get(&b_path).1;
    assert_eq!(
        after["RiskOfServiceLossState"], "NoRiskOfServiceLoss",
        "{after}"
    );
    let (moved, copied) = volume_events(&servers[c], &ev);
    rebuild_progress(&servers[c], &ev);
    assert_eq!(
        moved,
        [
            "VolumeReplicaAdded",
            "VolumeReplicaInSync",
            "VolumeReplicaRemoved"
        ],
        "{moved:?}"
    );
    // A full copy of the 64 MiB volume (more if an attempt failed: a retry copies it all
    // again).
    assert!(
        copied.len() == 1 && copied[0] >= 64 << 20,
        "{copied:?}: not a full copy of the 64 MiB volume"
    );
    let (moved, _) = volume_events(&servers[c], &one);
    assert_eq!(
        moved,
        [
            "VolumeReplicaAdded",
            "VolumeReplicaInSync",
            "VolumePrimaryHandedOver",
            "VolumeReplicaRemoved",
            "VolumePrimaryReleased"
        ],
        "{moved:?}"
    );
    drop(host);
    assert_moved_off(&mut servers, b, (&ev, c, a), (&one, x));
}

/// Stops the servers, then checks a move off server `b`: the two-copy volume `moved` (49
/// blocks of `pattern`) is whole on its new copy's server `to` and on its primary's, the
/// one-copy volume `one` (4 blocks) on the server it was handed over to, and `b` holds
/// neither any more.
fn assert_moved_off(
    servers: &mut [Server],
    b: usize,
    (moved, to, primary): (&str, usize, usize),
    (one, one_to): (&str, usize),
) {
    for s in servers.iter_mut() {
        s.stop();
    }
    let want: Vec<u8> = (0..49u32).flat_map(pattern).collect();
    assert_eq!(image_blocks(&servers[to], moved, 49), want, "the new copy");
    assert_eq!(
        image_blocks(&servers[primary], moved, 49),
        want,
        "the primary"
    );
    let one_want: Vec<u8> = (0..4u32).flat_map(|k| pattern(1_000_000 + k)).collect();
    assert_eq!(
        image_blocks(&servers[one_to], one, 4),
        one_want,
        "the handed-over copy"
    );
    let store = open_store(&servers[b]);
    for u in [moved, one] {
        assert!(
            !store.contains(u.parse().expect("uuid")),
            "B still holds {u}"
        );
    }
}

/// A snapshot of a volume of three copies, taken while a host writes, is the same on every
/// copy (`nodeList` names all three). After the primary is killed, a clone of it is made
/// where a copy survives and reads the snapshot's data. Deleted while a server is down,
/// every copy is released, that server's when it is back.
#[test]
fn a_snapshot_is_taken_on_every_copy_and_outlives_its_primary() {
    let etcd = Etcd::start(3);
    // The reconciler logs each copy it releases.
    let log = [("EVSTOR_LOG", "warn,evstor_control::reconcile=info")];
    let mut servers = three_with_env(&etcd, &log);
    let uuid = create_volume(&servers[0], "sv", 3);
    let (mut host, nsid, p) = host_on_primary(&servers, 0, &uuid);
    for b in 0..8u64 {
        host.write(nsid, b, &block(b as u8)).expect("write");
    }
    // Another host writes without pause while the snapshot is taken.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (mut busy, _, _) = host_on_primary(&servers, 0, &uuid);
    let st = stop.clone();
    let writer = std::thread::spawn(move || {
        let mut n = 0u64;
        while !st.load(std::sync::atomic::Ordering::SeqCst) {
            busy.write(nsid, 16 + n % 240, &block(n as u8 ^ 0x5c))
                .expect("write under the snapshot");
            n += 1;
        }
        n
    });
    std::thread::sleep(Duration::from_millis(200));
    let (status, snap) = servers[1].admin().post(
        "/api/v2/projects/default/snapshots",
        &json!({"name": "s1", "sourceVolumeUUID": uuid}),
    );
    assert_eq!(status, 200, "{snap}");
    let snap_uuid = snap["UUID"].as_str().expect("UUID").to_string();
    let snap_path = format!("/api/v2/projects/default/snapshots/{snap_uuid}");
    let snap = eventually(&servers[2], &snap_path, |_, v| v["state"] == "Available");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(writer.join().expect("writer") > 0);
    let owners = node_owner(&servers[0], &servers);
    let mut on: Vec<usize> = snap["nodeList"]
        .as_array()
        .expect("nodeList")
        .iter()
        .map(|n| owners[n.as_str().expect("node")])
        .collect();
    on.sort();
    assert_eq!(on, [0, 1, 2], "every copy holds it: {snap}");
    assert_eq!(
        owners[snap["primaryNodeUUID"].as_str().expect("primary")],
        p
    );
    // After the snapshot, block 0 changes: the snapshot keeps the old data.
    host.write(nsid, 0, &block(0xaa)).expect("write after");
    drop(host);
    // The primary dies; a clone is made from a surviving copy of the snapshot.
    servers[p].kill9();
    let live: Vec<usize> = (0..3).filter(|i| *i != p).collect();
    let path = format!("/api/v2/projects/default/volumes/{uuid}");
    eventually(&servers[live[0]], &path, |_, v| {
        node_owner(&servers[live[0]], &servers)
            .get(v["primaryNodeUUID"].as_str().unwrap_or_default())
            .is_some_and(|o| *o != p)
    });
    let mut body = volume_body("clone", 1);
    body["sourceSnapshotUUID"] = json!(snap_uuid);
    let c = servers[live[0]].admin();
    let (status, clone) = c.post("/api/v2/projects/default/volumes", &body);
    assert_eq!(status, 200, "{clone}");
    let clone_uuid = clone["UUID"].as_str().expect("UUID").to_string();
    let (mut h, cnsid, cp) = host_on_primary(&servers, live[0], &clone_uuid);
    assert_ne!(
        cp, p,
        "the clone lives where a copy of the snapshot survived"
    );
    let want: Vec<u8> = (0..8u8).flat_map(block).collect();
    assert_eq!(h.read(cnsid, 0, 8).expect("read the clone"), want);
    drop(h);
    let clone_path = format!("/api/v2/projects/default/volumes/{clone_uuid}");
    assert_eq!(c.delete(&clone_path).0, 200);
    eventually(&servers[live[0]], &clone_path, |st, _| st == 404);
    // The old primary returns; its copy of the snapshot is the same as the others'.
    servers[p].start_again();
    eventually(&servers[p], &path, |_, v| {
        v["protectionState"] == "FullyProtected"
    });
    for s in servers.iter_mut() {
        s.stop();
    }
    let taken = image_blocks(&servers[p], &snap_uuid, 256);
    assert_eq!(taken[..8 * 4096], want[..]);
    for i in live.iter().copied() {
        assert!(
            image_blocks(&servers[i], &snap_uuid, 256) == taken,
            "server {i}'s copy of the snapshot differs from the primary's"
        );
    }
    // Deleted while a server is down: the live ones release their copies at once, the
    // other when it is back.
    let down = live[1];
    for i in (0..3).filter(|i| *i != down) {
        servers[i].start_again();
    }
    let ask = live[0];
    let c = servers[ask].admin();
    let deadline = Instant::now() + CONVERGE;
    loop {
        match c.delete(&snap_path) {
            (200, _) => break,
            (st, e) => assert!(Instant::now() < deadline, "delete: {st} {e}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eventually(&servers[ask], &snap_path, |st, _| st == 404);
    servers[down].start_again();
    let released = format!("released this node's copy of snapshot {snap_uuid}");
    let deadline = Instant::now() + CONVERGE;
    while !servers[down].log().contains(&released) {
        assert!(Instant::now() < deadline, "{}", servers[down].log());
        std::thread::sleep(Duration::from_millis(200));
    }
    for s in servers.iter_mut() {
        s.stop();
    }
    let id: uuid::Uuid = snap_uuid.parse().expect("uuid");
    for (i, s) in servers.iter().enumerate() {
        assert!(!open_store(s).contains(id), "server {i} still holds it");
    }
}

/// A rollback of a replicated volume is done on every copy holding the snapshot: the
/// replicas roll back with the primary and are in sync again at once (nothing copied), the
/// volume stays `FullyProtected`, and every copy holds the snapshot's data.
#[test]
fn a_rollback_rolls_back_every_copy_holding_the_snapshot() {
    let etcd = Etcd::start(3);
    let mut servers = three(&etcd);
    let uuid = create_volume(&servers[0], "rb", 3);
    let (mut host, nsid, p) = host_on_primary(&servers, 0, &uuid);
    for b in 0..8u64 {
        host.write(nsid, b, &block(b as u8)).expect("write");
    }
    let (status, snap) = servers[1].admin().post(
        "/api/v2/projects/default/snapshots",
        &json!({"name": "before", "sourceVolumeUUID": uuid}),
    );
    assert_eq!(status, 200, "{snap}");
    let snap_uuid = snap["UUID"].as_str().expect("UUID").to_string();
    let snap_path = format!("/api/v2/projects/default/snapshots/{snap_uuid}");
    let snap = eventually(&servers[2], &snap_path, |_, v| v["state"] == "Available");
    assert_eq!(snap["nodeList"].as_array().map(Vec::len), Some(3), "{snap}");
    for b in 0..12u64 {
        host.write(nsid, b, &block(0xa0 | b as u8))
            .expect("overwrite");
    }
    drop(host);
    let path = format!("/api/v2/projects/default/volumes/{uuid}");
    let (status, body) = servers[2].admin().put(
        &format!("{path}/rollback"),
        &json!({"srcSnapshotUUID": snap_uuid}),
    );
    assert_eq!(status, 200, "{body}");
    eventually(&servers[0], &path, |_, v| {
        v["state"] == "Available" && v["protectionState"] == "FullyProtected"
    });
    let (kinds, copied) = volume_events(&servers[p], &uuid);
    let rolled = kinds
        .iter()
        .position(|k| k == "VolumeRollbackRequested")
        .expect("a rollback");
    assert_eq!(
        kinds[rolled..],
        [
            "VolumeRollbackRequested",
            "VolumeReplicaInSync",
            "VolumeReplicaInSync",
            "VolumeRolledBack"
        ],
        "both replicas rolled back with the primary: {kinds:?}"
    );
    assert_eq!(copied, [0, 0], "nothing was copied");
    let (mut host, _, q) = host_on_primary(&servers, 0, &uuid);
    assert_eq!(q, p);
    let want: Vec<u8> = (0..8u8)
        .flat_map(block)
        .chain(std::iter::repeat_n(0, 4 * 4096))
        .collect();
    assert_eq!(
        host.read(nsid, 0, 12).expect("read after the rollback"),
        want
    );
    // Writes go to every copy again.
    host.write(nsid, 20, &block(20))
        .expect("write after the rollback");
    drop(host);
    for s in servers.iter_mut() {
        s.stop();
    }
    let mut want = want;
    want.extend(std::iter::repeat_n(0, 8 * 4096));
    want.extend(block(20));
    for (i, s) in servers.iter().enumerate() {
        assert_eq!(image_blocks(s, &uuid, 21), want, "server {i}'s copy");
    }
}

/// A copy made after snapshots were taken receives them before it is in sync: a two-copy
/// volume with two snapshots moves its copy off a disabled server to the third one, which
/// is recorded holding both (`SnapshotCopied` before its `VolumeReplicaInSync`, shown in
/// their `nodeList`), keeps them, and holds the same data for each as the primary.
#[test]
fn a_new_copy_receives_the_snapshots_taken_before_it() {
    let etcd = Etcd::start(3);
    let mut servers = three(&etcd);
    assert_eq!(disable(&servers, B, C, json!({})).0, 200);
    let uuid = create_volume(&servers[B], "sn", 2);
    assert_eq!(enable(&servers, B, C).0, 200);
    let (mut host, nsid, p) = host_on_primary(&servers, B, &uuid);
    let mut snaps = Vec::new();
    for round in 0..2u8 {
        for b in 0..8u64 {
            let lba = b * 40 + u64::from(round);
            host.write(nsid, lba, &block(round << 4 | b as u8))
                .expect("write");
        }
        let (status, snap) = servers[C].admin().post(
            "/api/v2/projects/default/snapshots",
            &json!({"name": format!("s{round}"), "sourceVolumeUUID": uuid}),
        );
        assert_eq!(status, 200, "{snap}");
        let id = snap["UUID"].as_str().expect("UUID").to_string();
        let path = format!("/api/v2/projects/default/snapshots/{id}");
        eventually(&servers[C], &path, |_, v| v["state"] == "Available");
        snaps.push(id);
    }
    host.write(nsid, 300, &block(0x77)).expect("write after");
    drop(host);
    // The copy that is not the primary leaves its server for C.
    let away = (0..3).find(|i| *i != p && *i != C).expect("the other copy");
    let (status, body) = disable(&servers, B, away, json!({"evictData": true}));
    assert_eq!(status, 200, "{body}");
    let path = format!("/api/v2/projects/default/volumes/{uuid}");
    let owners = node_owner(&servers[B], &servers);
    let c_node = owners
        .iter()
        .find(|(_, i)| **i == C)
        .map(|(n, _)| n.clone())
        .expect("C's node");
    eventually(&servers[C], &path, |_, v| {
        v["protectionState"] == "FullyProtected"
            && v["nodeList"]
                .as_array()
                .is_some_and(|n| n.contains(&json!(c_node)))
            && v["nodeList"].as_array().map(Vec::len) == Some(2)
    });
    for id in &snaps {
        let snap_path = format!("/api/v2/projects/default/snapshots/{id}");
        let snap = servers[C].admin().get(&snap_path).1;
        assert!(
            snap["nodeList"]
                .as_array()
                .is_some_and(|n| n.contains(&json!(c_node))),
            "C holds snapshot {id}: {snap}"
        );
    }
    let kinds: Vec<String> = events(&servers[C])
        .into_iter()
        .map(|e| e["type"].as_str().unwrap_or_default().to_string())
        .filter(|k| k == "SnapshotCopied" || k == "VolumeReplicaInSync")
        .collect();
    assert!(
        kinds.ends_with(&[
            "SnapshotCopied".to_string(),
            "SnapshotCopied".to_string(),
            "VolumeReplicaInSync".to_string()
        ]),
        "{kinds:?}"
    );
    // Nothing releases the copies meanwhile (the reconciler runs on every commit).
    std::thread::sleep(Duration::from_secs(2));
    for s in servers.iter_mut() {
        s.stop();
    }
    for id in &snaps {
        assert!(
            image_blocks(&servers[C], id, 320) == image_blocks(&servers[p], id, 320),
            "C's copy of snapshot {id} differs from the primary's"
        );
    }
    assert!(
        image_blocks(&servers[C], &uuid, 320) == image_blocks(&servers[p], &uuid, 320),
        "C's copy of the volume differs from the primary's"
    );
}

/// POST `/nodes/{src}/replace` of node `src` with `body`, asked of server `ask`, with extra
/// headers.
fn replace_node(
    servers: &[Server],
    ask: usize,
    src: &str,
    body: Value,
    headers: &[(&str, &[u8])],
) -> (u16, Value) {
    let path = format!("/api/v2/nodes/{src}/replace");
    servers[ask]
        .admin()
        .send_with_headers("POST", &path, Some(&body), headers)
}

/// Replacing a node moves every copy it holds to the target node, make before break,
/// while a host writes on: the replica of a two-copy volume (full copy, then the old one
/// leaves as the new one is recorded in sync; `FullyProtected` throughout) and a one-copy
/// volume it is the primary of (a new copy, then a planned hand-over, although its server
/// stays enabled: `ReplaceWhileActive`). The source node shows the progress, ends
/// `Unattached` and releases its images; the target holds every acknowledged write. The
/// refusals come first: unknown nodes 404, the same node or a target holding a copy 400,
/// an active source without `ReplaceWhileActive` 400, a stale `If-Match` 412.
#[test]
fn replacing_a_node_moves_its_copies_to_the_target_make_before_break() {
    let etcd = Etcd::start(3);
    let mut servers = three(&etcd);
    let (b, a, c) = (B, A, C);
    let (one, rv, nodes) = one_on_b_two_on_a_and_b(&servers, "rv");
    let node = |i: usize| nodes[i].clone();
    let rv_path = format!("/api/v2/projects/default/volumes/{rv}");
    let one_path = format!("/api/v2/projects/default/volumes/{one}");
    let (mut host, nsid, p) = host_on_primary(&servers, b, &rv);
    assert_eq!(p, a);
    for k in 0..16u32 {
        host.write(nsid, k.into(), &pattern(k))
            .expect("write before the replacement");
    }
    let (mut one_host, one_nsid, q) = host_on_primary(&servers, b, &one);
    assert_eq!(q, b);
    for k in 0..4u32 {
        one_host
            .write(one_nsid, k.into(), &pattern(1_000_000 + k))
            .expect("write to the one-copy volume");
    }
    drop(one_host);
    let to = |n: String| json!({"TargetNodeUUID": n, "ReplaceWhileActive": true});
    let unknown = uuid::Uuid::new_v4().to_string();
    let refusals = [
        (replace_node(&servers, a, &unknown, to(node(c)), &[]), 404),
        (
            replace_node(&servers, a, &node(b), to(unknown.clone()), &[]),
            404,
        ),
        (replace_node(&servers, a, &node(b), to(node(b)), &[]), 400),
        // A holds a copy of `rv`.
        (replace_node(&servers, a, &node(b), to(node(a)), &[]), 400),
        (
            replace_node(
                &servers,
                a,
                &node(b),
                json!({"TargetNodeUUID": node(c)}),
                &[],
            ),
            400,
        ),
        (
            replace_node(&servers, a, &node(b), to(node(c)), &[("If-Match", b"1")]),
            412,
        ),
    ];
    for ((status, body), want) in refusals {
        assert_eq!(status, want, "{body}");
    }
    let b_node_path = format!("/api/v2/nodes/{}", node(b));
    let before = servers[c].admin().get(&b_node_path).1;
    assert_eq!(before["state"], "Active", "{before}");
    assert!(before["replacement"].is_null(), "{before}");
    let etag = before["ETag"].as_str().expect("ETag").to_string();
    let if_match = [("If-Match", etag.as_bytes())];
    let (status, body) = replace_node(&servers, c, &node(b), to(node(c)), &if_match);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["replacement"]["targetNodeUUID"],
        json!(node(c)),
        "{body}"
    );
    // Writes once the move started: each must reach the new copy.
    eventually(&servers[a], &rv_path, |_, v| {
        v["nodeList"]
            .as_array()
            .is_some_and(|n| n.contains(&json!(node(c))))
    });
    for k in 16..48u32 {
        host.write(nsid, k.into(), &pattern(k))
            .expect("write during the replacement");
        if k % 8 == 0 {
            let v = servers[a].admin().get(&rv_path).1;
            assert_eq!(v["protectionState"], "FullyProtected", "{v}");
        }
    }
    let done = eventually(&servers[a], &b_node_path, |_, n| {
        n["replacement"]["status"] == "Completed"
    });
    assert_eq!(done["state"], "Unattached", "{done}");
    let r = &done["replacement"];
    assert_eq!(r["progress"], 100, "{r}");
    assert!(
        r["startTime"].is_string() && r["endTime"].is_string(),
        "{r}"
    );
    assert_ne!(done["ETag"], json!(etag), "{done}");
    host.write(nsid, 48, &pattern(48))
        .expect("write after the replacement");
    // B released both images; its server stays enabled.
    eventually(&servers[b], &b_node_path, |_, n| {
        n["statistics"]["logicalUsedStorage"].is_null()
    });
    assert_eq!(states(&servers[b]), all_enabled(&["s1", "s2", "s3"]));
    let v = servers[b].admin().get(&rv_path).1;
    assert_eq!(v["nodeList"], json!([node(a), node(c)]), "{v}");
    assert_eq!(v["protectionState"], "FullyProtected", "{v}");
    let o = eventually(&servers[b], &one_path, |_, o| {
        o["primaryNodeUUID"] == json!(node(c)) && o["protectionState"] == "FullyProtected"
    });
    assert_eq!(o["nodeList"], json!([node(c)]), "{o}");
    let (moved, copied) = volume_events(&servers[c], &rv);
    assert_eq!(
        moved,
        [
            "VolumeReplicaAdded",
            "VolumeReplicaInSync",
            "VolumeReplicaRemoved"
        ],
        "{moved:?}"
    );
    assert!(copied.len() == 1 && copied[0] >= 64 << 20, "{copied:?}");
    let (moved, _) = volume_events(&servers[c], &one);
    assert_eq!(
        moved,
        [
            "VolumeReplicaAdded",
            "VolumeReplicaInSync",
            "VolumePrimaryHandedOver",
            "VolumeReplicaRemoved",
            "VolumePrimaryReleased"
        ],
        "{moved:?}"
    );
    let kinds: Vec<String> = events(&servers[a])
        .iter()
        .filter_map(|e| e["type"].as_str())
        .filter(|t| t.starts_with("NodeReplacement"))
        .map(str::to_string)
        .collect();
    assert_eq!(
        kinds,
        ["NodeReplacementStarted", "NodeReplacementCompleted"]
    );
    drop(host);
    assert_moved_off(&mut servers, b, (&rv, c, a), (&one, c));
}

/// The node of server `uuid`, as `s` lists it.
fn node_of_server(s: &Server, uuid: &str) -> Value {
    let (_, nodes) = s.admin().get("/api/v2/nodes");
    nodes["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["serverUUID"] == uuid)
        .cloned()
        .unwrap_or_else(|| panic!("no node of server {uuid}: {nodes}"))
}

/// `POST /servers` pre-registers a server by the address its process will publish: it is
/// listed `Creating` (no health is recorded for it) until `evstor serve` starts with that
/// `--api-addr`; the process joins under the created UUID and shows `Enabled`. Created
/// without `extendCluster`, its node is `Unattached`: no volume is placed there, but it can
/// take over a node by replace. A process started without `CreateServer` joins as before.
/// Refusals: several, no or bad endpoints and a bad UUID 400; a UUID or an endpoint in use
/// 409.
#[test]
fn a_server_created_through_the_api_joins_when_its_process_starts() {
    let etcd = Etcd::start(1);
    let s1 = member(&etcd, "s1", &[]);
    eventually(&s1, "/api/v2/servers", |_, _| {
        states(&s1) == all_enabled(&["s1"])
    });
    let admin = s1.admin();
    let port = common::free_port();
    let created = uuid::Uuid::new_v4().to_string();
    let endpoint = format!("https://127.0.0.1:{port}");
    let body = |eps: Value, uuid: &str| json!({"serverEndpoints": eps, "serverUUID": uuid});
    let s1_api = format!("127.0.0.1:{}", s1.api_port);
    for (b, want) in [
        (body(json!([endpoint, "127.0.0.1:1"]), &created), 400),
        (body(json!([]), &created), 400),
        (body(json!(["127.0.0.1"]), &created), 400),
        (body(json!([endpoint]), "x"), 400),
        (body(json!([s1_api]), &created), 409),
        (body(json!([endpoint]), &server_id(&s1)), 409),
    ] {
        let (status, err) = admin.post("/api/v2/servers", &b);
        assert_eq!(status, want, "{b}: {err}");
    }
    let mut b = body(json!([endpoint]), &created);
    b["extendCluster"] = json!(false);
    let (status, s) = admin.post("/api/v2/servers", &b);
    assert_eq!(status, 200, "{s}");
    assert_eq!(
        (&s["UUID"], &s["state"]),
        (&json!(created), &json!("Creating")),
        "{s}"
    );
    assert_eq!(s["ServerEndpoints"], json!([format!("127.0.0.1:{port}")]));
    let other = uuid::Uuid::new_v4().to_string();
    let (status, err) = admin.post("/api/v2/servers", &body(json!([endpoint]), &other));
    assert_eq!(status, 409, "{err}");
    let path = format!("/api/v2/servers/{created}");
    // The leader's orchestrator passes (every 500 ms) record no health for it: it has no
    // process yet, so it is not `Failed`.
    std::thread::sleep(Duration::from_secs(3));
    let creating = admin.get(&path).1;
    assert_eq!(
        (&creating["state"], &creating["health"]),
        (&json!("Creating"), &json!("OK")),
        "{creating}"
    );
    // Its process takes the created UUID and is Enabled once joined.
    let options = common::Options {
        api_port: Some(port),
        ..common::Options::default()
    };
    let s2 = member_with(&etcd, "s2", options);
    assert_eq!(server_id(&s2), created);
    let joined = eventually(&s1, &path, |_, s| s["state"] == "Enabled");
    assert_eq!(joined["name"], "s2", "{joined}");
    // Not extending the cluster: its node is Unattached and takes no volume.
    let n2 = node_of_server(&s1, &created);
    assert_eq!(n2["state"], "Unattached", "{n2}");
    let n2 = n2["UUID"].as_str().expect("UUID").to_string();
    let v = create_volume(&s1, "v", 1);
    let (status, err) = admin.post("/api/v2/projects/default/volumes", &volume_body("two", 2));
    assert_eq!(status, 400, "{err}");
    // It takes over s1's node.
    let n1 = node_of_server(&s1, &server_id(&s1))["UUID"]
        .as_str()
        .expect("UUID")
        .to_string();
    let (status, r) = admin.post(
        &format!("/api/v2/nodes/{n1}/replace"),
        &json!({"TargetNodeUUID": n2, "ReplaceWhileActive": true}),
    );
    assert_eq!(status, 200, "{r}");
    eventually(&s2, &format!("/api/v2/nodes/{n1}"), |_, n| {
        n["state"] == "Unattached" && n["replacement"]["status"] == "Completed"
    });
    let vol = eventually(
        &s2,
        &format!("/api/v2/projects/default/volumes/{v}"),
        |_, v| v["nodeList"] == json!([n2]) && v["primaryNodeUUID"] == json!(n2),
    );
    assert_eq!(vol["protectionState"], "FullyProtected", "{vol}");
    assert_eq!(node_of_server(&s2, &created)["state"], "Active");
    // A server started without CreateServer joins under its own id, as before.
    let s3 = member(&etcd, "s3", &[]);
    eventually(&s1, "/api/v2/servers", |_, _| {
        states(&s1) == all_enabled(&["s1", "s2", "s3"])
    });
    assert_ne!(server_id(&s3), created);
    let mut kinds = Vec::new();
    for e in events(&s1) {
        let kind = e["type"].as_str().unwrap_or_default().to_string();
        if e["event"]["Inventory"][&kind]["uuid"] == json!(created) {
            kinds.push(kind);
        }
    }
    assert_eq!(
        kinds,
        ["ServerCreated", "ServerRegistered", "CreatedServerJoined"],
        "no health was recorded for the server while it was being created"
    );
    // Every member's rows (node roles, created servers) are what its events replay to.
    same_head(&[&s1, &s2, &s3], CONVERGE);
}
