//! The initiator's pipelined queues (`evstor_datapath::initiator::Queue`) against an
//! in-process target: 32 commands in flight whose completions are matched by command ID,
//! several queues of one session on several threads with digests on, an NVMe error as one
//! command's result inside a batch, local refusals, a dead target breaking the queue, and a
//! completion that does not come in time failing the reap instead of hanging it.

use std::collections::HashSet;
use std::io;
use std::path::Path;
use std::time::Duration;

use evstor_datapath::initiator::{
    read_cmd, write_cmd, Data, InitiatorError, Options, Queue, Session,
};
use evstor_datapath::nvme::Status;
use evstor_datapath::{start, Acl, NamespaceSpec, QosLimits, TargetConfig, TargetHandle};

const NQN: &str = "nqn.2024-01.io.evstor:pipelined";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:0b1e0b1e-0000-4000-8000-000000000002";
const BLOCK: usize = 4096;
/// 16 MiB namespace.
const NS_BLOCKS: u64 = 4096;

fn target(dir: &Path) -> TargetHandle {
    target_with_qos(dir, QosLimits::default())
}

fn target_with_qos(dir: &Path, qos: QosLimits) -> TargetHandle {
    let ns = NamespaceSpec {
        nsid: 1,
        uuid: [1; 16],
        size_bytes: NS_BLOCKS * BLOCK as u64,
        backing: evstor_datapath::Backing::File(dir.join("ns1")),
        host_acl: Acl::AllowAny,
        ip_acl: Acl::AllowAny,
        qos,
        ana: Default::default(),
    };
    let cfg = TargetConfig::new("127.0.0.1:0".parse().expect("addr"), NQN);
    start(cfg, vec![ns]).expect("start target")
}

/// Bytes unique to (block, seed): a block landing at the wrong LBA, or a read's data handed
/// to another command, is caught.
fn pattern(first_lba: u64, blocks: usize, seed: u8) -> Vec<u8> {
    (0..blocks * BLOCK)
        .map(|i| {
            let lba = first_lba + (i / BLOCK) as u64;
            (lba as u8).wrapping_mul(131) ^ ((lba >> 8) as u8) ^ (i as u8) ^ seed
        })
        .collect()
}

fn opts(io_queues: u16, queue_depth: u16, slot_bytes: usize) -> Options {
    Options {
        io_queues,
        queue_depth,
        slot_bytes,
        ..Options::default()
    }
}

/// Writes `n` commands of 1..=4 blocks (in-capsule and R2T sizes mixed, so they finish out
/// of order) from `base`, all in flight at once, then reads them back the same way and
/// checks each read's data by its command ID. Returns whether any batch completed out of
/// submission order.
fn round_trip(q: &mut Queue, base: u64, n: usize, seed: u8) -> bool {
    let extent = |i: usize| (base + 4 * i as u64, 1 + i % 4);
    let mut out_of_order = false;
    let mut by_cid = vec![usize::MAX; q.depth()];
    for write in [true, false] {
        for i in 0..n {
            let (lba, blocks) = extent(i);
            let cid = if write {
                let data = pattern(lba, blocks, seed);
                let cmd = write_cmd(1, lba, blocks as u32, i % 3 == 0);
                q.submit(cmd, Data::ToTarget(&data)).expect("submit write")
            } else {
                let cmd = read_cmd(1, lba, blocks as u32);
                q.submit(cmd, Data::FromTarget(blocks * BLOCK))
                    .expect("submit read")
            };
            by_cid[cid as usize] = i;
        }
        assert_eq!(q.in_flight(), n);
        let mut seen = HashSet::new();
        let mut last = None;
        for _ in 0..n {
            let c = q.reap().expect("reap");
            assert_eq!(c.result().expect("success"), 0, "cid {}", c.cid);
            assert!(seen.insert(c.cid), "cid {} completed twice", c.cid);
            let i = by_cid[c.cid as usize];
            out_of_order |= last.is_some_and(|l| i < l);
            last = Some(i);
            if !write {
                let (lba, blocks) = extent(i);
                assert!(
                    q.data(c.cid) == pattern(lba, blocks, seed),
                    "read {i} (cid {}) got another command's data",
                    c.cid
                );
            }
        }
        assert_eq!(q.in_flight(), 0);
    }
    out_of_order
}

#[test]
fn qd32_writes_then_reads_complete_by_command_id() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let t = target(dir.path());
    let mut s = Session::connect_with(t.local_addr(), NQN, HOST, &opts(1, 32, 16 * 1024))?;
    assert_eq!(
        s.max_transfer_bytes(),
        16 * 1024,
        "the slot size bounds a command"
    );

    let q = &mut s.io_queues()[0];
    assert_eq!(q.depth(), 32);
    let mut out_of_order = false;
    for round in 0..8u8 {
        out_of_order |= round_trip(q, 200 * round as u64, 32, round);
    }
    eprintln!("completions arrived out of submission order: {out_of_order}");

    // The blocking path (a different command layout) sees the same blocks.
    let back = s.read(1, 7 * 200, 4 * 32)?;
    for i in 0..32usize {
        let (lba, blocks) = (7 * 200 + 4 * i as u64, 1 + i % 4);
        let at = 4 * i * BLOCK;
        assert!(
            back[at..at + blocks * BLOCK] == pattern(lba, blocks, 7),
            "{i}"
        );
    }
    t.shutdown();
    Ok(())
}

#[test]
fn several_queues_with_digests_run_on_their_own_threads() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let t = target(dir.path());
    let o = opts(4, 16, 16 * 1024).with_digests();
    let mut s = Session::connect_with(t.local_addr(), NQN, HOST, &o)?;
    assert!(t
        .connected_hosts()
        .iter()
        .any(|h| h.cntlid == s.cntlid() && h.io_queues == 4));

    std::thread::scope(|scope| {
        for (n, q) in s.io_queues().iter_mut().enumerate() {
            let d = q.digests();
            assert!(d.header && d.data, "queue {n} negotiated {d:?}");
            scope.spawn(move || {
                for round in 0..4u8 {
                    round_trip(q, 1000 * n as u64, 16, round ^ n as u8);
                }
            });
        }
    });

    // Every queue's last round is where it wrote it, through queue 1's blocking path.
    for n in 0..4u64 {
        let back = s.read(1, 1000 * n, 1)?;
        assert!(back == pattern(1000 * n, 1, 3 ^ n as u8), "queue {n}");
    }
    t.shutdown();
    Ok(())
}

#[test]
fn an_error_status_fails_only_its_command_in_a_batch() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let t = target(dir.path());
    let mut s = Session::connect_with(t.local_addr(), NQN, HOST, &opts(1, 8, 8192))?;
    s.write(1, 0, &pattern(0, 8, 5))?;
    let q = &mut s.io_queues()[0];

    let mut bad = None;
    for i in 0..8u64 {
        let lba = if i == 5 { NS_BLOCKS } else { i };
        let cid = q.submit(read_cmd(1, lba, 1), Data::FromTarget(BLOCK))?;
        if i == 5 {
            bad = Some(cid);
        }
    }
    let refused = q.submit(read_cmd(1, 0, 1), Data::FromTarget(BLOCK));
    assert!(
        matches!(refused, Err(InitiatorError::Invalid(_))),
        "a 9th at depth 8"
    );
    let too_big = q.submit(read_cmd(1, 0, 4), Data::FromTarget(4 * BLOCK));
    assert!(matches!(too_big, Err(InitiatorError::Invalid(_))));

    for _ in 0..8 {
        let c = q.reap()?;
        if Some(c.cid) == bad {
            assert_eq!(c.status, Status::LBA_RANGE);
            assert_eq!(
                c.result().map_err(|e| e.status()).err(),
                Some(Some(Status::LBA_RANGE))
            );
        } else {
            c.result()?;
            assert_eq!(q.data(c.cid).len(), BLOCK);
        }
    }
    assert!(!q.is_broken());
    assert!(
        matches!(q.reap(), Err(InitiatorError::Invalid(_))),
        "nothing in flight"
    );
    assert!(s.read(1, 3, 1)? == pattern(3, 1, 5), "the queue goes on");
    t.shutdown();
    Ok(())
}

#[test]
fn a_target_that_goes_away_breaks_the_queue() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let t = target(dir.path());
    let mut s = Session::connect_with(t.local_addr(), NQN, HOST, &opts(2, 4, 8192))?;
    t.shutdown();

    let q = &mut s.io_queues()[1];
    let sent = q
        .submit(read_cmd(1, 0, 1), Data::FromTarget(BLOCK))
        .and_then(|_| q.reap());
    let e = sent.expect_err("no target to answer");
    assert!(
        e.status().is_none(),
        "a transport failure, not a status: {e}"
    );
    assert!(q.is_broken());
    let again = q.submit(read_cmd(1, 0, 1), Data::FromTarget(BLOCK));
    assert!(matches!(again, Err(InitiatorError::Broken)));
    Ok(())
}

#[test]
fn a_completion_that_does_not_come_in_time_fails_the_reap_and_breaks_the_queue(
) -> anyhow::Result<()> {
    // One read per second: the first read spends the bucket, the second is parked by the
    // target for about a second, longer than the session's socket timeout.
    let dir = tempfile::tempdir()?;
    let qos = QosLimits {
        read_iops: 1,
        ..QosLimits::default()
    };
    let t = target_with_qos(dir.path(), qos);
    let o = Options {
        timeout: Duration::from_millis(300),
        ..opts(1, 4, 8192)
    };
    let mut s = Session::connect_with(t.local_addr(), NQN, HOST, &o)?;
    let q = &mut s.io_queues()[0];
    q.submit(read_cmd(1, 0, 1), Data::FromTarget(BLOCK))?;
    q.reap()?.result()?;

    q.submit(read_cmd(1, 1, 1), Data::FromTarget(BLOCK))?;
    match q.reap() {
        Err(InitiatorError::Io(e)) => assert!(
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{e}"
        ),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(
        q.is_broken(),
        "a command may still be answered: the stream is unknown"
    );
    t.shutdown();
    Ok(())
}
