//! The crate's own NVMe/TCP host, for tests, benches and tools; not a production initiator.
//!
//! It speaks the protocol through the crate's own [`pdu`](crate::pdu) codec, so the
//! target's tests exercise the same wire code from both ends. A [`Session`] is one
//! controller: an admin queue and one or more I/O queues ([`Options::io_queues`]), each a
//! pipelined [`Queue`] on its own TCP connection with up to [`Options::queue_depth`]
//! commands in flight, completions reaped in any order by command ID, optional header and
//! data digests, and per-slot data buffers allocated at connect (nothing is allocated per
//! I/O on [`Queue::submit`]/[`Queue::reap`]). No keep-alive (KATO 0), no AEN. Every socket
//! read and write is bounded by a timeout ([`INITIATOR_TIMEOUT_MS`] unless the caller picks
//! one), so a stuck target fails a test instead of hanging it.
//!
//! The blocking calls ([`Session::read`], [`Session::write`], …) use I/O queue 1: transfers
//! larger than one command (the target's MDTS, or the slot size) are split, and the parts
//! pipelined up to the queue depth. Data up to the queue's in-capsule size travels in the
//! command capsule, larger writes answer the target's R2T with H2CData PDUs.
//!
//! A command the target completes with an error status comes back as
//! [`InitiatorError::Status`] (or in [`Completion::status`]) and the queue stays usable;
//! any transport or protocol failure leaves that queue unusable ([`InitiatorError::Broken`]
//! from then on), as the byte stream can no longer be trusted.
//!
//! ```no_run
//! use evstor_datapath::initiator::{read_cmd, Data, Options, Session};
//!
//! let addr = "127.0.0.1:4420".parse()?;
//! let (sub, host) = ("nqn.2024-01.io.evstor:x", "nqn.2014-08.org.nvmexpress:uuid:h");
//! let mut s = Session::connect(addr, sub, host)?;
//! let nsid = s.active_namespaces()?[0];
//! s.write(nsid, 0, &[0xab; 8192])?;
//! assert_eq!(s.read(nsid, 0, 2)?, vec![0xab; 8192]);
//!
//! // Pipelined: 4 queues of depth 32, 4 KiB slots, digests on.
//! let opts = Options { io_queues: 4, queue_depth: 32, slot_bytes: 4096, ..Options::default() };
//! let mut s = Session::connect_with(addr, sub, host, &opts.with_digests())?;
//! let q = &mut s.io_queues()[0];
//! for lba in 0..32 {
//!     q.submit(read_cmd(nsid, lba, 1), Data::FromTarget(4096))?;
//! }
//! for _ in 0..32 {
//!     let c = q.reap()?;
//!     c.result()?;
//!     let _block = q.data(c.cid);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod queue;

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use queue::QueueConfig;
pub use queue::{Completion, Data, Digests, Queue};

use crate::limits::{
    ADMIN_IN_CAPSULE_DATA_BYTES, INITIATOR_ADMIN_QUEUE_DEPTH, INITIATOR_ADMIN_SLOT_BYTES,
    INITIATOR_IO_QUEUES_MAX, INITIATOR_MAX_DATA_BYTES, INITIATOR_QUEUE_DEPTH,
    INITIATOR_QUEUE_DEPTH_MAX, INITIATOR_READY_POLLS_MAX, INITIATOR_SLOT_BYTES_MIN,
    INITIATOR_TIMEOUT_MS, LBA_BYTES, MAX_NAMESPACES, NQN_BYTES,
};
use crate::nvme::{self, fctype, prop, Status, DISCOVERY_NQN, FABRICS};
use crate::pdu::{PduError, SQE_LEN};

/// Identify data structures are 4 KiB.
const IDENTIFY_BYTES: usize = 4096;
/// Fabrics Connect data (host ID, cntlid, subsystem and host NQNs).
const CONNECT_DATA_BYTES: usize = 1024;
/// Connect cntlid asking the target to allocate a controller.
const CNTLID_DYNAMIC: u16 = 0xffff;
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

/// How [`Session::connect_with`] sets up a controller.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// I/O queues (1..=[`INITIATOR_IO_QUEUES_MAX`]), one TCP connection each.
    pub io_queues: u16,
    /// Commands in flight per I/O queue (1..=[`INITIATOR_QUEUE_DEPTH_MAX`]).
    pub queue_depth: u16,
    /// Data buffer of each command slot: the largest transfer of one I/O command
    /// ([`INITIATOR_SLOT_BYTES_MIN`]..=[`INITIATOR_MAX_DATA_BYTES`], and at most the
    /// target's MDTS is used). Each I/O queue holds `queue_depth` of them and a receive
    /// buffer of two.
    pub slot_bytes: usize,
    /// Digests asked for on every queue of the session.
    pub digests: Digests,
    /// Bound on every socket read and write.
    pub timeout: Duration,
}

impl Default for Options {
    /// One I/O queue of [`INITIATOR_QUEUE_DEPTH`], MDTS-sized slots, no digests,
    /// [`INITIATOR_TIMEOUT_MS`].
    fn default() -> Options {
        Options {
            io_queues: 1,
            queue_depth: INITIATOR_QUEUE_DEPTH,
            slot_bytes: INITIATOR_MAX_DATA_BYTES as usize,
            digests: Digests::default(),
            timeout: Duration::from_millis(INITIATOR_TIMEOUT_MS),
        }
    }
}

impl Options {
    /// These options with header and data digests on.
    pub fn with_digests(self) -> Options {
        Options {
            digests: Digests {
                header: true,
                data: true,
            },
            ..self
        }
    }

    fn check(&self) -> Result<()> {
        let slot = INITIATOR_SLOT_BYTES_MIN..=INITIATOR_MAX_DATA_BYTES as usize;
        if !(1..=INITIATOR_IO_QUEUES_MAX).contains(&self.io_queues)
            || !(1..=INITIATOR_QUEUE_DEPTH_MAX).contains(&self.queue_depth)
            || !slot.contains(&self.slot_bytes)
        {
            return Err(InitiatorError::Invalid("session options out of range"));
        }
        Ok(())
    }
}

/// The data of one blocking command.
#[derive(Debug)]
pub enum Xfer<'a> {
    /// No data.
    None,
    /// Host to controller.
    ToTarget(&'a [u8]),
    /// Controller to host; exactly this many bytes must arrive.
    FromTarget(&'a mut [u8]),
}

/// One controller on the target: an admin queue and its I/O queues.
pub struct Session {
    // Field order is drop order: the I/O queues go before the admin queue that owns the
    // controller, as a host disconnects.
    io: Vec<Queue>,
    admin: Queue,
    cntlid: u16,
    /// Largest data transfer of one I/O command (target MDTS, capped by the slot size).
    max_xfer_bytes: usize,
    /// Block size per namespace, learned on first use (at most MAX_NAMESPACES entries).
    block_bytes: Vec<(u32, u32)>,
}

impl Session {
    /// Connects to `addr` as `host_nqn` with the default [`Options`].
    pub fn connect(addr: SocketAddr, subsystem_nqn: &str, host_nqn: &str) -> Result<Session> {
        Session::connect_with(addr, subsystem_nqn, host_nqn, &Options::default())
    }

    /// As [`Session::connect`], with `timeout` bounding every socket read and write.
    pub fn connect_timeout(
        addr: SocketAddr,
        subsystem_nqn: &str,
        host_nqn: &str,
        timeout: Duration,
    ) -> Result<Session> {
        let opts = Options {
            timeout,
            ..Options::default()
        };
        Session::connect_with(addr, subsystem_nqn, host_nqn, &opts)
    }

    /// Creates a controller (admin Connect, CC.EN, CSTS.RDY), reads Identify Controller,
    /// then connects I/O queues 1..=`opts.io_queues`.
    pub fn connect_with(
        addr: SocketAddr,
        subsystem_nqn: &str,
        host_nqn: &str,
        opts: &Options,
    ) -> Result<Session> {
        opts.check()?;
        if subsystem_nqn == DISCOVERY_NQN {
            return Err(InitiatorError::Invalid(
                "discovery controllers have no I/O queues",
            ));
        }
        let host = HostIds::new(subsystem_nqn, host_nqn)?;
        let admin_cfg = QueueConfig {
            timeout: opts.timeout,
            depth: INITIATOR_ADMIN_QUEUE_DEPTH,
            slot_bytes: INITIATOR_ADMIN_SLOT_BYTES,
            in_capsule_bytes: ADMIN_IN_CAPSULE_DATA_BYTES,
            digests: opts.digests,
        };
        let mut admin = Queue::open(addr, &admin_cfg)?;
        let cntlid = fabrics_connect(&mut admin, &host, 0, CNTLID_DYNAMIC)?;
        enable(&mut admin)?;
        let mut id = [0u8; IDENTIFY_BYTES];
        exec(
            &mut admin,
            identify(CNS_CONTROLLER, 0),
            Xfer::FromTarget(&mut id),
        )?;
        let (mdts_bytes, in_capsule_bytes) = transfer_limits(&id);
        let slot_bytes = opts.slot_bytes.min(mdts_bytes);
        let io_cfg = QueueConfig {
            depth: opts.queue_depth,
            slot_bytes,
            in_capsule_bytes,
            ..admin_cfg
        };
        let mut io = Vec::with_capacity(opts.io_queues as usize);
        for qid in 1..=opts.io_queues {
            let mut q = Queue::open(addr, &io_cfg)?;
            fabrics_connect(&mut q, &host, qid, cntlid)?;
            io.push(q);
        }
        Ok(Session {
            io,
            admin,
            cntlid,
            max_xfer_bytes: slot_bytes,
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

    /// The I/O queues (queue ID `i + 1` at index `i`), for pipelined I/O. The blocking
    /// calls use the first and expect none of its commands in flight but their own.
    pub fn io_queues(&mut self) -> &mut [Queue] {
        &mut self.io
    }

    /// Runs one raw admin command (CID, PSDT and data pointer are filled in); returns CQE
    /// dwords 0/1, or the status as [`InitiatorError::Status`]. For tests that need a
    /// command this API has no call for.
    pub fn admin_exec(&mut self, cmd: [u8; SQE_LEN], xfer: Xfer<'_>) -> Result<u64> {
        exec(&mut self.admin, cmd, xfer)
    }

    /// Active namespace IDs visible to this host, ascending (Identify CNS 02h).
    pub fn active_namespaces(&mut self) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        let mut page = [0u8; IDENTIFY_BYTES];
        loop {
            let after = ids.last().copied().unwrap_or(0);
            let cmd = identify(CNS_ACTIVE_NS_LIST, after);
            exec(&mut self.admin, cmd, Xfer::FromTarget(&mut page))?;
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
        let cmd = identify(CNS_NAMESPACE, nsid);
        exec(&mut self.admin, cmd, Xfer::FromTarget(&mut id))?;
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
        let total = blocks as usize;
        let count = total.div_ceil(per_cmd);
        let part = |i: usize| (i * per_cmd, per_cmd.min(total - i * per_cmd));
        let make = |i: usize| {
            let (first, n) = part(i);
            let cmd = rw_cmd(nvme::io::READ, nsid, lba + first as u64, n, 0);
            (cmd, Data::FromTarget(n * bs))
        };
        let take = |i: usize, data: &[u8]| {
            let at = part(i).0 * bs;
            out[at..at + data.len()].copy_from_slice(data);
        };
        pipeline(&mut self.io[0], count, make, take)?;
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
        let chunks: Vec<&[u8]> = data.chunks(per_cmd * bs).collect();
        let make = |i: usize| {
            let slba = lba + (i * per_cmd) as u64;
            let cmd = rw_cmd(nvme::io::WRITE, nsid, slba, chunks[i].len() / bs, cdw12);
            (cmd, Data::ToTarget(chunks[i]))
        };
        pipeline(&mut self.io[0], chunks.len(), make, |_, _| {})
    }

    /// Flush: everything completed before is durable.
    pub fn flush(&mut self, nsid: u32) -> Result<()> {
        exec(&mut self.io[0], command(nvme::io::FLUSH, nsid), Xfer::None)?;
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
            put32(&mut cmd, 44, DSM_AD); // CDW11; CDW10 NR = 0: one range
            let mut range = [0u8; DSM_RANGE_BYTES];
            put32(&mut range, 4, n);
            put64(&mut range, 8, lba + done);
            exec(&mut self.io[0], cmd, Xfer::ToTarget(&range))?;
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
            exec(&mut self.io[0], cmd, Xfer::None)?;
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

/// Runs `count` commands on `q`, as many at once as its free slots allow, waiting for the
/// oldest first: `make(i)` builds command `i`, `take(i, data)` gets a read's data. After an
/// NVMe error nothing more is submitted, those in flight are still waited for, and the
/// first error is returned.
fn pipeline<'a>(
    q: &mut Queue,
    count: usize,
    mut make: impl FnMut(usize) -> ([u8; SQE_LEN], Data<'a>),
    mut take: impl FnMut(usize, &[u8]),
) -> Result<()> {
    let mut pending = VecDeque::with_capacity(q.depth());
    let (mut next, mut failed) = (0, None);
    loop {
        while next < count && failed.is_none() && q.in_flight() < q.depth() {
            let (cmd, data) = make(next);
            pending.push_back((q.submit(cmd, data)?, next));
            next += 1;
        }
        let Some((cid, i)) = pending.pop_front() else {
            break;
        };
        match q.wait(cid)?.result() {
            Ok(_) => take(i, q.data(cid)),
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    match failed {
        Some(e) => Err(e),
        None if next < count => Err(InitiatorError::Invalid("queue full of other commands")),
        None => Ok(()),
    }
}

/// Runs one command to its completion; returns CQE dwords 0/1.
fn exec(q: &mut Queue, cmd: [u8; SQE_LEN], xfer: Xfer<'_>) -> Result<u64> {
    let data = match &xfer {
        Xfer::None => Data::None,
        Xfer::ToTarget(d) => Data::ToTarget(d),
        Xfer::FromTarget(b) => Data::FromTarget(b.len()),
    };
    let cid = q.submit(cmd, data)?;
    let dw0 = q.wait(cid)?.result()?;
    if let Xfer::FromTarget(b) = xfer {
        b.copy_from_slice(q.data(cid));
    }
    Ok(dw0)
}

/// Fabrics Connect of queue `qid`; returns the controller ID.
fn fabrics_connect(q: &mut Queue, host: &HostIds, qid: u16, cntlid: u16) -> Result<u16> {
    let mut cmd = command(FABRICS, 0);
    cmd[4] = fctype::CONNECT;
    put16(&mut cmd, 42, qid);
    // SQSIZE is 0-based: depth + 1 entries, so `depth` commands never fill the queue.
    put16(&mut cmd, 44, q.depth() as u16);
    // KATO (bytes 48..52) stays 0: no keep-alive timer, none to feed.
    let mut data = [0u8; CONNECT_DATA_BYTES];
    data[0..16].copy_from_slice(&host.host_id);
    put16(&mut data, 16, cntlid);
    data[256..256 + host.subnqn.len()].copy_from_slice(host.subnqn.as_bytes());
    data[512..512 + host.hostnqn.len()].copy_from_slice(host.hostnqn.as_bytes());
    let dw0 = exec(q, cmd, Xfer::ToTarget(&data))?;
    Ok(dw0 as u16)
}

/// Sets CC.EN and waits, boundedly, for CSTS.RDY.
fn enable(admin: &mut Queue) -> Result<()> {
    exec(admin, property_set(prop::CC, CC_ENABLE), Xfer::None)?;
    for _ in 0..INITIATOR_READY_POLLS_MAX {
        if exec(admin, property_get(prop::CSTS), Xfer::None)? & CSTS_RDY != 0 {
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
/// A Read of `blocks` (1..=65536) from `slba`, for [`Queue::submit`] with
/// [`Data::FromTarget`].
pub fn read_cmd(nsid: u32, slba: u64, blocks: u32) -> [u8; SQE_LEN] {
    rw_cmd(nvme::io::READ, nsid, slba, blocks as usize, 0)
}

/// A Write of `blocks` (1..=65536) at `slba` (with Force Unit Access if `fua`), for
/// [`Queue::submit`] with [`Data::ToTarget`].
pub fn write_cmd(nsid: u32, slba: u64, blocks: u32, fua: bool) -> [u8; SQE_LEN] {
    let cdw12 = if fua { RW_FUA } else { 0 };
    rw_cmd(nvme::io::WRITE, nsid, slba, blocks as usize, cdw12)
}

/// A Flush, for [`Queue::submit`] with [`Data::None`].
pub fn flush_cmd(nsid: u32) -> [u8; SQE_LEN] {
    command(nvme::io::FLUSH, nsid)
}

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
