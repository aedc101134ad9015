//! A minimal synchronous NVMe/TCP host for tests, benches and tools; not a production
//! initiator.
//!
//! It speaks the protocol through the crate's own [`pdu`](crate::pdu) codec, so the
//! target's tests exercise the same wire code from both ends, and it stays small on
//! purpose: one admin queue and one I/O queue (one TCP connection each), one command in
//! flight per queue, no digests, no keep-alive (KATO 0), no AEN. Every socket read and
//! write is bounded by a timeout ([`INITIATOR_TIMEOUT_MS`] unless the caller picks one),
//! so a stuck target fails a test instead of hanging it. Transfers larger than the
//! target's MDTS are split; data up to the I/O queue's in-capsule size travels in the
//! command capsule, larger writes answer the target's R2T with H2CData PDUs.
//!
//! A command the target completes with an error status comes back as
//! [`InitiatorError::Status`] and the session stays usable; any transport or protocol
//! failure leaves that queue unusable ([`InitiatorError::Broken`] from then on), as the
//! byte stream can no longer be trusted.
//!
//! ```no_run
//! use evstor_datapath::initiator::Session;
//!
//! let addr = "127.0.0.1:4420".parse()?;
//! let mut s = Session::connect(addr, "nqn.2024-01.io.evstor:x", "nqn.2014-08.org.nvmexpress:uuid:h")?;
//! let nsid = s.active_namespaces()?[0];
//! s.write(nsid, 0, &[0xab; 8192])?;
//! assert_eq!(s.read(nsid, 0, 2)?, vec![0xab; 8192]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::limits::{
    ADMIN_IN_CAPSULE_DATA_BYTES, INITIATOR_MAX_DATA_BYTES, INITIATOR_QUEUE_DEPTH,
    INITIATOR_READY_POLLS_MAX, INITIATOR_TIMEOUT_MS, LBA_BYTES, MAX_HDR_BYTES, MAX_NAMESPACES,
    NQN_BYTES,
};
use crate::nvme::{
    self, fctype, prop, Status, DISCOVERY_NQN, FABRICS, SGL_DATA_OFFSET, SGL_TRANSPORT_DATA,
};
use crate::pdu::{
    self, Check, DataHdr, HdrFields, IcReq, Pdu, PduError, PduType, RxContext, TxContext, CH_LEN,
    DIGEST_LEN, FLAG_LAST_PDU, SQE_LEN,
};

/// Identify data structures are 4 KiB.
const IDENTIFY_BYTES: usize = 4096;
/// Fabrics Connect data (host ID, cntlid, subsystem and host NQNs).
const CONNECT_DATA_BYTES: usize = 1024;
/// Connect cntlid asking the target to allocate a controller.
const CNTLID_DYNAMIC: u16 = 0xffff;
/// SQE flags: PSDT = SGL for data (NVMe/TCP carries no PRPs).
const PSDT_SGL: u8 = 0x40;
/// CC: EN, IOSQES = 6 (64-byte SQEs), IOCQES = 4 (16-byte CQEs).
const CC_ENABLE: u64 = 0x1 | (6 << 16) | (4 << 20);
/// CSTS.RDY.
const CSTS_RDY: u64 = 0x1;
/// Pause between CSTS polls while the controller gets ready.
const READY_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Identify CNS values.
const CNS_NAMESPACE: u8 = 0x00;
const CNS_CONTROLLER: u8 = 0x01;
const CNS_ACTIVE_NS_LIST: u8 = 0x02;
/// Entries in one active namespace list page.
const NS_LIST_ENTRIES: usize = IDENTIFY_BYTES / 4;
/// Read/Write CDW12 bit: Force Unit Access.
const RW_FUA: u32 = 1 << 30;
/// DSM CDW11 bit: Attribute Deallocate.
const DSM_AD: u32 = 1 << 2;
/// Bytes of one DSM range entry.
const DSM_RANGE_BYTES: usize = 16;
/// Write Zeroes NLB is a 0-based 16-bit field.
const WRITE_ZEROES_BLOCKS_MAX: u64 = 1 << 16;

/// Why an initiator call failed.
#[derive(Debug, thiserror::Error)]
pub enum InitiatorError {
    /// The target completed the command with an error status.
    #[error("command {opcode:#04x} failed: {status}")]
    Status {
        /// Opcode of the failed command (0x7f for Fabrics).
        opcode: u8,
        /// The completion status.
        status: Status,
    },
    /// Socket I/O failed or timed out.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The target sent a PDU the codec rejects.
    #[error("target sent a malformed PDU: {0}")]
    Pdu(#[from] PduError),
    /// The target ended the connection with a C2HTermReq.
    #[error("target terminated the connection (FES {fes:#x}, FEI {fei})")]
    Terminated {
        /// Fatal error status.
        fes: u16,
        /// Fatal error information.
        fei: u32,
    },
    /// The target broke the protocol (wrong PDU, command ID, offset or length).
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    /// The caller asked for something this initiator cannot send.
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    /// An earlier transport or protocol failure left this queue unusable.
    #[error("queue unusable after an earlier transport failure")]
    Broken,
}

impl InitiatorError {
    /// The NVMe status, when the target completed the command with an error.
    pub fn status(&self) -> Option<Status> {
        match self {
            InitiatorError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Result of initiator calls.
pub type Result<T> = std::result::Result<T, InitiatorError>;

/// What Identify Namespace says about a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// Size in logical blocks (NSZE); 0 for an inactive namespace ID.
    pub blocks: u64,
    /// Logical block size in bytes (from the LBA format FLBAS selects).
    pub block_bytes: u32,
}

/// One controller on the target: an admin queue and one I/O queue.
pub struct Session {
    // Field order is drop order: the I/O queue goes before the admin queue that owns the
    // controller, as a host disconnects.
    io: Queue,
    admin: Queue,
    cntlid: u16,
    /// Largest data transfer of one command (target MDTS, capped by ours).
    max_xfer_bytes: usize,
    /// Block size per namespace, learned on first use (at most MAX_NAMESPACES entries).
    block_bytes: Vec<(u32, u32)>,
}

impl Session {
    /// Connects to `addr` as `host_nqn` with the default timeout ([`INITIATOR_TIMEOUT_MS`]).
    pub fn connect(addr: SocketAddr, subsystem_nqn: &str, host_nqn: &str) -> Result<Session> {
        let timeout = Duration::from_millis(INITIATOR_TIMEOUT_MS);
        Session::connect_timeout(addr, subsystem_nqn, host_nqn, timeout)
    }

    /// Creates a controller (admin Connect, CC.EN, CSTS.RDY), reads Identify Controller,
    /// then connects I/O queue 1; `timeout` bounds every socket read and write.
    pub fn connect_timeout(
        addr: SocketAddr,
        subsystem_nqn: &str,
        host_nqn: &str,
        timeout: Duration,
    ) -> Result<Session> {
        if subsystem_nqn == DISCOVERY_NQN {
            return Err(InitiatorError::Invalid(
                "discovery controllers have no I/O queues",
            ));
        }
        let host = HostIds::new(subsystem_nqn, host_nqn)?;
        let mut admin = Queue::open(addr, timeout, ADMIN_IN_CAPSULE_DATA_BYTES)?;
        let cntlid = admin.connect(&host, 0, CNTLID_DYNAMIC)?;
        enable(&mut admin)?;
        let mut id = [0u8; IDENTIFY_BYTES];
        admin.exec(identify(CNS_CONTROLLER, 0), Xfer::FromTarget(&mut id))?;
        let (max_xfer_bytes, in_capsule_bytes) = transfer_limits(&id);
        let mut io = Queue::open(addr, timeout, in_capsule_bytes)?;
        io.connect(&host, 1, cntlid)?;
        Ok(Session {
            io,
            admin,
            cntlid,
            max_xfer_bytes,
            block_bytes: Vec::new(),
        })
    }

    /// The controller ID the target allocated.
    pub fn cntlid(&self) -> u16 {
        self.cntlid
    }

    /// Largest data transfer of one command; longer reads and writes are split.
    pub fn max_transfer_bytes(&self) -> usize {
        self.max_xfer_bytes
    }

    /// Active namespace IDs visible to this host, ascending (Identify CNS 02h).
    pub fn active_namespaces(&mut self) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        let mut page = [0u8; IDENTIFY_BYTES];
        loop {
            let after = ids.last().copied().unwrap_or(0);
            let cmd = identify(CNS_ACTIVE_NS_LIST, after);
            self.admin.exec(cmd, Xfer::FromTarget(&mut page))?;
            let before = ids.len();
            ids.extend(page.chunks_exact(4).map(le32).take_while(|&id| id != 0));
            let got = ids.len() - before;
            if ids[before..].iter().any(|&id| id <= after) {
                return Err(InitiatorError::Protocol("namespace list not ascending"));
            }
            if got < NS_LIST_ENTRIES {
                return Ok(ids);
            }
        }
    }

    /// Identify Namespace: size and block size.
    pub fn namespace(&mut self, nsid: u32) -> Result<NamespaceInfo> {
        let mut id = [0u8; IDENTIFY_BYTES];
        self.admin
            .exec(identify(CNS_NAMESPACE, nsid), Xfer::FromTarget(&mut id))?;
        let blocks = le64(&id[0..8]);
        let format = (id[26] & 0x0f) as usize;
        let lbads = id[128 + format * 4 + 2];
        let block_bytes = match lbads {
            0 => 0, // inactive namespace: the structure is all zeroes
            9..=31 => 1u32 << lbads,
            _ => return Err(InitiatorError::Protocol("LBA data size out of range")),
        };
        Ok(NamespaceInfo {
            blocks,
            block_bytes,
        })
    }

    /// Size of a namespace in logical blocks (NSZE).
    pub fn namespace_blocks(&mut self, nsid: u32) -> Result<u64> {
        Ok(self.namespace(nsid)?.blocks)
    }

    /// Reads `blocks` logical blocks from `lba`.
    pub fn read(&mut self, nsid: u32, lba: u64, blocks: u32) -> Result<Vec<u8>> {
        if blocks == 0 {
            return Err(InitiatorError::Invalid("a read of zero blocks"));
        }
        check_range(lba, blocks as u64)?;
        let bs = self.lba_bytes(nsid)? as usize;
        let mut out = vec![0u8; blocks as usize * bs];
        let per_cmd = self.max_xfer_bytes / bs;
        for (i, chunk) in out.chunks_mut(per_cmd * bs).enumerate() {
            let slba = lba + (i * per_cmd) as u64;
            let cmd = rw_cmd(nvme::io::READ, nsid, slba, chunk.len() / bs, 0);
            self.io.exec(cmd, Xfer::FromTarget(chunk))?;
        }
        Ok(out)
    }

    /// Writes `data` (whole logical blocks) at `lba`.
    pub fn write(&mut self, nsid: u32, lba: u64, data: &[u8]) -> Result<()> {
        self.write_with(nsid, lba, data, 0)
    }

    /// Writes with Force Unit Access: durable when each command completes.
    pub fn write_fua(&mut self, nsid: u32, lba: u64, data: &[u8]) -> Result<()> {
        self.write_with(nsid, lba, data, RW_FUA)
    }

    fn write_with(&mut self, nsid: u32, lba: u64, data: &[u8], cdw12: u32) -> Result<()> {
        let bs = self.lba_bytes(nsid)? as usize;
        if data.is_empty() || !data.len().is_multiple_of(bs) {
            return Err(InitiatorError::Invalid("write data is not whole blocks"));
        }
        check_range(lba, (data.len() / bs) as u64)?;
        let per_cmd = self.max_xfer_bytes / bs;
        for (i, chunk) in data.chunks(per_cmd * bs).enumerate() {
            let slba = lba + (i * per_cmd) as u64;
            let cmd = rw_cmd(nvme::io::WRITE, nsid, slba, chunk.len() / bs, cdw12);
            self.io.exec(cmd, Xfer::ToTarget(chunk))?;
        }
        Ok(())
    }

    /// Flush: everything completed before is durable.
    pub fn flush(&mut self, nsid: u32) -> Result<()> {
        self.io.exec(command(nvme::io::FLUSH, nsid), Xfer::None)?;
        Ok(())
    }

    /// Dataset Management with Attribute Deallocate over `blocks` blocks from `lba`.
    /// Zero blocks is a no-op.
    pub fn deallocate(&mut self, nsid: u32, lba: u64, blocks: u64) -> Result<()> {
        check_range(lba, blocks)?;
        let mut done = 0u64;
        while done < blocks {
            let n = (blocks - done).min(u32::MAX as u64) as u32;
            let mut cmd = command(nvme::io::DSM, nsid);
            put32(&mut cmd, 40, 0); // NR: one range (0-based)
            put32(&mut cmd, 44, DSM_AD);
            let mut range = [0u8; DSM_RANGE_BYTES];
            put32(&mut range, 4, n);
            put64(&mut range, 8, lba + done);
            self.io.exec(cmd, Xfer::ToTarget(&range))?;
            done += n as u64;
        }
        Ok(())
    }

    /// Write Zeroes over `blocks` blocks from `lba`.
    /// Zero blocks is a no-op.
    pub fn write_zeroes(&mut self, nsid: u32, lba: u64, blocks: u64) -> Result<()> {
        check_range(lba, blocks)?;
        let mut done = 0u64;
        while done < blocks {
            let n = (blocks - done).min(WRITE_ZEROES_BLOCKS_MAX);
            let cmd = rw_cmd(nvme::io::WRITE_ZEROES, nsid, lba + done, n as usize, 0);
            self.io.exec(cmd, Xfer::None)?;
            done += n;
        }
        Ok(())
    }

    /// Block size of `nsid`, from Identify Namespace on first use. A namespace Identify
    /// does not describe (inactive, hidden, unknown) is not remembered and assumes the
    /// target's 4 KiB, so the I/O still reaches the target and fails with its own status.
    fn lba_bytes(&mut self, nsid: u32) -> Result<u32> {
        if let Some(&(_, bs)) = self.block_bytes.iter().find(|(id, _)| *id == nsid) {
            return Ok(bs);
        }
        let info = match self.namespace(nsid) {
            Ok(info) if info.block_bytes != 0 => info,
            Err(e) if e.status().is_none() => return Err(e),
            _ => return Ok(LBA_BYTES as u32),
        };
        if info.block_bytes as usize > self.max_xfer_bytes {
            return Err(InitiatorError::Protocol("block size larger than MDTS"));
        }
        if self.block_bytes.len() < MAX_NAMESPACES as usize {
            self.block_bytes.push((nsid, info.block_bytes));
        }
        Ok(info.block_bytes)
    }
}

/// Sets CC.EN and waits, boundedly, for CSTS.RDY.
fn enable(admin: &mut Queue) -> Result<()> {
    admin.exec(property_set(prop::CC, CC_ENABLE), Xfer::None)?;
    for _ in 0..INITIATOR_READY_POLLS_MAX {
        if admin.exec(property_get(prop::CSTS), Xfer::None)? & CSTS_RDY != 0 {
            return Ok(());
        }
        std::thread::sleep(READY_POLL_INTERVAL);
    }
    Err(InitiatorError::Protocol("controller never set CSTS.RDY"))
}

/// (largest transfer, I/O queue in-capsule bytes) from Identify Controller.
fn transfer_limits(id: &[u8; IDENTIFY_BYTES]) -> (usize, usize) {
    let ours = INITIATOR_MAX_DATA_BYTES as usize;
    // MDTS is in units of the minimum page size, 4 KiB for this target; 0 means no limit.
    let max_xfer = match id[77] {
        0 => ours,
        m if m >= 20 => ours,
        m => (4096usize << m).min(ours),
    };
    let ioccsz = le32(&id[1792..1796]) as usize;
    let in_capsule = (ioccsz * 16).saturating_sub(SQE_LEN).min(max_xfer);
    (max_xfer, in_capsule)
}

/// Host identity sent in every Connect of a session.
struct HostIds {
    subnqn: String,
    hostnqn: String,
    host_id: [u8; 16],
}

impl HostIds {
    fn new(subnqn: &str, hostnqn: &str) -> Result<HostIds> {
        // The wire fields are NUL-terminated within NQN_BYTES.
        let fits = |n: &str| !n.is_empty() && n.len() < NQN_BYTES && !n.contains('\0');
        if !fits(subnqn) || !fits(hostnqn) {
            return Err(InitiatorError::Invalid("NQN empty or too long"));
        }
        Ok(HostIds {
            subnqn: subnqn.to_owned(),
            hostnqn: hostnqn.to_owned(),
            host_id: *uuid::Uuid::new_v4().as_bytes(),
        })
    }
}

/// The data of one command.
enum Xfer<'a> {
    None,
    /// Host to controller (in-capsule when small enough, otherwise on R2T).
    ToTarget(&'a [u8]),
    /// Controller to host; exactly this many bytes must arrive.
    FromTarget(&'a mut [u8]),
}

/// One queue pair on one TCP connection, one command at a time.
struct Queue {
    sock: TcpStream,
    rx: RxContext,
    tx: TxContext,
    /// One maximal PDU from the target; allocated at open.
    rx_buf: Vec<u8>,
    /// One outgoing PDU (header and data); allocated at open.
    tx_buf: Vec<u8>,
    /// Largest H2CData payload the target accepts (ICResp MAXH2CDATA).
    maxh2c: usize,
    in_capsule_bytes: usize,
    next_cid: u16,
    broken: bool,
}

impl Queue {
    /// TCP connect and ICReq/ICResp without digests.
    fn open(addr: SocketAddr, timeout: Duration, in_capsule_bytes: usize) -> Result<Queue> {
        let sock = TcpStream::connect_timeout(&addr, timeout)?;
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        sock.set_nodelay(true)?;
        let max_data = INITIATOR_MAX_DATA_BYTES;
        let mut q = Queue {
            sock,
            rx: RxContext {
                from_controller: true,
                hdgst: false,
                ddgst: false,
                data_align: 4, // HPDA 0
                max_data,
            },
            tx: TxContext::plain(),
            rx_buf: vec![0; MAX_HDR_BYTES + DIGEST_LEN + max_data as usize],
            tx_buf: Vec::with_capacity(MAX_HDR_BYTES + max_data as usize),
            maxh2c: 0,
            in_capsule_bytes,
            next_cid: 0,
            broken: false,
        };
        let req = IcReq {
            pfv: 0,
            hpda: 0,
            digest: 0,
            maxr2t: 0,
        };
        q.send(PduType::IcReq, 0, &HdrFields::IcReq(req), &[])?;
        let plen = q.recv()?;
        let resp = match pdu::parse(&q.rx_buf[..plen], &q.rx)? {
            Pdu::IcResp(r) => r,
            Pdu::C2hTermReq { fes, fei, .. } => {
                return Err(InitiatorError::Terminated { fes, fei })
            }
            _ => return Err(InitiatorError::Protocol("expected ICResp")),
        };
        if resp.pfv != 0 || resp.digest != 0 || resp.cpda > 31 || resp.maxh2cdata < 4096 {
            return Err(InitiatorError::Protocol("ICResp parameters unusable"));
        }
        q.tx.data_align = (resp.cpda as usize + 1) * 4;
        q.maxh2c = (resp.maxh2cdata as usize).min(max_data as usize);
        Ok(q)
    }

    /// Fabrics Connect; returns the controller ID.
    fn connect(&mut self, host: &HostIds, qid: u16, cntlid: u16) -> Result<u16> {
        let mut cmd = command(FABRICS, 0);
        cmd[4] = fctype::CONNECT;
        put16(&mut cmd, 42, qid);
        put16(&mut cmd, 44, INITIATOR_QUEUE_DEPTH - 1); // SQSIZE is 0-based
                                                        // KATO (bytes 48..52) stays 0: no keep-alive timer, none to feed.
        let mut data = [0u8; CONNECT_DATA_BYTES];
        data[0..16].copy_from_slice(&host.host_id);
        put16(&mut data, 16, cntlid);
        data[256..256 + host.subnqn.len()].copy_from_slice(host.subnqn.as_bytes());
        data[512..512 + host.hostnqn.len()].copy_from_slice(host.hostnqn.as_bytes());
        let dw0 = self.exec(cmd, Xfer::ToTarget(&data))?;
        Ok(dw0 as u16)
    }

    /// Runs one command to its completion; returns CQE dword 0/1.
    fn exec(&mut self, cmd: [u8; SQE_LEN], xfer: Xfer<'_>) -> Result<u64> {
        if self.broken {
            return Err(InitiatorError::Broken);
        }
        let r = self.run(cmd, xfer);
        if matches!(&r, Err(e) if e.status().is_none()) {
            self.broken = true;
        }
        r
    }

    fn run(&mut self, mut cmd: [u8; SQE_LEN], mut xfer: Xfer<'_>) -> Result<u64> {
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1);
        put16(&mut cmd, 2, cid);
        cmd[1] = PSDT_SGL;
        let len = match &xfer {
            Xfer::None => 0,
            Xfer::ToTarget(d) => d.len(),
            Xfer::FromTarget(b) => b.len(),
        };
        let capsule: &[u8] = match &xfer {
            Xfer::ToTarget(d) if d.len() <= self.in_capsule_bytes => d,
            _ => &[],
        };
        if len > self.rx.max_data as usize {
            return Err(InitiatorError::Invalid(
                "transfer larger than one command carries",
            ));
        }
        // DPTR: address 0 (offset into the capsule), length, descriptor type.
        put32(&mut cmd, 32, len as u32);
        cmd[39] = if capsule.is_empty() {
            SGL_TRANSPORT_DATA
        } else {
            SGL_DATA_OFFSET
        };
        self.send(PduType::CapsuleCmd, 0, &HdrFields::Cmd(&cmd), capsule)?;
        let mut received = 0usize;
        loop {
            let plen = self.recv()?;
            let r2t = match pdu::parse(&self.rx_buf[..plen], &self.rx)? {
                Pdu::CapsuleResp { cqe } => return complete(cqe, cid, cmd[0], &xfer, received),
                Pdu::C2hData {
                    hdr, success, data, ..
                } => {
                    received += take_c2h(&hdr, data, cid, &mut xfer)?;
                    if success {
                        return complete_by_flag(&xfer, received);
                    }
                    continue;
                }
                Pdu::R2t(r) => r,
                Pdu::C2hTermReq { fes, fei, .. } => {
                    return Err(InitiatorError::Terminated { fes, fei })
                }
                _ => return Err(InitiatorError::Protocol("unexpected PDU type")),
            };
            let Xfer::ToTarget(d) = &xfer else {
                return Err(InitiatorError::Protocol(
                    "R2T for a command without H2C data",
                ));
            };
            self.send_h2c(cid, r2t, d)?;
        }
    }

    /// Answers an R2T with H2CData PDUs of at most MAXH2CDATA bytes.
    fn send_h2c(&mut self, cid: u16, r: pdu::R2t, data: &[u8]) -> Result<()> {
        let (start, len) = (r.offset as usize, r.length as usize);
        let end = start
            .checked_add(len)
            .filter(|&e| e <= data.len() && len > 0);
        let (Some(end), true) = (end, r.cccid == cid) else {
            return Err(InitiatorError::Protocol("R2T outside the command's data"));
        };
        let mut off = start;
        while off < end {
            let n = (end - off).min(self.maxh2c);
            let hdr = DataHdr {
                cccid: cid,
                ttag: r.ttag,
                offset: off as u32,
                length: n as u32,
            };
            let flags = if off + n == end { FLAG_LAST_PDU } else { 0 };
            self.send(
                PduType::H2cData,
                flags,
                &HdrFields::Data(hdr),
                &data[off..off + n],
            )?;
            off += n;
        }
        Ok(())
    }

    /// Sends one PDU in one write.
    fn send(&mut self, t: PduType, flags: u8, fields: &HdrFields<'_>, data: &[u8]) -> Result<()> {
        let mut hdr = [0u8; MAX_HDR_BYTES];
        let n = pdu::encode_header(&mut hdr, &self.tx, t, flags, fields, data.len());
        self.tx_buf.clear();
        self.tx_buf.extend_from_slice(&hdr[..n]);
        self.tx_buf.extend_from_slice(data);
        self.sock.write_all(&self.tx_buf)?;
        Ok(())
    }

    /// Reads exactly one PDU into `rx_buf`; returns its length.
    fn recv(&mut self) -> Result<usize> {
        self.sock.read_exact(&mut self.rx_buf[..CH_LEN])?;
        let plen = match pdu::check(&self.rx_buf[..CH_LEN], &self.rx)? {
            Check::Complete(n) => n,
            Check::NeedHeader => return Err(InitiatorError::Protocol("short common header")),
        };
        // check bounds plen by rx.max_data, for which rx_buf was sized.
        if plen > self.rx_buf.len() {
            return Err(InitiatorError::Protocol(
                "PDU larger than the receive buffer",
            ));
        }
        self.sock.read_exact(&mut self.rx_buf[CH_LEN..plen])?;
        Ok(plen)
    }
}

/// Copies one C2HData PDU into the read buffer; returns its length.
fn take_c2h(hdr: &DataHdr, data: &[u8], cid: u16, xfer: &mut Xfer<'_>) -> Result<usize> {
    let Xfer::FromTarget(buf) = xfer else {
        return Err(InitiatorError::Protocol(
            "C2HData for a command without C2H data",
        ));
    };
    let start = hdr.offset as usize;
    let end = start.checked_add(data.len()).filter(|&e| e <= buf.len());
    let (Some(end), true) = (end, hdr.cccid == cid) else {
        return Err(InitiatorError::Protocol(
            "C2HData outside the command's data",
        ));
    };
    buf[start..end].copy_from_slice(data);
    Ok(data.len())
}

/// The command's CQE arrived: its status, or CQE dwords 0/1 on success.
fn complete(cqe: &[u8; 16], cid: u16, opcode: u8, xfer: &Xfer<'_>, received: usize) -> Result<u64> {
    if u16::from_le_bytes([cqe[12], cqe[13]]) != cid {
        return Err(InitiatorError::Protocol("response for another command ID"));
    }
    let status = Status::from_field(u16::from_le_bytes([cqe[14], cqe[15]]));
    if !status.is_success() {
        return Err(InitiatorError::Status { opcode, status });
    }
    if let Xfer::FromTarget(b) = xfer {
        if received != b.len() {
            return Err(InitiatorError::Protocol(
                "success with less data than asked",
            ));
        }
    }
    Ok(le64(&cqe[0..8]))
}

/// C2HData with the SUCCESS flag stands in for the response capsule.
fn complete_by_flag(xfer: &Xfer<'_>, received: usize) -> Result<u64> {
    match xfer {
        Xfer::FromTarget(b) if received == b.len() => Ok(0),
        _ => Err(InitiatorError::Protocol(
            "SUCCESS flag before all data arrived",
        )),
    }
}

/// Refuses a range whose end does not fit in 64 bits (no command could name it).
fn check_range(lba: u64, blocks: u64) -> Result<()> {
    match lba.checked_add(blocks) {
        Some(_) => Ok(()),
        None => Err(InitiatorError::Invalid("LBA range overflows")),
    }
}

fn command(opcode: u8, nsid: u32) -> [u8; SQE_LEN] {
    let mut c = [0u8; SQE_LEN];
    c[0] = opcode;
    put32(&mut c, 4, nsid);
    c
}

fn identify(cns: u8, nsid: u32) -> [u8; SQE_LEN] {
    let mut c = command(nvme::admin::IDENTIFY, nsid);
    c[40] = cns;
    c
}

/// Read, Write or Write Zeroes of `blocks` (1..=65536) from `slba`.
fn rw_cmd(opcode: u8, nsid: u32, slba: u64, blocks: usize, cdw12: u32) -> [u8; SQE_LEN] {
    debug_assert!((1..=WRITE_ZEROES_BLOCKS_MAX as usize).contains(&blocks));
    let mut c = command(opcode, nsid);
    put64(&mut c, 40, slba);
    put32(&mut c, 48, cdw12 | (blocks - 1) as u32);
    c
}

fn property_set(offset: u32, value: u64) -> [u8; SQE_LEN] {
    let mut c = command(FABRICS, 0);
    c[4] = fctype::PROPERTY_SET;
    put32(&mut c, 44, offset);
    put64(&mut c, 48, value);
    c
}

fn property_get(offset: u32) -> [u8; SQE_LEN] {
    let mut c = command(FABRICS, 0);
    c[4] = fctype::PROPERTY_GET;
    put32(&mut c, 44, offset);
    c
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le64(b: &[u8]) -> u64 {
    le32(b) as u64 | ((le32(&b[4..]) as u64) << 32)
}
