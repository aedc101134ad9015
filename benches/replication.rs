//! Replication and failover on a real three-server cluster (one etcd member and three
//! `evstor serve --etcd` processes on loopback, the same harness as `tests/cluster.rs`):
//!
//! - 4k random writes at QD32 on one queue to volumes of 1, 2 and 3 copies, on the primary
//!   (IOPS, p50/p99 latency, the ratio to one copy, and the CPU time per write of the
//!   primary's process and of all three servers together, from `/proc/<pid>/stat`);
//! - failover time: from kill -9 of a volume's primary to the first write completed on the
//!   promoted replica's path (the host polls every server's path, as multipath would),
//!   `REPL_FAILOVERS` times (default 3; says whether the killed server led the cluster);
//! - rebuild: a replica's server killed while 4k random writes (QD8, over the first 64 MiB
//!   of a 256 MiB volume) go on, restarted after `REPL_OUTAGE_SECS`; the time from its
//!   restart to `FullyProtected` (start-up and catch-up included), the bytes the rebuild
//!   copied (from `VolumeReplicaInSync`) and the rate that makes.
//!
//! Prints figures, asserts nothing. Everything shares this machine's CPUs (three servers,
//! etcd and the initiator), so the ratios say more than the absolute figures.
//!
//! ```sh
//! cargo bench --bench replication   # REPL_SECS (default 5) per volume, REPL_OUTAGE_SECS (30)
//! REPL_ONLY=failover cargo bench --bench replication   # the failover rounds alone
//! REPL_DEVICES=shm cargo bench --bench replication     # pools on /dev/shm, not the disk
//! ```
//!
//! By default each server's pool is a file in its data directory (on this machine, a disk:
//! the writes then wait on it); `REPL_DEVICES=shm` puts the pools on `/dev/shm`, which
//! leaves the CPU (the servers' and the replication's) as what bounds the figures.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{events, holders, leader_id, member, server_id, Etcd};
use common::Server;
use evstor_datapath::initiator::{write_cmd, Data, Options, Session};
use serde_json::json;

const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:be7cbe7c-0000-4000-8000-00000000be7c";
const VOLUME_BLOCKS: u64 = (256 << 20) / 4096;
const QD: u16 = 32;

fn main() -> anyhow::Result<()> {
    let secs: f64 = std::env::var("REPL_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let etcd = Etcd::start(1);
    let shm = std::env::var("REPL_DEVICES").is_ok_and(|v| v == "shm");
    let shm_dir = shm.then(|| tempfile::tempdir_in("/dev/shm")).transpose()?;
    let mut servers: Vec<Server> = ["b1", "b2", "b3"]
        .iter()
        .map(|n| match &shm_dir {
            Some(d) => {
                let dev = d.path().join(format!("{n}.img"));
                member(&etcd, n, &["--device", &dev.to_string_lossy()])
            }
            None => member(&etcd, n, &[]),
        })
        .collect();
    if shm {
        println!("pools on /dev/shm");
    }
    wait_enabled(&servers[0]);
    let nqn = servers[0].admin().get("/api/v2/clusterinfo").1["subsystemNQN"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let failover_only = std::env::var("REPL_ONLY").is_ok_and(|v| v == "failover");
    if !failover_only {
        println!("replication: 4k randwrite QD{QD}, one queue, {secs} s per volume");
    }
    let mut base = None;
    for copies in (1..=3u32).filter(|_| !failover_only) {
        let (uuid, nsid) = create(&servers[0], &format!("r{copies}"), copies)?;
        let p = primary(&servers, 0, &uuid);
        let before: Vec<f64> = servers.iter().map(cpu_secs).collect();
        let w = randwrite(portal(&servers[p]), &nqn, nsid, secs)?;
        let used: Vec<f64> = servers
            .iter()
            .zip(&before)
            .map(|(s, b)| cpu_secs(s) - b)
            .collect();
        let per_write = |cpu: f64| cpu * 1e6 / w.writes as f64;
        let ratio = w.iops / *base.get_or_insert(w.iops);
        println!(
            "replicaCount {copies}: {:>9.0} IOPS  p50 {:>6.0} µs  p99 {:>6.0} µs  \
             ({ratio:.2}x one copy); CPU per write: primary {:.1} µs, all servers {:.1} µs",
            w.iops,
            w.p50,
            w.p99,
            per_write(used[p]),
            per_write(used.iter().sum()),
        );
    }
    if !failover_only {
        rebuild_after_outage(&mut servers, &nqn)?;
    }
    let rounds: usize = std::env::var("REPL_FAILOVERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    for round in 0..rounds {
        failover(&mut servers, &etcd, &nqn, round)?;
    }
    Ok(())
}

/// Kills the primary of a new volume of two copies and times the first write completed on
/// the promoted replica's path; then brings the server back for the next round.
fn failover(servers: &mut [Server], etcd: &Etcd, nqn: &str, round: usize) -> anyhow::Result<()> {
    let (uuid, nsid) = create(&servers[0], &format!("failover{round}"), 2)?;
    let p = primary(servers, 0, &uuid);
    let led = leader_id(etcd) == Some(server_id(&servers[p]));
    eprintln!("failover {round}: volume {uuid}, primary on server {p}");
    let block = vec![0x5au8; 4096];
    Session::connect(portal(&servers[p]), nqn, HOSTNQN)?.write(nsid, 0, &block)?;
    // Only a volume whose replica has the write can fail over (a replica that was still
    // creating its image when the write came is rebuilt first).
    let path = format!("/api/v2/projects/default/volumes/{uuid}");
    servers[0].wait_for(&path, |_, v| v["protectionState"] == "FullyProtected");
    // The host's other paths, connected now (an idle session may have been torn down by
    // its keep-alive timeout while the volume was being protected).
    let mut paths: Vec<Option<Session>> = (0..servers.len())
        .map(|i| {
            if i == p {
                None
            } else {
                Session::connect(portal(&servers[i]), nqn, HOSTNQN).ok()
            }
        })
        .collect();
    let missing: Vec<usize> = (0..paths.len())
        .filter(|i| *i != p && paths[*i].is_none())
        .collect();
    anyhow::ensure!(missing.is_empty(), "no session to servers {missing:?}");
    // The primary dies busy (4k writes at QD8), so its replicas owe it a fresh read lease.
    let stop = Arc::new(AtomicBool::new(false));
    let (addr, nqn2, flag) = (portal(&servers[p]), nqn.to_string(), stop.clone());
    let busy = std::thread::spawn(move || load(addr, &nqn2, nsid, &flag));
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    servers[p].kill9();
    let deadline = killed + Duration::from_secs(60);
    let took = 'found: loop {
        for (i, path) in paths.iter_mut().enumerate().filter(|(i, _)| *i != p) {
            let Some(s) = path.as_mut() else {
                *path = Session::connect(portal(&servers[i]), nqn, HOSTNQN).ok();
                continue;
            };
            match s.write(nsid, 1, &block) {
                Ok(()) => break 'found killed.elapsed(),
                // A path error (inaccessible, not ready): the path stays, as multipath's would.
                Err(e) if e.status().is_some() => {}
                // The session itself broke: connect again, as the kernel would.
                Err(_) => *path = Session::connect(portal(&servers[i]), nqn, HOSTNQN).ok(),
            }
        }
        if Instant::now() > deadline {
            for (i, s) in servers.iter().enumerate() {
                let log = s.log();
                let cluster: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("evstor_control::cluster") || l.starts_with("evstor:"))
                    .collect();
                eprintln!(
                    "--- server {i} ({}) log, cluster lines:\n{}",
                    server_id(s),
                    cluster.join("\n")
                );
            }
            if let Some(s) = servers.iter().find(|s| s.pid().is_some()) {
                let c = s.admin();
                eprintln!("volume: {}", c.get(&path).1);
                eprintln!("servers: {}", c.get("/api/v2/servers").1);
            }
            anyhow::bail!("no path served within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    println!(
        "failover {round}: kill -9 of the primary ({}, under 4k writes at QD8) to the first \
         write completed on the new path: {:.2} s",
        if led {
            "the cluster's leader"
        } else {
            "not the leader"
        },
        took.as_secs_f64()
    );
    stop.store(true, Ordering::Relaxed);
    let _ = busy.join();
    drop(paths);
    servers[p].start_again();
    wait_enabled(&servers[(p + 1) % servers.len()]);
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
    holders(servers, ask, uuid).first().copied().unwrap_or(0)
}

/// A replica's server is killed under write load and restarted after the outage: how long
/// until the volume is `FullyProtected` again, and what the rebuild copied.
fn rebuild_after_outage(servers: &mut [Server], nqn: &str) -> anyhow::Result<()> {
    let outage: f64 = std::env::var("REPL_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30.0);
    let (uuid, nsid) = create(&servers[0], "rebuild", 2)?;
    let copies = holders(servers, 0, &uuid);
    let (p, r) = match copies[..] {
        [p, r] => (p, r),
        _ => anyhow::bail!("the volume's copies are on {copies:?}"),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (addr, nqn2, flag) = (portal(&servers[p]), nqn.to_string(), stop.clone());
    let load = std::thread::spawn(move || load(addr, &nqn2, nsid, &flag));
    std::thread::sleep(Duration::from_secs(2));
    servers[r].kill9();
    std::thread::sleep(Duration::from_secs_f64(outage));
    servers[r].start_again();
    let back = Instant::now();
    let path = format!("/api/v2/projects/default/volumes/{uuid}");
    let deadline = back + Duration::from_secs(300);
    while servers[p].admin().get(&path).1["protectionState"] != "FullyProtected" {
        anyhow::ensure!(Instant::now() < deadline, "not FullyProtected within 300 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = back.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let (writes, errors) = load.join().map_err(|_| anyhow::anyhow!("load thread"))??;
    let rebuilds: Vec<u64> = events(&servers[p])
        .into_iter()
        .filter_map(|e| {
            let ev = &e["event"]["Volume"]["VolumeReplicaInSync"];
            (ev["uuid"] == json!(uuid)).then(|| ev["copied_bytes"].as_u64().unwrap_or(0))
        })
        .collect();
    let copied: u64 = rebuilds.iter().sum();
    let progress: Vec<u64> = events(&servers[p])
        .into_iter()
        .filter_map(|e| {
            let ev = &e["event"]["Volume"]["VolumeRebuildProgressed"];
            (ev["uuid"] == json!(uuid)).then(|| ev["percent"].as_u64().unwrap_or(0))
        })
        .collect();
    println!(
        "rebuild: replica down {outage:.0} s under 4k randwrite QD8 over 64 MiB \
         ({writes} writes, {errors} failed); FullyProtected {took:.2} s after its server \
         restarted; {} rebuild(s) copied {:.1} MiB of 256 MiB, {:.1} MB/s over that time; \
         progress recorded at {progress:?} %",
        rebuilds.len(),
        copied as f64 / (1 << 20) as f64,
        copied as f64 / 1e6 / took
    );
    Ok(())
}

/// 4k random writes at QD8 over the first 64 MiB until `stop`; (writes done, failed).
fn load(addr: SocketAddr, nqn: &str, nsid: u32, stop: &AtomicBool) -> anyhow::Result<(u64, u64)> {
    const REGION: u64 = (64 << 20) / 4096;
    let opts = Options {
        queue_depth: 8,
        slot_bytes: 4096,
        ..Options::default()
    };
    let mut session = Session::connect_with(addr, nqn, HOSTNQN, &opts)?;
    let q = &mut session.io_queues()[0];
    let data = vec![0x3cu8; 4096];
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % REGION
    };
    let (mut done, mut failed) = (0u64, 0u64);
    while q.in_flight() < 8 {
        q.submit(write_cmd(nsid, next(), 1, false), Data::ToTarget(&data))?;
    }
    while q.in_flight() > 0 {
        let c = q.reap()?;
        if c.status.is_success() {
            done += 1;
        } else {
            failed += 1;
        }
        if !stop.load(Ordering::Relaxed) {
            q.submit(write_cmd(nsid, next(), 1, false), Data::ToTarget(&data))?;
        }
    }
    Ok((done, failed))
}

/// CPU seconds (user + system) the server's process has used so far (0 if it is gone).
fn cpu_secs(s: &Server) -> f64 {
    let Some(stat) = s
        .pid()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
    else {
        return 0.0;
    };
    // After the command name's closing parenthesis: field 3 (state) onwards; utime and
    // stime are fields 14 and 15.
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|t| t.parse::<f64>().ok()))
        .sum();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks / hz
}

/// What a write run measured.
struct Writes {
    iops: f64,
    p50: f64,
    p99: f64,
    writes: u64,
}

/// 4k random writes at QD32 for `secs`.
fn randwrite(addr: SocketAddr, nqn: &str, nsid: u32, secs: f64) -> anyhow::Result<Writes> {
    let opts = Options {
        queue_depth: QD,
        slot_bytes: 4096,
        ..Options::default()
    };
    let mut session = Session::connect_with(addr, nqn, HOSTNQN, &opts)?;
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
    Ok(Writes {
        iops: done as f64 / took,
        p50: pct(0.5),
        p99: pct(0.99),
        writes: done,
    })
}
