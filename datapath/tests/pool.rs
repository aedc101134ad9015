//! The shared data buffer pool seen from the network: when it is exhausted, commands
//! wait for a buffer (no R2T, no data) holding nothing, are served in arrival order as
//! buffers come back, and admin commands and in-capsule writes still complete.

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;
use evstor_datapath::limits::MAX_DATA_BYTES;
use evstor_datapath::pdu::{self, HdrFields, PduType};
use evstor_datapath::{start, Acl, TargetConfig};

const BLOCKS: u32 = (MAX_DATA_BYTES / 4096) as u32;

/// Sends a read or write of `BLOCKS` blocks at `slba` (data via R2T) without waiting.
fn send_rw(h: &mut Host, write: bool, cid: u16, slba: u64) {
    let mut c = sqe(if write { 0x01 } else { 0x02 }, 1);
    c[1] = 0x40;
    c[2..4].copy_from_slice(&cid.to_le_bytes());
    set64(&mut c, 40, slba);
    set32(&mut c, 48, BLOCKS - 1);
    set32(&mut c, 32, MAX_DATA_BYTES as u32);
    c[39] = 0x5a;
    let b = pdu::encode(&h.tx, PduType::CapsuleCmd, 0, &HdrFields::Cmd(&c), &[]);
    h.s.write_all(&b).expect("send");
}

/// Nothing arrives on `h` for a while (the command is waiting, not answered).
fn quiet(h: &mut Host) -> bool {
    h.s.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let got = h.recv();
    h.s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    got.is_none()
}

fn expect_r2t(h: &mut Host, cid: u16) -> pdu::R2t {
    match h.recv() {
        Some(Got::R2t(r)) if r.cccid == cid => r,
        other => panic!("expected the R2T of command {cid}, got {other:?}"),
    }
}

fn expect_resp(h: &mut Host, cid: u16) {
    match h.recv() {
        Some(Got::Resp { status, cid: c, .. }) if c == cid => assert_eq!(status, OK),
        other => panic!("expected the completion of command {cid}, got {other:?}"),
    }
}

/// Namespace 1, room for several maximal transfers.
fn big_ns(dir: &std::path::Path, acl: Acl) -> evstor_datapath::NamespaceSpec {
    let mut spec = ns(dir, 1, acl);
    spec.size_bytes = 8 * MAX_DATA_BYTES as u64;
    spec
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..MAX_DATA_BYTES).map(|i| (i as u8) ^ seed).collect()
}

fn queue(t: &evstor_datapath::TargetHandle, host: &str, cntlid: u16, qid: u16) -> Host {
    let mut q = Host::tcp(t.local_addr(), false);
    assert_eq!(
        q.connect(NQN, host, cntlid, qid, 0).0,
        OK,
        "I/O queue {qid}"
    );
    q
}

/// Reads the data and completion of read `cid`.
fn expect_read(h: &mut Host, cid: u16) -> Vec<u8> {
    let mut read = vec![0u8; MAX_DATA_BYTES];
    loop {
        match h.recv().expect("read completes") {
            Got::Data { hdr, data } => {
                let at = hdr.offset as usize;
                read[at..at + data.len()].copy_from_slice(&data)
            }
            Got::Resp { status, cid: c, .. } if c == cid => {
                assert_eq!(status, OK);
                return read;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn an_exhausted_pool_makes_commands_wait_in_arrival_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = TargetConfig::new("127.0.0.1:0".parse().expect("addr"), NQN);
    cfg.buffer_pool_bytes = 2 * MAX_DATA_BYTES;
    let t = start(cfg, vec![big_ns(dir.path(), Acl::AllowAny)]).expect("start");
    let (mut admin, cntlid) = Host::admin(t.local_addr(), HOST, false, 0);
    let mut q1 = queue(&t, HOST, cntlid, 1);
    let mut q2 = queue(&t, HOST, cntlid, 2);
    let mut q3 = queue(&t, HOST, cntlid, 3);

    // Two writes whose data the host holds back take the whole pool.
    send_rw(&mut q1, true, 1, 0);
    let r1 = expect_r2t(&mut q1, 1);
    send_rw(&mut q2, true, 2, BLOCKS as u64);
    let r2 = expect_r2t(&mut q2, 2);
    send_rw(&mut q3, true, 3, 2 * BLOCKS as u64);
    assert!(
        quiet(&mut q3),
        "a third write gets no R2T while the pool is empty"
    );
    send_rw(&mut q2, false, 9, 0);
    assert!(quiet(&mut q2), "a read waits too, behind the write");

    let (st, id) = admin.identify(1, 0);
    assert_eq!(
        (st, u16::from_le_bytes([id[78], id[79]])),
        (OK, cntlid),
        "admin progresses"
    );
    let small = vec![0x5a; 4096];
    assert_eq!(
        q1.rw(true, 1, 200, &small, 1, true).0,
        OK,
        "in-capsule data is taken in (the queue's reserve) though the pool is empty"
    );

    let (w1, w2, w3) = (pattern(1), pattern(2), pattern(3));
    q1.send_h2c(1, r1, &w1);
    expect_resp(&mut q1, 1);
    let r3 = expect_r2t(&mut q3, 3); // the returned buffer goes to the oldest waiter
    assert!(quiet(&mut q2), "the read is still behind");
    q2.send_h2c(2, r2, &w2);
    expect_resp(&mut q2, 2);
    assert!(
        expect_read(&mut q2, 9) == w1,
        "the read ran once a buffer came back"
    );
    q3.send_h2c(3, r3, &w3);
    expect_resp(&mut q3, 3);
    for (k, want) in [w1, w2, w3].iter().enumerate() {
        let (st, back) = q1.rw(false, 1, k as u64 * BLOCKS as u64, &[], BLOCKS, false);
        assert_eq!(st, OK);
        assert!(back == *want, "write {} reads back", k + 1);
    }
    t.shutdown();
}

/// Data asked for by R2T is held until the host sends it, so a queue may only have its
/// share of it outstanding (here one maximal transfer): a host that never answers R2Ts
/// cannot drain the pool, and one that sees no namespace gets no R2T at all.
#[test]
fn a_queue_holds_only_its_share_of_r2t_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = TargetConfig::new("127.0.0.1:0".parse().expect("addr"), NQN);
    cfg.buffer_pool_bytes = 8 * MAX_DATA_BYTES;
    cfg.max_connections = 4; // four queues below, none of them reclaimed
    cfg.max_discovery_connections = 1; // share per queue: 1 MiB / (2 * 5) < 128 KiB
    let t = start(cfg, vec![big_ns(dir.path(), Acl::List(vec![HOST.into()]))]).expect("start");
    let (_admin, cntlid) = Host::admin(t.local_addr(), HOST, false, 0);
    let mut q = queue(&t, HOST, cntlid, 1);
    send_rw(&mut q, true, 1, 0);
    let r1 = expect_r2t(&mut q, 1);
    send_rw(&mut q, true, 2, BLOCKS as u64);
    assert!(quiet(&mut q), "no second R2T while the first is unanswered");
    send_rw(&mut q, false, 3, 4 * BLOCKS as u64);
    expect_read(&mut q, 3); // reads are not held back: the pool has room
    let w1 = pattern(7);
    q.send_h2c(1, r1, &w1);
    let (mut done, mut r2) = (false, None);
    while !done || r2.is_none() {
        match q.recv() {
            Some(Got::Resp {
                status: OK, cid: 1, ..
            }) => done = true,
            Some(Got::R2t(r)) if r.cccid == 2 => r2 = Some(r),
            other => panic!("expected write 1's completion and write 2's R2T, got {other:?}"),
        }
    }
    let r2 = r2.expect("R2T of write 2");
    q.send_h2c(2, r2, &pattern(8));
    expect_resp(&mut q, 2);

    let stranger = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000dead";
    let (_a, c2) = Host::admin(t.local_addr(), stranger, false, 0);
    let mut s = queue(&t, stranger, c2, 1);
    send_rw(&mut s, true, 5, 0);
    match s.recv() {
        Some(Got::Resp { status, cid: 5, .. }) => assert_eq!(status, INVALID_NS),
        other => panic!("expected Invalid Namespace before any R2T, got {other:?}"),
    }
    t.shutdown();
}
