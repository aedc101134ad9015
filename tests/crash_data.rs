//! Crash consistency of volume data: `kill -9` while hosts write over NVMe/TCP and snapshots
//! are being taken. After the restart every acknowledged write reads back, no block is torn
//! or mixed, and every snapshot holds exactly a prefix of each writer's writes: at least all
//! writes acknowledged before it was requested, none issued after it was seen `Available`,
//! and never an earlier state than a snapshot requested before it.
//!
//! Each writer owns a disjoint set of blocks and writes one block at a time, so "the state
//! after the first k writes" is well defined per writer; blocks describe themselves (writer,
//! block, write number, a derived pattern and a checksum), so one read tells which write a
//! block holds and whether it is whole.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Client, Server};
use evstor_datapath::initiator::Session;
use serde_json::{json, Value};

const P: &str = "/api/v2/projects/default";
/// Host threads writing, each over its own NVMe/TCP connections.
const WRITERS: usize = 4;
/// Blocks the writers share out (block `b` belongs to writer `b % WRITERS`).
const BLOCKS: u64 = 1024;
const BLOCK: usize = 4096;
/// How long the load runs before the server is killed.
const LOAD: Duration = Duration::from_millis(2500);
/// One write in this many is FUA; the rest rely on the process dying, not the machine.
const FUA_EVERY: usize = 8;
/// After a snapshot request went out, how long until the kill, at most (a request takes
/// some 4 to 20 ms in a debug build, commit and fsync included).
const KILL_DELAY_US_MAX: u64 = 15_000;
/// Pause between snapshot requests, at most.
const SNAPSHOT_PAUSE_MS_MAX: u64 = 30;
/// Longest a snapshot may take to become `Available` before the test calls it stuck.
const SNAPSHOT_WAIT_MAX: Duration = Duration::from_secs(30);
const MAGIC: &[u8; 8] = b"evstorCD";
/// Where the checksum sits: the block's last 8 bytes.
const SUM_AT: usize = BLOCK - 8;

fn host_nqn(i: usize) -> String {
    format!("nqn.2014-08.org.nvmexpress:uuid:c0a5c0a5-0000-4000-8000-{i:012x}")
}

/// xorshift64*: the test's only randomness, seeded from the clock and printed.
fn next(x: &mut u64) -> u64 {
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The content of write `k` of `writer` to `block`.
fn fill(buf: &mut [u8], writer: usize, block: u64, k: u64) {
    buf[..8].copy_from_slice(MAGIC);
    buf[8..16].copy_from_slice(&(writer as u64).to_le_bytes());
    buf[16..24].copy_from_slice(&block.to_le_bytes());
    buf[24..32].copy_from_slice(&k.to_le_bytes());
    let mut x = ((writer as u64 + 1) ^ block.rotate_left(20) ^ k.rotate_left(40)) | 1;
    for chunk in buf[32..SUM_AT].chunks_mut(8) {
        chunk.copy_from_slice(&next(&mut x).to_le_bytes()[..chunk.len()]);
    }
    let sum = fnv1a(&buf[..SUM_AT]);
    buf[SUM_AT..].copy_from_slice(&sum.to_le_bytes());
}

/// Which write block `block` holds: `None` if never written, an error if it is not exactly
/// one write's content (torn, mixed, misplaced or corrupt).
fn decode(block: u64, bytes: &[u8]) -> Result<Option<(usize, u64)>, String> {
    if bytes.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
    let (writer, at, k) = (word(8) as usize, word(16), word(24));
    if &bytes[..8] != MAGIC || writer >= WRITERS || at != block {
        return Err(format!(
            "block {block}: foreign header {:02x?}",
            &bytes[..32]
        ));
    }
    if word(SUM_AT) != fnv1a(&bytes[..SUM_AT]) {
        return Err(format!(
            "block {block}: checksum mismatch (writer {writer}, write {k})"
        ));
    }
    let mut want = vec![0u8; BLOCK];
    fill(&mut want, writer, block, k);
    if want != bytes {
        return Err(format!(
            "block {block}: body differs from write {k} of writer {writer}"
        ));
    }
    Ok(Some((writer, k)))
}

/// One writer's record, shared with the main thread.
#[derive(Default)]
struct WriterLog {
    /// The block of each write in issue order: write `k` went to `history[k]`.
    history: Vec<u64>,
    /// Writes acknowledged: `history[..acked]`; the one after it, if any, was in flight.
    acked: usize,
}

/// What the load threads share with the main thread.
#[derive(Default)]
struct Shared {
    logs: Vec<Mutex<WriterLog>>,
    snaps: Mutex<Vec<SnapRecord>>,
    /// Set just before the kill: errors after it are expected.
    killed: AtomicBool,
    /// A snapshot request is on the wire (the main thread kills at such a moment).
    posting: AtomicBool,
}

impl Shared {
    fn killed(&self) -> bool {
        self.killed.load(Ordering::Relaxed)
    }
}

type Logs = [Mutex<WriterLog>];

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn acked(logs: &Logs) -> Vec<usize> {
    logs.iter().map(|l| lock(l).acked).collect()
}

fn issued(logs: &Logs) -> Vec<usize> {
    logs.iter().map(|l| lock(l).history.len()).collect()
}

/// Where writers and the snapshot thread reach the server.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    nqn: String,
    nsid: u32,
    volume: String,
}

/// Writes random owned blocks one at a time until stopped or the server dies. An error
/// before the kill is a failure.
fn writer(t: usize, to: Target, sh: Arc<Shared>, seed: u64) -> Result<(), String> {
    let logs = &sh.logs;
    let mut h = Session::connect(to.addr, &to.nqn, &host_nqn(t)).map_err(|e| e.to_string())?;
    let owned: Vec<u64> = (0..BLOCKS).filter(|b| *b as usize % WRITERS == t).collect();
    let mut x = (seed ^ (t as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
    let mut buf = vec![0u8; BLOCK];
    while !sh.killed() {
        let b = owned[(next(&mut x) % owned.len() as u64) as usize];
        let k = {
            let mut l = lock(&logs[t]);
            l.history.push(b);
            l.history.len() - 1
        };
        fill(&mut buf, t, b, k as u64);
        let r = if k % FUA_EVERY == FUA_EVERY - 1 {
            h.write_fua(to.nsid, b, &buf)
        } else {
            h.write(to.nsid, b, &buf)
        };
        match r {
            Ok(()) => lock(&logs[t]).acked = k + 1,
            // A dead target fails the transport; an NVMe status came from a live one.
            Err(e) if sh.killed() && e.status().is_none() => break,
            Err(e) => return Err(format!("writer {t}, write {k} to block {b}: {e}")),
        }
    }
    Ok(())
}

/// A snapshot request and the bounds on what it holds.
#[derive(Debug, Clone)]
struct SnapRecord {
    name: String,
    /// Writes acknowledged per writer before the request was sent: all are in it.
    lower: Vec<usize>,
    /// Writes issued per writer once it was seen `Available`: none after is in it. The
    /// freeze happens in the reconciler after the request's 200, so the 200 bounds nothing.
    upper: Option<Vec<usize>>,
    /// The request was answered 200 (else it was in flight at the kill).
    acknowledged: bool,
    uuid: Option<String>,
}

/// Requests snapshots until the server dies, in rounds of four: the first is waited for
/// until `Available`, the second is followed by one look at the list, the next two go out
/// back to back so requests pile up behind the reconciler. Each look at the list bounds the
/// snapshots it finds `Available`.
fn snapshotter(c: Client, to: Target, sh: Arc<Shared>, seed: u64) -> Result<(), String> {
    let mut x = seed | 1;
    for i in 0.. {
        let name = format!("s{i:04}");
        let lower = acked(&sh.logs);
        lock(&sh.snaps).push(SnapRecord {
            name: name.clone(),
            lower,
            upper: None,
            acknowledged: false,
            uuid: None,
        });
        let body = json!({"name": name, "sourceVolumeUUID": to.volume});
        sh.posting.store(true, Ordering::Relaxed);
        let answer = c.try_post(&format!("{P}/snapshots"), &body);
        sh.posting.store(false, Ordering::Relaxed);
        match answer {
            Ok((200, v)) => {
                let mut s = lock(&sh.snaps);
                let r = s.last_mut().expect("pushed above");
                r.acknowledged = true;
                r.uuid = v["UUID"].as_str().map(str::to_string);
            }
            // Only a transport error can mean the server died: a killed process answers
            // nothing, so any status, a 5xx above all, is the server's own failure.
            Err(_) if sh.killed() => return Ok(()),
            r => return Err(format!("snapshot {name}: {r:?}")),
        }
        if i % 4 >= 2 {
            continue;
        }
        let deadline = Instant::now() + SNAPSHOT_WAIT_MAX;
        loop {
            match c.try_get(&format!("{P}/snapshots")) {
                Ok((200, list)) if bound_available(&sh, &list) || i % 4 == 1 => break,
                Ok((200, _)) if Instant::now() < deadline => {}
                Ok((200, _)) => return Err(format!("snapshot {name} not Available in time")),
                Err(_) if sh.killed() => return Ok(()),
                r => return Err(format!("listing snapshots: {r:?}")),
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(next(&mut x) % SNAPSHOT_PAUSE_MS_MAX));
    }
    Ok(())
}

/// Gives every snapshot `list` shows `Available` its upper bound (writes issued now, after
/// the list was read); says whether the latest request has one.
fn bound_available(sh: &Shared, list: &Value) -> bool {
    let now = issued(&sh.logs);
    let mut s = lock(&sh.snaps);
    let listed = list["snapshots"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    for r in s.iter_mut().filter(|r| r.upper.is_none()) {
        if listed
            .iter()
            .any(|v| r.uuid.as_deref() == v["UUID"].as_str() && v["state"] == "Available")
        {
            r.upper = Some(now.clone());
        }
    }
    s.last().is_some_and(|r| r.upper.is_some())
}

/// The prefixes of a writer's history an image shows for that writer's blocks: every `k` in
/// the returned inclusive range makes each block hold the last write to it among
/// `history[..k]`. Empty (`lo > hi`) if no prefix does, i.e. the writes are not in order.
fn prefixes(
    history: &[u64],
    writes_of: &HashMap<u64, Vec<usize>>,
    seen: &BTreeMap<u64, Option<usize>>,
) -> Result<(usize, usize), String> {
    let (mut lo, mut hi) = ((0, None), (history.len(), None));
    for (&b, &j) in seen {
        let writes = writes_of.get(&b).map(Vec::as_slice).unwrap_or(&[]);
        if let Some(j) = j {
            if history.get(j) != Some(&b) {
                return Err(format!(
                    "block {b} holds write {j}, which was never issued to it"
                ));
            }
            if j + 1 > lo.0 {
                lo = (j + 1, Some(b));
            }
        }
        let later = match j {
            Some(j) => writes.iter().find(|&&w| w > j),
            None => writes.first(),
        };
        if let Some(&w) = later.filter(|&&w| w < hi.0) {
            hi = (w, Some(b));
        }
    }
    if lo.0 > hi.0 {
        return Err(format!(
            "no prefix: block {:?} holds write {} but block {:?} lacks write {}",
            lo.1,
            lo.0 - 1,
            hi.1,
            hi.0
        ));
    }
    Ok((lo.0, hi.0))
}

/// Reads blocks `[0, BLOCKS)` of `nsid` and sorts them by writer: block → write number.
fn read_image(h: &mut Session, nsid: u32) -> Result<Vec<BTreeMap<u64, Option<usize>>>, String> {
    let data = h
        .read(nsid, 0, BLOCKS as u32)
        .map_err(|e| format!("read: {e}"))?;
    let mut per_writer = vec![BTreeMap::new(); WRITERS];
    for (b, bytes) in data.chunks(BLOCK).enumerate() {
        let b = b as u64;
        let t = b as usize % WRITERS;
        let k = match decode(b, bytes)? {
            None => None,
            Some((w, _)) if w != t => return Err(format!("block {b} holds writer {w}'s data")),
            Some((_, k)) => Some(k as usize),
        };
        per_writer[t].insert(b, k);
    }
    Ok(per_writer)
}

/// Checks an image against per-writer bounds `[lower, upper]` on its prefix; returns the
/// feasible prefix range per writer.
fn check_image(
    what: &str,
    h: &mut Session,
    nsid: u32,
    logs: &[WriterLog],
    writes_of: &[HashMap<u64, Vec<usize>>],
    lower: &[usize],
    upper: &[usize],
) -> Vec<(usize, usize)> {
    let image = read_image(h, nsid).unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut ranges = Vec::new();
    for t in 0..WRITERS {
        let (lo, hi) = prefixes(&logs[t].history, &writes_of[t], &image[t])
            .unwrap_or_else(|e| panic!("{what}, writer {t}: {e}"));
        assert!(
            lo <= upper[t] && lower[t] <= hi,
            "{what}, writer {t}: holds the state after {lo}..={hi} of its {} writes, \
             expected after {}..={}",
            logs[t].history.len(),
            lower[t],
            upper[t]
        );
        ranges.push((lo.max(lower[t]), hi.min(upper[t])));
    }
    ranges
}

/// `EVSTOR_SEED` (decimal or 0x-hex) when set, so a failing case can be run again; else
/// the clock.
fn seed() -> u64 {
    match std::env::var("EVSTOR_SEED") {
        Ok(v) => {
            let parsed = match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("EVSTOR_SEED={v}: {e}"))
        }
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("the clock is past 1970")
            .as_nanos() as u64,
    }
}

fn create_volume(c: &Client, body: Value) -> String {
    let (status, v) = c.post(&format!("{P}/volumes"), &body);
    assert_eq!(status, 200, "{v}");
    v["UUID"].as_str().unwrap().to_string()
}

fn volume_body(name: &str) -> Value {
    json!({"name": name, "size": "64 MiB", "acl": {"values": ["ALLOW_ANY"]}, "replicaCount": 1})
}

fn available_nsid(s: &Server, uuid: &str) -> u32 {
    let v = s.wait_for(&format!("{P}/volumes/{uuid}"), |_, v| {
        v["state"] == "Available"
    });
    v["nsid"].as_u64().expect("nsid") as u32
}

/// Runs the writers and the snapshot thread, kills the server mid-flight, and returns what
/// they recorded.
fn load_then_kill(
    s: &mut Server,
    c: &Client,
    to: &Target,
    seed: u64,
) -> (Vec<WriterLog>, Vec<SnapRecord>) {
    let sh = Arc::new(Shared {
        logs: (0..WRITERS).map(|_| Mutex::default()).collect(),
        ..Shared::default()
    });
    let writers: Vec<_> = (0..WRITERS)
        .map(|t| {
            let (to, sh) = (to.clone(), sh.clone());
            std::thread::spawn(move || writer(t, to, sh, seed))
        })
        .collect();
    let snapshotter = {
        let (c, to, sh) = (c.clone(), to.clone(), sh.clone());
        std::thread::spawn(move || snapshotter(c, to, sh, seed))
    };
    // Pull the plug while a snapshot request is on the wire, up to a few ms into it: before,
    // during or after its commit, and before or after the reconciler freezes the volume.
    std::thread::sleep(LOAD);
    let deadline = Instant::now() + Duration::from_secs(1);
    while !sh.posting.load(Ordering::Relaxed) && Instant::now() < deadline {
        std::hint::spin_loop();
    }
    std::thread::sleep(Duration::from_micros(seed % KILL_DELAY_US_MAX));
    sh.killed.store(true, Ordering::Relaxed);
    s.kill9();
    for w in writers {
        w.join()
            .expect("writer thread")
            .expect("writes before the kill");
    }
    snapshotter
        .join()
        .expect("snapshot thread")
        .expect("snapshots before the kill");
    let logs: Vec<WriterLog> = sh
        .logs
        .iter()
        .map(|l| std::mem::take(&mut *lock(l)))
        .collect();
    let snaps = lock(&sh.snaps).clone();

    (logs, snaps)
}

#[test]
fn kill9_during_writes_and_snapshots_keeps_acknowledged_data_and_consistent_snapshots() {
    let started = Instant::now();
    let seed = seed();
    eprintln!("crash_data seed {seed:#x} (EVSTOR_SEED={seed:#x} runs this case again)");
    let mut s = Server::start();
    let c = s.admin();
    let volume = create_volume(&c, volume_body("data"));
    let (_, info) = c.get("/api/v2/clusterinfo");
    let to = Target {
        addr: SocketAddr::from(([127, 0, 0, 1], s.nvme_port)),
        nqn: info["subsystemNQN"].as_str().unwrap().to_string(),
        nsid: available_nsid(&s, &volume),
        volume: volume.clone(),
    };

    let (logs, snaps) = load_then_kill(&mut s, &c, &to, seed);

    let (ok, out) = s.cli(&["journal", "verify"]);
    assert!(ok, "journal verify after kill -9: {out}");
    s.restart_after_kill9();
    let writes_of: Vec<HashMap<u64, Vec<usize>>> = logs
        .iter()
        .map(|l| {
            let mut m: HashMap<u64, Vec<usize>> = HashMap::new();
            for (k, &b) in l.history.iter().enumerate() {
                m.entry(b).or_default().push(k);
            }
            m
        })
        .collect();
    let acked: Vec<usize> = logs.iter().map(|l| l.acked).collect();
    let issued: Vec<usize> = logs.iter().map(|l| l.history.len()).collect();
    let in_flight = (0..WRITERS).filter(|&t| issued[t] > acked[t]).count();

    // The volume: every acknowledged write, perhaps the one in flight, nothing torn.
    let mut h = Session::connect(to.addr, &to.nqn, &host_nqn(WRITERS)).expect("connect");
    let nsid = available_nsid(&s, &volume);
    check_image("volume", &mut h, nsid, &logs, &writes_of, &acked, &issued);

    let checked = check_snapshots(&s, &mut h, &snaps, &logs, &writes_of, &issued);
    let (ok, out) = s.cli(&["journal", "verify"]);
    assert!(ok, "journal verify after restart: {out}");
    eprintln!(
        "crash_data: {} writes acknowledged ({acked:?} per writer), {in_flight} in flight at \
         the kill; {} snapshots requested, {} acknowledged, {} in flight at the kill, {} \
         seen Available before it; {checked} checked through clones; {:.1} s",
        acked.iter().sum::<usize>(),
        snaps.len(),
        snaps.iter().filter(|r| r.acknowledged).count(),
        snaps.iter().filter(|r| !r.acknowledged).count(),
        snaps.iter().filter(|r| r.upper.is_some()).count(),
        started.elapsed().as_secs_f64()
    );
}

/// Every acknowledged snapshot exists; each existing one becomes `Available`, and a clone of
/// it holds a prefix of each writer's writes within its bounds, never behind an earlier
/// request's. Returns how many were checked.
fn check_snapshots(
    s: &Server,
    h: &mut Session,
    snaps: &[SnapRecord],
    logs: &[WriterLog],
    writes_of: &[HashMap<u64, Vec<usize>>],
    issued: &[usize],
) -> usize {
    let c = s.admin();
    let list = s.wait_for(&format!("{P}/snapshots"), |_, v| {
        v["snapshots"].as_array().is_some_and(|l| {
            l.iter()
                .all(|s| s.get("state") == Some(&json!("Available")))
        })
    });
    let found: HashMap<&str, &str> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v["UUID"].as_str().unwrap()))
        .collect();
    for (name, uuid) in &found {
        let r = snaps.iter().find(|r| r.name == *name);
        let r = r.unwrap_or_else(|| panic!("snapshot {name} was never requested"));
        assert!(
            r.uuid.as_deref().is_none_or(|u| u == *uuid),
            "{r:?} is {uuid}"
        );
    }
    let mut clones = Vec::new();
    for r in snaps {
        match found.get(r.name.as_str()) {
            Some(uuid) => {
                let mut body = volume_body(&format!("clone-{}", r.name));
                body["size"] = Value::Null;
                body["sourceSnapshotUUID"] = json!(uuid);
                clones.push((r, create_volume(&c, body)));
            }
            None => assert!(!r.acknowledged, "acknowledged snapshot {} lost", r.name),
        }
    }
    // Per writer, the latest prefix an earlier snapshot was forced to show.
    let mut floor = [0usize; WRITERS];
    for (r, clone) in &clones {
        let nsid = available_nsid(s, clone);
        let upper = r.upper.as_deref().unwrap_or(issued);
        let what = format!("snapshot {}", r.name);
        let ranges = check_image(&what, h, nsid, logs, writes_of, &r.lower, upper);
        for (t, &(lo, hi)) in ranges.iter().enumerate() {
            assert!(
                floor[t] <= hi,
                "{what}, writer {t}: holds at most its first {hi} writes, \
                 an earlier snapshot at least {}",
                floor[t]
            );
            floor[t] = floor[t].max(lo);
        }
    }
    clones.len()
}

/// The checker itself: which prefixes a handful of block states admit.
#[test]
fn prefixes_admits_exactly_the_consistent_prefixes() {
    // Writes 0..5 go to blocks 0, 4, 0, 8, 4.
    let history = [0u64, 4, 0, 8, 4];
    let mut writes_of: HashMap<u64, Vec<usize>> = HashMap::new();
    for (k, &b) in history.iter().enumerate() {
        writes_of.entry(b).or_default().push(k);
    }
    let check = |state: [Option<usize>; 3]| {
        let seen: BTreeMap<u64, Option<usize>> = [0, 4, 8].into_iter().zip(state).collect();
        prefixes(&history, &writes_of, &seen)
    };
    assert_eq!(check([None, None, None]), Ok((0, 0)));
    assert_eq!(check([Some(0), None, None]), Ok((1, 1)));
    assert_eq!(check([Some(2), Some(1), None]), Ok((3, 3)));
    assert_eq!(check([Some(2), Some(4), Some(3)]), Ok((5, 5)));
    assert_eq!(check([Some(2), Some(1), Some(3)]), Ok((4, 4)));
    // Block 8 has write 3 but block 0 lacks write 2, which came before it.
    assert!(check([Some(0), Some(1), Some(3)]).is_err());
    // Write 1 went to block 4, not block 0.
    assert!(check([Some(1), None, None]).is_err());
    // Unwritten blocks leave the range open: only block 0 seen, holding write 2.
    let seen: BTreeMap<u64, Option<usize>> = [(0, Some(2))].into_iter().collect();
    assert_eq!(prefixes(&history, &writes_of, &seen), Ok((3, 5)));
    // Decoding: a block mixed from two writes is refused.
    let (mut a, mut b) = (vec![0u8; BLOCK], vec![0u8; BLOCK]);
    fill(&mut a, 1, 5, 7);
    fill(&mut b, 1, 5, 8);
    assert_eq!(decode(5, &a), Ok(Some((1, 7))));
    a[BLOCK / 2..].copy_from_slice(&b[BLOCK / 2..]);
    assert!(decode(5, &a).is_err());
    assert!(decode(6, &b).is_err());
}
