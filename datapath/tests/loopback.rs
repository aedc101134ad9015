//! In-process protocol tests over loopback: a tiny NVMe/TCP host built on the crate's
//! own PDU codec drives the target through Connect, admin, I/O, AEN, keep-alive,
//! ACL and malformed-PDU paths. Fast (no VM); the real-kernel proof is `host_vm.rs`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use evstor_datapath::pdu::{
    self, Check, DataHdr, HdrFields, IcReq, Pdu, PduType, RxContext, TxContext, FLAG_LAST_PDU,
    IC_DDGST_ENABLE, IC_HDGST_ENABLE,
};
use evstor_datapath::{start, Acl, NamespaceSpec, TargetConfig, TargetHandle};

const NQN: &str = "nqn.2024-01.io.evstor:loop";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";
const DISC: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// A status as (SCT << 8 | SC).
type Sc = u16;
const OK: Sc = 0;
const INVALID_OPCODE: Sc = 0x001;
const INVALID_NS: Sc = 0x00b;
const LBA_RANGE: Sc = 0x080;
const CONNECT_INVALID_PARAM: Sc = 0x182;

#[derive(Debug)]
enum Got {
    Resp { status: Sc, dw0: u64, cid: u16 },
    Data { hdr: DataHdr, data: Vec<u8> },
    R2t(pdu::R2t),
    Term { fes: u16 },
}

struct Host {
    s: TcpStream,
    rx: RxContext,
    tx: TxContext,
    buf: Vec<u8>,
    next_cid: u16,
    maxh2c: u32,
}

fn sqe(opcode: u8, nsid: u32) -> [u8; 64] {
    let mut s = [0u8; 64];
    s[0] = opcode;
    s[4..8].copy_from_slice(&nsid.to_le_bytes());
    s
}

fn set32(s: &mut [u8; 64], at: usize, v: u32) {
    s[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn set64(s: &mut [u8; 64], at: usize, v: u64) {
    s[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

impl Host {
    fn tcp(addr: SocketAddr, digests: bool) -> Host {
        let s = TcpStream::connect(addr).expect("tcp connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let digest = if digests {
            IC_HDGST_ENABLE | IC_DDGST_ENABLE
        } else {
            0
        };
        let req = IcReq {
            pfv: 0,
            hpda: 0,
            digest,
            maxr2t: 0,
        };
        let b = pdu::encode(
            &TxContext::plain(),
            PduType::IcReq,
            0,
            &HdrFields::IcReq(req),
            &[],
        );
        let mut h = Host {
            s,
            rx: RxContext {
                from_controller: true,
                hdgst: false,
                ddgst: false,
                data_align: 4,
                max_data: 1 << 20,
            },
            tx: TxContext {
                hdgst: digests,
                ddgst: digests,
                data_align: 4,
            },
            buf: Vec::new(),
            next_cid: 1,
            maxh2c: 0,
        };
        h.s.write_all(&b).expect("send icreq");
        let mut r = [0u8; 128];
        h.s.read_exact(&mut r).expect("icresp");
        match pdu::parse(&r, &h.rx) {
            Ok(Pdu::IcResp(resp)) => {
                assert_eq!(resp.digest, digest);
                h.maxh2c = resp.maxh2cdata;
            }
            other => panic!("bad ICResp {other:?}"),
        }
        h.rx.hdgst = digests;
        h.rx.ddgst = digests;
        h
    }

    /// Reads one PDU; None on EOF.
    fn recv(&mut self) -> Option<Got> {
        loop {
            if let Ok(Check::Complete(n)) = pdu::check(&self.buf, &self.rx) {
                if self.buf.len() >= n {
                    let bytes: Vec<u8> = self.buf.drain(..n).collect();
                    return Some(
                        match pdu::parse(&bytes, &self.rx).expect("target sent a bad PDU") {
                            Pdu::CapsuleResp { cqe } => Got::Resp {
                                status: (u16::from_le_bytes([cqe[14], cqe[15]]) >> 1) & 0x7ff,
                                dw0: u64::from_le_bytes(cqe[0..8].try_into().expect("8 bytes")),
                                cid: u16::from_le_bytes([cqe[12], cqe[13]]),
                            },
                            Pdu::C2hData { hdr, data, .. } => Got::Data {
                                hdr,
                                data: data.to_vec(),
                            },
                            Pdu::R2t(r) => Got::R2t(r),
                            Pdu::C2hTermReq { fes, .. } => Got::Term { fes },
                            other => panic!("unexpected {other:?}"),
                        },
                    );
                }
            }
            let mut tmp = [0u8; 65536];
            match self.s.read(&mut tmp) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
            }
        }
    }

    /// Runs one command to completion: H2C data in-capsule (if `inline`) or via R2T.
    fn exec(
        &mut self,
        mut cmd: [u8; 64],
        h2c: &[u8],
        c2h_len: u32,
        inline: bool,
    ) -> (Sc, u64, Vec<u8>) {
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1);
        cmd[2..4].copy_from_slice(&cid.to_le_bytes());
        let len = if h2c.is_empty() {
            c2h_len
        } else {
            h2c.len() as u32
        };
        set32(&mut cmd, 32, len);
        cmd[39] = if inline && !h2c.is_empty() {
            0x01
        } else {
            0x5a
        };
        cmd[1] = 0x40;
        let data: &[u8] = if inline { h2c } else { &[] };
        let b = pdu::encode(
            &self.tx,
            PduType::CapsuleCmd,
            0,
            &HdrFields::Cmd(&cmd),
            data,
        );
        self.s.write_all(&b).expect("send capsule");
        let mut out = vec![0u8; c2h_len as usize];
        loop {
            match self.recv().expect("connection closed mid-command") {
                Got::Resp {
                    status,
                    dw0,
                    cid: c,
                } => {
                    assert_eq!(c, cid);
                    return (status, dw0, out);
                }
                Got::Data { hdr, data } => {
                    let o = hdr.offset as usize;
                    out[o..o + data.len()].copy_from_slice(&data);
                }
                Got::R2t(r) => self.send_h2c(cid, r, h2c),
                Got::Term { fes } => panic!("terminated (fes {fes})"),
            }
        }
    }

    fn send_h2c(&mut self, cid: u16, r: pdu::R2t, h2c: &[u8]) {
        let mut off = r.offset;
        let end = r.offset + r.length;
        while off < end {
            let n = (end - off).min(self.maxh2c).min(8192);
            let d = DataHdr {
                cccid: cid,
                ttag: r.ttag,
                offset: off,
                length: n,
            };
            let flags = if off + n == end { FLAG_LAST_PDU } else { 0 };
            let chunk = &h2c[off as usize..(off + n) as usize];
            let b = pdu::encode(
                &self.tx,
                PduType::H2cData,
                flags,
                &HdrFields::Data(d),
                chunk,
            );
            self.s.write_all(&b).expect("send h2c");
            off += n;
        }
    }

    fn connect(
        &mut self,
        subnqn: &str,
        hostnqn: &str,
        cntlid: u16,
        qid: u16,
        kato_ms: u32,
    ) -> (Sc, u64) {
        let mut c = sqe(0x7f, 0);
        c[4] = 0x01;
        c[42..44].copy_from_slice(&qid.to_le_bytes());
        c[44..46].copy_from_slice(&31u16.to_le_bytes());
        set32(&mut c, 48, kato_ms);
        let mut data = vec![0u8; 1024];
        data[0..16].copy_from_slice(&[7; 16]);
        data[16..18].copy_from_slice(&cntlid.to_le_bytes());
        data[256..256 + subnqn.len()].copy_from_slice(subnqn.as_bytes());
        data[512..512 + hostnqn.len()].copy_from_slice(hostnqn.as_bytes());
        let (st, dw0, _) = self.exec(c, &data, 0, true);
        (st, dw0)
    }

    fn prop_set_cc(&mut self, v: u32) -> Sc {
        let mut c = sqe(0x7f, 0);
        c[4] = 0x00;
        set32(&mut c, 44, 0x14);
        set64(&mut c, 48, v as u64);
        self.exec(c, &[], 0, true).0
    }

    fn prop_get(&mut self, off: u32, wide: bool) -> u64 {
        let mut c = sqe(0x7f, 0);
        c[4] = 0x04;
        c[40] = wide as u8;
        set32(&mut c, 44, off);
        let (st, v, _) = self.exec(c, &[], 0, true);
        assert_eq!(st, OK);
        v
    }

    /// Admin connect + enable: returns the controller ID.
    fn admin(addr: SocketAddr, hostnqn: &str, digests: bool, kato_ms: u32) -> (Host, u16) {
        let mut h = Host::tcp(addr, digests);
        let (st, dw0) = h.connect(NQN, hostnqn, 0xffff, 0, kato_ms);
        assert_eq!(st, OK, "admin connect");
        assert_eq!(h.prop_set_cc(0x460001), OK);
        assert_eq!(h.prop_get(0x1c, false) & 1, 1, "CSTS.RDY");
        (h, dw0 as u16)
    }

    fn identify(&mut self, cns: u8, nsid: u32) -> (Sc, Vec<u8>) {
        let mut c = sqe(0x06, nsid);
        c[40] = cns;
        let (st, _, d) = self.exec(c, &[], 4096, true);
        (st, d)
    }

    fn get_log(&mut self, lid: u8, len: u32) -> (Sc, Vec<u8>) {
        let mut c = sqe(0x02, 0xffff_ffff);
        let numd = len / 4 - 1;
        set32(&mut c, 40, lid as u32 | ((numd & 0xffff) << 16));
        set32(&mut c, 44, numd >> 16);
        let (st, _, d) = self.exec(c, &[], len, true);
        (st, d)
    }

    fn rw(
        &mut self,
        write: bool,
        nsid: u32,
        slba: u64,
        data_or_len: &[u8],
        nlb: u32,
        inline: bool,
    ) -> (Sc, Vec<u8>) {
        let mut c = sqe(if write { 0x01 } else { 0x02 }, nsid);
        set64(&mut c, 40, slba);
        set32(&mut c, 48, nlb - 1);
        let (st, _, d) = if write {
            self.exec(c, data_or_len, 0, inline)
        } else {
            self.exec(c, &[], nlb * 4096, false)
        };
        (st, d)
    }
}

fn ns(dir: &Path, nsid: u32, host_acl: Acl) -> NamespaceSpec {
    NamespaceSpec {
        nsid,
        uuid: [nsid as u8; 16],
        size_bytes: 16 << 20,
        backing: evstor_datapath::Backing::File(dir.join(format!("ns{nsid}"))),
        host_acl,
        ip_acl: Acl::AllowAny,
    }
}

fn target(dir: &Path, max_connections: usize) -> TargetHandle {
    let mut cfg = TargetConfig::new("127.0.0.1:0".parse().expect("addr"), NQN);
    cfg.max_connections = max_connections;
    let specs = vec![
        ns(dir, 1, Acl::List(vec![HOST.into()])),
        ns(dir, 3, Acl::AllowNone),
    ];
    start(cfg, specs).expect("start")
}

fn io_queue(addr: SocketAddr, cntlid: u16, digests: bool) -> Host {
    let mut q = Host::tcp(addr, digests);
    let (st, _) = q.connect(NQN, HOST, cntlid, 1, 0);
    assert_eq!(st, OK, "io connect");
    q
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
        q.connect(NQN, "nqn.other", cntlid, 1, 0).0,
        CONNECT_INVALID_PARAM
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

#[test]
fn connection_limit_is_enforced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = target(dir.path(), 2);
    let (_a, _) = Host::admin(t.local_addr(), HOST, false, 0);
    let (_b, _) = Host::admin(t.local_addr(), HOST, false, 0);
    let mut s = TcpStream::connect(t.local_addr()).expect("tcp");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut one = [0u8; 1];
    assert!(
        matches!(s.read(&mut one), Ok(0) | Err(_)),
        "third connection refused"
    );
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
/// completion, no connection thread panics, and the target keeps serving.
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
        0u32..9000,
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
            if c[0] & 3 == 1 && len > 0 && c[0] != 0x7f {
                let data = vec![0x5au8; len as usize];
                let mut h = hosts.borrow_mut();
                let host = if admin { &mut h.0 } else { &mut h.1 };
                let (st, _, _) = host.exec(c, &data, 0, inline && len <= 8192);
                prop_assert!(st != 0xffff);
            } else {
                let want = if c[0] & 3 == 2 { len } else { 0 };
                let mut h = hosts.borrow_mut();
                let host = if admin { &mut h.0 } else { &mut h.1 };
                let (st, _, _) = host.exec(c, &[], want, true);
                prop_assert!(st != 0xffff);
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
