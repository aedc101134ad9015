//! Memory follows what is in flight, not queue depth: connecting many deep I/O queues
//! must not commit a maximal data buffer per queue slot (it once cost 16 MiB per queue
//! of depth 128, touched at Connect). Alone in its binary, so no other test moves the
//! process's resident set while it measures.

mod common;

use common::*;
use evstor_datapath::limits::MAX_DATA_BYTES;
use evstor_datapath::{start, Acl, TargetConfig};

const QUEUES_PER_CTRL: u16 = 16;
const CTRLS: usize = 2;
const DEPTH: u16 = 128;

/// Resident set size of this process, in bytes.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .expect("resident pages");
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    pages * page
}

#[test]
fn deep_queues_cost_memory_for_what_is_in_flight_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = TargetConfig::new("127.0.0.1:0".parse().expect("addr"), NQN);
    cfg.max_connections_per_host = 64;
    cfg.max_connections_per_addr = 64;
    let t = start(cfg, vec![ns(dir.path(), 1, Acl::AllowAny)]).expect("start");
    let before = rss_bytes();
    let (mut ios, mut admins) = (Vec::new(), Vec::new());
    for _ in 0..CTRLS {
        let (a, cntlid) = Host::admin(t.local_addr(), HOST, false, 0);
        for qid in 1..=QUEUES_PER_CTRL {
            let mut q = Host::tcp(t.local_addr(), false);
            let args = ConnectArgs {
                sqsize: DEPTH - 1,
                ..ConnectArgs::io(HOST, cntlid, qid)
            };
            assert_eq!(
                q.connect_with(&args).0,
                OK,
                "I/O queue {qid} of depth {DEPTH}"
            );
            ios.push(q);
        }
        admins.push(a);
    }
    // One maximal read per queue: every queue moves data, one command at a time.
    for q in ios.iter_mut() {
        let (st, _) = q.rw(false, 1, 0, &[], (MAX_DATA_BYTES / 4096) as u32, false);
        assert_eq!(st, OK);
    }
    let grown = rss_bytes().saturating_sub(before);
    let queues = (CTRLS * QUEUES_PER_CTRL as usize) as u64;
    let per_slot_commit = queues * DEPTH as u64 * MAX_DATA_BYTES as u64; // 512 MiB
    eprintln!(
        "resident set grew by {} KiB for {queues} queues",
        grown >> 10
    );
    assert!(
        grown < per_slot_commit / 8,
        "resident set grew by {grown} bytes, near a buffer per slot ({per_slot_commit})"
    );
    drop(ios);
    drop(admins);
    t.shutdown();
}
