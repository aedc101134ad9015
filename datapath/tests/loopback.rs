//! In-process protocol tests over loopback: the tiny NVMe/TCP host of `common` drives the target through Connect, admin, I/O, AEN, keep-alive,
//! ACL and malformed-PDU paths. Fast (no VM); the real-kernel proof is `host_vm.rs`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use evstor_datapath::pdu::{self, DataHdr, HdrFields, PduType, FLAG_LAST_PDU};
use evstor_datapath::{start, Acl, TargetConfig, TargetHandle};

fn target(dir: &Path, max_connections: usize) -> TargetHandle {
    let mut cfg = TargetConfig::new("127.0.0.1:0".parse().expect("addr"), NQN);
    cfg.max_connections = max_connections;
    let specs = vec![
        ns(dir, 1, Acl::List(vec![HOST.into()])),
        ns(dir, 3, Acl::AllowNone),
    ];
    start(cfg, specs).expect("start")
}

#[test]
fn identify_and_io_with_and_without_digests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = target(dir.path(), 16);
    for digests in [false, true] {
        let (mut a, cntlid) = Host::admin(t.local_addr(), HOST, digests, 0);
        let (st, idc) = a.identify(1, 0);
        assert_eq!(st, OK);
        assert_eq!(u16::from_le_bytes([idc[78], idc[79]]), cntlid);
        let (st, list) = a.identify(2, 0);
        assert_eq!(st, OK);
        assert_eq!(&list[..8], &[1, 0, 0, 0, 0, 0, 0, 0], "ACL hides nsid 3");
        let (st, idn) = a.identify(0, 1);
        assert_eq!(st, OK);
        assert_eq!(u64::from_le_bytes(idn[0..8].try_into().expect("8")), 4096);
        assert_eq!(a.identify(3, 3).0, INVALID_NS, "descriptors of a hidden ns");

        let mut q = io_queue(t.local_addr(), cntlid, digests);
        let pattern: Vec<u8> = (0..32 * 1024)
            .map(|i| (i * 7 + digests as usize) as u8)
            .collect();
        assert_eq!(
            q.rw(true, 1, 10, &pattern[..4096], 1, true).0,
            OK,
            "in-capsule write"
        );
        assert_eq!(
            q.rw(true, 1, 11, &pattern, 8, false).0,
            OK,
            "R2T write in several H2CData"
        );
        let (st, back) = q.rw(false, 1, 10, &[], 9, false);
        assert_eq!(st, OK);
        assert_eq!(&back[..4096], &pattern[..4096]);
        assert_eq!(&back[4096..], &pattern[..]);
        assert_eq!(q.rw(false, 1, 4095, &[], 2, false).0, LBA_RANGE);
        assert_eq!(
            q.rw(false, 3, 0, &[], 1, false).0,
            INVALID_NS,
            "hidden by ACL"
        );
        assert_eq!(q.rw(false, 9, 0, &[], 1, false).0, INVALID_NS);
        assert_eq!(q.exec(sqe(0x55, 1), &[], 0, true).0, INVALID_OPCODE);
        let hosts = t.connected_hosts();
        assert!(hosts
            .iter()
            .any(|h| h.cntlid == cntlid && h.io_queues == 1 && h.nsids == [1]));
    }
    t.shutdown();
}

#[test]
fn io_connect_must_match_an_existing_controller_and_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = target(dir.path(), 16);
    let (_a, cntlid) = Host::admin(t.local_addr(), HOST, false, 0);
    let mut q = Host::tcp(t.local_addr(), false);
    assert_eq!(
        q.connect(NQN, "nqn.2014-08.org.nvmexpress:uuid:other", cntlid, 1, 0),
        (CONNECT_INVALID_PARAM, in_data(512)),
        "another host's controller: the host NQN is what does not match"
    );
    let mut q = Host::tcp(t.local_addr(), false);
    assert_eq!(
        q.connect(NQN, HOST, cntlid.wrapping_add(100), 1, 0).0,
        CONNECT_INVALID_PARAM
    );
    let mut q = Host::tcp(t.local_addr(), false);
    assert_eq!(
        q.connect("nqn.wrong", HOST, 0xffff, 0, 0).0,
        CONNECT_INVALID_PARAM
    );
    t.shutdown();
}

#[test]
fn discovery_controller_lists_the_subsystem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = target(dir.path(), 16);
    let mut d = Host::tcp(t.local_addr(), false);
    assert_eq!(d.connect(DISC, HOST, 0xffff, 0, 0).0, OK);
    assert_eq!(d.prop_set_cc(1), OK);
    let (st, log) = d.get_log(0x70, 2048);
    assert_eq!(st, OK);
    assert_eq!(log[8], 1, "one record");
    let port = t.local_addr().port().to_string();
    assert_eq!(&log[1024 + 32..1024 + 32 + port.len()], port.as_bytes());
    assert_eq!(&log[1024 + 256..1024 + 256 + NQN.len()], NQN.as_bytes());
    assert_eq!(
        d.identify(2, 0).0 & 0xff,
        0x02,
        "discovery controllers have no namespaces"
    );
    t.shutdown();
}

#[test]
fn new_namespace_completes_an_aer_and_lands_in_the_changed_list() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = target(dir.path(), 16);
    let (mut a, _) = Host::admin(t.local_addr(), HOST, false, 0);
    let mut aec = sqe(0x09, 0);
    set32(&mut aec, 40, 0x0b);
    set32(&mut aec, 44, 1 << 8);
    assert_eq!(a.exec(aec, &[], 0, true).0, OK);
    let mut aer = sqe(0x0c, 0);
    aer[2..4].copy_from_slice(&0x7000u16.to_le_bytes());
    let b = pdu::encode(&a.tx, PduType::CapsuleCmd, 0, &HdrFields::Cmd(&aer), &[]);
    a.s.write_all(&b).expect("send AER");
    t.set_namespaces(vec![
        ns(dir.path(), 1, Acl::List(vec![HOST.into()])),
        ns(dir.path(), 2, Acl::AllowAny),
        ns(dir.path(), 3, Acl::AllowNone),
    ]);
    match a.recv() {
        Some(Got::Resp {
            status: OK,
            dw0,
            cid: 0x7000,
        }) => assert_eq!(dw0, 0x04_00_02),
        other => panic!("expected the AER completion, got {other:?}"),
    }
    let (st, log) = a.get_log(0x04, 4096);
    assert_eq!(st, OK);
    assert_eq!(&log[..8], &[2, 0, 0, 0, 0, 0, 0, 0]);
    let (_, list) = a.identify(2, 0);
    assert_eq!(&list[..8], &[1, 0, 0, 0, 2, 0, 0, 0]);
    t.shutdown();
}

#[test]
fn keep_alive_timeout_tears_the_controller_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = target(dir.path(), 16);
    let (mut a, cntlid) = Host::admin(t.local_addr(), HOST, false, 500);
    let mut q = io_queue(t.local_addr(), cntlid, false);
    let began = Instant::now();
    assert!(
        a.recv().is_none(),
        "admin queue should be closed by the target"
    );
    assert!(q.recv().is_none(), "I/O queue should follow its controller");
    assert!(began.elapsed() < Duration::from_secs(8));
    assert!(t.connected_hosts().is_empty());
    t.shutdown();
}

#[test]
fn malformed_pdu_ends_only_its_own_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = target(dir.path(), 16);
    let (mut good, _) = Host::admin(t.local_addr(), HOST, false, 0);
    let (mut bad, _) = Host::admin(t.local_addr(), HOST, false, 0);
    let mut b = pdu::encode(
        &bad.tx,
        PduType::CapsuleCmd,
        0,
        &HdrFields::Cmd(&sqe(0x06, 0)),
        &[],
    );
    b[2] = 99; // bad HLEN
    bad.s.write_all(&b).expect("send garbage");
    match bad.recv() {
        Some(Got::Term { fes }) => assert_eq!(fes, 1),
        other => panic!("expected C2HTermReq, got {other:?}"),
    }
    assert!(
        bad.recv().is_none(),
        "connection closed after the terminate request"
    );
    assert_eq!(
        good.identify(1, 0).0,
        OK,
        "the other connection is unaffected"
    );
    t.shutdown();
}

/// The connection over the limit is closed at once (EOF or reset, not a silent socket),
/// and one within the limit is served, also once a slot is freed.
#[test]
fn connection_limit_is_enforced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = target(dir.path(), 2);
    let (_a, _) = Host::admin(t.local_addr(), HOST, false, 0);
    let (b, _) = Host::admin(t.local_addr(), HOST, false, 0);
    let mut s = TcpStream::connect(t.local_addr()).expect("tcp");
    assert!(
        closed_within(&mut s, CLOSE_WAIT),
        "third connection refused"
    );
    drop(b);
    // The target notices the close on its own time: try until it has.
    let served = (0..100).any(|_| {
        let s = TcpStream::connect(t.local_addr()).expect("tcp");
        let ok = Host::try_over(s, false)
            .and_then(|mut h| h.try_connect(&ConnectArgs::admin(HOST)))
            .is_some_and(|(st, _)| st == OK);
        if !ok {
            std::thread::sleep(Duration::from_millis(50));
        }
        ok
    });
    assert!(served, "a connection within the limit is served");
    t.shutdown();
}

/// A userspace initiator may send a fresh Host Identifier on every Connect: I/O queues
/// are matched to their controller by controller ID and host NQN only.
#[test]
fn io_queue_connect_with_another_host_id_is_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = target(dir.path(), 16);
    let (_a, cntlid) = Host::admin(t.local_addr(), HOST, false, 0);
    let mut q = Host::tcp(t.local_addr(), false);
    let io = ConnectArgs {
        host_id: [0x42; 16],
        ..ConnectArgs::io(HOST, cntlid, 1)
    };
    assert_eq!(q.connect_with(&io), (OK, cntlid as u64));
    assert_eq!(
        q.rw(false, 1, 0, &[], 1, false).0,
        OK,
        "the queue serves I/O"
    );
    t.shutdown();
}

/// Every Connect Invalid Parameters result names the offending field: byte offset, and
/// bit 16 set when it is in the Connect data rather than the command.
#[test]
fn connect_errors_point_at_the_offending_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = TargetConfig::new("127.0.0.1:0".parse().expect("addr"), NQN);
    cfg.max_connections = 64;
    cfg.max_connections_per_addr = 64;
    cfg.max_controllers_per_addr = 64;
    cfg.max_controllers_per_host = 64;
    let t = start(cfg, vec![ns(dir.path(), 1, Acl::AllowAny)]).expect("start");
    let (_a, cntlid) = Host::admin(t.local_addr(), HOST, false, 0);
    let over_255 = |prefix: &str| {
        let mut v = prefix.as_bytes().to_vec();
        v.resize(256, b'a');
        v
    };
    let long = format!("nqn.{}", "a".repeat(220)); // 224 bytes, terminated
    let cases: Vec<(&str, ConnectArgs, u64)> = vec![
        (
            "host NQN without terminator",
            ConnectArgs {
                hostnqn: over_255("nqn.2014-08.x:"),
                ..ConnectArgs::admin(HOST)
            },
            in_data(512),
        ),
        (
            "host NQN not UTF-8",
            ConnectArgs {
                hostnqn: b"nqn.2014-08.x:\xff\xfe".to_vec(),
                ..ConnectArgs::admin(HOST)
            },
            in_data(512),
        ),
        (
            "host NQN without nqn.",
            ConnectArgs {
                hostnqn: b"host-a".to_vec(),
                ..ConnectArgs::admin(HOST)
            },
            in_data(512),
        ),
        (
            "host NQN of 224 bytes",
            ConnectArgs {
                hostnqn: long.as_bytes().to_vec(),
                ..ConnectArgs::admin(HOST)
            },
            in_data(512),
        ),
        (
            "empty host NQN",
            ConnectArgs {
                hostnqn: Vec::new(),
                ..ConnectArgs::admin(HOST)
            },
            in_data(512),
        ),
        (
            "subsystem NQN without terminator",
            ConnectArgs {
                subnqn: over_255(NQN),
                ..ConnectArgs::admin(HOST)
            },
            in_data(256),
        ),
        (
            "subsystem NQN not UTF-8",
            ConnectArgs {
                subnqn: b"nqn.2024-01.io.evstor:\xff".to_vec(),
                ..ConnectArgs::admin(HOST)
            },
            in_data(256),
        ),
        (
            "unknown subsystem",
            ConnectArgs {
                subnqn: b"nqn.2024-01.io.evstor:other".to_vec(),
                ..ConnectArgs::admin(HOST)
            },
            in_data(256),
        ),
        (
            "admin Connect with a static CNTLID",
            ConnectArgs {
                cntlid: 5,
                ..ConnectArgs::admin(HOST)
            },
            in_data(16),
        ),
        (
            "unknown controller",
            ConnectArgs::io(HOST, cntlid.wrapping_add(100), 1),
            in_data(16),
        ),
        (
            "another host's controller",
            ConnectArgs::io("nqn.2014-08.org.nvmexpress:uuid:other", cntlid, 1),
            in_data(512),
        ),
        (
            "SQSIZE 0",
            ConnectArgs {
                sqsize: 0,
                ..ConnectArgs::admin(HOST)
            },
            44,
        ),
        (
            "SQSIZE beyond MQES",
            ConnectArgs {
                sqsize: 4096,
                ..ConnectArgs::admin(HOST)
            },
            44,
        ),
        (
            "KATO beyond the maximum",
            ConnectArgs {
                kato_ms: u32::MAX,
                ..ConnectArgs::admin(HOST)
            },
            48,
        ),
        (
            "I/O queue of a discovery controller",
            ConnectArgs {
                subnqn: DISC.as_bytes().to_vec(),
                ..ConnectArgs::io(HOST, cntlid, 1)
            },
            42,
        ),
    ];
    for (what, args, want) in cases {
        let mut h = Host::tcp(t.local_addr(), false);
        assert_eq!(
            h.connect_with(&args),
            (CONNECT_INVALID_PARAM, want),
            "{what}"
        );
    }
    t.shutdown();
}

#[test]
fn data_digest_error_fails_the_command_not_the_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = target(dir.path(), 16);
    let (_a, cntlid) = Host::admin(t.local_addr(), HOST, true, 0);
    let mut q = io_queue(t.local_addr(), cntlid, true);
    let mut c = sqe(0x01, 1);
    c[1] = 0x40;
    c[2..4].copy_from_slice(&0x4242u16.to_le_bytes());
    set32(&mut c, 32, 4096);
    c[39] = 0x01;
    let mut b = pdu::encode(
        &q.tx,
        PduType::CapsuleCmd,
        0,
        &HdrFields::Cmd(&c),
        &[0xaa; 4096],
    );
    let last = b.len() - 1;
    b[last] ^= 0xff; // corrupt the data digest
    q.s.write_all(&b).expect("send");
    match q.recv() {
        Some(Got::Resp {
            status,
            cid: 0x4242,
            ..
        }) => assert_eq!(status, 0x022),
        other => panic!("expected Transient Transport Error, got {other:?}"),
    }
    let (st, data) = q.rw(false, 1, 0, &[], 1, false);
    assert_eq!(st, OK, "connection still usable");
    assert_ne!(
        &data[..],
        &[0xaa; 4096][..],
        "corrupted write was not applied"
    );
    t.shutdown();
}

#[test]
fn h2c_data_for_an_unknown_transfer_terminates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = target(dir.path(), 16);
    let (_a, cntlid) = Host::admin(t.local_addr(), HOST, false, 0);
    let mut q = io_queue(t.local_addr(), cntlid, false);
    let d = DataHdr {
        cccid: 5,
        ttag: 77,
        offset: 0,
        length: 512,
    };
    let b = pdu::encode(
        &q.tx,
        PduType::H2cData,
        FLAG_LAST_PDU,
        &HdrFields::Data(d),
        &[0; 512],
    );
    q.s.write_all(&b).expect("send");
    assert!(matches!(q.recv(), Some(Got::Term { fes: 1 })));
    assert!(q.recv().is_none());
    t.shutdown();
}

#[test]
fn exceeding_the_queue_depth_terminates_the_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = target(dir.path(), 16);
    let (_a, cntlid) = Host::admin(t.local_addr(), HOST, false, 0);
    let mut q = io_queue(t.local_addr(), cntlid, false); // SQSIZE 31: 32 entries
    for cid in 0..33u16 {
        let mut c = sqe(0x01, 1);
        c[1] = 0x40;
        c[2..4].copy_from_slice(&cid.to_le_bytes());
        set32(&mut c, 32, 4096);
        c[39] = 0x5a; // data follows via R2T, which this host never answers
        let b = pdu::encode(&q.tx, PduType::CapsuleCmd, 0, &HdrFields::Cmd(&c), &[]);
        q.s.write_all(&b).expect("send");
    }
    let mut r2ts = 0;
    loop {
        match q.recv() {
            Some(Got::R2t(_)) => r2ts += 1,
            Some(Got::Term { fes }) => {
                assert_eq!(fes, 2, "PDU sequence error");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(r2ts, 32);
    assert!(q.recv().is_none());
    t.shutdown();
}

/// The largest transfer MDTS allows is one command each way (an R2T write in many H2CData
/// PDUs, a read in C2HData), split into backend parts inside the target and reassembled in
/// place; one block more is refused with Invalid Field and the queue goes on.
#[test]
fn a_maximal_transfer_round_trips_and_one_block_more_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = target(dir.path(), 16);
    let (mut a, cntlid) = Host::admin(t.local_addr(), HOST, false, 0);
    let (st, idc) = a.identify(1, 0);
    assert_eq!(st, OK);
    let mdts_bytes = 4096usize << idc[77];
    assert_eq!(mdts_bytes, evstor_datapath::limits::MAX_DATA_BYTES);
    assert!(mdts_bytes >= 2 << 20, "at least 2 MiB");
    let blocks = (mdts_bytes / 4096) as u32;
    let mut q = io_queue(t.local_addr(), cntlid, true);
    let data: Vec<u8> = (0..mdts_bytes)
        .map(|i| (i / 4096 * 31 + i * 7) as u8)
        .collect();
    assert_eq!(
        q.rw(true, 1, 5, &data, blocks, false).0,
        OK,
        "maximal write"
    );
    let (st, back) = q.rw(false, 1, 5, &[], blocks, false);
    assert_eq!(st, OK, "maximal read");
    assert!(back == data, "the maximal transfer came back in place");
    let (st, _) = q.rw(false, 1, 0, &[], blocks + 1, false);
    assert_eq!(st, INVALID_FIELD, "one block over MDTS");
    let (st, back) = q.rw(false, 1, 5, &[], 1, false);
    assert_eq!((st, &back[..]), (OK, &data[..4096]), "the queue goes on");
    t.shutdown();
}

#[test]
fn write_zeroes_deallocate_and_flush() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = target(dir.path(), 16);
    let (_a, cntlid) = Host::admin(t.local_addr(), HOST, false, 0);
    let mut q = io_queue(t.local_addr(), cntlid, false);
    let ones = vec![0xffu8; 16 * 4096];
    assert_eq!(q.rw(true, 1, 0, &ones, 16, false).0, OK);
    let mut wz = sqe(0x08, 1);
    set64(&mut wz, 40, 2);
    set32(&mut wz, 48, 1); // 2 blocks
    assert_eq!(q.exec(wz, &[], 0, true).0, OK);
    let mut ranges = vec![0u8; 32];
    ranges[4..8].copy_from_slice(&3u32.to_le_bytes()); // 3 blocks at LBA 8
    ranges[8..16].copy_from_slice(&8u64.to_le_bytes());
    ranges[20..24].copy_from_slice(&1u32.to_le_bytes()); // 1 block at LBA 14
    ranges[24..32].copy_from_slice(&14u64.to_le_bytes());
    let mut dsm = sqe(0x09, 1);
    set32(&mut dsm, 40, 1); // NR = 2 ranges
    set32(&mut dsm, 44, 1 << 2); // AD
    assert_eq!(q.exec(dsm, &ranges, 0, true).0, OK);
    assert_eq!(q.exec(sqe(0x00, 1), &[], 0, true).0, OK, "flush");
    let (st, back) = q.rw(false, 1, 0, &[], 16, false);
    assert_eq!(st, OK);
    let zero: Vec<u64> = vec![2, 3, 8, 9, 10, 14];
    for lba in 0..16u64 {
        let blk = &back[lba as usize * 4096..(lba as usize + 1) * 4096];
        let want = if zero.contains(&lba) { 0 } else { 0xff };
        assert!(blk.iter().all(|&b| b == want), "LBA {lba}");
    }
    let mut bad = sqe(0x09, 1);
    set32(&mut bad, 44, 1 << 2);
    let mut far = vec![0u8; 16];
    far[4..8].copy_from_slice(&1u32.to_le_bytes());
    far[8..16].copy_from_slice(&4096u64.to_le_bytes());
    assert_eq!(q.exec(bad, &far, 0, true).0, LBA_RANGE);
    t.shutdown();
}

#[test]
fn ip_acl_and_removal_change_what_a_host_sees() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = TargetConfig::new("127.0.0.1:0".parse().expect("addr"), NQN);
    cfg.max_connections = 8;
    let mut n1 = ns(dir.path(), 1, Acl::AllowAny);
    n1.ip_acl = Acl::List(vec!["10.9.9.9".into()]);
    let n2 = ns(dir.path(), 2, Acl::AllowAny);
    let t = start(cfg, vec![n1.clone(), n2.clone()]).expect("start");
    let (mut a, cntlid) = Host::admin(t.local_addr(), HOST, false, 0);
    let (_, list) = a.identify(2, 0);
    assert_eq!(
        &list[..8],
        &[2, 0, 0, 0, 0, 0, 0, 0],
        "nsid 1 is not for 127.0.0.1"
    );
    let mut q = io_queue(t.local_addr(), cntlid, false);
    assert_eq!(q.rw(false, 1, 0, &[], 1, false).0, INVALID_NS);
    assert_eq!(q.rw(false, 2, 0, &[], 1, false).0, OK);
    n1.ip_acl = Acl::List(vec!["127.0.0.1".into()]);
    t.set_namespaces(vec![n1]);
    assert_eq!(
        q.rw(false, 1, 0, &[], 1, false).0,
        OK,
        "admitted after the ACL change"
    );
    assert_eq!(q.rw(false, 2, 0, &[], 1, false).0, INVALID_NS, "removed");
    let (st, log) = a.get_log(0x04, 4096);
    assert_eq!(st, OK);
    assert_eq!(&log[..12], &[1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
    t.shutdown();
}

/// Random commands (any opcode, any fields) on admin and I/O queues: every one gets a
/// completion, no reactor panics, and the target keeps serving.
#[test]
fn random_commands_always_complete_and_never_panic() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let panicked = Arc::new(AtomicBool::new(false));
    let flag = panicked.clone();
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        flag.store(true, Ordering::SeqCst);
        prev(info);
    }));
    let dir = tempfile::tempdir().expect("tempdir");
    let t = target(dir.path(), 16);
    let (a, cntlid) = Host::admin(t.local_addr(), HOST, false, 0);
    let q = io_queue(t.local_addr(), cntlid, false);
    let hosts = std::cell::RefCell::new((a, q));
    let mut runner = TestRunner::new(Config {
        cases: 400,
        ..Config::default()
    });
    // Real opcodes and namespace IDs most of the time, so handlers see odd fields.
    let opcode = prop_oneof![
        prop::sample::select(vec![0x00u8, 0x01, 0x02, 0x06, 0x08, 0x09, 0x0a, 0x18, 0x7f]),
        any::<u8>(),
    ];
    let nsid = prop_oneof![
        prop::sample::select(vec![0u32, 1, 2, 3, 1024, 1025, u32::MAX]),
        any::<u32>(),
    ];
    let cdw10_12 = prop::array::uniform3(prop_oneof![0u32..64, any::<u32>()]);
    let strat = (
        (any::<bool>(), opcode, nsid, cdw10_12),
        prop::array::uniform32(any::<u8>()),
        prop::array::uniform32(any::<u8>()),
        prop_oneof![Just(0u32), 0u32..9000],
        any::<bool>(),
    );
    runner
        .run(&strat, |((admin, op, nsid, dws), lo, hi, len, inline)| {
            let mut c = [0u8; 64];
            c[..32].copy_from_slice(&lo);
            c[32..].copy_from_slice(&hi);
            c[0] = op;
            c[4..8].copy_from_slice(&nsid.to_le_bytes());
            if op == 0x7f {
                c[4] = [0u8, 4, 1, 0x7e][(nsid % 4) as usize];
            }
            for (k, dw) in dws.iter().enumerate() {
                set32(&mut c, 40 + 4 * k, *dw);
            }
            if c[0] == 0x0c || (c[0] == 0x7f && c[4] == 0x01) {
                c[0] = 0x18; // AERs park forever and Connect is a different test: keep alive instead
            }
            let st = if c[0] & 3 == 1 && len > 0 && c[0] != 0x7f {
                let data = vec![0x5au8; len as usize];
                let mut h = hosts.borrow_mut();
                let host = if admin { &mut h.0 } else { &mut h.1 };
                host.exec(c, &data, 0, inline && len <= 8192).0
            } else {
                let want = if c[0] & 3 == 2 { len } else { 0 };
                let mut h = hosts.borrow_mut();
                let host = if admin { &mut h.0 } else { &mut h.1 };
                host.exec(c, &[], want, true).0
            };
            // Completing at all is checked by `exec` (it panics on a dropped connection);
            // what it completes with must follow the spec for the odd fields it was given.
            let supported: &[u8] = if admin {
                &[0x02, 0x06, 0x08, 0x09, 0x0a, 0x0c, 0x18, 0x7f]
            } else {
                &[0x00, 0x01, 0x02, 0x08, 0x09, 0x7f]
            };
            let nsid = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
            prop_assert!(
                st >> 8 <= 3,
                "status type {:#x} is not one NVMe defines",
                st >> 8
            );
            // A transfer the target refuses is refused before the opcode or namespace is looked
            // at (a bidirectional opcode always is), so these hold for commands without data.
            let plain = len == 0 && c[0] & 3 != 3;
            if plain && !supported.contains(&c[0]) {
                prop_assert_eq!(st, INVALID_OPCODE, "opcode {:#04x}", c[0]);
            }
            let broadcast_flush = c[0] == 0 && nsid == u32::MAX;
            let io_command = !admin && c[0] != 0x7f && supported.contains(&c[0]);
            if plain && io_command && nsid != 1 && !broadcast_flush {
                prop_assert_eq!(st, INVALID_NS, "opcode {:#04x} on nsid {}", c[0], nsid);
            }
            Ok(())
        })
        .expect("every random command completed");
    assert!(!panicked.load(Ordering::SeqCst), "a target thread panicked");
    let (mut a, mut q) = hosts.into_inner();
    assert_eq!(a.identify(1, 0).0, OK);
    assert_eq!(q.rw(false, 1, 0, &[], 1, false).0, OK);
    t.shutdown();
}

/// Random bytes after the ICReq/ICResp exchange: the target answers with a terminate
/// request or a refusal and closes; it never panics and keeps accepting connections.
#[test]
fn garbage_after_the_handshake_closes_only_that_connection() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let dir = tempfile::tempdir().expect("tempdir");
    let t = target(dir.path(), 16);
    let mut runner = TestRunner::new(Config {
        cases: 100,
        ..Config::default()
    });
    let strat = (
        prop::collection::vec(any::<u8>(), 1..400),
        prop::sample::select(vec![0u8, 4, 6, 2, 0x55]),
        any::<bool>(),
    );
    runner
        .run(&strat, |(mut bytes, first, digests)| {
            bytes[0] = first;
            let mut h = Host::tcp(t.local_addr(), digests);
            h.s.write_all(&bytes).expect("send");
            let _ = h.s.shutdown(std::net::Shutdown::Write);
            let mut sink = Vec::new();
            // The target must close its side (EOF), not hang until our read timeout.
            let r = h.s.read_to_end(&mut sink);
            prop_assert!(r.is_ok(), "target did not close: {r:?}");
            Ok(())
        })
        .expect("garbage handled");
    let (mut a, _) = Host::admin(t.local_addr(), HOST, false, 0);
    assert_eq!(a.identify(1, 0).0, OK);
    t.shutdown();
}
