//! One connected NVMe queue pair as a pure state machine: PDUs, storage completions, buffer
//! grants and time go in; storage requests to issue and PDUs to send come out. No
//! sockets, rings or threads: the reactor ([`crate::reactor`]) drives it, and the unit
//! tests below drive it by hand.
//!
//! # Inputs and outputs
//!
//! | input | what it does |
//! |---|---|
//! | [`Queue::on_pdu`] | a whole PDU (capsule, H2C data, terminate request) |
//! | [`Queue::h2c_begin`] / [`Queue::h2c_bytes`] / [`Queue::h2c_end`] | H2C data streamed in pieces, as it arrives |
//! | [`Queue::on_io_done`] | one part of a command finished (`tag` = slot, `res` = bytes or -errno) |
//! | [`Queue::on_wake`] | a notification: buffers granted by the pool, an event for an AER, a controller teardown |
//! | [`Queue::on_tick`] | time passed: keep-alive expiry, QoS retries |
//! | [`Queue::on_sent`] | the kernel took bytes of the batch in flight |
//!
//! Outputs are drained by the driver: [`Queue::drain_submits`] (storage operations, each
//! tagged with its slot) and the send side ([`Queue::tx_start`], [`Queue::tx_iov`]). An
//! `Err` from an input ends the connection; a `DatapathError::Pdu` asks for a terminate
//! request first.
//!
//! # Completion accounting: a command may wait on several parts
//!
//! A command in `Executing` counts its outstanding *parts* (`Slot::parts`): every storage
//! operation it issued (Dataset Management issues one per range), and every part a driver
//! adds with [`Queue::add_parts`]. Each part reports once through [`Queue::on_io_done`];
//! the first failure sets the status; the command completes when the count reaches zero,
//! whatever the order. This is how the replicated write path is meant to work without a
//! thread per I/O: the reactor that issues a write to local storage also forwards it to
//! each replica through an NVMe/TCP initiator connection it drives on the same ring, adds
//! one part per replica, and reports each replica's completion (its capsule response,
//! matched by the initiator) as a part done. The host's command completes only when
//! local storage and every replica have. Nothing in the state machine knows which part is
//! which; it only counts, so N remote parts cost one counter.
//!
//! # Buffers
//!
//! Data buffers come from the target's shared pool ([`crate::pool`]). A write takes one
//! when its R2T is due, a read when it reaches the backend (after QoS), and both give it
//! back once their completion has been *sent* (the send batch holds the slot until then).
//! A command that finds the pool exhausted waits in the pool's FIFO holding nothing
//! (`AwaitBuf`) and resumes on [`Queue::on_wake`] when its buffer is granted. In-capsule
//! data has already arrived and cannot wait in line: it takes a pool buffer if one is
//! free, else the queue's private reserve; if that is busy too, the PDU is refused with
//! [`Flow::Stalled`] and offered again later (the driver keeps the bytes). An admin
//! command that moves data never waits for the pool: it takes a pool buffer if one is
//! free, else the admin queue's reserve (one maximal buffer), waiting for the reserve if
//! a sent command still holds it. Data asked for by R2T is held until the host sends it,
//! so a queue may have only its share of it outstanding ([`R2T_POOL_SHARE_DIVISOR`]);
//! further writes wait in the queue's own FIFO, holding nothing.
//!
//! # QoS
//!
//! Reads and writes of a QoS-limited namespace take tokens right before they reach the
//! backend (writes once their data has arrived). A command without tokens parks in a FIFO
//! bounded by the queue depth and is retried, in order, at most once per refill period
//! ([`Queue::on_tick`]); commands of one namespace never overtake each other.
//!
//! Nothing is allocated per command: slots, free list, FIFOs, the send batches and the
//! list of storage requests are sized at Connect from the queue depth.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

use crate::backend::{IoKind, IoRequest};
use crate::buffer::SlotBuf;
use crate::ctrl::Controller;
use crate::error::DatapathError;
use crate::fabrics::{self, Accepted};
use crate::limits::{
    ADMIN_MAX_DATA_BYTES, ADMIN_QUEUE_RESERVE_BYTES, IO_QUEUE_RESERVE_BYTES, KATO_GRACE_MS,
    MAX_DATA_BYTES, MAX_HDR_BYTES, MAX_OUTSTANDING_AERS, QOS_REFILL_MS, R2T_POOL_SHARE_DIVISOR,
};
#[cfg(test)]
use crate::notify::Notifier;
use crate::ns::{Namespace, NsTable};
use crate::nvme::{self, Dir, Sqe, Status, SGL_DATA_OFFSET};
use crate::pdu::{
    self, DataHdr, HdrFields, Pdu, PduError, PduType, RxContext, TxContext, DIGEST_LEN,
    FLAG_LAST_PDU, FLAG_SUCCESS, SQE_LEN,
};
use crate::pool::{Buf, PoolClient};
use crate::qos::{QosDir, WriteTicket};
use crate::target::Shared;
use crate::tx::{Seg, Tx};

/// Lifecycle of a command slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Unused.
    Free,
    /// Waiting for H2CData after an R2T.
    AwaitData,
    /// Parts (storage operations, remote writes) outstanding.
    Executing,
    /// Waiting in the QoS FIFO for its namespace's tokens (its data, if any, has arrived).
    Throttled,
    /// Waiting for a data buffer (pool FIFO, R2T budget or admin reserve); holds nothing.
    AwaitBuf,
    /// Finished; its data is in a send batch, so the buffer stays reserved.
    Sending,
}

/// Per-command bookkeeping; one per submission queue entry.
#[derive(Debug)]
pub struct Slot {
    /// State.
    pub state: SlotState,
    /// The command.
    pub sqe: [u8; SQE_LEN],
    /// Bytes the command transfers (SGL length).
    pub xfer: u32,
    /// H2C bytes received so far.
    pub got: u32,
    /// Parts outstanding (storage operations and any added by [`Queue::add_parts`]).
    pub parts: u32,
    /// Bytes the finished storage parts of a read or write moved.
    pub moved: u32,
    /// Status to report (first error wins).
    pub status: Status,
    /// Bytes to return to the host on success.
    pub c2h_len: u32,
    /// Namespace kept alive while I/O is in flight.
    pub ns: Option<Arc<Namespace>>,
    /// The command's data buffer, if it holds one.
    data: SlotData,
    /// What to do once a waited-for buffer is granted.
    after_grant: AfterGrant,
    /// Its QoS tokens were taken (a read waiting for a buffer is not charged twice).
    pub tokens_paid: bool,
    /// A change admitted through its namespace's write gate: held until the slot is
    /// released, so a replicated snapshot waits for it.
    pub write_ticket: Option<WriteTicket>,
}

/// Where a slot's data buffer comes from.
#[derive(Debug)]
enum SlotData {
    None,
    Pool(Buf),
    /// The queue's private reserve (at most one slot holds it).
    Reserve,
}

/// The step a command waiting for a buffer resumes at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterGrant {
    /// Ask the host for the data.
    R2t,
    /// Run the command.
    Execute,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            state: SlotState::Free,
            sqe: [0; SQE_LEN],
            xfer: 0,
            got: 0,
            parts: 0,
            moved: 0,
            status: Status::SUCCESS,
            c2h_len: 0,
            ns: None,
            data: SlotData::None,
            after_grant: AfterGrant::Execute,
            tokens_paid: false,
            write_ticket: None,
        }
    }

    /// The command as a parsed view.
    pub fn cmd(&self) -> Sqe<'_> {
        Sqe(&self.sqe)
    }
}

/// How a command ended (or did not, yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Respond now; `c2h_len` bytes of the slot buffer go to the host first.
    Done {
        /// Completion status.
        status: Status,
        /// CQE dwords 0-1.
        result: u64,
        /// Data bytes to send.
        c2h_len: u32,
    },
    /// Parts are outstanding; the last [`Queue::on_io_done`] responds.
    Pending,
    /// Parked without a slot (an AER); answered later.
    Parked,
    /// The namespace's QoS tokens ran out: the slot waits in the QoS FIFO and the
    /// command is executed again when its turn comes.
    Throttled,
    /// No data buffer yet: the slot waits and is executed again when it gets one.
    AwaitBuf,
}

impl Outcome {
    /// A completion with no data and no result.
    pub fn status(status: Status) -> Outcome {
        Outcome::Done {
            status,
            result: 0,
            c2h_len: 0,
        }
    }

    /// A successful completion returning `c2h_len` bytes.
    pub fn data(c2h_len: u32) -> Outcome {
        Outcome::Done {
            status: Status::SUCCESS,
            result: 0,
            c2h_len,
        }
    }
}

/// Whether a PDU was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Consumed.
    Taken,
    /// Not yet: in-capsule data found no buffer. Offer the same PDU again once
    /// [`Queue::rx_stalled`] may have cleared (after a send, a completion or a tick).
    Stalled,
}

/// One storage operation to issue: `kind` on `slot`'s namespace, data (for reads and
/// writes) in the slot's buffer. Its completion comes back as [`Queue::on_io_done`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Submit {
    /// The command's slot (the tag to complete with).
    pub slot: u16,
    /// What to do.
    pub kind: IoKind,
    /// Byte offset in the namespace.
    pub offset: u64,
    /// Bytes.
    pub len: u32,
    /// Where in the command's data buffer this part's bytes are.
    pub buf_off: u32,
}

/// Commands waiting for QoS tokens, oldest first, and the namespaces they hold back.
///
/// Both hold at most one entry per slot, and are allocated with the queue depth as
/// capacity, so parking never allocates.
struct QosFifo {
    slots: VecDeque<u16>,
    /// Namespaces with a command parked (during a retry pass: re-parked in this pass).
    /// A new command of one of these waits behind them instead of taking tokens.
    blocked: Vec<u32>,
    /// Earliest next retry pass: tokens accrue once per refill period.
    retry_at: Instant,
}

impl QosFifo {
    fn new(depth: usize, now: Instant) -> QosFifo {
        QosFifo {
            slots: VecDeque::with_capacity(depth),
            blocked: Vec::with_capacity(depth),
            retry_at: now,
        }
    }

    fn holds_back(&self, nsid: u32) -> bool {
        self.blocked.contains(&nsid)
    }

    fn park(&mut self, slot: u16, nsid: u32) {
        debug_assert!(
            self.slots.len() < self.slots.capacity(),
            "one entry per slot"
        );
        self.slots.push_back(slot);
        if !self.holds_back(nsid) {
            self.blocked.push(nsid);
        }
    }
}

/// What a queue is made from at Connect.
pub struct QueueInit {
    /// Target-wide state.
    pub shared: Arc<Shared>,
    /// What Connect established.
    pub accepted: Accepted,
    /// Local address of the connection (for the discovery log).
    pub local: SocketAddr,
    /// The host's address (for the IP ACL).
    pub peer: SocketAddr,
    /// What the host sends (negotiated at ICReq).
    pub rxc: RxContext,
    /// What the target sends.
    pub txc: TxContext,
    /// The driver's clock at Connect.
    pub now: Instant,
}

/// Everything a connected queue owns.
pub struct Queue {
    /// Target-wide state.
    pub shared: Arc<Shared>,
    /// The controller this queue belongs to.
    pub ctrl: Arc<Controller>,
    /// Queue ID (0 = admin).
    pub qid: u16,
    /// Submission queue depth (SQSIZE + 1).
    pub depth: u16,
    sqhd: u16,
    sqflow_off: bool,
    /// Local address of the connection (for the discovery log).
    pub local: SocketAddr,
    peer: SocketAddr,
    rxc: RxContext,
    txc: TxContext,
    hdr: [u8; MAX_HDR_BYTES],
    tx: Tx,
    /// Command slots.
    pub slots: Vec<Slot>,
    free: Vec<u16>,
    subs: Vec<Submit>,
    /// This queue's place in the target's buffer pool.
    pool: PoolClient,
    /// Slots waiting for a pool grant.
    awaiting_buf: usize,
    /// Slots whose grant arrived, in grant order (capacity: the depth).
    granted: Vec<u16>,
    /// Private buffer for data that cannot wait for the pool.
    reserve: SlotBuf,
    reserve_free: bool,
    /// Admin commands waiting for the reserve (they never wait for the pool).
    reserve_wait: VecDeque<u16>,
    /// A capsule with in-capsule data waits for a data buffer (the driver keeps it).
    rx_stalled: bool,
    /// The stalled PDU is a capsule that found every slot taken while some were only
    /// waiting for their send to complete (it resumes once one is released).
    stalled_for_slot: bool,
    /// R2T data this queue may have outstanding, and has (bytes).
    r2t_budget: usize,
    r2t_held: usize,
    /// Writes waiting for room in the R2T budget, oldest first (they hold nothing).
    r2t_wait: VecDeque<u16>,
    table: Arc<NsTable>,
    /// Namespaces this host may see, ascending by nsid (rebuilt when a table is published).
    visible: Vec<Arc<Namespace>>,
    /// Outstanding AER command IDs (admin queue).
    pub aers: Vec<u16>,
    in_capsule_max: usize,
    qos: QosFifo,
    /// The driver's clock at the input being handled (keep-alive times); the state
    /// machine reads no clock of its own.
    pub(crate) now: Instant,
}

/// Header bytes one command's PDUs may need in a send batch: an R2T, or C2H data
/// (header, padding to the host's alignment, data digest) followed by its response.
fn tx_bytes_per_cmd(txc: &TxContext) -> usize {
    let hd = if txc.hdgst { DIGEST_LEN } else { 0 };
    let data_area = (24 + hd).next_multiple_of(txc.data_align.max(4));
    let resp = 24 + hd;
    (data_area + DIGEST_LEN + resp).max(24 + hd)
}

impl Queue {
    /// Allocates everything the queue will ever need (its only allocation point).
    pub fn new(init: QueueInit) -> Result<Queue, DatapathError> {
        let QueueInit {
            shared,
            accepted,
            local,
            peer,
            rxc,
            txc,
            now,
        } = init;
        let Accepted {
            ctrl,
            qid,
            depth,
            sqflow_off,
            notify,
        } = accepted;
        let n = depth as usize;
        let reserve_bytes = if qid == 0 {
            ADMIN_QUEUE_RESERVE_BYTES
        } else {
            IO_QUEUE_RESERVE_BYTES
        };
        let reserve = SlotBuf::new(1, reserve_bytes).ok_or(DatapathError::Closed(
            "cannot map the queue's reserve buffer",
        ))?;
        // The pool wakes the queue through its notifier (the controller and the
        // connection hold it too).
        let pool = shared.pool.client(Waker::from(notify), n);
        let conns = shared.cfg.max_connections + shared.cfg.max_discovery_connections;
        let r2t_budget = (shared.pool.capacity_bytes() / (R2T_POOL_SHARE_DIVISOR * conns.max(1)))
            .max(MAX_DATA_BYTES);
        // One PDU group per command and per AER, the Connect response and a terminate.
        let groups = n + MAX_OUTSTANDING_AERS + 1;
        let tx = Tx::new(
            groups * tx_bytes_per_cmd(&txc) + MAX_HDR_BYTES,
            3 * groups + 1,
            n,
        );
        let table = shared.table();
        let mut q = Queue {
            shared,
            ctrl,
            qid,
            depth,
            sqhd: 0,
            sqflow_off,
            local,
            peer,
            rxc,
            txc,
            hdr: [0; MAX_HDR_BYTES],
            tx,
            slots: (0..n).map(|_| Slot::new()).collect(),
            free: (0..depth).rev().collect(),
            subs: Vec::with_capacity(n),
            pool,
            awaiting_buf: 0,
            granted: Vec::with_capacity(n),
            reserve,
            reserve_free: true,
            reserve_wait: VecDeque::with_capacity(if qid == 0 { n } else { 0 }),
            rx_stalled: false,
            stalled_for_slot: false,
            r2t_budget,
            r2t_held: 0,
            r2t_wait: VecDeque::with_capacity(n),
            table,
            visible: Vec::new(),
            aers: Vec::with_capacity(MAX_OUTSTANDING_AERS),
            in_capsule_max: if qid == 0 {
                crate::limits::ADMIN_IN_CAPSULE_DATA_BYTES
            } else {
                crate::limits::IN_CAPSULE_DATA_BYTES
            },
            qos: QosFifo::new(n, now),
            now,
        };
        q.refresh_visible();
        Ok(q)
    }

    /// Stages the response to the Connect that created this queue.
    pub fn accept_connect(&mut self, cid: u16) -> Result<(), DatapathError> {
        self.sqhd = 1 % self.depth;
        let cntlid = self.ctrl.cntlid as u64;
        self.send_resp(cid, Status::SUCCESS, cntlid)
    }

    /// Bytes the host may legitimately have sent that this queue has not taken while it
    /// is stalled: a capsule per slot and the R2T data it was asked for. A driver that
    /// holds more for it is being flooded.
    pub fn stalled_bytes_max(&self) -> usize {
        let capsule = MAX_HDR_BYTES + self.in_capsule_max + DIGEST_LEN;
        self.depth as usize * capsule + self.r2t_budget + MAX_DATA_BYTES + MAX_HDR_BYTES
    }

    // ---------------------------------------------------------------------------------
    // Inputs

    /// A whole PDU from the host. `Ok(Flow::Stalled)` asks for the same bytes again later.
    pub fn on_pdu(&mut self, now: Instant, bytes: &[u8]) -> Result<Flow, DatapathError> {
        self.now = now;
        let parsed = match pdu::parse(bytes, &self.rxc) {
            Err(PduError::DataDigest) => {
                pdu::parse_with(bytes, &self.rxc, false).map(|p| (p, false))
            }
            other => other.map(|p| (p, true)),
        };
        let (p, digest_ok) = parsed?;
        self.rx_stalled = false;
        let flow = match p {
            Pdu::CapsuleCmd { sqe, data } => self.on_capsule(sqe, data, digest_ok)?,
            Pdu::H2cData { hdr, last, data } => {
                self.h2c_begin(&hdr, last)?;
                self.h2c_bytes(&hdr, hdr.offset, data);
                self.h2c_end(&hdr, last, digest_ok)?;
                Flow::Taken
            }
            Pdu::H2cTermReq { fes, .. } => {
                tracing::debug!(fes, "host terminated the connection");
                return Err(DatapathError::Closed("host sent H2CTermReq"));
            }
            Pdu::IcReq(_) => return Err(PduError::Unexpected(PduType::IcReq as u8).into()),
            _ => return Err(PduError::Unexpected(0xff).into()),
        };
        self.rx_stalled = flow == Flow::Stalled;
        Ok(flow)
    }

    /// Whether a PDU was refused for want of a buffer and waits to be offered again.
    #[cfg(test)]
    pub fn rx_stalled(&self) -> bool {
        self.rx_stalled
    }

    /// Whether offering the stalled PDU again may succeed now (the reserve is back; the
    /// pool may have been refilled by other queues at any time, so a driver also retries
    /// on its ticks).
    pub fn rx_may_resume(&self) -> bool {
        self.rx_stalled && (self.reserve_free || (self.stalled_for_slot && !self.free.is_empty()))
    }

    /// One part of slot `tag`'s command finished: `res` is bytes done or -errno.
    pub fn on_io_done(&mut self, tag: u16, res: i32) -> Result<(), DatapathError> {
        let i = tag as usize;
        let Some(s) = self.slots.get_mut(i) else {
            tracing::warn!(tag, "completion for an unknown slot ignored");
            return Ok(());
        };
        if s.state != SlotState::Executing || s.parts == 0 {
            // Not ours to finish (cannot happen unless a driver misreports a tag).
            tracing::warn!(tag, "completion for an idle slot ignored");
            return Ok(());
        }
        crate::io::account_completion(s, res);
        self.settle_done(i)
    }

    /// Adds `n` parts to slot `tag`'s executing command (remote writes issued for it by
    /// the driver); each reports through [`Queue::on_io_done`] with 0 (it moved no bytes
    /// through this server's storage: those are counted against the command's length) or
    /// -errno.
    pub fn add_parts(&mut self, tag: u16, n: u32) {
        if let Some(s) = self
            .slots
            .get_mut(tag as usize)
            .filter(|s| s.state == SlotState::Executing)
        {
            s.parts += n;
        }
    }

    /// A notification: picks up granted buffers, answers AERs with queued events, and
    /// ends the queue if its controller is being torn down.
    pub fn on_wake(&mut self) -> Result<(), DatapathError> {
        if self.ctrl.is_dead() {
            return Err(DatapathError::Closed("controller torn down"));
        }
        self.take_grants()?;
        self.pump_reserve()?;
        self.deliver_events()
    }

    /// Time passed: keep-alive expiry (admin queue), QoS retries, events, teardown.
    pub fn on_tick(&mut self, now: Instant) -> Result<(), DatapathError> {
        self.now = now;
        if self.ctrl.is_dead() {
            return Err(DatapathError::Closed("controller torn down"));
        }
        if self.qid == 0 && self.keepalive_deadline().is_some_and(|d| now > d) {
            tracing::info!(
                cntlid = self.ctrl.cntlid,
                "keep-alive timeout: tearing down controller"
            );
            return Err(DatapathError::Closed("keep alive timeout"));
        }
        self.retry_throttled(now)?;
        self.take_grants()?;
        self.deliver_events()
    }

    /// Whether the driver should tick this queue every refill period (commands parked for
    /// QoS, or a stalled PDU retrying the pool).
    pub fn wants_fast_tick(&self) -> bool {
        !self.qos.slots.is_empty() || self.rx_stalled
    }

    /// Whether any part of any command is outstanding (storage I/O the kernel may still
    /// be doing into a buffer): a closing queue is dropped only once this is false.
    pub fn parts_in_flight(&self) -> bool {
        self.slots
            .iter()
            .any(|s| s.state == SlotState::Executing && s.parts > 0)
    }

    // ---------------------------------------------------------------------------------
    // Outputs

    /// Calls `f(namespace, request)` for each storage operation to issue, in order; the
    /// request's tag is the slot, and `f` returns how many parts beyond the local one it
    /// issued (replica copies, see [`Queue::add_parts`]). A submission that fails completes
    /// its part with Internal Error.
    pub fn drain_submits(
        &mut self,
        mut f: impl FnMut(&Namespace, &IoRequest) -> std::io::Result<u32>,
    ) -> Result<(), DatapathError> {
        let mut subs = std::mem::take(&mut self.subs);
        let mut r = Ok(());
        for s in subs.drain(..) {
            let i = s.slot as usize;
            let buf = match s.kind {
                IoKind::Read | IoKind::Write { .. } => {
                    let end = s.buf_off as usize + s.len as usize;
                    // SAFETY: the buffer holds `end` bytes (data_ptr checked), so the part's
                    // start lies inside it.
                    self.data_ptr(i, end)
                        .map(|p| unsafe { p.add(s.buf_off as usize) })
                }
                _ => Some(std::ptr::null_mut()),
            };
            let req = buf.map(|buf| IoRequest {
                kind: s.kind,
                offset: s.offset,
                len: s.len,
                buf,
                tag: i as u64,
            });
            let submitted = match (&req, self.slots[i].ns.as_deref()) {
                (Some(req), Some(ns)) => f(ns, req),
                _ => Err(std::io::Error::other("no buffer or namespace")),
            };
            match submitted {
                Ok(extra) => self.add_parts(i as u16, extra),
                Err(e) => {
                    tracing::warn!("backend submit failed: {e}");
                    if r.is_ok() {
                        r = self.part_failed(i, Status::INTERNAL);
                    }
                }
            }
        }
        self.subs = subs;
        r
    }

    /// Whether storage operations wait in [`Queue::drain_submits`].
    pub fn has_submits(&self) -> bool {
        !self.subs.is_empty()
    }

    /// Moves the staged PDUs in flight if nothing is; true if the driver should send.
    pub fn tx_start(&mut self, now: Instant) -> bool {
        self.tx.start(now)
    }

    /// Whether PDUs are staged and not yet in flight.
    pub fn tx_staged(&self) -> bool {
        self.tx.staged()
    }

    /// Whether a batch is in flight, and since when.
    pub fn tx_in_flight_since(&self) -> Option<Instant> {
        self.tx.in_flight_since()
    }

    /// Describes the unsent rest of the batch in flight as iovecs (at most `iov.capacity()`
    /// pieces; the rest goes after the next [`Queue::on_sent`]). Returns the bytes covered.
    pub fn tx_iov(&mut self, iov: &mut Vec<libc::iovec>) -> usize {
        iov.clear();
        let mut skip = self.tx.sent();
        let mut bytes = 0;
        let flight = self.tx.flight();
        for seg in flight.segs() {
            if iov.len() == iov.capacity() {
                break;
            }
            let len = seg.len();
            if skip >= len {
                skip -= len;
                continue;
            }
            let base: *const u8 = match *seg {
                Seg::Hdr { start, .. } => flight.hdrs()[start as usize..].as_ptr(),
                Seg::Slot { i, len } => match self.data(i as usize, len as usize) {
                    Some(d) => d.as_ptr(),
                    None => break, // cannot happen: held slots keep their buffers
                },
            };
            // SAFETY: skip < len, so the pointer stays inside the piece.
            let base = unsafe { base.add(skip) };
            iov.push(libc::iovec {
                iov_base: base as *mut libc::c_void,
                iov_len: len - skip,
            });
            bytes += len - skip;
            skip = 0;
        }
        bytes
    }

    /// The kernel took `n` bytes of the batch in flight. Once all of it went, the slots
    /// it held are freed (their buffers go back to the pool or the reserve).
    pub fn on_sent(&mut self, n: usize) -> Result<(), DatapathError> {
        if !self.tx.advance(n) {
            return Ok(());
        }
        for k in 0..self.tx.flight().held().len() {
            let i = self.tx.flight().held()[k] as usize;
            self.release(i);
        }
        self.tx.finish();
        self.pump_reserve()
    }

    /// Stages a terminate request after whatever is staged (best effort; the connection
    /// ends once it is sent).
    pub fn stage_raw(&mut self, bytes: &[u8]) {
        if self.tx.has_room(bytes.len(), 1) {
            self.tx.push_hdr(bytes);
        }
    }

    // ---------------------------------------------------------------------------------
    // The namespace table

    /// Re-reads the namespace table if a new one was published.
    pub fn refresh_table(&mut self) {
        if self.shared.generation.load(Ordering::Acquire) != self.table.generation {
            self.table = self.shared.table();
            self.refresh_visible();
        }
    }

    fn refresh_visible(&mut self) {
        self.visible.clear();
        if self.ctrl.discovery {
            return;
        }
        let ip = self.peer.ip();
        let visible = self.table.visible(&self.ctrl.host_nqn, ip).cloned();
        self.visible.extend(visible);
    }

    /// The namespace `nsid` if this host may see it.
    pub fn visible_ns(&self, nsid: u32) -> Option<&Arc<Namespace>> {
        self.visible
            .binary_search_by_key(&nsid, |n| n.spec.nsid)
            .ok()
            .map(|i| &self.visible[i])
    }

    /// Visible namespace IDs, ascending.
    pub fn visible_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.visible.iter().map(|n| n.spec.nsid)
    }

    fn sees_nsid(&mut self, nsid: u32) -> bool {
        self.refresh_table();
        self.visible_ns(nsid).is_some()
    }

    // ---------------------------------------------------------------------------------
    // Commands

    /// A new command; `Stalled` if its in-capsule data found no buffer (nothing taken).
    fn on_capsule(
        &mut self,
        sqe: &[u8; SQE_LEN],
        data: &[u8],
        digest_ok: bool,
    ) -> Result<Flow, DatapathError> {
        let Some(slot) = self.free.pop() else {
            // A host may reuse a command's slot as soon as it has the completion, which can
            // arrive before this side has seen its own send complete: wait for that send.
            // With no slot merely sending, the host exceeded the depth it connected with.
            if self.slots.iter().any(|s| s.state == SlotState::Sending) {
                self.stalled_for_slot = true;
                return Ok(Flow::Stalled);
            }
            return Err(PduError::Unexpected(PduType::CapsuleCmd as u8).into());
        };
        self.stalled_for_slot = false;
        let i = slot as usize;
        let s = &mut self.slots[i];
        s.sqe = *sqe;
        s.got = 0;
        s.parts = 0;
        s.moved = 0;
        s.status = Status::SUCCESS;
        s.c2h_len = 0;
        s.tokens_paid = false;
        let cmd = Sqe(sqe);
        let sgl = cmd.sgl();
        s.xfer = sgl.length;
        let dir = nvme::data_dir(&cmd);
        let bad = self.capsule_fault(&cmd, data, digest_ok, dir);
        if !data.is_empty() && bad.is_none() && !self.take_now(i, data.len()) {
            self.free.push(slot); // offered again once a buffer is back
            return Ok(Flow::Stalled);
        }
        self.sqhd = (self.sqhd + 1) % self.depth;
        if let Some(status) = bad {
            self.finish(i, Outcome::status(status))?;
        } else if !data.is_empty() {
            if let Some(b) = self.data_mut(i, data.len()) {
                b.copy_from_slice(data);
            }
            self.execute(i)?;
        } else if dir != Dir::H2c || sgl.length == 0 {
            self.execute(i)?;
        } else if self.qid != 0 && !self.sees_nsid(cmd.nsid()) {
            // Nothing to write to: fail before any buffer is taken or data asked for.
            self.finish(i, Outcome::status(Status::INVALID_NS))?;
        } else if self.r2t_wait.is_empty() && self.r2t_fits(sgl.length as usize) {
            self.start_r2t(i)?;
        } else {
            self.slots[i].state = SlotState::AwaitBuf;
            self.r2t_wait.push_back(slot);
        }
        Ok(Flow::Taken)
    }

    /// Largest transfer a command of this queue may carry.
    fn max_transfer(&self) -> usize {
        if self.qid == 0 {
            ADMIN_MAX_DATA_BYTES
        } else {
            MAX_DATA_BYTES
        }
    }

    /// What is wrong with a capsule's transfer, if anything.
    fn capsule_fault(
        &self,
        cmd: &Sqe<'_>,
        data: &[u8],
        digest_ok: bool,
        dir: Dir,
    ) -> Option<Status> {
        let sgl = cmd.sgl();
        if !digest_ok {
            Some(Status::TRANSIENT_TRANSPORT)
        } else if (!data.is_empty() && dir != Dir::H2c)
            || sgl.length as usize > self.max_transfer()
            || dir == Dir::Both
        {
            Some(Status::INVALID_FIELD)
        } else if !data.is_empty()
            && (data.len() != sgl.length as usize
                || data.len() > self.in_capsule_max
                || sgl.sgl_type != SGL_DATA_OFFSET
                || sgl.addr != 0)
        {
            Some(Status::SGL_LENGTH_INVALID)
        } else {
            None
        }
    }

    /// Whether `bytes` more R2T data fit the queue's budget (one transfer always does).
    fn r2t_fits(&self, bytes: usize) -> bool {
        self.r2t_held == 0 || self.r2t_held + bytes <= self.r2t_budget
    }

    /// Counts slot `i`'s data against the R2T budget and asks the host for it as soon
    /// as it has a buffer.
    fn start_r2t(&mut self, i: usize) -> Result<(), DatapathError> {
        let xfer = self.slots[i].xfer;
        self.r2t_held += xfer as usize;
        if self.take_or_wait(i, xfer as usize, AfterGrant::R2t) {
            self.slots[i].state = SlotState::AwaitData;
            let cid = self.slots[i].cmd().cid();
            self.send_r2t(cid, i as u16, xfer)?;
        }
        Ok(())
    }

    /// Slot `i`'s R2T data all arrived: its budget goes to the writes waiting for it.
    fn r2t_done(&mut self, i: usize) -> Result<(), DatapathError> {
        self.r2t_held = self.r2t_held.saturating_sub(self.slots[i].xfer as usize);
        while let Some(&j) = self.r2t_wait.front() {
            if !self.r2t_fits(self.slots[j as usize].xfer as usize) {
                break;
            }
            self.r2t_wait.pop_front();
            self.start_r2t(j as usize)?;
        }
        Ok(())
    }

    /// H2C data for the transfer `hdr` names begins (its header was validated by the
    /// codec): checks that the transfer is waiting and the piece is the next one.
    pub fn h2c_begin(&mut self, hdr: &DataHdr, _last: bool) -> Result<(), DatapathError> {
        let i = hdr.ttag as usize;
        let ok_tag = self
            .slots
            .get(i)
            .is_some_and(|s| s.state == SlotState::AwaitData && s.cmd().cid() == hdr.cccid);
        if !ok_tag {
            return Err(PduError::BadTransferTag {
                ttag: hdr.ttag,
                cccid: hdr.cccid,
            }
            .into());
        }
        let s = &self.slots[i];
        let end = hdr.offset as u64 + hdr.length as u64;
        if hdr.offset != s.got || end > s.xfer as u64 {
            return Err(PduError::DataLength {
                len: end.min(u32::MAX as u64) as u32,
                max: s.xfer,
            }
            .into());
        }
        Ok(())
    }

    /// Bytes of the transfer `hdr` names, at `offset` in the command's data (inside the
    /// piece [`Queue::h2c_begin`] accepted).
    pub fn h2c_bytes(&mut self, hdr: &DataHdr, offset: u32, bytes: &[u8]) {
        let i = hdr.ttag as usize;
        let end = offset as usize + bytes.len();
        if end > (hdr.offset + hdr.length) as usize {
            return; // outside the accepted piece: a driver bug, not input
        }
        if let Some(b) = self.data_mut(i, end) {
            b[offset as usize..].copy_from_slice(bytes);
        }
    }

    /// The piece `hdr` names has fully arrived (`digest_ok`: its data digest matched).
    pub fn h2c_end(
        &mut self,
        hdr: &DataHdr,
        last: bool,
        digest_ok: bool,
    ) -> Result<(), DatapathError> {
        let i = hdr.ttag as usize;
        let end = hdr.offset + hdr.length;
        self.slots[i].got = end;
        if !digest_ok {
            self.slots[i].status = Status::TRANSIENT_TRANSPORT;
        }
        if end == self.slots[i].xfer {
            self.slots[i].state = SlotState::Executing;
            self.r2t_done(i)?;
            let failed = self.slots[i].status;
            if !failed.is_success() {
                // Whole transfer received; fail the command without executing it.
                return self.finish(i, Outcome::status(failed));
            }
            return self.execute(i);
        }
        if last {
            return Err(PduError::DataLength {
                len: end,
                max: self.slots[i].xfer,
            }
            .into());
        }
        Ok(())
    }

    fn execute(&mut self, i: usize) -> Result<(), DatapathError> {
        self.slots[i].state = SlotState::Executing;
        self.refresh_table();
        let out = if self.qid == 0 {
            if !self.admin_buffer(i) {
                return Ok(()); // waits for the reserve
            }
            self.exec_admin(i)
        } else {
            self.exec_io(i)
        };
        self.finish(i, out)
    }

    /// Gives an admin command that moves data a maximal buffer (its handlers build pages
    /// of up to ADMIN_MAX_DATA_BYTES in it): a free pool buffer, else the reserve. False if the
    /// reserve is out (a sent command holds it): the command waits for it.
    fn admin_buffer(&mut self, i: usize) -> bool {
        let dir = nvme::data_dir(&self.slots[i].cmd());
        if dir == Dir::None || !matches!(self.slots[i].data, SlotData::None) {
            return true;
        }
        if self.take_now(i, ADMIN_MAX_DATA_BYTES) {
            return true;
        }
        self.slots[i].state = SlotState::AwaitBuf;
        self.reserve_wait.push_back(i as u16);
        false
    }

    /// Runs admin commands that waited for the reserve, now that it is back.
    fn pump_reserve(&mut self) -> Result<(), DatapathError> {
        while self.reserve_free {
            let Some(i) = self.reserve_wait.pop_front() else {
                break;
            };
            let i = i as usize;
            if self.slots[i].state != SlotState::AwaitBuf {
                continue;
            }
            self.reserve_free = false;
            self.slots[i].data = SlotData::Reserve;
            self.execute(i)?;
        }
        Ok(())
    }

    /// A buffer for slot `i` without waiting in line: from the pool if one is free, else
    /// the reserve.
    fn take_now(&mut self, i: usize, len: usize) -> bool {
        if let Some(b) = self.shared.pool.try_take(len) {
            self.slots[i].data = SlotData::Pool(b);
            return true;
        }
        if len > self.reserve.slot_bytes() || !self.reserve_free {
            return false;
        }
        self.reserve_free = false;
        self.slots[i].data = SlotData::Reserve;
        true
    }

    /// A pool buffer for slot `i` now, or a place in the pool's FIFO (false: the slot
    /// waits, holding nothing, and is executed again when its buffer is granted).
    pub fn take_or_wait_buf(&mut self, i: usize, len: usize) -> bool {
        self.take_or_wait(i, len, AfterGrant::Execute)
    }

    fn take_or_wait(&mut self, i: usize, len: usize, then: AfterGrant) -> bool {
        match self.pool.take_or_wait(i as u32, len) {
            Some(b) => {
                self.slots[i].data = SlotData::Pool(b);
                true
            }
            None => {
                self.slots[i].state = SlotState::AwaitBuf;
                self.slots[i].after_grant = then;
                self.awaiting_buf += 1;
                false
            }
        }
    }

    /// Resumes the commands whose buffers the pool granted, in grant order.
    fn take_grants(&mut self) -> Result<(), DatapathError> {
        if self.awaiting_buf == 0 {
            return Ok(());
        }
        let mut granted = std::mem::take(&mut self.granted);
        let slots = &mut self.slots;
        self.pool.take_granted(|tag, buf| {
            if let Some(s) = slots.get_mut(tag as usize) {
                if s.state == SlotState::AwaitBuf && matches!(s.data, SlotData::None) {
                    s.data = SlotData::Pool(buf);
                    granted.push(tag as u16);
                }
            }
        });
        self.awaiting_buf -= granted.len().min(self.awaiting_buf);
        let mut r = Ok(());
        for &i in &granted {
            let i = i as usize;
            r = match self.slots[i].after_grant {
                AfterGrant::R2t => {
                    self.slots[i].state = SlotState::AwaitData;
                    let (cid, xfer) = (self.slots[i].cmd().cid(), self.slots[i].xfer);
                    self.send_r2t(cid, i as u16, xfer)
                }
                AfterGrant::Execute => self.execute(i),
            };
            if r.is_err() {
                break;
            }
        }
        granted.clear();
        self.granted = granted;
        r
    }

    /// The first `len` bytes of slot `i`'s data buffer (None if it holds none that long).
    pub fn data(&self, i: usize, len: usize) -> Option<&[u8]> {
        match &self.slots.get(i)?.data {
            SlotData::Pool(b) if len <= b.len() => Some(b.as_slice(len)),
            SlotData::Reserve if len <= self.reserve.slot_bytes() => {
                Some(self.reserve.slot(0, len))
            }
            _ => None,
        }
    }

    /// The first `len` bytes of slot `i`'s data buffer, mutably.
    pub fn data_mut(&mut self, i: usize, len: usize) -> Option<&mut [u8]> {
        match &mut self.slots.get_mut(i)?.data {
            SlotData::Pool(b) if len <= b.len() => Some(b.as_mut_slice(len)),
            SlotData::Reserve if len <= self.reserve.slot_bytes() => {
                Some(self.reserve.slot_mut(0, len))
            }
            _ => None,
        }
    }

    /// Start of slot `i`'s data buffer, for storage I/O, if it holds `len` bytes.
    pub fn data_ptr(&mut self, i: usize, len: usize) -> Option<*mut u8> {
        match &mut self.slots.get_mut(i)?.data {
            SlotData::Pool(b) if len <= b.len() => Some(b.as_mut_ptr()),
            SlotData::Reserve if len <= self.reserve.slot_bytes() => Some(self.reserve.slot_ptr(0)),
            _ => None,
        }
    }

    /// Whether slot `i` holds a data buffer.
    pub fn has_data(&self, i: usize) -> bool {
        !matches!(self.slots[i].data, SlotData::None)
    }

    /// Queues one storage operation for slot `i` (its completion is tagged with `i`), on
    /// the bytes of its data buffer from `buf_off`.
    pub fn push_submit(&mut self, i: usize, kind: IoKind, offset: u64, len: u32, buf_off: u32) {
        self.slots[i].parts += 1;
        self.subs.push(Submit {
            slot: i as u16,
            kind,
            offset,
            len,
            buf_off,
        });
    }

    /// After queueing parts: wait for them, or finish now if none were queued.
    pub fn settle(&mut self, i: usize) -> Outcome {
        let s = &self.slots[i];
        if s.parts > 0 {
            Outcome::Pending
        } else {
            Outcome::Done {
                status: s.status,
                result: 0,
                c2h_len: s.c2h_len,
            }
        }
    }

    /// One part of slot `i` could not even be issued.
    fn part_failed(&mut self, i: usize, status: Status) -> Result<(), DatapathError> {
        let s = &mut self.slots[i];
        if s.state != SlotState::Executing || s.parts == 0 {
            return Ok(());
        }
        s.parts -= 1;
        if s.status.is_success() {
            s.status = status;
            s.c2h_len = 0;
        }
        self.settle_done(i)
    }

    /// Responds for slot `i` if its last part is done.
    fn settle_done(&mut self, i: usize) -> Result<(), DatapathError> {
        let s = &self.slots[i];
        if s.parts > 0 {
            return Ok(());
        }
        let out = Outcome::Done {
            status: s.status,
            result: 0,
            c2h_len: s.c2h_len,
        };
        self.account_stats(i);
        self.finish(i, out)
    }

    /// Acts on an outcome: respond and free the slot, or leave it in flight.
    fn finish(&mut self, i: usize, out: Outcome) -> Result<(), DatapathError> {
        match out {
            Outcome::Pending | Outcome::AwaitBuf => Ok(()),
            Outcome::Parked => {
                self.release(i);
                Ok(())
            }
            Outcome::Throttled => {
                self.slots[i].state = SlotState::Throttled;
                let nsid = self.slots[i].cmd().nsid();
                self.qos.park(i as u16, nsid);
                Ok(())
            }
            Outcome::Done {
                status,
                result,
                c2h_len,
            } => {
                let cid = self.slots[i].cmd().cid();
                if status.is_success() && c2h_len > 0 {
                    if self.data(i, c2h_len as usize).is_none() {
                        // A handler reported data it had nowhere to put: a bug, not input.
                        tracing::error!(cid, c2h_len, "completion with data but no buffer");
                        self.send_resp(cid, Status::INTERNAL, 0)?;
                        self.release(i);
                        return Ok(());
                    }
                    // Held, not released: the batch points at this slot's buffer.
                    self.send_data_resp(i, cid, c2h_len, result)?;
                    self.slots[i].state = SlotState::Sending;
                    return Ok(());
                }
                self.send_resp(cid, status, result)?;
                self.release(i);
                Ok(())
            }
        }
    }

    /// Frees slot `i` and gives its data buffer back (to the pool, or the reserve).
    fn release(&mut self, i: usize) {
        let s = &mut self.slots[i];
        s.state = SlotState::Free;
        s.ns = None;
        s.write_ticket = None;
        match std::mem::replace(&mut s.data, SlotData::None) {
            SlotData::Pool(b) => drop(b),
            SlotData::Reserve => self.reserve_free = true,
            SlotData::None => {}
        }
        self.free.push(i as u16);
    }

    // ---------------------------------------------------------------------------------
    // QoS, keep-alive, events

    /// Executes parked commands again, oldest first, at most once per refill period. One
    /// that still finds no tokens goes back in line and holds back the rest of its
    /// namespace for this pass.
    fn retry_throttled(&mut self, now: Instant) -> Result<(), DatapathError> {
        let n = self.qos.slots.len();
        if n == 0 || now < self.qos.retry_at {
            return Ok(());
        }
        self.qos.retry_at = now + Duration::from_millis(QOS_REFILL_MS);
        self.qos.blocked.clear();
        for _ in 0..n {
            let Some(i) = self.qos.slots.pop_front() else {
                break;
            };
            let nsid = self.slots[i as usize].cmd().nsid();
            if self.qos.holds_back(nsid) {
                self.qos.park(i, nsid);
                continue;
            }
            self.execute(i as usize)?;
        }
        Ok(())
    }

    /// Whether a read or write of `bytes` on `ns` may go to the backend now: nothing of
    /// its namespace is parked ahead of it, and the namespace's buckets hold the tokens.
    pub fn qos_admit(&self, ns: &Namespace, dir: QosDir, bytes: u32) -> bool {
        !self.qos.holds_back(ns.spec.nsid) && ns.qos.try_take(dir, bytes)
    }

    /// When the controller's keep-alive timer runs out (None: no timer). The KATO
    /// enforced is the effective one: a controller that sees no namespace cannot opt out.
    fn keepalive_deadline(&self) -> Option<Instant> {
        let kato_ms = self
            .ctrl
            .effective_kato_ms(self.shared.cfg.no_namespace_kato_ms);
        if kato_ms == 0 {
            return None;
        }
        let last = self.ctrl.state().last_keepalive;
        Some(last + Duration::from_millis(kato_ms as u64 + KATO_GRACE_MS))
    }

    /// Answers outstanding AERs with queued events (admin queue).
    fn deliver_events(&mut self) -> Result<(), DatapathError> {
        while !self.aers.is_empty() {
            let Some(ev) = self.ctrl.state().events.pop_front() else {
                break;
            };
            let cid = self.aers.remove(0);
            self.send_resp(cid, Status::SUCCESS, ev as u64)?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------------------------
    // Staging PDUs

    /// Makes room for a PDU group of `bytes` header bytes in `segs` pieces. The batch is
    /// sized for one group per slot, so running out means a bug, not load.
    fn room(&self, bytes: usize, segs: usize) -> Result<(), DatapathError> {
        if self.tx.has_room(bytes, segs) {
            Ok(())
        } else {
            tracing::error!(qid = self.qid, "send batch full");
            Err(DatapathError::Closed("send batch full"))
        }
    }

    /// Stages a header-only PDU (capsule response, R2T).
    fn stage_hdr_only(&mut self, t: PduType, fields: &HdrFields<'_>) -> Result<(), DatapathError> {
        let n = pdu::encode_header(&mut self.hdr, &self.txc, t, 0, fields, 0);
        self.room(n, 1)?;
        self.tx.push_hdr(&self.hdr[..n]);
        Ok(())
    }

    fn send_resp(&mut self, cid: u16, status: Status, result: u64) -> Result<(), DatapathError> {
        let cqe = nvme::cqe(result, self.sqhd, self.qid, cid, status);
        self.stage_hdr_only(PduType::CapsuleResp, &HdrFields::Resp(&cqe))
    }

    fn send_r2t(&mut self, cid: u16, ttag: u16, len: u32) -> Result<(), DatapathError> {
        let r2t = pdu::R2t {
            cccid: cid,
            ttag,
            offset: 0,
            length: len,
        };
        self.stage_hdr_only(PduType::R2t, &HdrFields::R2t(r2t))
    }

    /// Stages C2HData with the slot's first `len` bytes, then the response capsule
    /// (unless SQ flow control is off and the SUCCESS flag stands in for it).
    fn send_data_resp(
        &mut self,
        i: usize,
        cid: u16,
        len: u32,
        result: u64,
    ) -> Result<(), DatapathError> {
        self.room(tx_bytes_per_cmd(&self.txc), 3)?;
        let success_flag = self.sqflow_off && result == 0;
        let flags = FLAG_LAST_PDU | if success_flag { FLAG_SUCCESS } else { 0 };
        let dh = DataHdr {
            cccid: cid,
            ttag: 0,
            offset: 0,
            length: len,
        };
        let t = PduType::C2hData;
        let f = HdrFields::Data(dh);
        let n = pdu::encode_header(&mut self.hdr, &self.txc, t, flags, &f, len as usize);
        self.tx.push_hdr(&self.hdr[..n]);
        self.tx.push_slot(i as u16, len);
        if self.txc.ddgst {
            let dd = pdu::data_digest(self.data(i, len as usize).unwrap_or_default());
            self.tx.push_hdr(&dd);
        }
        if !success_flag {
            let cqe = nvme::cqe(result, self.sqhd, self.qid, cid, Status::SUCCESS);
            let f = HdrFields::Resp(&cqe);
            let n = pdu::encode_header(&mut self.hdr, &self.txc, PduType::CapsuleResp, 0, &f, 0);
            self.tx.push_hdr(&self.hdr[..n]);
        }
        Ok(())
    }
}

/// Teardown: a controller never outlives its admin queue, and no buffer is freed while the
/// kernel may still write into it. The driver drops a queue only once nothing is in
/// flight; should it have to give up waiting (shutdown deadline), the buffers of what is
/// still outstanding are leaked (a leaked `Buf` keeps the pool mapped), never reused.
impl Drop for Queue {
    fn drop(&mut self) {
        let mut leak_reserve = false;
        for s in self
            .slots
            .iter_mut()
            .filter(|s| s.state == SlotState::Executing && s.parts > 0)
        {
            match std::mem::replace(&mut s.data, SlotData::None) {
                SlotData::Pool(b) => std::mem::forget(b),
                SlotData::Reserve => leak_reserve = true,
                SlotData::None => {}
            }
        }
        if leak_reserve {
            if let Some(p) = SlotBuf::new(1, 1) {
                std::mem::forget(std::mem::replace(&mut self.reserve, p));
            }
        }
        fabrics::disconnect(&self.shared, &self.ctrl, self.qid);
    }
}

#[cfg(test)]
mod tests;
