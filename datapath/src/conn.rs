//! One TCP connection as its reactor holds it: the handshake (ICReq, then the Fabrics
//! Connect that creates its queue), the receive stream ([`Rx`]) feeding the queue state
//! machine ([`Queue`]), what waits to be sent, and how far closing has come.
//!
//! Nothing here touches the ring: the reactor reads the connection's state after each
//! event and issues the socket operations (`crate::reactor`). A connection is in exactly
//! one [`Phase`]; before Connect it sends only from a small buffer of its own (ICResp,
//! a Connect refusal, a terminate request), afterwards from its queue's send batches.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

use crate::admission::{ConnKey, PortClass};
use crate::error::DatapathError;
use crate::fabrics::{self, ConnectFrom, ConnectOutcome};
use crate::limits::{MAX_H2C_DATA_BYTES, TX_IOV_MAX};
use crate::notify::Notifier;
use crate::nvme::{self, Sqe, Status};
use crate::pdu::{
    self, DataHdr, HdrFields, IcResp, Pdu, PduError, PduType, RxContext, TxContext,
    IC_DDGST_ENABLE, IC_HDGST_ENABLE,
};
use crate::queue::{Flow, Queue, QueueInit};
use crate::rx::{Fail, Rx, Sink};
use crate::target::{LedgerGuard, Shared};

/// Bytes a connection can send before it has a queue: an ICResp, then a Connect response
/// or a terminate request.
const PRE_BYTES: usize = 512;

/// Where a connection is in its life.
pub enum Phase {
    /// Waiting for the ICReq.
    IcReq,
    /// ICResp staged; waiting for the Connect.
    Connect,
    /// Connected: the queue state machine.
    Live(Box<Queue>),
}

/// How far closing has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Closing {
    /// Open.
    No,
    /// Close once everything staged (a refusal, a terminate request) has been sent.
    AfterSend,
    /// Shut the socket down and drop the connection once nothing is in flight.
    Now,
}

/// What a connection sends before it has a queue.
struct Pre {
    buf: [u8; PRE_BYTES],
    len: usize,
    sent: usize,
}

impl Pre {
    fn push(&mut self, bytes: &[u8]) {
        // A refusal or terminate that does not fit is dropped: the close still happens.
        if self.len + bytes.len() <= PRE_BYTES {
            self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
            self.len += bytes.len();
        }
    }
}

/// Who the connection is.
pub struct Ident {
    /// Its port.
    pub port: PortClass,
    /// Its entry in the admission ledger.
    pub key: ConnKey,
    /// The host's address.
    pub peer: SocketAddr,
    /// The local address.
    pub local: SocketAddr,
    /// When it was accepted (the handshake deadline runs from here).
    pub accepted: Instant,
}

/// One connection.
pub struct Conn {
    /// Who it is.
    pub id: Ident,
    /// Generation of its slot in the reactor (ring tags carry it, so a completion for a
    /// closed connection is never applied to the next one in the same slot).
    pub gen: u32,
    /// Its phase. Declared before the socket and the ledger entry: a queue is dropped
    /// (detaching it from its controller) before either goes.
    pub phase: Phase,
    rx: Rx,
    rxc: RxContext,
    txc: TxContext,
    pre: Pre,
    /// Wakes this connection's queue on its reactor.
    pub notify: Arc<Notifier>,
    /// Closing state.
    pub closing: Closing,
    /// A multishot receive is armed.
    pub recv_armed: bool,
    /// The receive ended (no buffers, or the kernel stopped it) and must be armed again.
    pub rearm: bool,
    /// A send is in flight (from `pre` or from the queue's batch).
    pub send_in_flight: bool,
    /// The send in flight is from `pre`.
    pub pre_in_flight: bool,
    /// When `pre`'s send went out (the send timeout).
    pub pre_since: Option<Instant>,
    /// The socket was shut down.
    pub shut: bool,
    /// In the reactor's list of connections to look at after this pass.
    pub dirty: bool,
    /// In the reactor's list of connections ticked every refill period.
    pub fast: bool,
    /// The iovecs and header of the send in flight (the kernel reads them at submission;
    /// kept here so they stay put until then).
    pub iov: Vec<libc::iovec>,
    /// See `iov`.
    pub msg: libc::msghdr,
    /// The socket.
    pub fd: OwnedFd,
    _ledger: LedgerGuard,
}

impl Conn {
    /// A connection just accepted.
    pub fn new(
        id: Ident,
        gen: u32,
        fd: OwnedFd,
        notify: Arc<Notifier>,
        ledger: LedgerGuard,
    ) -> Conn {
        // SAFETY: msghdr is plain data; all zeroes is a valid empty header.
        let msg: libc::msghdr = unsafe { std::mem::zeroed() };
        Conn {
            id,
            gen,
            phase: Phase::IcReq,
            rx: Rx::new(),
            rxc: RxContext::controller_initial(),
            txc: TxContext::plain(),
            pre: Pre {
                buf: [0; PRE_BYTES],
                len: 0,
                sent: 0,
            },
            notify,
            closing: Closing::No,
            recv_armed: false,
            rearm: false,
            send_in_flight: false,
            pre_in_flight: false,
            pre_since: None,
            shut: false,
            dirty: false,
            fast: false,
            iov: Vec::new(),
            msg,
            fd,
            _ledger: ledger,
        }
    }

    /// The queue, once connected.
    pub fn queue(&mut self) -> Option<&mut Queue> {
        match &mut self.phase {
            Phase::Live(q) => Some(q),
            _ => None,
        }
    }

    /// Asks for the connection to end (never reopens a closing one, never delays a `Now`).
    pub fn close(&mut self, how: Closing) {
        self.closing = self.closing.max(how);
    }

    /// Bytes received from the socket.
    pub fn on_bytes(&mut self, shared: &Arc<Shared>, now: Instant, chunk: &[u8]) {
        if self.closing != Closing::No {
            return; // what a closing connection receives is dropped
        }
        let r = {
            let (rx, mut sink) = self.sink(shared, now);
            rx.feed(chunk, &mut sink)
        };
        self.after_rx(r);
    }

    /// Offers a stalled PDU again (the queue may have a buffer now).
    pub fn resume_rx(&mut self, shared: &Arc<Shared>, now: Instant) {
        if self.closing != Closing::No || !self.rx.stalled() {
            return;
        }
        let r = {
            let (rx, mut sink) = self.sink(shared, now);
            rx.resume(&mut sink)
        };
        self.after_rx(r);
    }

    /// Whether the receive stream waits for the queue to take a PDU.
    pub fn rx_stalled(&self) -> bool {
        self.rx.stalled()
    }

    fn sink<'a>(&'a mut self, shared: &'a Arc<Shared>, now: Instant) -> (&'a mut Rx, ConnSink<'a>) {
        let sink = ConnSink {
            shared,
            now,
            id: &self.id,
            phase: &mut self.phase,
            rxc: &mut self.rxc,
            txc: &mut self.txc,
            pre: &mut self.pre,
            notify: &self.notify,
            closing: &mut self.closing,
        };
        (&mut self.rx, sink)
    }

    fn after_rx(&mut self, r: Result<(), Fail>) {
        if let Err(f) = r {
            self.fail(f);
        }
        if let Phase::Live(q) = &self.phase {
            self.rx.set_backlog_max(q.stalled_bytes_max());
        }
    }

    /// Ends the connection after an error: a protocol error sends a terminate request
    /// (after whatever is staged) first.
    fn fail(&mut self, f: Fail) {
        match f.err() {
            DatapathError::Pdu(e) => {
                tracing::debug!(peer = %self.id.peer, "protocol error: {e}");
                let term = pdu::encode_term(e, f.offending());
                match &mut self.phase {
                    Phase::Live(q) => q.stage_raw(&term),
                    _ => self.pre.push(&term),
                }
                self.close(Closing::AfterSend);
            }
            e => {
                tracing::debug!(peer = %self.id.peer, "connection ended: {e}");
                self.close(Closing::Now);
            }
        }
    }

    /// Ends the connection after an error from one of its queue's inputs.
    pub fn fail_queue(&mut self, e: DatapathError) {
        self.fail(Fail::new(e, &[]));
    }

    /// Bytes `pre` still has to send, if any (and none are in flight).
    pub fn pre_pending(&self) -> Option<&[u8]> {
        (self.pre.sent < self.pre.len).then(|| &self.pre.buf[self.pre.sent..self.pre.len])
    }

    /// The kernel took `n` bytes of `pre`.
    pub fn pre_sent(&mut self, n: usize) {
        self.pre.sent = (self.pre.sent + n).min(self.pre.len);
        if self.pre.sent == self.pre.len {
            self.pre.sent = 0;
            self.pre.len = 0;
        }
    }

    /// Whether anything is staged or in flight to send.
    pub fn sending(&self) -> bool {
        if self.send_in_flight || self.pre.len > 0 {
            return true;
        }
        match &self.phase {
            Phase::Live(q) => q.tx_staged() || q.tx_in_flight_since().is_some(),
            _ => false,
        }
    }

    /// Fills `iov` and `msg` for the queue's next send; the bytes covered, 0 if nothing.
    pub fn prepare_send(&mut self, now: Instant) -> usize {
        let Phase::Live(q) = &mut self.phase else {
            return 0;
        };
        if q.tx_in_flight_since().is_none() && !q.tx_start(now) {
            return 0;
        }
        if self.iov.capacity() == 0 {
            self.iov.reserve_exact(TX_IOV_MAX);
        }
        let bytes = q.tx_iov(&mut self.iov);
        self.msg.msg_iov = self.iov.as_mut_ptr();
        self.msg.msg_iovlen = self.iov.len() as _;
        bytes
    }

    /// Since when the send in flight has been waiting for the kernel, if one is.
    pub fn send_since(&self) -> Option<Instant> {
        if !self.send_in_flight {
            return None;
        }
        match &self.phase {
            Phase::Live(q) if !self.pre_in_flight => q.tx_in_flight_since(),
            _ => self.pre_since,
        }
    }

    /// When the handshake must be over (None once connected).
    pub fn handshake_deadline(&self, shared: &Shared) -> Option<Instant> {
        match self.phase {
            Phase::Live(_) => None,
            _ => Some(self.id.accepted + shared.cfg.handshake_timeout),
        }
    }
}

/// The connection's side of its receive stream.
struct ConnSink<'a> {
    shared: &'a Arc<Shared>,
    /// The reactor's clock for this pass.
    now: Instant,
    id: &'a Ident,
    phase: &'a mut Phase,
    rxc: &'a mut RxContext,
    txc: &'a mut TxContext,
    pre: &'a mut Pre,
    notify: &'a Arc<Notifier>,
    closing: &'a mut Closing,
}

impl Sink for ConnSink<'_> {
    fn ctx(&self) -> RxContext {
        *self.rxc
    }

    fn pdu(&mut self, bytes: &[u8]) -> Result<Flow, DatapathError> {
        if *self.closing != Closing::No {
            return Ok(Flow::Taken); // a refused Connect: nothing more is read
        }
        if let Phase::Live(q) = &mut *self.phase {
            return q.on_pdu(self.now, bytes);
        }
        if matches!(*self.phase, Phase::IcReq) {
            self.ic_req(bytes)?;
        } else {
            self.connect(bytes)?;
        }
        Ok(Flow::Taken)
    }

    fn h2c_begin(&mut self, hdr: &DataHdr, last: bool) -> Result<(), DatapathError> {
        match &mut *self.phase {
            Phase::Live(q) => q.h2c_begin(hdr, last),
            _ => Err(PduError::Unexpected(PduType::H2cData as u8).into()),
        }
    }

    fn h2c_bytes(&mut self, hdr: &DataHdr, offset: u32, bytes: &[u8]) {
        if let Phase::Live(q) = &mut *self.phase {
            q.h2c_bytes(hdr, offset, bytes);
        }
    }

    fn h2c_end(&mut self, hdr: &DataHdr, last: bool, ok: bool) -> Result<(), DatapathError> {
        match &mut *self.phase {
            Phase::Live(q) => q.h2c_end(hdr, last, ok),
            _ => Err(PduError::Unexpected(PduType::H2cData as u8).into()),
        }
    }
}

impl ConnSink<'_> {
    /// The ICReq: checks it, stages the ICResp and switches to the negotiated contexts.
    fn ic_req(&mut self, bytes: &[u8]) -> Result<(), DatapathError> {
        let req = match pdu::parse(bytes, self.rxc)? {
            Pdu::IcReq(r) => r,
            _ => return Err(PduError::Unexpected(bytes[0]).into()),
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
            return Err(PduError::Unsupported { offset }.into());
        }
        let hdgst = req.digest & IC_HDGST_ENABLE != 0;
        let ddgst = req.digest & IC_DDGST_ENABLE != 0;
        let resp = IcResp {
            pfv: 0,
            cpda: 0,
            digest: req.digest,
            maxh2cdata: MAX_H2C_DATA_BYTES,
        };
        let mut hdr = [0u8; crate::limits::MAX_HDR_BYTES];
        let f = HdrFields::IcResp(resp);
        let n = pdu::encode_header(&mut hdr, &TxContext::plain(), PduType::IcResp, 0, &f, 0);
        self.pre.push(&hdr[..n]);
        *self.rxc = RxContext {
            from_controller: false,
            hdgst,
            ddgst,
            data_align: 4,
            max_data: MAX_H2C_DATA_BYTES,
        };
        *self.txc = TxContext {
            hdgst,
            ddgst,
            data_align: (req.hpda as usize + 1) * 4,
        };
        *self.phase = Phase::Connect;
        Ok(())
    }

    /// The Connect: creates (or joins) a controller and this connection's queue, or
    /// refuses it and closes once the refusal is sent.
    fn connect(&mut self, bytes: &[u8]) -> Result<(), DatapathError> {
        let (sqe, data) = match pdu::parse(bytes, self.rxc)? {
            Pdu::CapsuleCmd { sqe, data } => (sqe, data),
            p => {
                tracing::debug!("expected Connect, got {p:?}");
                return Err(PduError::Unexpected(bytes[0]).into());
            }
        };
        let cid = Sqe(sqe).cid();
        let from = ConnectFrom {
            port: self.id.port,
            conn: self.id.key,
            remote: self.id.peer,
            notify: self.notify,
        };
        match fabrics::connect(self.shared, &from, &Sqe(sqe), data) {
            ConnectOutcome::Refused { status, result } => {
                self.refuse(cid, status, result);
                Ok(())
            }
            ConnectOutcome::Accepted(accepted) => {
                let (ctrl, qid) = (accepted.ctrl.clone(), accepted.qid);
                let init = QueueInit {
                    shared: self.shared.clone(),
                    accepted,
                    local: self.id.local,
                    peer: self.id.peer,
                    rxc: *self.rxc,
                    txc: *self.txc,
                    now: self.now,
                };
                let mut q = match Queue::new(init) {
                    Ok(q) => q,
                    Err(e) => {
                        fabrics::disconnect(self.shared, &ctrl, qid);
                        return Err(e);
                    }
                };
                q.accept_connect(cid)?;
                *self.phase = Phase::Live(Box::new(q));
                Ok(())
            }
        }
    }

    fn refuse(&mut self, cid: u16, status: Status, result: u64) {
        let cqe = nvme::cqe(result, 1, 0, cid, status);
        let mut hdr = [0u8; crate::limits::MAX_HDR_BYTES];
        let f = HdrFields::Resp(&cqe);
        let n = pdu::encode_header(&mut hdr, self.txc, PduType::CapsuleResp, 0, &f, 0);
        self.pre.push(&hdr[..n]);
        *self.closing = Closing::AfterSend;
    }
}
