//! Shared fixtures of the data path's loopback tests, and [`Host`]: a raw PDU client, not
//! a host. Ordinary I/O goes through the crate's initiator (`evstor_datapath::initiator`,
//! see `qos.rs`, `initiator*.rs`); `Host` is for protocol and admission tests that must
//! send exactly the PDUs they choose, including ones a correct host never sends: Connects
//! with wrong fields, reused queue IDs, KATO values, in-capsule data where R2T is due,
//! commands left unanswered or a queue dropped mid-flight, and reading the target's PDUs
//! one by one (C2HData before the response, R2T, C2HTermReq, a close). It panics on what
//! it does not expect, as a test should, and has no timeouts beyond the socket's.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::FromRawFd;
use std::path::Path;
use std::time::Duration;

use evstor_datapath::pdu::{
    self, Check, DataHdr, HdrFields, IcReq, Pdu, PduType, RxContext, TxContext, FLAG_LAST_PDU,
    IC_DDGST_ENABLE, IC_HDGST_ENABLE,
};
use evstor_datapath::{Acl, NamespaceSpec};

pub const NQN: &str = "nqn.2024-01.io.evstor:loop";
pub const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";
pub const DISC: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// A status as (SCT << 8 | SC).
pub type Sc = u16;
pub const OK: Sc = 0;
pub const INVALID_OPCODE: Sc = 0x001;
pub const INVALID_NS: Sc = 0x00b;
pub const LBA_RANGE: Sc = 0x080;
pub const INVALID_FIELD: Sc = 0x002;
pub const CONNECT_INVALID_PARAM: Sc = 0x182;
pub const CONNECT_CTRL_BUSY: Sc = 0x181;

/// Connect Invalid Parameters result pointing at a byte of the Connect data.
pub const fn in_data(offset: u64) -> u64 {
    (1 << 16) | offset
}

/// Every field of a Connect, for tests that get one wrong on purpose.
#[derive(Debug, Clone)]
pub struct ConnectArgs {
    pub subnqn: Vec<u8>,
    pub hostnqn: Vec<u8>,
    pub host_id: [u8; 16],
    pub cntlid: u16,
    pub qid: u16,
    pub sqsize: u16,
    pub kato_ms: u32,
}

impl ConnectArgs {
    /// An admin Connect to the loopback subsystem as `hostnqn`.
    pub fn admin(hostnqn: &str) -> ConnectArgs {
        ConnectArgs {
            subnqn: NQN.as_bytes().to_vec(),
            hostnqn: hostnqn.as_bytes().to_vec(),
            host_id: [7; 16],
            cntlid: 0xffff,
            qid: 0,
            sqsize: 31,
            kato_ms: 0,
        }
    }

    /// An I/O queue Connect to controller `cntlid`.
    pub fn io(hostnqn: &str, cntlid: u16, qid: u16) -> ConnectArgs {
        ConnectArgs {
            cntlid,
            qid,
            ..ConnectArgs::admin(hostnqn)
        }
    }
}

/// A TCP connection to `addr` from source address `from` (any 127.0.0.0/8 address works
/// over loopback), so tests can play several peers.
pub fn tcp_from(from: IpAddr, addr: SocketAddr) -> TcpStream {
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (from, addr.ip()) else {
        panic!("IPv4 only");
    };
    let sin = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor this function owns until it is wrapped;
    // the sockaddr structs live on the stack for the duration of each call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let s = TcpStream::from_raw_fd(fd);
        let a = sin(src, 0);
        let r = libc::bind(fd, (&a as *const libc::sockaddr_in).cast(), len);
        assert_eq!(r, 0, "bind {src}: {}", std::io::Error::last_os_error());
        let b = sin(dst, addr.port());
        let r = libc::connect(fd, (&b as *const libc::sockaddr_in).cast(), len);
        assert_eq!(r, 0, "connect: {}", std::io::Error::last_os_error());
        s
    }
}

/// Whether the peer closed `s` (EOF or reset) within `wait`; false if it stayed open.
pub fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).expect("timeout");
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // a response or terminate request before the close
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
}

/// How long a test waits for the target to close a connection it must close. Generous:
/// the tests assert that the close happens, never how fast.
pub const CLOSE_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub enum Got {
    Resp { status: Sc, dw0: u64, cid: u16 },
    Data { hdr: DataHdr, data: Vec<u8> },
    R2t(pdu::R2t),
    Term { fes: u16 },
}

pub struct Host {
    pub s: TcpStream,
    pub rx: RxContext,
    pub tx: TxContext,
    pub buf: Vec<u8>,
    pub next_cid: u16,
    pub maxh2c: u32,
}

pub fn sqe(opcode: u8, nsid: u32) -> [u8; 64] {
    let mut s = [0u8; 64];
    s[0] = opcode;
    s[4..8].copy_from_slice(&nsid.to_le_bytes());
    s
}

pub fn set32(s: &mut [u8; 64], at: usize, v: u32) {
    s[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

pub fn set64(s: &mut [u8; 64], at: usize, v: u64) {
    s[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

impl Host {
    pub fn tcp(addr: SocketAddr, digests: bool) -> Host {
        Host::over(TcpStream::connect(addr).expect("tcp connect"), digests)
    }

    /// ICReq/ICResp over an already connected socket.
    pub fn over(s: TcpStream, digests: bool) -> Host {
        Host::try_over(s, digests).expect("ICReq/ICResp exchange")
    }

    /// ICReq/ICResp over an already connected socket; None if the target closed it.
    pub fn try_over(s: TcpStream, digests: bool) -> Option<Host> {
        // As the kernel host does: a capsule sent behind an unacknowledged one must not
        // wait for a delayed ACK (it did, and throttled reads then slowed other streams).
        s.set_nodelay(true).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
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
                max_data: evstor_datapath::limits::MAX_DATA_BYTES as u32,
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
        h.s.write_all(&b).ok()?;
        let mut r = [0u8; 128];
        h.s.read_exact(&mut r).ok()?;
        match pdu::parse(&r, &h.rx) {
            Ok(Pdu::IcResp(resp)) => {
                assert_eq!(resp.digest, digest);
                h.maxh2c = resp.maxh2cdata;
            }
            other => panic!("bad ICResp {other:?}"),
        }
        h.rx.hdgst = digests;
        h.rx.ddgst = digests;
        Some(h)
    }

    /// Reads one PDU; None on EOF.
    pub fn recv(&mut self) -> Option<Got> {
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
    pub fn exec(
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

    pub fn send_h2c(&mut self, cid: u16, r: pdu::R2t, h2c: &[u8]) {
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

    pub fn connect(
        &mut self,
        subnqn: &str,
        hostnqn: &str,
        cntlid: u16,
        qid: u16,
        kato_ms: u32,
    ) -> (Sc, u64) {
        self.connect_with(&ConnectArgs {
            subnqn: subnqn.as_bytes().to_vec(),
            cntlid,
            qid,
            kato_ms,
            ..ConnectArgs::admin(hostnqn)
        })
    }

    /// Connect with every field given (NQN fields are copied raw, up to 256 bytes).
    pub fn connect_with(&mut self, a: &ConnectArgs) -> (Sc, u64) {
        let mut c = sqe(0x7f, 0);
        c[4] = 0x01;
        c[42..44].copy_from_slice(&a.qid.to_le_bytes());
        c[44..46].copy_from_slice(&a.sqsize.to_le_bytes());
        set32(&mut c, 48, a.kato_ms);
        let mut data = vec![0u8; 1024];
        data[0..16].copy_from_slice(&a.host_id);
        data[16..18].copy_from_slice(&a.cntlid.to_le_bytes());
        data[256..256 + a.subnqn.len()].copy_from_slice(&a.subnqn);
        data[512..512 + a.hostnqn.len()].copy_from_slice(&a.hostnqn);
        let (st, dw0, _) = self.exec(c, &data, 0, true);
        (st, dw0)
    }

    /// Connect, or None if the target closed the connection instead of answering.
    pub fn try_connect(&mut self, a: &ConnectArgs) -> Option<(Sc, u64)> {
        let mut c = sqe(0x7f, 0);
        c[4] = 0x01;
        c[1] = 0x40;
        c[2..4].copy_from_slice(&0xc0c0u16.to_le_bytes());
        c[42..44].copy_from_slice(&a.qid.to_le_bytes());
        c[44..46].copy_from_slice(&a.sqsize.to_le_bytes());
        set32(&mut c, 48, a.kato_ms);
        let mut data = vec![0u8; 1024];
        data[0..16].copy_from_slice(&a.host_id);
        data[16..18].copy_from_slice(&a.cntlid.to_le_bytes());
        data[256..256 + a.subnqn.len()].copy_from_slice(&a.subnqn);
        data[512..512 + a.hostnqn.len()].copy_from_slice(&a.hostnqn);
        set32(&mut c, 32, 1024);
        c[39] = 0x01;
        let b = pdu::encode(&self.tx, PduType::CapsuleCmd, 0, &HdrFields::Cmd(&c), &data);
        self.s.write_all(&b).ok()?;
        match self.recv()? {
            Got::Resp { status, dw0, .. } => Some((status, dw0)),
            _ => None,
        }
    }

    /// Set Features `fid` to `value` (CDW11).
    pub fn set_feature(&mut self, fid: u8, value: u32) -> Sc {
        let mut c = sqe(0x09, 0);
        set32(&mut c, 40, fid as u32);
        set32(&mut c, 44, value);
        self.exec(c, &[], 0, true).0
    }

    /// Get Features `fid`: (status, DW0).
    pub fn get_feature(&mut self, fid: u8) -> (Sc, u64) {
        let mut c = sqe(0x0a, 0);
        set32(&mut c, 40, fid as u32);
        let (st, dw0, _) = self.exec(c, &[], 0, true);
        (st, dw0)
    }

    pub fn prop_set_cc(&mut self, v: u32) -> Sc {
        let mut c = sqe(0x7f, 0);
        c[4] = 0x00;
        set32(&mut c, 44, 0x14);
        set64(&mut c, 48, v as u64);
        self.exec(c, &[], 0, true).0
    }

    pub fn prop_get(&mut self, off: u32, wide: bool) -> u64 {
        let mut c = sqe(0x7f, 0);
        c[4] = 0x04;
        c[40] = wide as u8;
        set32(&mut c, 44, off);
        let (st, v, _) = self.exec(c, &[], 0, true);
        assert_eq!(st, OK);
        v
    }

    /// Admin connect + enable: returns the controller ID.
    pub fn admin(addr: SocketAddr, hostnqn: &str, digests: bool, kato_ms: u32) -> (Host, u16) {
        let mut h = Host::tcp(addr, digests);
        let (st, dw0) = h.connect(NQN, hostnqn, 0xffff, 0, kato_ms);
        assert_eq!(st, OK, "admin connect");
        assert_eq!(h.prop_set_cc(0x460001), OK);
        assert_eq!(h.prop_get(0x1c, false) & 1, 1, "CSTS.RDY");
        (h, dw0 as u16)
    }

    pub fn identify(&mut self, cns: u8, nsid: u32) -> (Sc, Vec<u8>) {
        let mut c = sqe(0x06, nsid);
        c[40] = cns;
        let (st, _, d) = self.exec(c, &[], 4096, true);
        (st, d)
    }

    pub fn get_log(&mut self, lid: u8, len: u32) -> (Sc, Vec<u8>) {
        let mut c = sqe(0x02, 0xffff_ffff);
        let numd = len / 4 - 1;
        set32(&mut c, 40, lid as u32 | ((numd & 0xffff) << 16));
        set32(&mut c, 44, numd >> 16);
        let (st, _, d) = self.exec(c, &[], len, true);
        (st, d)
    }

    pub fn rw(
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

pub fn ns(dir: &Path, nsid: u32, host_acl: Acl) -> NamespaceSpec {
    NamespaceSpec {
        nsid,
        uuid: [nsid as u8; 16],
        size_bytes: 16 << 20,
        backing: evstor_datapath::Backing::File(dir.join(format!("ns{nsid}"))),
        host_acl,
        ip_acl: Acl::AllowAny,
        qos: Default::default(),
        ana: Default::default(),
    }
}

pub fn io_queue(addr: SocketAddr, cntlid: u16, digests: bool) -> Host {
    let mut q = Host::tcp(addr, digests);
    let (st, _) = q.connect(NQN, HOST, cntlid, 1, 0);
    assert_eq!(st, OK, "io connect");
    q
}
