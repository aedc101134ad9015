//! The admission policy seen from the network (`datapath/src/admission.rs`): one
//! handshake deadline, per-address and per-host-NQN shares, separate discovery capacity,
//! bounded lifetimes and reclaim for controllers that see no namespace. Each test plays
//! the hostile peer over loopback and checks that a legitimate host still gets in.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::path::Path;
use std::thread::sleep;
use std::time::Duration;

use common::*;
use evstor_datapath::pdu::{self, HdrFields, IcReq, PduType, TxContext};
use evstor_datapath::{start, Acl, TargetConfig, TargetHandle};

/// A host NQN no ACL names: its controllers see no namespace.
const STRANGER: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000dead";

fn config() -> TargetConfig {
    TargetConfig::new("127.0.0.1:0".parse().expect("addr"), NQN)
}

/// Namespace 1 is for HOST only.
fn target_with(dir: &Path, cfg: TargetConfig) -> TargetHandle {
    start(cfg, vec![ns(dir, 1, Acl::List(vec![HOST.into()]))]).expect("start")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// Sends `bytes` one at a time, `gap` apart, until the target closes the connection;
/// returns how many it took before closing (None: it never did).
fn trickle(s: &mut TcpStream, bytes: &[u8], gap: Duration) -> Option<usize> {
    s.set_read_timeout(Some(gap)).expect("timeout");
    for (sent, b) in bytes.iter().enumerate() {
        if s.write_all(&[*b]).is_err() {
            return Some(sent);
        }
        let mut one = [0u8; 1];
        match s.read(&mut one) {
            Ok(0) => return Some(sent + 1),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Some(sent + 1),
            Ok(_) => panic!("the target answered an incomplete PDU"),
        }
    }
    None
}

fn icreq() -> Vec<u8> {
    let req = IcReq {
        pfv: 0,
        hpda: 0,
        digest: 0,
        maxr2t: 0,
    };
    pdu::encode(
        &TxContext::plain(),
        PduType::IcReq,
        0,
        &HdrFields::IcReq(req),
        &[],
    )
}

/// One byte every 200 ms never lets a per-read timeout of 1 s expire; the overall
/// deadline of 1 s closes the connection long before the 128-byte ICReq is complete.
#[test]
fn a_trickled_icreq_is_cut_off_by_the_handshake_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config();
    cfg.handshake_timeout = Duration::from_secs(1);
    let t = target_with(dir.path(), cfg);
    let mut s = TcpStream::connect(t.local_addr()).expect("tcp");
    let sent = trickle(&mut s, &icreq(), Duration::from_millis(200));
    assert!(sent.is_some(), "a trickled ICReq kept its connection");
    let (mut a, _) = Host::admin(t.local_addr(), HOST, false, 0);
    assert_eq!(a.identify(1, 0).0, OK, "others are served");
    t.shutdown();
}

/// The same deadline covers the Connect that follows a prompt ICReq.
#[test]
fn a_trickled_connect_is_cut_off_by_the_handshake_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config();
    cfg.handshake_timeout = Duration::from_secs(1);
    let t = target_with(dir.path(), cfg);
    let h = Host::tcp(t.local_addr(), false);
    let mut c = sqe(0x7f, 0);
    c[4] = 0x01;
    c[44] = 31;
    set32(&mut c, 32, 1024);
    c[39] = 0x01;
    let mut data = vec![0u8; 1024];
    data[256..256 + NQN.len()].copy_from_slice(NQN.as_bytes());
    data[512..512 + HOST.len()].copy_from_slice(HOST.as_bytes());
    let capsule = pdu::encode(&h.tx, PduType::CapsuleCmd, 0, &HdrFields::Cmd(&c), &data);
    let mut s = h.s;
    let sent = trickle(&mut s, &capsule, Duration::from_millis(200));
    assert!(sent.is_some(), "a trickled Connect kept its connection");
    t.shutdown();
}

/// One source address holds at most its share of connections (the next one is closed
/// at once) and of controllers (Controller Busy, retryable); other addresses are served.
#[test]
fn one_address_holds_a_bounded_share() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config();
    cfg.max_connections_per_addr = 2;
    cfg.max_controllers_per_addr = 1;
    let t = target_with(dir.path(), cfg);
    let addr = t.local_addr();
    let mut a = Host::over(tcp_from(ip("127.0.0.1"), addr), false);
    let (st, cntlid) = a.connect(NQN, HOST, 0xffff, 0, 0);
    assert_eq!(st, OK);
    assert_eq!(a.prop_set_cc(0x460001), OK);
    let mut second = Host::over(tcp_from(ip("127.0.0.1"), addr), false);
    assert_eq!(
        second.connect(NQN, STRANGER, 0xffff, 0, 0),
        (CONNECT_CTRL_BUSY, 0),
        "a second controller from the same address"
    );
    drop(second);
    let q = (0..100).find_map(|_| {
        let mut q = Host::try_over(tcp_from(ip("127.0.0.1"), addr), false)?;
        let r = q.try_connect(&ConnectArgs::io(HOST, cntlid as u16, 1));
        if r.is_none() {
            sleep(Duration::from_millis(50)); // the refused one may not be counted out yet
        }
        r.map(|r| (q, r))
    });
    let (_q, (st, _)) = q.expect("an I/O queue within the share");
    assert_eq!(st, OK);
    let mut third = tcp_from(ip("127.0.0.1"), addr);
    assert!(
        closed_within(&mut third, CLOSE_WAIT),
        "a third connection from 127.0.0.1 is refused at accept"
    );
    let mut other = Host::over(tcp_from(ip("127.0.0.2"), addr), false);
    assert_eq!(
        other.connect(NQN, HOST, 0xffff, 0, 0).0,
        OK,
        "127.0.0.2 is served"
    );
    t.shutdown();
}

/// One host NQN holds at most its share of controllers and connections, whatever address
/// it comes from; other host NQNs are served.
#[test]
fn one_host_nqn_holds_a_bounded_share() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config();
    cfg.max_controllers_per_host = 2;
    cfg.max_connections_per_host = 3;
    let t = target_with(dir.path(), cfg);
    let addr = t.local_addr();
    let (_a1, c1) = Host::admin(addr, STRANGER, false, 0);
    let mut a2 = Host::over(tcp_from(ip("127.0.0.2"), addr), false);
    assert_eq!(a2.connect(NQN, STRANGER, 0xffff, 0, 0).0, OK);
    assert_eq!(a2.prop_set_cc(0x460001), OK);
    let mut a3 = Host::over(tcp_from(ip("127.0.0.3"), addr), false);
    assert_eq!(
        a3.connect(NQN, STRANGER, 0xffff, 0, 0),
        (CONNECT_CTRL_BUSY, 0),
        "a third controller for the same host NQN"
    );
    let mut q1 = Host::tcp(addr, false);
    assert_eq!(
        q1.connect(NQN, STRANGER, c1, 1, 0).0,
        OK,
        "third connection"
    );
    let mut q2 = Host::over(tcp_from(ip("127.0.0.4"), addr), false);
    assert_eq!(
        q2.connect(NQN, STRANGER, c1, 2, 0),
        (CONNECT_CTRL_BUSY, 0),
        "a fourth connection for the same host NQN"
    );
    let (mut other, _) = Host::admin(addr, HOST, false, 0);
    assert_eq!(other.identify(1, 0).0, OK, "another host NQN is served");
    t.shutdown();
}

/// Filling the discovery port leaves the I/O port's capacity alone, and the other way
/// round; a full discovery port makes room by reclaiming its oldest controller (which
/// sees no namespace), a full I/O port of admitted hosts refuses.
#[test]
fn discovery_and_io_capacity_are_separate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config();
    cfg.discovery_addr = Some("127.0.0.1:0".parse().expect("addr"));
    cfg.max_connections = 2;
    cfg.max_discovery_connections = 2;
    let t = target_with(dir.path(), cfg);
    let disc_addr = t.discovery_addr().expect("discovery port");
    let discovery = |_| {
        let mut d = Host::tcp(disc_addr, false);
        assert_eq!(d.connect(DISC, STRANGER, 0xffff, 0, 0).0, OK);
        assert_eq!(d.prop_set_cc(1), OK);
        d
    };
    let mut d: Vec<Host> = (0..2).map(discovery).collect();
    let (mut a, _) = Host::admin(t.local_addr(), HOST, false, 0);
    let (mut b, _) = Host::admin(t.local_addr(), HOST, false, 0);
    assert_eq!(
        a.identify(1, 0).0,
        OK,
        "I/O port served with the discovery port full"
    );
    for h in d.iter_mut() {
        assert_eq!(
            h.get_log(0x70, 2048).0,
            OK,
            "discovery controllers untouched"
        );
    }
    let mut refused = TcpStream::connect(t.local_addr()).expect("tcp");
    assert!(
        closed_within(&mut refused, CLOSE_WAIT),
        "I/O port full of admitted hosts: refused"
    );
    let mut late = Host::tcp(disc_addr, false);
    assert_eq!(
        late.connect(DISC, STRANGER, 0xffff, 0, 0).0,
        OK,
        "discovery served"
    );
    assert!(
        closed_within(&mut d[0].s, CLOSE_WAIT),
        "the oldest discovery controller made room"
    );
    assert_eq!(d[1].get_log(0x70, 2048).0, OK);
    assert_eq!(b.identify(1, 0).0, OK, "I/O controllers untouched");
    t.shutdown();
}

/// Controllers of hosts no ACL admits, idle with KATO 0, cannot pin the I/O port: a
/// host that needs the slot reclaims the oldest of them; admitted hosts are never
/// reclaimed.
#[test]
fn idle_controllers_without_namespaces_are_reclaimed_for_admitted_hosts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config();
    cfg.max_connections = 2;
    let t = target_with(dir.path(), cfg);
    let addr = t.local_addr();
    let (mut idle1, _) = Host::admin(addr, STRANGER, false, 0);
    let (mut idle2, _) = Host::admin(addr, STRANGER, false, 0);
    let (mut legit, _) = Host::admin(addr, HOST, false, 0);
    assert_eq!(legit.identify(1, 0).0, OK);
    assert!(
        closed_within(&mut idle1.s, CLOSE_WAIT),
        "the oldest idle controller was reclaimed"
    );
    assert_eq!(
        idle2.identify(1, 0).0,
        OK,
        "the younger one is still served"
    );
    let (_legit2, _) = Host::admin(addr, HOST, false, 0);
    assert!(closed_within(&mut idle2.s, CLOSE_WAIT), "then the next one");
    let mut refused = TcpStream::connect(addr).expect("tcp");
    assert!(
        closed_within(&mut refused, CLOSE_WAIT),
        "admitted hosts are not reclaimed: refused"
    );
    assert_eq!(legit.identify(1, 0).0, OK);
    t.shutdown();
}

/// Connections that never finish their handshake cannot pin a port either: when it is
/// full, a newcomer takes the place of the oldest of them.
#[test]
fn stalled_handshakes_are_reclaimed_for_newcomers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config();
    cfg.max_connections = 2;
    let t = target_with(dir.path(), cfg);
    let addr = t.local_addr();
    let mut silent1 = tcp_from(ip("127.0.0.2"), addr);
    let mut silent2 = tcp_from(ip("127.0.0.3"), addr);
    let (mut legit, _) = Host::admin(addr, HOST, false, 0);
    assert!(
        closed_within(&mut silent1, CLOSE_WAIT),
        "the oldest stalled handshake made room"
    );
    let (_legit2, _) = Host::admin(addr, HOST, false, 0);
    assert!(closed_within(&mut silent2, CLOSE_WAIT), "then the next one");
    let mut refused = TcpStream::connect(addr).expect("tcp");
    assert!(
        closed_within(&mut refused, CLOSE_WAIT),
        "a port full of admitted hosts refuses"
    );
    assert_eq!(legit.identify(1, 0).0, OK);
    t.shutdown();
}

fn short_kato_target(dir: &Path) -> TargetHandle {
    let mut cfg = config();
    cfg.discovery_addr = Some("127.0.0.1:0".parse().expect("addr"));
    cfg.no_namespace_kato_ms = 1_000;
    target_with(dir, cfg)
}

/// KATO 0 means "at most `no_namespace_kato_ms`" for a controller that sees no namespace,
/// however it asked: at Connect, or later through Set Features.
#[test]
fn kato_zero_cannot_keep_a_controller_without_namespaces_forever() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = short_kato_target(dir.path());
    let (mut io_ctrl, _) = Host::admin(t.local_addr(), STRANGER, false, 0);
    let mut disc = Host::tcp(t.discovery_addr().expect("port"), false);
    assert_eq!(disc.connect(DISC, STRANGER, 0xffff, 0, 0).0, OK);
    let (mut set_later, _) = Host::admin(t.local_addr(), STRANGER, false, 3_600_000);
    assert_eq!(set_later.set_feature(0x0f, 0), OK, "Set Features KATO 0");
    assert_eq!(
        set_later.get_feature(0x0f),
        (OK, 1_000),
        "the KATO in force"
    );
    for (what, h) in [
        ("I/O controller", &mut io_ctrl),
        ("discovery controller", &mut disc),
        ("KATO 0 by Set Features", &mut set_later),
    ] {
        assert!(
            closed_within(&mut h.s, CLOSE_WAIT),
            "{what} outlived its bound"
        );
    }
    t.shutdown();
}

/// The bound changes nothing for hosts that keep their controller alive, nor for a
/// controller that sees a namespace (an ACL admitted it: its KATO 0 stands).
#[test]
fn keep_alives_and_admitted_hosts_are_unaffected_by_the_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = short_kato_target(dir.path());
    let (mut admitted, _) = Host::admin(t.local_addr(), HOST, false, 0);
    let (mut polite, _) = Host::admin(t.local_addr(), STRANGER, false, 1_000);
    for _ in 0..12 {
        sleep(Duration::from_millis(250));
        assert_eq!(polite.exec(sqe(0x18, 0), &[], 0, true).0, OK, "keep alive");
    }
    assert_eq!(
        admitted.identify(1, 0).0,
        OK,
        "KATO 0 with a namespace stands"
    );
    assert_eq!(admitted.get_feature(0x0f), (OK, 0));
    t.shutdown();
}
