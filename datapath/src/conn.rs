//! One TCP connection = one NVMe queue pair, served by one thread.
//!
//! The thread does the ICReq/Connect handshake with blocking reads, then runs a
//! poll loop over three descriptors: the socket (PDUs in), the queue's io_uring
//! (storage completions) and a notifier (AENs, teardown). Responses produced in
//! one pass of the loop are staged in a [`TxBatch`] and written with one blocking
//! `writev` before the thread sleeps, data straight from the slot buffers.
//! Everything a queue needs (slots, ring, send batch, the QoS parking FIFO, a small
//! reserve data buffer) is allocated once, at Connect; data buffers are borrowed from the
//! target's shared pool ([`crate::pool`]) only while a command moves data.
//!
//! Data buffers: a write takes one when its R2T is due, a read when it reaches the
//! backend, and both give it back once their completion is sent. A command that finds
//! the pool exhausted waits in the pool's FIFO holding nothing (state `AwaitBuf`) and goes
//! on when its buffer is granted. In-capsule data has already arrived and cannot wait in
//! line: it takes a pool buffer if one is free, else the queue's private reserve; if that
//! is busy too, the capsule stays in the receive buffer until the reserve comes back
//! (its holder is executing or sending, so it always does). Admin commands complete
//! synchronously, so the admin queue's reserve (one maximal buffer) is free again after a
//! flush: Identify and log pages never wait for the pool. Data asked for by R2T is held
//! until the host sends it, so a queue may have only its share of it outstanding
//! ([`R2T_POOL_SHARE_DIVISOR`]); further writes wait in the queue's own FIFO, holding
//! nothing. A write to a namespace the host cannot see fails before any R2T.
//!
//! Reads and writes of a QoS-limited namespace take tokens right before they reach the
//! backend (writes once their data has arrived). A command that finds none is parked
//! in a FIFO bounded by the queue depth; the loop then sleeps at most one refill period
//! and, once per refill period (tokens accrue no faster), retries parked commands in
//! order before reading new ones. Commands of one namespace never overtake each other;
//! other namespaces on the queue are not held up.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

use crate::admission::ConnKey;
pub use crate::admission::PortClass;
use crate::backend::IoQueue;
use crate::buffer::SlotBuf;
use crate::ctrl::Controller;
use crate::error::DatapathError;
use crate::fabrics::{self, Accepted, ConnectOutcome};
use crate::limits::{
    ADMIN_QUEUE_RESERVE_BYTES, IO_QUEUE_RESERVE_BYTES, KATO_GRACE_MS, MAX_DATA_BYTES,
    MAX_H2C_DATA_BYTES, MAX_HDR_BYTES, MAX_OUTSTANDING_AERS, POLL_INTERVAL_MS_MAX, QOS_REFILL_MS,
    R2T_POOL_SHARE_DIVISOR, RX_BUF_BYTES, SEND_TIMEOUT_MS, TX_BATCH_HDR_BYTES, TX_BATCH_SEGS,
};
use crate::notify::Notifier;
use crate::ns::{Namespace, NsTable};
use crate::nvme::{self, Dir, Sqe, Status, SGL_DATA_OFFSET};
use crate::pdu::{
    self, Check, DataHdr, HdrFields, IcResp, Pdu, PduError, PduType, RxContext, TxContext, CH_LEN,
    CQE_LEN, FLAG_LAST_PDU, FLAG_SUCCESS, IC_DDGST_ENABLE, IC_HDGST_ENABLE, SQE_LEN,
};
use crate::pool::{Buf, PoolClient};
use crate::qos::QosDir;
use crate::target::Shared;

/// Lifecycle of a command slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Unused.
    Free,
    /// Waiting for H2CData after an R2T.
    AwaitData,
    /// Storage operations in flight.
    Executing,
    /// Waiting in the QoS FIFO for its namespace's tokens (its data, if any, has arrived).
    Throttled,
    /// Waiting in the buffer pool's FIFO for a data buffer; holds nothing.
    AwaitBuf,
    /// Finished; its data is staged in the send batch, so the buffer stays reserved.
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
    /// Storage operations outstanding.
    pub pending: u32,
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
            pending: 0,
            status: Status::SUCCESS,
            c2h_len: 0,
            ns: None,
            data: SlotData::None,
            after_grant: AfterGrant::Execute,
            tokens_paid: false,
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
    /// Storage operations are in flight; the reaper responds.
    Pending,
    /// Parked without a slot (an AER); answered later.
    Parked,
    /// The namespace's QoS tokens ran out: the slot waits in the QoS FIFO and the
    /// command is executed again when its turn comes.
    Throttled,
    /// No data buffer yet: the slot waits in the pool's FIFO and the command is executed
    /// again when its buffer is granted.
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

/// The receive buffer: bytes from the socket not yet consumed as PDUs.
struct RxBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl RxBuf {
    fn new() -> RxBuf {
        RxBuf {
            buf: vec![0; RX_BUF_BYTES],
            start: 0,
            end: 0,
        }
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads what the socket has (without blocking if `nonblocking`); Ok(0) is EOF.
    fn fill(&mut self, sock: &TcpStream, nonblocking: bool) -> io::Result<usize> {
        if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let flags = if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        let spare = &mut self.buf[self.end..];
        if spare.is_empty() {
            // Unreachable while limits hold (a PDU always fits); never mistake it for EOF.
            return Err(io::Error::other("receive buffer full"));
        }
        // SAFETY: recv writes at most spare.len() bytes into a live, exclusively borrowed slice.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                flags,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.end += n as usize;
        Ok(n as usize)
    }
}

/// One piece of a batched send.
#[derive(Debug, Clone, Copy)]
enum Seg {
    /// Bytes `start..end` of the batch's header area.
    Hdr { start: usize, end: usize },
    /// The first `len` bytes of slot `i`'s data buffer.
    Slot { i: u16, len: u32 },
}

/// PDUs staged during one pass of the loop, sent with one `writev` before the thread
/// sleeps (or earlier when full): one syscall for many completions instead of one each.
///
/// Slots whose data is staged are held in [`SlotState::Sending`] until the send, so a
/// new command cannot take (and overwrite) a buffer the kernel has not copied yet.
struct TxBatch {
    hdrs: Vec<u8>,
    used: usize,
    segs: Vec<Seg>,
    held: Vec<u16>,
}

impl TxBatch {
    fn new(depth: usize) -> TxBatch {
        TxBatch {
            hdrs: vec![0; TX_BATCH_HDR_BYTES],
            used: 0,
            segs: Vec::with_capacity(TX_BATCH_SEGS),
            held: Vec::with_capacity(depth),
        }
    }

    /// Whether `bytes` of headers in up to `segs` pieces still fit.
    fn has_room(&self, bytes: usize, segs: usize) -> bool {
        self.used + bytes <= self.hdrs.len() && self.segs.len() + segs <= TX_BATCH_SEGS
    }

    /// Appends header bytes, merging with the previous piece when they are contiguous.
    /// The caller checked [`TxBatch::has_room`].
    fn push_hdr(&mut self, bytes: &[u8]) {
        let (start, end) = (self.used, self.used + bytes.len());
        self.hdrs[start..end].copy_from_slice(bytes);
        self.used = end;
        match self.segs.last_mut() {
            Some(Seg::Hdr { end: e, .. }) if *e == start => *e = end,
            _ => self.segs.push(Seg::Hdr { start, end }),
        }
    }
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
    /// Earliest next retry pass: tokens accrue once per refill period, so a pass sooner
    /// after one that left commands parked would only spend the CPU the other namespaces
    /// of the queue need.
    retry_at: Instant,
}

impl QosFifo {
    fn new(depth: usize) -> QosFifo {
        QosFifo {
            slots: VecDeque::with_capacity(depth),
            blocked: Vec::with_capacity(depth),
            retry_at: Instant::now(),
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

/// Everything a connected queue owns except its receive buffer.
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
    sock: TcpStream,
    /// Local address of the socket (for the discovery log).
    pub local: SocketAddr,
    /// The host's address on this connection (for the IP ACL).
    peer: SocketAddr,
    rxc: RxContext,
    tx: TxContext,
    hdr: [u8; MAX_HDR_BYTES],
    txb: TxBatch,
    /// Command slots.
    pub slots: Vec<Slot>,
    free: Vec<u16>,
    ready: Vec<u16>,
    /// This queue's place in the target's buffer pool.
    pool: PoolClient,
    /// Slots waiting for a pool grant.
    awaiting_buf: usize,
    /// Slots whose grant arrived, in grant order (capacity: the depth).
    granted: Vec<u16>,
    /// Private buffer for data that cannot wait for the pool.
    reserve: SlotBuf,
    reserve_free: bool,
    /// A capsule with in-capsule data waits in the receive buffer for a data buffer.
    rx_stalled: bool,
    /// R2T data this queue may have outstanding, and has (bytes).
    r2t_budget: usize,
    r2t_held: usize,
    /// Writes waiting for room in the R2T budget, oldest first (they hold nothing).
    r2t_wait: VecDeque<u16>,
    /// Storage submission ring.
    pub ioq: IoQueue,
    notify: Arc<Notifier>,
    table: Arc<NsTable>,
    /// Namespaces this host may see, ascending by nsid (rebuilt when a table is published).
    visible: Vec<Arc<Namespace>>,
    /// Outstanding AER command IDs (admin queue).
    pub aers: Vec<u16>,
    in_capsule_max: usize,
    qos: QosFifo,
}

/// Entry point of a connection thread; `accepted` starts the handshake deadline.
pub fn serve(
    stream: TcpStream,
    shared: Arc<Shared>,
    port: PortClass,
    conn: ConnKey,
    accepted: Instant,
) {
    let peer = stream.peer_addr().ok();
    if let Err(e) = serve_inner(stream, shared, port, conn, accepted) {
        tracing::debug!(?peer, "connection ended: {e}");
    }
}

fn serve_inner(
    stream: TcpStream,
    shared: Arc<Shared>,
    port: PortClass,
    conn: ConnKey,
    accepted: Instant,
) -> Result<(), DatapathError> {
    // One deadline for ICReq and Connect together: a peer trickling bytes cannot stretch
    // it, as it could a timeout per read.
    let deadline = accepted + shared.cfg.handshake_timeout;
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(Duration::from_millis(SEND_TIMEOUT_MS)))?;
    let (rxc, tx) = ic_handshake(&stream, deadline)?;
    let mut rx = RxBuf::new();
    let plen = loop {
        match pdu::check(rx.data(), &rxc) {
            Ok(Check::Complete(n)) if rx.data().len() >= n => break n,
            Ok(_) => {}
            Err(e) => return Err(terminate(&stream, e, rx.data())),
        }
        arm(&stream, deadline)?;
        if rx.fill(&stream, false)? == 0 {
            return Err(DatapathError::Closed("eof before connect"));
        }
    };
    let (sqe, data) = match pdu::parse(&rx.data()[..plen], &rxc) {
        Ok(Pdu::CapsuleCmd { sqe, data }) => (*sqe, data.to_vec()),
        Ok(p) => {
            let e = PduError::Unexpected(rx.data()[0]);
            tracing::debug!("expected Connect, got {p:?}");
            return Err(terminate(&stream, e, rx.data()));
        }
        Err(e) => return Err(terminate(&stream, e, rx.data())),
    };
    rx.consume(plen);
    let cid = Sqe(&sqe).cid();
    match fabrics::connect(&shared, &stream, port, conn, &Sqe(&sqe), &data)? {
        ConnectOutcome::Refused { status, result } => {
            send_plain_resp(&stream, &tx, cid, 0, status, result)?;
            Err(DatapathError::Closed("connect refused"))
        }
        ConnectOutcome::Accepted(c) => {
            let (ctrl, qid) = (c.ctrl.clone(), c.qid);
            match Queue::new(shared.clone(), c, stream, rxc, tx) {
                Ok(mut q) => q.accept_connect(cid).and_then(|()| q.run(&mut rx)),
                Err(e) => {
                    fabrics::disconnect(&shared, &ctrl, qid);
                    Err(e)
                }
            }
        }
    }
}

/// Arms the socket's read timeout with what is left until `deadline`.
fn arm(stream: &TcpStream, deadline: Instant) -> Result<(), DatapathError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(DatapathError::Closed("handshake deadline passed"));
    }
    stream.set_read_timeout(Some(left))?;
    Ok(())
}

/// Fills `buf` from the socket before `deadline`.
fn read_exact_by(
    stream: &TcpStream,
    buf: &mut [u8],
    deadline: Instant,
) -> Result<(), DatapathError> {
    let mut s = stream;
    let mut got = 0;
    while got < buf.len() {
        arm(stream, deadline)?;
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(DatapathError::Closed("eof during the handshake")),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads the ICReq, answers with an ICResp, and returns the negotiated contexts.
fn ic_handshake(
    stream: &TcpStream,
    deadline: Instant,
) -> Result<(RxContext, TxContext), DatapathError> {
    let mut b = [0u8; 128];
    let mut s = stream;
    read_exact_by(stream, &mut b[..CH_LEN], deadline)?;
    let rx0 = RxContext::controller_initial();
    if let Err(e) = pdu::check(&b[..CH_LEN], &rx0) {
        return Err(terminate(stream, e, &b[..CH_LEN]));
    }
    read_exact_by(stream, &mut b[CH_LEN..], deadline)?;
    let req = match pdu::parse(&b, &rx0) {
        Ok(Pdu::IcReq(r)) => r,
        Ok(_) => return Err(terminate(stream, PduError::Unexpected(b[0]), &b)),
        Err(e) => return Err(terminate(stream, e, &b)),
    };
    let bad = if req.pfv != 0 {
        Some(8)
    } else if req.hpda > 31 {
        Some(10)
    } else if req.digest & !(IC_HDGST_ENABLE | IC_DDGST_ENABLE) != 0 {
        Some(11)
    } else {
        None
    };
    if let Some(offset) = bad {
        return Err(terminate(stream, PduError::Unsupported { offset }, &b));
    }
    let hdgst = req.digest & IC_HDGST_ENABLE != 0;
    let ddgst = req.digest & IC_DDGST_ENABLE != 0;
    let resp = IcResp {
        pfv: 0,
        cpda: 0,
        digest: req.digest,
        maxh2cdata: MAX_H2C_DATA_BYTES,
    };
    let out = pdu::encode(
        &TxContext::plain(),
        PduType::IcResp,
        0,
        &HdrFields::IcResp(resp),
        &[],
    );
    s.write_all(&out)?;
    let rxc = RxContext {
        from_controller: false,
        hdgst,
        ddgst,
        data_align: 4,
        max_data: MAX_H2C_DATA_BYTES,
    };
    let tx = TxContext {
        hdgst,
        ddgst,
        data_align: (req.hpda as usize + 1) * 4,
    };
    Ok((rxc, tx))
}

/// Sends a C2HTermReq for `e` (best effort) and returns the error to end the connection.
fn terminate(stream: &TcpStream, e: PduError, offending: &[u8]) -> DatapathError {
    let n = offending.len().min(MAX_HDR_BYTES);
    let term = pdu::encode_term(&e, &offending[..n]);
    let mut s = stream;
    let _ = s.write_all(&term);
    DatapathError::Pdu(e)
}

fn send_plain_resp(
    stream: &TcpStream,
    tx: &TxContext,
    cid: u16,
    qid: u16,
    status: Status,
    result: u64,
) -> io::Result<()> {
    let cqe = nvme::cqe(result, 1, qid, cid, status);
    let out = pdu::encode(tx, PduType::CapsuleResp, 0, &HdrFields::Resp(&cqe), &[]);
    let mut s = stream;
    s.write_all(&out)
}

/// Writes every byte of `parts`, retrying partial writes.
fn writev_all(sock: &TcpStream, parts: &mut [IoSlice<'_>]) -> io::Result<()> {
    let mut s = sock;
    let mut parts = parts;
    while !parts.is_empty() {
        let n = s.write_vectored(parts)?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        IoSlice::advance_slices(&mut parts, n);
    }
    Ok(())
}

impl Queue {
    /// Allocates everything the queue will ever need (its only allocation point).
    fn new(
        shared: Arc<Shared>,
        c: Accepted,
        sock: TcpStream,
        rxc: RxContext,
        tx: TxContext,
    ) -> Result<Queue, DatapathError> {
        sock.set_read_timeout(None)?;
        let Accepted {
            ctrl,
            qid,
            depth,
            sqflow_off,
            notify,
            ..
        } = c;
        let n = depth as usize;
        let reserve_bytes = if qid == 0 {
            ADMIN_QUEUE_RESERVE_BYTES
        } else {
            IO_QUEUE_RESERVE_BYTES
        };
        let reserve = SlotBuf::new(1, reserve_bytes).ok_or(DatapathError::Closed(
            "cannot map the queue's reserve buffer",
        ))?;
        let pool = shared.pool.client(Waker::from(notify.clone()), n);
        let conns = shared.cfg.max_connections + shared.cfg.max_discovery_connections;
        let r2t_budget = (shared.pool.capacity_bytes() / (R2T_POOL_SHARE_DIVISOR * conns.max(1)))
            .max(MAX_DATA_BYTES);
        let local = sock.local_addr()?;
        let peer = sock.peer_addr()?;
        let table = shared.table();
        let mut q = Queue {
            shared,
            ctrl,
            qid,
            depth,
            sqhd: 0,
            sqflow_off,
            sock,
            local,
            peer,
            rxc,
            tx,
            hdr: [0; MAX_HDR_BYTES],
            txb: TxBatch::new(n),
            slots: (0..n).map(|_| Slot::new()).collect(),
            free: (0..depth).rev().collect(),
            ready: Vec::with_capacity(n),
            pool,
            awaiting_buf: 0,
            granted: Vec::with_capacity(n),
            reserve,
            reserve_free: true,
            rx_stalled: false,
            r2t_budget,
            r2t_held: 0,
            r2t_wait: VecDeque::with_capacity(n),
            ioq: IoQueue::new(),
            notify,
            table,
            visible: Vec::new(),
            aers: Vec::with_capacity(MAX_OUTSTANDING_AERS),
            in_capsule_max: if qid == 0 {
                crate::limits::ADMIN_IN_CAPSULE_DATA_BYTES
            } else {
                crate::limits::IN_CAPSULE_DATA_BYTES
            },
            qos: QosFifo::new(n),
        };
        q.refresh_visible();
        Ok(q)
    }

    /// Answers the Connect that created this queue.
    fn accept_connect(&mut self, cid: u16) -> Result<(), DatapathError> {
        self.sqhd = 1 % self.depth;
        let cntlid = self.ctrl.cntlid as u64;
        self.send_resp(cid, Status::SUCCESS, cntlid)?;
        Ok(self.flush()?)
    }

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

    fn run(&mut self, rx: &mut RxBuf) -> Result<(), DatapathError> {
        loop {
            if self.shared.shutdown.load(Ordering::Acquire) || self.ctrl.is_dead() {
                return Ok(());
            }
            self.retry_throttled()?;
            self.take_grants()?;
            self.drain_rx(rx)?;
            self.ioq.submit()?;
            self.reap()?;
            if self.qid == 0 {
                self.admin_tick()?;
            }
            let timeout = if self.ioq.has_ready() || (self.rx_stalled && self.reserve_free) {
                0
            } else if !self.qos.slots.is_empty() || self.rx_stalled {
                // A stalled capsule also retries the pool, which other queues refill.
                self.poll_timeout_ms().min(QOS_REFILL_MS)
            } else {
                self.poll_timeout_ms()
            };
            self.flush()?;
            let (sock_ready, _) = self.wait(timeout)?;
            if sock_ready {
                match rx.fill(&self.sock, true) {
                    Ok(0) => return Ok(()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }

    /// Executes parked commands again, oldest first, at most once per refill period. One
    /// that still finds no tokens goes back in line and holds back the rest of its
    /// namespace for this pass.
    fn retry_throttled(&mut self) -> Result<(), DatapathError> {
        let n = self.qos.slots.len();
        if n == 0 {
            return Ok(());
        }
        let now = Instant::now();
        if now < self.qos.retry_at {
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

    /// Polls the socket, the notifier and the ring; returns (socket readable, notified).
    fn wait(&mut self, timeout_ms: u64) -> io::Result<(bool, bool)> {
        // While a capsule is stalled in the receive buffer, more bytes could not be taken.
        let sock_events = if self.rx_stalled { 0 } else { libc::POLLIN };
        let mut fds = [
            libc::pollfd {
                fd: self.sock.as_raw_fd(),
                events: sock_events,
                revents: 0,
            },
            libc::pollfd {
                fd: self.notify.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.ioq.poll_fd().unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a live array of initialised pollfd structs; its length is passed.
        let r = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                timeout_ms as i32,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok((false, false))
            } else {
                Err(e)
            };
        }
        let notified = fds[1].revents != 0;
        if notified {
            self.notify.drain();
        }
        Ok((fds[0].revents != 0, notified))
    }

    /// When the controller's keep-alive timer runs out (None: no timer).
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

    fn poll_timeout_ms(&self) -> u64 {
        if self.qid != 0 {
            return POLL_INTERVAL_MS_MAX;
        }
        let Some(deadline) = self.keepalive_deadline() else {
            return POLL_INTERVAL_MS_MAX;
        };
        let left = deadline.saturating_duration_since(Instant::now());
        (left.as_millis() as u64).clamp(1, POLL_INTERVAL_MS_MAX)
    }

    /// Delivers queued AENs and enforces KATO (admin queue only). The KATO enforced is
    /// the effective one: a controller that sees no namespace cannot opt out with 0.
    fn admin_tick(&mut self) -> Result<(), DatapathError> {
        if self
            .keepalive_deadline()
            .is_some_and(|d| Instant::now() > d)
        {
            tracing::info!(
                cntlid = self.ctrl.cntlid,
                "keep-alive timeout: tearing down controller"
            );
            return Err(DatapathError::Closed("keep alive timeout"));
        }
        while !self.aers.is_empty() {
            let Some(ev) = self.ctrl.state().events.pop_front() else {
                break;
            };
            let cid = self.aers.remove(0);
            self.send_resp(cid, Status::SUCCESS, ev as u64)?;
        }
        Ok(())
    }

    fn drain_rx(&mut self, rx: &mut RxBuf) -> Result<(), DatapathError> {
        self.rx_stalled = false;
        loop {
            let avail = rx.data();
            let plen = match pdu::check(avail, &self.rxc) {
                Ok(Check::Complete(n)) if avail.len() >= n => n,
                Ok(_) => return Ok(()),
                Err(e) => return Err(self.fail(e, avail)),
            };
            let parsed = match pdu::parse(&avail[..plen], &self.rxc) {
                Err(PduError::DataDigest) => {
                    pdu::parse_with(&avail[..plen], &self.rxc, false).map(|p| (p, false))
                }
                other => other.map(|p| (p, true)),
            };
            match parsed {
                Ok((p, digest_ok)) => match self.handle(p, digest_ok) {
                    Ok(true) => {}
                    Ok(false) => {
                        // In-capsule data and no buffer: keep the PDU for the next pass.
                        self.rx_stalled = true;
                        return Ok(());
                    }
                    Err(e) => {
                        let hdr = &rx.data()[..plen.min(MAX_HDR_BYTES)];
                        return Err(match e {
                            DatapathError::Pdu(pe) => self.fail(pe, hdr),
                            other => other,
                        });
                    }
                },
                Err(e) => return Err(self.fail(e, avail)),
            }
            rx.consume(plen);
        }
    }

    /// Sends what is staged (best effort), then a terminate request; ends the connection.
    fn fail(&mut self, e: PduError, offending: &[u8]) -> DatapathError {
        let _ = self.flush();
        terminate(&self.sock, e, offending)
    }

    /// Acts on one PDU; false means it could not be taken yet and must be offered again.
    /// `digest_ok` false means its data failed the data digest: the command it belongs to
    /// fails with Transient Transport Error; the connection lives.
    fn handle(&mut self, p: Pdu<'_>, digest_ok: bool) -> Result<bool, DatapathError> {
        match p {
            Pdu::CapsuleCmd { sqe, data } => self.on_capsule(sqe, data, digest_ok),
            Pdu::H2cData { hdr, last, data } => {
                self.on_h2c_data(hdr, last, data, digest_ok).map(|()| true)
            }
            Pdu::H2cTermReq { fes, .. } => {
                tracing::debug!(fes, "host terminated the connection");
                Err(DatapathError::Closed("host sent H2CTermReq"))
            }
            Pdu::IcReq(_) => Err(PduError::Unexpected(PduType::IcReq as u8).into()),
            _ => Err(PduError::Unexpected(0xff).into()),
        }
    }

    /// A new command; false if its in-capsule data found no buffer (nothing was taken).
    fn on_capsule(
        &mut self,
        sqe: &[u8; SQE_LEN],
        data: &[u8],
        digest_ok: bool,
    ) -> Result<bool, DatapathError> {
        let Some(slot) = self.free.pop() else {
            // The host exceeded the queue depth it connected with.
            return Err(PduError::Unexpected(PduType::CapsuleCmd as u8).into());
        };
        let i = slot as usize;
        let s = &mut self.slots[i];
        s.sqe = *sqe;
        s.got = 0;
        s.pending = 0;
        s.status = Status::SUCCESS;
        s.c2h_len = 0;
        s.tokens_paid = false;
        let cmd = Sqe(sqe);
        let sgl = cmd.sgl();
        s.xfer = sgl.length;
        let dir = nvme::data_dir(&cmd);
        let bad = if !digest_ok {
            Some(Status::TRANSIENT_TRANSPORT)
        } else if (!data.is_empty() && dir != Dir::H2c)
            || sgl.length as usize > MAX_DATA_BYTES
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
        };
        if !data.is_empty() && bad.is_none() && !self.take_now(i, data.len())? {
            self.free.push(slot); // offered again once a buffer is back
            return Ok(false);
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
        Ok(true)
    }

    fn sees_nsid(&mut self, nsid: u32) -> bool {
        self.refresh_table();
        self.visible_ns(nsid).is_some()
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

    fn on_h2c_data(
        &mut self,
        hdr: DataHdr,
        last: bool,
        data: &[u8],
        digest_ok: bool,
    ) -> Result<(), DatapathError> {
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
        let end = hdr.offset as u64 + data.len() as u64;
        if hdr.offset != s.got || end > s.xfer as u64 {
            return Err(PduError::DataLength {
                len: end.min(u32::MAX as u64) as u32,
                max: s.xfer,
            }
            .into());
        }
        let off = hdr.offset as usize;
        if let Some(b) = self.data_mut(i, end as usize) {
            b[off..].copy_from_slice(data);
        }
        self.slots[i].got = end as u32;
        if !digest_ok {
            self.slots[i].status = Status::TRANSIENT_TRANSPORT;
        }
        if end as u32 == self.slots[i].xfer {
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
                len: end as u32,
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
            if !self.admin_buffer(i)? {
                return Ok(()); // waits for a grant
            }
            self.exec_admin(i)
        } else {
            self.exec_io(i)
        };
        self.finish(i, out)
    }

    /// Gives an admin command that moves data a maximal buffer (its handlers build pages
    /// of up to MAX_DATA_BYTES in it). False if it has to wait for a grant.
    fn admin_buffer(&mut self, i: usize) -> Result<bool, DatapathError> {
        let dir = nvme::data_dir(&self.slots[i].cmd());
        if dir == Dir::None || !matches!(self.slots[i].data, SlotData::None) {
            return Ok(true);
        }
        if self.take_now(i, MAX_DATA_BYTES)? {
            return Ok(true);
        }
        Ok(self.take_or_wait(i, MAX_DATA_BYTES, AfterGrant::Execute))
    }

    /// A buffer for slot `i` without waiting in line: from the pool if one is free, else
    /// the reserve (flushing the send batch first if a sent command still holds it).
    fn take_now(&mut self, i: usize, len: usize) -> Result<bool, DatapathError> {
        if let Some(b) = self.shared.pool.try_take(len) {
            self.slots[i].data = SlotData::Pool(b);
            return Ok(true);
        }
        if len > self.reserve.slot_bytes() {
            return Ok(false);
        }
        if !self.reserve_free && !self.txb.held.is_empty() {
            self.flush()?;
        }
        if !self.reserve_free {
            return Ok(false);
        }
        self.reserve_free = false;
        self.slots[i].data = SlotData::Reserve;
        Ok(true)
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
                        .map_err(DatapathError::from)
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
                    // Held, not released: the batch still points at this slot's buffer.
                    self.send_data_resp(i, cid, c2h_len, result)?;
                    self.slots[i].state = SlotState::Sending;
                    self.txb.held.push(i as u16);
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
        match std::mem::replace(&mut s.data, SlotData::None) {
            SlotData::Pool(b) => drop(b),
            SlotData::Reserve => self.reserve_free = true,
            SlotData::None => {}
        }
        self.free.push(i as u16);
    }

    /// Collects storage completions and answers finished commands.
    fn reap(&mut self) -> Result<(), DatapathError> {
        let slots = &mut self.slots;
        let ready = &mut self.ready;
        self.ioq.reap(|tag, res| {
            let Some(s) = slots.get_mut(tag as usize) else {
                return;
            };
            if s.state != SlotState::Executing || s.pending == 0 {
                // Not ours to finish (cannot happen unless the ring misreports a tag).
                tracing::warn!(tag, "completion for an idle slot ignored");
                return;
            }
            crate::io::account_completion(s, res);
            if s.pending == 0 {
                ready.push(tag as u16);
            }
        });
        while let Some(i) = self.ready.pop() {
            let i = i as usize;
            let s = &self.slots[i];
            let out = Outcome::Done {
                status: s.status,
                result: 0,
                c2h_len: s.c2h_len,
            };
            self.account_stats(i);
            self.finish(i, out)?;
        }
        Ok(())
    }

    /// Makes room for a PDU of `bytes` header bytes in `segs` pieces, sending early if full.
    fn reserve(&mut self, bytes: usize, segs: usize) -> io::Result<()> {
        if !self.txb.has_room(bytes, segs) {
            self.flush()?;
        }
        Ok(())
    }

    /// Sends everything staged with one `writev`, then frees the slots it held.
    fn flush(&mut self) -> io::Result<()> {
        if self.txb.segs.is_empty() {
            return Ok(());
        }
        let mut iov = [IoSlice::new(&[]); TX_BATCH_SEGS];
        let n = self.txb.segs.len();
        for (v, seg) in iov.iter_mut().zip(&self.txb.segs) {
            *v = match *seg {
                Seg::Hdr { start, end } => IoSlice::new(&self.txb.hdrs[start..end]),
                Seg::Slot { i, len } => {
                    IoSlice::new(self.data(i as usize, len as usize).unwrap_or_default())
                }
            };
        }
        let r = writev_all(&self.sock, &mut iov[..n]);
        self.txb.segs.clear();
        self.txb.used = 0;
        while let Some(i) = self.txb.held.pop() {
            self.release(i as usize);
        }
        r
    }

    /// Stages a header-only PDU (capsule response, R2T).
    fn stage_hdr_only(&mut self, t: PduType, fields: &HdrFields<'_>) -> io::Result<()> {
        self.reserve(MAX_HDR_BYTES, 1)?;
        let n = pdu::encode_header(&mut self.hdr, &self.tx, t, 0, fields, 0);
        self.txb.push_hdr(&self.hdr[..n]);
        Ok(())
    }

    fn send_resp(&mut self, cid: u16, status: Status, result: u64) -> io::Result<()> {
        let cqe: [u8; CQE_LEN] = nvme::cqe(result, self.sqhd, self.qid, cid, status);
        self.stage_hdr_only(PduType::CapsuleResp, &HdrFields::Resp(&cqe))
    }

    fn send_r2t(&mut self, cid: u16, ttag: u16, len: u32) -> io::Result<()> {
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
    fn send_data_resp(&mut self, i: usize, cid: u16, len: u32, result: u64) -> io::Result<()> {
        self.reserve(2 * MAX_HDR_BYTES + pdu::DIGEST_LEN, 3)?;
        let success_flag = self.sqflow_off && result == 0;
        let flags = FLAG_LAST_PDU | if success_flag { FLAG_SUCCESS } else { 0 };
        let dh = DataHdr {
            cccid: cid,
            ttag: 0,
            offset: 0,
            length: len,
        };
        let t = PduType::C2hData;
        let n = pdu::encode_header(
            &mut self.hdr,
            &self.tx,
            t,
            flags,
            &HdrFields::Data(dh),
            len as usize,
        );
        self.txb.push_hdr(&self.hdr[..n]);
        self.txb.segs.push(Seg::Slot { i: i as u16, len });
        if self.tx.ddgst {
            let dd = pdu::data_digest(self.data(i, len as usize).unwrap_or_default());
            self.txb.push_hdr(&dd);
        }
        if !success_flag {
            let cqe = nvme::cqe(result, self.sqhd, self.qid, cid, Status::SUCCESS);
            let f = HdrFields::Resp(&cqe);
            let n = pdu::encode_header(&mut self.hdr, &self.tx, PduType::CapsuleResp, 0, &f, 0);
            self.txb.push_hdr(&self.hdr[..n]);
        }
        Ok(())
    }
}

/// Teardown runs on every exit path, unwinding included, so a controller never outlives
/// its admin queue and no buffer is freed while the kernel may still write into it.
impl Drop for Queue {
    fn drop(&mut self) {
        // Throttled slots never reached the backend: they hold no I/O and no namespace,
        // and vanish with the queue (the host gets no completion for them, as for any
        // command outstanding when its connection ends).
        //
        // Drain in-flight storage I/O so no buffer is freed under the kernel.
        let deadline = Instant::now() + Duration::from_secs(30);
        while self
            .slots
            .iter()
            .any(|s| s.state == SlotState::Executing && s.pending > 0)
            && Instant::now() < deadline
        {
            let _ = self.ioq.submit();
            let slots = &mut self.slots;
            self.ioq.reap(|tag, res| {
                if let Some(s) = slots.get_mut(tag as usize) {
                    crate::io::account_completion(s, res);
                }
            });
            std::thread::sleep(Duration::from_millis(1));
        }
        // The kernel may still write into the buffers of what did not drain: leaking them
        // (and keeping the pool mapped, which a leaked `Buf` does) beats a use-after-free.
        let mut leak_reserve = false;
        for s in self
            .slots
            .iter_mut()
            .filter(|s| s.state == SlotState::Executing && s.pending > 0)
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
