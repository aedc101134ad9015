//! The queue state machine driven by hand: PDUs in, storage requests and PDUs out, with
//! no socket, ring or thread. Completions are made up by the test (it plays the backend
//! and the replicas), time is passed in.

use std::net::SocketAddr;
use std::path::Path;

use super::*;
use crate::admission::PortClass;
use crate::config::{Acl, Backing, NamespaceSpec, TargetConfig};
use crate::ctrl::ControllerInit;
use crate::limits::BACKEND_IO_BYTES_MAX;
use crate::nvme::{admin, aen, feat, io};
use crate::pdu::{Check, R2t, TxContext, FLAG_LAST_PDU};
use crate::qos::QosLimits;

const NQN: &str = "nqn.2024-01.io.evstor:queue-tests";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000a11c";
const K4: usize = 4096;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

fn spec(dir: &Path, nsid: u32, qos: QosLimits) -> NamespaceSpec {
    NamespaceSpec {
        nsid,
        uuid: [nsid as u8; 16],
        size_bytes: 16 << 20,
        backing: Backing::File(dir.join(format!("ns{nsid}.img"))),
        host_acl: Acl::AllowAny,
        ip_acl: Acl::AllowAny,
        qos,
        ana: Default::default(),
    }
}

/// A target's shared state (no listeners, no reactors) with one namespace.
fn shared(dir: &Path, pool_bytes: usize, qos: QosLimits) -> Arc<Shared> {
    let mut cfg = TargetConfig::new(addr("127.0.0.1:4420"), NQN);
    cfg.buffer_pool_bytes = pool_bytes;
    let table = NsTable::build(vec![spec(dir, 1, qos)], &NsTable::default(), 1).expect("table");
    Arc::new(Shared::new(cfg, table, addr("127.0.0.1:4420"), None, Vec::new()).expect("shared"))
}

fn controller(shared: &Shared, kato_ms: u32) -> Arc<Controller> {
    let peer = addr("127.0.0.1:50000");
    let key = {
        let mut l = shared.ledger();
        let conn = l.open_conn(PortClass::Io, peer.ip());
        l.add_controller(conn, HOST, true)
    };
    let init = ControllerInit {
        cntlid: 1,
        host_nqn: HOST.into(),
        host_id: [0; 16],
        remote: peer,
        discovery: false,
        kato_ms,
        admin_notify: Arc::new(Notifier::detached()),
        ledger_key: key,
    };
    let c = Arc::new(Controller::new(init, &shared.table()));
    shared.registry().insert(c.clone());
    c
}

fn queue(shared: &Arc<Shared>, ctrl: &Arc<Controller>, qid: u16, depth: u16) -> Queue {
    queue_with(shared, ctrl, qid, depth, Arc::new(Notifier::detached()))
}

fn queue_with(
    shared: &Arc<Shared>,
    ctrl: &Arc<Controller>,
    qid: u16,
    depth: u16,
    notify: Arc<Notifier>,
) -> Queue {
    let accepted = Accepted {
        ctrl: ctrl.clone(),
        qid,
        depth,
        sqflow_off: false,
        notify,
    };
    let init = QueueInit {
        shared: shared.clone(),
        accepted,
        local: addr("127.0.0.1:4420"),
        peer: addr("127.0.0.1:50000"),
        rxc: RxContext {
            from_controller: false,
            hdgst: false,
            ddgst: false,
            data_align: 4,
            max_data: crate::limits::MAX_H2C_DATA_BYTES,
        },
        txc: TxContext::plain(),
        now: Instant::now(),
    };
    let mut q = Queue::new(init).expect("queue");
    q.accept_connect(0).expect("connect response");
    assert_eq!(
        sent(&mut q),
        vec![Out::Resp {
            cid: 0,
            sc: 0,
            dw0: 1
        }]
    );
    q
}

fn sqe(opcode: u8, cid: u16, nsid: u32) -> [u8; 64] {
    let mut c = [0u8; 64];
    c[0] = opcode;
    c[1] = 0x40; // SGL
    c[2..4].copy_from_slice(&cid.to_le_bytes());
    c[4..8].copy_from_slice(&nsid.to_le_bytes());
    c
}

fn set32(c: &mut [u8; 64], at: usize, v: u32) {
    c[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// A read or write of `blocks` at `slba`; `data` goes in the capsule if given.
fn rw(opcode: u8, cid: u16, slba: u64, blocks: u32, data: &[u8]) -> Vec<u8> {
    let mut c = sqe(opcode, cid, 1);
    c[40..48].copy_from_slice(&slba.to_le_bytes());
    set32(&mut c, 48, blocks - 1);
    set32(&mut c, 32, blocks * K4 as u32);
    c[39] = if data.is_empty() { 0x5a } else { 0x01 };
    capsule(&c, data)
}

fn capsule(c: &[u8; 64], data: &[u8]) -> Vec<u8> {
    pdu::encode(
        &TxContext::plain(),
        PduType::CapsuleCmd,
        0,
        &HdrFields::Cmd(c),
        data,
    )
}

fn h2c(cid: u16, ttag: u16, offset: u32, data: &[u8], last: bool) -> Vec<u8> {
    let d = DataHdr {
        cccid: cid,
        ttag,
        offset,
        length: data.len() as u32,
    };
    let flags = if last { FLAG_LAST_PDU } else { 0 };
    pdu::encode(
        &TxContext::plain(),
        PduType::H2cData,
        flags,
        &HdrFields::Data(d),
        data,
    )
}

/// What the target sent, as the host decodes it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Out {
    Resp { cid: u16, sc: u16, dw0: u64 },
    Data { cid: u16, data: Vec<u8> },
    R2t(R2t),
}

fn sc(s: Status) -> u16 {
    ((s.sct as u16) << 8) | s.sc as u16
}

/// Plays the socket: takes every staged batch, as the kernel would, and decodes it.
fn sent(q: &mut Queue) -> Vec<Out> {
    let mut bytes = Vec::new();
    let mut iov = Vec::with_capacity(8);
    while q.tx_start(Instant::now()) || q.tx_in_flight_since().is_some() {
        let n = q.tx_iov(&mut iov);
        for v in &iov {
            // SAFETY: the queue keeps the batch and its slots' buffers until on_sent.
            bytes.extend_from_slice(unsafe {
                std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
            });
        }
        q.on_sent(n).expect("sent");
    }
    let rx = RxContext {
        from_controller: true,
        hdgst: false,
        ddgst: false,
        data_align: 4,
        max_data: MAX_DATA_BYTES as u32,
    };
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let Ok(Check::Complete(n)) = pdu::check(&bytes[at..], &rx) else {
            panic!("target sent a bad PDU");
        };
        out.push(match pdu::parse(&bytes[at..at + n], &rx).expect("parse") {
            Pdu::CapsuleResp { cqe } => Out::Resp {
                cid: u16::from_le_bytes([cqe[12], cqe[13]]),
                sc: (u16::from_le_bytes([cqe[14], cqe[15]]) >> 1) & 0x7ff,
                dw0: u64::from_le_bytes(cqe[0..8].try_into().expect("8 bytes")),
            },
            Pdu::C2hData { hdr, data, .. } => Out::Data {
                cid: hdr.cccid,
                data: data.to_vec(),
            },
            Pdu::R2t(r) => Out::R2t(r),
            other => panic!("unexpected {other:?}"),
        });
        at += n;
    }
    out
}

/// Plays the driver: takes the storage requests the queue asks for.
fn submits(q: &mut Queue) -> Vec<IoRequest> {
    let mut v = Vec::new();
    q.drain_submits(|_, req| {
        v.push(*req);
        Ok(0)
    })
    .expect("submits");
    v
}

/// Feeds a PDU that must be taken, at the current time.
fn ok(q: &mut Queue, pdu: &[u8]) {
    ok_at(q, Instant::now(), pdu);
}

/// Feeds a PDU that must be taken, at `now`.
fn ok_at(q: &mut Queue, now: Instant, pdu: &[u8]) {
    assert_eq!(q.on_pdu(now, pdu).expect("PDU taken"), Flow::Taken);
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn a_write_gets_an_r2t_executes_once_its_data_arrived_and_completes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sh = shared(dir.path(), 1 << 20, QosLimits::default());
    let ctrl = controller(&sh, 0);
    let mut q = queue(&sh, &ctrl, 1, 4);
    ok(&mut q, &rw(io::WRITE, 7, 3, 2, &[]));
    assert!(
        submits(&mut q).is_empty(),
        "nothing to write before the data"
    );
    let out = sent(&mut q);
    let [Out::R2t(r)] = out.as_slice() else {
        panic!("expected one R2T, got {out:?}");
    };
    assert_eq!((r.cccid, r.offset, r.length), (7, 0, 2 * K4 as u32));
    let data = pattern(2 * K4, 9);
    ok(&mut q, &h2c(7, r.ttag, 0, &data[..K4], false));
    assert!(submits(&mut q).is_empty(), "half the data is not enough");
    ok(&mut q, &h2c(7, r.ttag, K4 as u32, &data[K4..], true));
    let subs = submits(&mut q);
    assert_eq!(subs.len(), 1);
    let w = subs[0];
    assert_eq!(
        (w.kind, w.offset, w.len),
        (IoKind::Write { fua: false }, 3 * K4 as u64, 2 * K4 as u32)
    );
    // SAFETY: the request's buffer holds its length until the completion is reported.
    let written = unsafe { std::slice::from_raw_parts(w.buf, w.len as usize) };
    assert!(
        written == data.as_slice(),
        "the data reached the write buffer"
    );
    assert!(
        sent(&mut q).is_empty(),
        "no response before the write completed"
    );
    q.on_io_done(w.tag as u16, w.len as i32).expect("done");
    assert_eq!(
        sent(&mut q),
        vec![Out::Resp {
            cid: 7,
            sc: 0,
            dw0: 0
        }]
    );
}

#[test]
fn h2c_data_for_a_transfer_nobody_asked_for_is_a_protocol_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sh = shared(dir.path(), 1 << 20, QosLimits::default());
    let ctrl = controller(&sh, 0);
    let mut q = queue(&sh, &ctrl, 1, 4);
    let e = q
        .on_pdu(Instant::now(), &h2c(1, 0, 0, &[0; 16], true))
        .expect_err("refused");
    assert!(
        matches!(e, DatapathError::Pdu(PduError::BadTransferTag { .. })),
        "{e}"
    );
}

#[test]
fn exceeding_the_queue_depth_is_a_protocol_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sh = shared(dir.path(), 1 << 20, QosLimits::default());
    let ctrl = controller(&sh, 0);
    let mut q = queue(&sh, &ctrl, 1, 2);
    ok(&mut q, &rw(io::READ, 1, 0, 1, &[]));
    ok(&mut q, &rw(io::READ, 2, 1, 1, &[]));
    let e = q
        .on_pdu(Instant::now(), &rw(io::READ, 3, 2, 1, &[]))
        .expect_err("a third command on a queue of two");
    assert!(
        matches!(e, DatapathError::Pdu(PduError::Unexpected(_))),
        "{e}"
    );
}

/// A host reuses a slot as soon as it has the completion, which can arrive before the
/// target has seen its own send complete: that capsule waits for the send, it does not end
/// the connection (seen with 128 KiB reads at QD32 over loopback).
#[test]
fn a_capsule_for_a_slot_still_sending_waits_for_the_send() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sh = shared(dir.path(), 1 << 20, QosLimits::default());
    let ctrl = controller(&sh, 0);
    let mut q = queue(&sh, &ctrl, 1, 2);
    ok(&mut q, &rw(io::READ, 1, 0, 1, &[]));
    ok(&mut q, &rw(io::READ, 2, 1, 1, &[]));
    for r in submits(&mut q) {
        q.on_io_done(r.tag as u16, r.len as i32).expect("read done");
    }
    assert!(q.tx_start(Instant::now()), "both completions are staged");
    // The host saw them and sends a third command before the target's send completed.
    let third = rw(io::READ, 3, 2, 1, &[]);
    assert_eq!(
        q.on_pdu(Instant::now(), &third).expect("no error"),
        Flow::Stalled
    );
    assert_eq!(
        q.on_pdu(Instant::now(), &third).expect("no error"),
        Flow::Stalled,
        "offered again before the send completed, it still waits"
    );
    let mut iov = Vec::with_capacity(8);
    let n = q.tx_iov(&mut iov);
    q.on_sent(n).expect("sent");
    assert!(q.rx_may_resume(), "the send released the slots");
    ok(&mut q, &third);
    assert_eq!(submits(&mut q).len(), 1, "the third read runs");
}

#[test]
fn a_command_completes_only_when_all_its_parts_did_in_either_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sh = shared(dir.path(), 1 << 20, QosLimits::default());
    let ctrl = controller(&sh, 0);
    let mut q = queue(&sh, &ctrl, 1, 4);
    // Each case: (which part reports first, its result, the other's result, status). A
    // remote part moves no local bytes: it reports 0, or -errno.
    let cases = [
        ("local first", K4 as i32, 0, Status::SUCCESS),
        ("remote first", K4 as i32, 0, Status::SUCCESS),
        ("remote failed", K4 as i32, -libc::EIO, Status::WRITE_FAULT),
    ];
    for (k, (what, local, remote, want)) in cases.into_iter().enumerate() {
        let cid = 10 + k as u16;
        ok(
            &mut q,
            &rw(io::WRITE, cid, k as u64, 1, &pattern(K4, k as u8)),
        );
        let subs = submits(&mut q);
        assert_eq!(subs.len(), 1, "{what}: the local write");
        let slot = subs[0].tag as u16;
        q.add_parts(slot, 1); // the replica's copy of the write
        let order = if what == "local first" {
            [local, remote]
        } else {
            [remote, local]
        };
        q.on_io_done(slot, order[0]).expect("first part");
        assert!(
            sent(&mut q).is_empty(),
            "{what}: no response after one of two parts"
        );
        q.on_io_done(slot, order[1]).expect("second part");
        assert_eq!(
            sent(&mut q),
            vec![Out::Resp {
                cid,
                sc: sc(want),
                dw0: 0
            }],
            "{what}"
        );
    }
}

#[test]
fn dataset_management_waits_for_every_range() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sh = shared(dir.path(), 1 << 20, QosLimits::default());
    let ctrl = controller(&sh, 0);
    let mut q = queue(&sh, &ctrl, 1, 4);
    let mut c = sqe(io::DSM, 5, 1);
    set32(&mut c, 40, 1); // two ranges
    set32(&mut c, 44, 1 << 2); // deallocate
    set32(&mut c, 32, 32);
    c[39] = 0x01;
    let mut ranges = [0u8; 32];
    for (r, (slba, nlb)) in ranges.chunks_exact_mut(16).zip([(0u64, 2u32), (8, 1)]) {
        r[4..8].copy_from_slice(&nlb.to_le_bytes());
        r[8..16].copy_from_slice(&slba.to_le_bytes());
    }
    ok(&mut q, &capsule(&c, &ranges));
    let subs = submits(&mut q);
    assert_eq!(subs.len(), 2, "one deallocation per range");
    q.on_io_done(subs[1].tag as u16, 0).expect("second range");
    assert!(sent(&mut q).is_empty());
    q.on_io_done(subs[0].tag as u16, 0).expect("first range");
    assert_eq!(
        sent(&mut q),
        vec![Out::Resp {
            cid: 5,
            sc: 0,
            dw0: 0
        }]
    );
}

#[test]
fn throttled_reads_park_in_order_hold_no_buffer_and_resume_on_ticks() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 100 reads/s: the bucket holds max(one command, 50 ms of tokens) = 5 reads.
    let qos = QosLimits {
        read_iops: 100,
        ..QosLimits::default()
    };
    let sh = shared(dir.path(), 1 << 20, qos);
    let ctrl = controller(&sh, 0);
    let mut q = queue(&sh, &ctrl, 1, 16);
    for cid in 0..8u16 {
        ok(&mut q, &rw(io::READ, cid, cid as u64, 1, &[]));
    }
    let mut order: Vec<u64> = submits(&mut q).iter().map(|r| r.offset).collect();
    assert_eq!(order.len(), 5, "the burst passes, the rest parks");
    assert_eq!(
        sh.pool.in_use_bytes(),
        5 * K4,
        "parked reads hold no buffer"
    );
    assert!(q.wants_fast_tick(), "parked commands need retries");
    let give_up = Instant::now() + Duration::from_secs(20);
    while order.len() < 8 {
        assert!(Instant::now() < give_up, "parked reads never resumed");
        std::thread::sleep(Duration::from_millis(2));
        q.on_tick(Instant::now()).expect("tick");
        order.extend(submits(&mut q).iter().map(|r| r.offset));
    }
    let want: Vec<u64> = (0..8).map(|b| b * K4 as u64).collect();
    assert_eq!(order, want, "parked commands resume in arrival order");
    assert!(!q.wants_fast_tick());
}

#[test]
fn a_read_waits_for_a_pool_buffer_holding_nothing_and_resumes_on_a_grant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sh = shared(dir.path(), MAX_DATA_BYTES, QosLimits::default());
    let ctrl = controller(&sh, 0);
    let notify = Arc::new(Notifier::detached());
    let mut q = queue_with(&sh, &ctrl, 1, 4, notify.clone());
    let blocks = (MAX_DATA_BYTES / K4) as u32;
    ok(&mut q, &rw(io::READ, 1, 0, blocks, &[]));
    ok(&mut q, &rw(io::READ, 2, 0, 1, &[]));
    let subs = submits(&mut q);
    // The maximal read goes to the backend in parts of BACKEND_IO_BYTES_MAX, each on its own
    // stretch of the one buffer; the second read waits for the pool.
    assert_eq!(subs.len(), MAX_DATA_BYTES / BACKEND_IO_BYTES_MAX);
    assert!(subs
        .iter()
        .all(|r| r.tag == subs[0].tag && r.len as usize == BACKEND_IO_BYTES_MAX));
    assert_eq!(sh.pool.in_use_bytes(), MAX_DATA_BYTES);
    assert_eq!(sh.pool.waiting(), 1);
    let data = pattern(MAX_DATA_BYTES, 3);
    for r in &subs {
        // SAFETY: pointer arithmetic inside the read's buffer, compared, not dereferenced.
        assert_eq!(r.buf, unsafe { subs[0].buf.add(r.offset as usize) });
        let part = &data[r.offset as usize..][..r.len as usize];
        // SAFETY: the buffer is the read's until its completion; the test is the backend.
        unsafe { std::ptr::copy_nonoverlapping(part.as_ptr(), r.buf, part.len()) };
    }
    for (n, r) in subs.iter().enumerate() {
        assert!(
            sent(&mut q).is_empty(),
            "nothing is sent before part {n} is done"
        );
        q.on_io_done(r.tag as u16, r.len as i32).expect("part done");
    }
    let woken = notify.count();
    let out = sent(&mut q); // the buffer goes back once its data has been sent
    assert_eq!(out.len(), 2);
    assert_eq!(out[0], Out::Data { cid: 1, data });
    assert!(notify.count() > woken, "the grant woke the queue");
    assert!(
        submits(&mut q).is_empty(),
        "the grant waits for the wake-up"
    );
    q.on_wake().expect("wake");
    let subs = submits(&mut q);
    assert_eq!(
        (subs.len(), subs[0].len),
        (1, K4 as u32),
        "the second read runs"
    );
}

#[test]
fn in_capsule_data_without_any_buffer_stalls_until_the_reserve_is_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sh = shared(dir.path(), MAX_DATA_BYTES, QosLimits::default());
    let ctrl = controller(&sh, 0);
    let mut q = queue(&sh, &ctrl, 1, 4);
    let hog = sh.pool.try_take(MAX_DATA_BYTES).expect("the whole pool");
    ok(&mut q, &rw(io::WRITE, 1, 0, 1, &pattern(K4, 1))); // takes the reserve
    let first = submits(&mut q);
    let second = rw(io::WRITE, 2, 1, 1, &pattern(K4, 2));
    assert_eq!(
        q.on_pdu(Instant::now(), &second).expect("no error"),
        Flow::Stalled
    );
    assert!(q.rx_stalled() && !q.rx_may_resume());
    q.on_io_done(first[0].tag as u16, K4 as i32)
        .expect("first done");
    assert!(
        q.rx_may_resume(),
        "the reserve is back once the first write completed"
    );
    ok(&mut q, &second);
    assert_eq!(submits(&mut q).len(), 1);
    drop(hog);
}

#[test]
fn an_aer_is_answered_when_a_namespace_change_is_published() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sh = shared(dir.path(), 1 << 20, QosLimits::default());
    let ctrl = controller(&sh, 0);
    let mut q = queue(&sh, &ctrl, 0, 8);
    let mut set = sqe(admin::SET_FEATURES, 1, 0);
    set32(&mut set, 40, feat::ASYNC_EVENT as u32);
    set32(&mut set, 44, aen::CFG_NS_ATTR);
    ok(&mut q, &capsule(&set, &[]));
    assert_eq!(
        sent(&mut q),
        vec![Out::Resp {
            cid: 1,
            sc: 0,
            dw0: 0
        }]
    );
    ok(&mut q, &capsule(&sqe(admin::ASYNC_EVENT, 2, 0), &[]));
    assert!(sent(&mut q).is_empty(), "an AER waits for an event");
    q.on_wake().expect("nothing happened yet");
    assert!(sent(&mut q).is_empty());
    let two = vec![
        spec(dir.path(), 1, QosLimits::default()),
        spec(dir.path(), 2, QosLimits::default()),
    ];
    let table = NsTable::build(two, &sh.table(), 2).expect("table");
    ctrl.namespaces_published(&table);
    assert_eq!(ctrl.admin_notify.count(), 1, "the admin queue is woken");
    q.on_wake().expect("wake");
    assert_eq!(
        sent(&mut q),
        vec![Out::Resp {
            cid: 2,
            sc: 0,
            dw0: aen::NS_CHANGED as u64
        }]
    );
}

#[test]
fn keep_alive_expiry_ends_the_admin_queue_and_keep_alives_defer_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sh = shared(dir.path(), 1 << 20, QosLimits::default());
    let ctrl = controller(&sh, 1000);
    let mut q = queue(&sh, &ctrl, 0, 8);
    // Virtual time from here on: the queue reads no clock, it takes the driver's.
    let t0 = Instant::now();
    let grace = Duration::from_millis(KATO_GRACE_MS);
    let ka_at = t0 + Duration::from_millis(900);
    q.on_tick(ka_at).expect("within KATO");
    ok_at(&mut q, ka_at, &capsule(&sqe(admin::KEEP_ALIVE, 1, 0), &[]));
    assert_eq!(
        sent(&mut q),
        vec![Out::Resp {
            cid: 1,
            sc: 0,
            dw0: 0
        }]
    );
    q.on_tick(ka_at + Duration::from_millis(1000) + grace / 2)
        .expect("the keep-alive moved the deadline");
    let e = q
        .on_tick(ka_at + Duration::from_millis(1000) + 2 * grace)
        .expect_err("past KATO and its grace");
    assert!(
        matches!(e, DatapathError::Closed("keep alive timeout")),
        "{e}"
    );
}
