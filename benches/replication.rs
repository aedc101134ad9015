//! Replication and failover on a real three-server cluster (one etcd member and three
//! `evstor serve --etcd` processes on loopback, the same harness as `tests/cluster.rs`):
//!
//! - 4k random writes at QD32 on one queue to volumes of 1, 2 and 3 copies, on the primary
//!   (IOPS, p50/p99 latency, and the ratio to one copy);
//! - failover time: from kill -9 of a volume's primary to the first write completed on the
//!   promoted replica's path (the host polls every server's path, as multipath would).
//!
//! Prints figures, asserts nothing. Everything shares this machine's CPUs (three servers,
//! etcd and the initiator), so the ratios say more than the absolute figures.
//!
//! ```sh
//! cargo bench --bench replication            # REPL_SECS (default 5) per volume
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::cluster::{member, server_id, Etcd};
use common::Server;
use evstor_datapath::initiator::{write_cmd, Data, Options, Session};
use serde_json::{json, Value};

const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:be7cbe7c-0000-4000-8000-00000000be7c";
const VOLUME_BLOCKS: u64 = (256 << 20) / 4096;
const QD: u16 = 32;

fn main() -> anyhow::Result<()> {
    let secs: f64 = std::env::var("REPL_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let etcd = Etcd::start(1);
    let mut servers: Vec<Server> = ["b1", "b2", "b3"]
        .iter()
        .map(|n| member(&etcd, n, &[]))
        .collect();
    wait_enabled(&servers[0]);
    let nqn = servers[0].admin().get("/api/v2/clusterinfo").1["subsystemNQN"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    println!("replication: 4k randwrite QD{QD}, one queue, {secs} s per volume");
    let mut base = None;
    for copies in 1..=3u32 {
        let (uuid, nsid) = create(&servers[0], &format!("r{copies}"), copies)?;
        let p = primary(&servers, 0, &uuid);
        let (iops, p50, p99) = randwrite(&servers[p], &nqn, nsid, secs)?;
        let ratio = iops / *base.get_or_insert(iops);
        println!(
            "replicaCount {copies}: {iops:>9.0} IOPS  p50 {p50:>6.0} µs  p99 {p99:>6.0} µs  \
             ({ratio:.2}x one copy)"
        );
    }
    let (uuid, nsid) = create(&servers[0], "failover", 2)?;
    let p = primary(&servers, 0, &uuid);
    let mut paths: Vec<Option<Session>> = servers
        .iter()
        .map(|s| Session::connect(portal(s), &nqn, HOSTNQN).ok())
        .collect();
    let block = vec![0x5au8; 4096];
    if let Some(s) = paths[p].as_mut() {
        s.write(nsid, 0, &block)?;
    }
    paths[p] = None;
    let killed = Instant::now();
    servers[p].kill9();
    let deadline = killed + Duration::from_secs(60);
    let took = 'found: loop {
        for s in paths.iter_mut().flatten() {
            if s.write(nsid, 1, &block).is_ok() {
                break 'found killed.elapsed();
            }
        }
        if Instant::now() > deadline {
            for s in servers.iter().filter(|s| s.pid().is_some()) {
                let log = s.log();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                eprintln!(
                    "--- a live server's log (last lines, newest first):\n{}",
                    tail.join("\n")
                );
            }
            anyhow::bail!("no path served within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    println!(
        "failover: kill -9 of the primary to the first write completed on the new path: \
         {:.2} s (the leader declares a server failed when its etcd lease lapses)",
        took.as_secs_f64()
    );
    Ok(())
}

fn wait_enabled(s: &Server) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.admin().get("/api/v2/servers").1["servers"]
        .as_array()
        .is_none_or(|v| v.iter().filter(|s| s["state"] == "Enabled").count() < 3)
    {
        assert!(Instant::now() < deadline, "three servers never enabled");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn portal(s: &Server) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], s.nvme_port))
}

/// Creates a volume of `copies` copies; returns its UUID and nsid once it is available.
fn create(s: &Server, name: &str, copies: u32) -> anyhow::Result<(String, u32)> {
    let body = json!({"name": name, "size": "256 MiB", "replicaCount": copies,
                      "acl": {"values": ["ALLOW_ANY"]}});
    let (status, v) = s.admin().post("/api/v2/projects/default/volumes", &body);
    anyhow::ensure!(status == 200, "create {name}: {v}");
    let uuid = v["UUID"].as_str().unwrap_or_default().to_string();
    let v = s.wait_for(
        &format!("/api/v2/projects/default/volumes/{uuid}"),
        |_, v| v["state"] == "Available",
    );
    Ok((uuid, v["nsid"].as_u64().unwrap_or_default() as u32))
}

/// Index of the volume's primary's server, as server `ask` sees it.
fn primary(servers: &[Server], ask: usize, uuid: &str) -> usize {
    let c = servers[ask].admin();
    let v = c.get(&format!("/api/v2/projects/default/volumes/{uuid}")).1;
    let nodes = c.get("/api/v2/nodes").1;
    let server: Value = nodes["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["UUID"] == v["primaryNodeUUID"])
        .map(|n| n["serverUUID"].clone())
        .unwrap_or(Value::Null);
    servers
        .iter()
        .position(|s| json!(server_id(s)) == server)
        .unwrap_or(0)
}

/// 4k random writes at QD32 for `secs`; (IOPS, p50 µs, p99 µs).
fn randwrite(s: &Server, nqn: &str, nsid: u32, secs: f64) -> anyhow::Result<(f64, f64, f64)> {
    let opts = Options {
        queue_depth: QD,
        slot_bytes: 4096,
        ..Options::default()
    };
    let mut session = Session::connect_with(portal(s), nqn, HOSTNQN, &opts)?;
    let q = &mut session.io_queues()[0];
    let data = vec![0xa5u8; 4096];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % VOLUME_BLOCKS
    };
    let mut issued = vec![Instant::now(); q.depth()];
    let mut lat = Vec::with_capacity(1 << 20);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    while q.in_flight() < QD as usize {
        let cid = q.submit(write_cmd(nsid, next(), 1, false), Data::ToTarget(&data))?;
        issued[cid as usize] = Instant::now();
    }
    let mut done = 0u64;
    while q.in_flight() > 0 {
        let c = q.reap()?;
        anyhow::ensure!(c.status.is_success(), "write failed: {:?}", c.status);
        let now = Instant::now();
        lat.push((now - issued[c.cid as usize]).as_micros() as f64);
        done += 1;
        if now < end {
            let cid = q.submit(write_cmd(nsid, next(), 1, false), Data::ToTarget(&data))?;
            issued[cid as usize] = Instant::now();
        }
    }
    let took = start.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    Ok((done as f64 / took, pct(0.5), pct(0.99)))
}
