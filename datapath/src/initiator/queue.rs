//! One pipelined NVMe/TCP queue pair on one TCP connection: the initiator's only wire code.
//!
//! Up to `depth` commands are in flight; each owns a slot whose data buffer is allocated
//! when the queue opens, so the submit/reap path allocates nothing. The command ID is the
//! slot index, so a completion, C2HData or R2T finds its command directly and completions
//! may arrive in any order. Outgoing PDUs are batched in a send buffer flushed before the
//! queue blocks on a read; received bytes go to a buffer that holds at least two maximal
//! PDUs, parsed in place. Every socket read and write is bounded by the queue's timeout.
//!
//! A transport or protocol failure (timeout, closed socket, malformed or unexpected PDU,
//! digest error) marks the queue broken: the byte stream can no longer be trusted, and every
//! later call returns [`InitiatorError::Broken`]. An NVMe error status is only the result
//! of that command ([`Completion::status`]).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::limits::MAX_HDR_BYTES;
use crate::nvme::{Status, SGL_DATA_OFFSET, SGL_TRANSPORT_DATA};
use crate::pdu::{
    self, Check, DataHdr, HdrFields, IcReq, Pdu, PduType, RxContext, TxContext, DIGEST_LEN,
    FLAG_LAST_PDU, IC_DDGST_ENABLE, IC_HDGST_ENABLE, SQE_LEN,
};

use super::{InitiatorError, Result};

/// SQE flags: PSDT = SGL for data (NVMe/TCP carries no PRPs).
const PSDT_SGL: u8 = 0x40;
/// Smallest MAXH2CDATA a target may advertise (NVMe/TCP 7.4.6.2).
const MAXH2CDATA_MIN: u32 = 4096;

/// Which digests a queue asks for in its ICReq (the target must enable exactly these).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digests {
    /// CRC32C over every PDU header.
    pub header: bool,
    /// CRC32C over every PDU's data.
    pub data: bool,
}

/// How a queue is opened.
#[derive(Debug, Clone, Copy)]
pub(super) struct QueueConfig {
    pub timeout: Duration,
    /// Commands in flight at most (SQSIZE is sent as this, 0-based: one entry spare).
    pub depth: u16,
    /// Data buffer per slot: the largest transfer of one command on this queue.
    pub slot_bytes: usize,
    /// Writes up to this size travel in the command capsule.
    pub in_capsule_bytes: usize,
    pub digests: Digests,
}

/// The data of a submitted command.
#[derive(Debug, Clone, Copy)]
pub enum Data<'a> {
    /// No data.
    None,
    /// Host to controller: copied into the command's slot at submit (in-capsule when small
    /// enough, otherwise sent when the target asks with R2T).
    ToTarget(&'a [u8]),
    /// Controller to host: this many bytes, read from [`Queue::data`] after completion.
    FromTarget(usize),
}

/// One command's completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The command ID [`Queue::submit`] returned.
    pub cid: u16,
    /// Opcode of the command (0x7f for Fabrics).
    pub opcode: u8,
    /// Its NVMe status.
    pub status: Status,
    /// CQE dwords 0 and 1 (0 when C2HData's SUCCESS flag stood in for the CQE).
    pub dw0: u64,
}

impl Completion {
    /// CQE dwords 0/1 on success, the status as an error otherwise.
    pub fn result(&self) -> Result<u64> {
        if self.status.is_success() {
            Ok(self.dw0)
        } else {
            Err(InitiatorError::Status {
                opcode: self.opcode,
                status: self.status,
            })
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    InFlight,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    None,
    /// Data sent in the capsule (`true`) or on R2T.
    ToTarget(bool),
    FromTarget,
}

struct Slot {
    state: State,
    opcode: u8,
    dir: Dir,
    /// Bytes of data the command moves.
    len: usize,
    /// C2H bytes received so far.
    received: usize,
    status: Status,
    dw0: u64,
    buf: Vec<u8>,
}

/// Received bytes, parsed in place.
struct Rx {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Largest PDU the queue accepts (header, digests, slot-sized data).
    max_pdu: usize,
    ctx: RxContext,
}

impl Rx {
    /// Reads what the socket has, blocking (up to the socket timeout) until something does.
    fn fill(&mut self, sock: &mut TcpStream) -> Result<()> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.buf.len() - self.end < self.max_pdu {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        loop {
            match sock.read(&mut self.buf[self.end..]) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                Ok(n) => {
                    self.end += n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The next complete PDU, if one is buffered.
    fn next(&mut self) -> Result<Option<Pdu<'_>>> {
        let avail = &self.buf[self.start..self.end];
        let plen = match pdu::check(avail, &self.ctx)? {
            Check::Complete(n) => n,
            Check::NeedHeader => return Ok(None),
        };
        if plen > self.max_pdu {
            return Err(InitiatorError::Protocol("PDU larger than the queue takes"));
        }
        if avail.len() < plen {
            return Ok(None);
        }
        let at = self.start;
        self.start += plen;
        Ok(Some(pdu::parse(&self.buf[at..at + plen], &self.ctx)?))
    }
}

/// PDUs waiting to be sent, written in one call.
struct Tx {
    buf: Vec<u8>,
    ctx: TxContext,
}

impl Tx {
    /// Bytes one PDU with `data_len` bytes of data takes at most.
    fn pdu_bytes(data_len: usize) -> usize {
        MAX_HDR_BYTES + data_len + DIGEST_LEN
    }

    fn push(&mut self, t: PduType, flags: u8, fields: &HdrFields<'_>, data: &[u8]) {
        let mut hdr = [0u8; MAX_HDR_BYTES];
        let n = pdu::encode_header(&mut hdr, &self.ctx, t, flags, fields, data.len());
        self.buf.extend_from_slice(&hdr[..n]);
        self.buf.extend_from_slice(data);
        if self.ctx.ddgst && !data.is_empty() && t != PduType::IcReq {
            self.buf.extend_from_slice(&pdu::data_digest(data));
        }
    }

    fn flush(&mut self, sock: &mut TcpStream) -> Result<()> {
        if !self.buf.is_empty() {
            sock.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }
}

/// A pipelined queue pair (admin or I/O) on one TCP connection.
pub struct Queue {
    sock: TcpStream,
    rx: Rx,
    tx: Tx,
    slots: Vec<Slot>,
    /// Free slot indices (a stack: the slot just reaped is reused first).
    free: Vec<u16>,
    /// Completed, not yet reaped commands in completion order.
    done: VecDeque<u16>,
    /// Largest H2CData payload the target accepts (ICResp MAXH2CDATA).
    maxh2c: usize,
    in_capsule_bytes: usize,
    digests: Digests,
    broken: bool,
}

impl Queue {
    /// TCP connect and ICReq/ICResp; every slot buffer is allocated here.
    pub(super) fn open(addr: SocketAddr, cfg: &QueueConfig) -> Result<Queue> {
        let sock = TcpStream::connect_timeout(&addr, cfg.timeout)?;
        sock.set_read_timeout(Some(cfg.timeout))?;
        sock.set_write_timeout(Some(cfg.timeout))?;
        sock.set_nodelay(true)?;
        let depth = cfg.depth as usize;
        let max_pdu = Tx::pdu_bytes(cfg.slot_bytes) + DIGEST_LEN;
        let tx_bytes = depth * Tx::pdu_bytes(cfg.in_capsule_bytes) + Tx::pdu_bytes(cfg.slot_bytes);
        let slot = |_| Slot {
            state: State::Free,
            opcode: 0,
            dir: Dir::None,
            len: 0,
            received: 0,
            status: Status::SUCCESS,
            dw0: 0,
            buf: vec![0; cfg.slot_bytes],
        };
        let mut q = Queue {
            sock,
            rx: Rx {
                buf: vec![0; 2 * max_pdu],
                start: 0,
                end: 0,
                max_pdu,
                ctx: RxContext {
                    from_controller: true,
                    hdgst: false,
                    ddgst: false,
                    data_align: 4, // HPDA 0
                    max_data: cfg.slot_bytes as u32,
                },
            },
            tx: Tx {
                buf: Vec::with_capacity(tx_bytes),
                ctx: TxContext::plain(),
            },
            slots: (0..depth).map(slot).collect(),
            free: (0..cfg.depth).rev().collect(),
            done: VecDeque::with_capacity(depth),
            maxh2c: 0,
            in_capsule_bytes: cfg.in_capsule_bytes.min(cfg.slot_bytes),
            digests: cfg.digests,
            broken: false,
        };
        q.handshake()?;
        Ok(q)
    }

    /// ICReq/ICResp: digests, the target's data alignment and MAXH2CDATA.
    fn handshake(&mut self) -> Result<()> {
        let mut digest = 0;
        if self.digests.header {
            digest |= IC_HDGST_ENABLE;
        }
        if self.digests.data {
            digest |= IC_DDGST_ENABLE;
        }
        let req = IcReq {
            pfv: 0,
            hpda: 0,
            digest,
            maxr2t: 0,
        };
        self.tx.push(PduType::IcReq, 0, &HdrFields::IcReq(req), &[]);
        self.tx.flush(&mut self.sock)?;
        let resp = loop {
            match self.rx.next()? {
                Some(Pdu::IcResp(r)) => break r,
                Some(Pdu::C2hTermReq { fes, fei, .. }) => {
                    return Err(InitiatorError::Terminated { fes, fei })
                }
                Some(_) => return Err(InitiatorError::Protocol("expected ICResp")),
                None => self.rx.fill(&mut self.sock)?,
            }
        };
        let usable = resp.pfv == 0 && resp.cpda <= 31 && resp.maxh2cdata >= MAXH2CDATA_MIN;
        if !usable || resp.digest != digest {
            return Err(InitiatorError::Protocol("ICResp parameters unusable"));
        }
        self.maxh2c = (resp.maxh2cdata as usize).min(self.slots[0].buf.len());
        self.rx.ctx.hdgst = self.digests.header;
        self.rx.ctx.ddgst = self.digests.data;
        self.tx.ctx = TxContext {
            hdgst: self.digests.header,
            ddgst: self.digests.data,
            data_align: (resp.cpda as usize + 1) * 4,
        };
        Ok(())
    }

    /// Commands that may be in flight at once.
    pub fn depth(&self) -> usize {
        self.slots.len()
    }

    /// Commands submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Largest data transfer of one command on this queue.
    pub fn slot_bytes(&self) -> usize {
        self.slots[0].buf.len()
    }

    /// The digests this queue negotiated.
    pub fn digests(&self) -> Digests {
        self.digests
    }

    /// Whether a transport or protocol failure has made the queue unusable.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Queues `cmd` (its CID, PSDT and data pointer are filled in here) and returns its
    /// command ID. Nothing is sent until [`Queue::flush`], [`Queue::reap`] or
    /// [`Queue::wait`]; at most [`Queue::depth`] commands are in flight.
    pub fn submit(&mut self, mut cmd: [u8; SQE_LEN], data: Data<'_>) -> Result<u16> {
        if self.broken {
            return Err(InitiatorError::Broken);
        }
        let (dir, len) = match data {
            Data::None => (Dir::None, 0),
            Data::ToTarget(d) => (Dir::ToTarget(d.len() <= self.in_capsule_bytes), d.len()),
            Data::FromTarget(n) => (Dir::FromTarget, n),
        };
        if len > self.slot_bytes() || (len == 0 && dir != Dir::None) {
            return Err(InitiatorError::Invalid(
                "transfer size out of the slot's range",
            ));
        }
        let Some(cid) = self.free.pop() else {
            return Err(InitiatorError::Invalid(
                "every slot of the queue is in flight",
            ));
        };
        let slot = &mut self.slots[cid as usize];
        if let Data::ToTarget(d) = data {
            slot.buf[..len].copy_from_slice(d);
        }
        (slot.state, slot.opcode, slot.dir) = (State::InFlight, cmd[0], dir);
        (slot.len, slot.received) = (len, 0);
        cmd[1] = PSDT_SGL;
        cmd[2..4].copy_from_slice(&cid.to_le_bytes());
        // DPTR: address 0 (offset into the capsule), length, descriptor type.
        cmd[24..32].fill(0);
        cmd[32..36].copy_from_slice(&(len as u32).to_le_bytes());
        let in_capsule = dir == Dir::ToTarget(true);
        cmd[39] = if in_capsule {
            SGL_DATA_OFFSET
        } else {
            SGL_TRANSPORT_DATA
        };
        let capsule: &[u8] = if in_capsule { &slot.buf[..len] } else { &[] };
        self.tx
            .push(PduType::CapsuleCmd, 0, &HdrFields::Cmd(&cmd), capsule);
        Ok(cid)
    }

    /// Sends every queued PDU now.
    pub fn flush(&mut self) -> Result<()> {
        self.guard(|q| q.tx.flush(&mut q.sock))
    }

    /// The next completion, in the order completions arrived; blocks (each read bounded by
    /// the timeout) until one does. The slot is free again: its read data stays readable
    /// with [`Queue::data`] until the next submit.
    pub fn reap(&mut self) -> Result<Completion> {
        if self.done.is_empty() && self.in_flight() == 0 {
            return Err(InitiatorError::Invalid("nothing in flight"));
        }
        self.guard(|q| q.drive(|q| !q.done.is_empty()))?;
        let cid = self.done.pop_front().ok_or(InitiatorError::Broken)?;
        Ok(self.release(cid))
    }

    /// Waits for command `cid` alone; completions of others stay queued for [`Queue::reap`].
    pub fn wait(&mut self, cid: u16) -> Result<Completion> {
        let state = self.slots.get(cid as usize).map(|s| s.state);
        if !matches!(state, Some(State::InFlight | State::Done)) {
            return Err(InitiatorError::Invalid("no such command in flight"));
        }
        let i = cid as usize;
        self.guard(|q| q.drive(|q| q.slots[i].state == State::Done))?;
        if let Some(at) = self.done.iter().position(|&c| c == cid) {
            self.done.remove(at);
        }
        Ok(self.release(cid))
    }

    /// The data a completed read brought (the slot's, until the slot is reused).
    pub fn data(&self, cid: u16) -> &[u8] {
        self.slots
            .get(cid as usize)
            .filter(|s| s.dir == Dir::FromTarget)
            .map_or(&[], |s| &s.buf[..s.len])
    }

    fn release(&mut self, cid: u16) -> Completion {
        let s = &mut self.slots[cid as usize];
        s.state = State::Free;
        self.free.push(cid);
        Completion {
            cid,
            opcode: s.opcode,
            status: s.status,
            dw0: s.dw0,
        }
    }

    /// Runs `f`; any failure but a caller's mistake breaks the queue.
    fn guard<T>(&mut self, f: impl FnOnce(&mut Queue) -> Result<T>) -> Result<T> {
        if self.broken {
            return Err(InitiatorError::Broken);
        }
        let r = f(self);
        if matches!(&r, Err(e) if !matches!(e, InitiatorError::Invalid(_))) {
            self.broken = true;
        }
        r
    }

    /// Sends what is queued and handles received PDUs until `until` holds.
    fn drive(&mut self, until: impl Fn(&Queue) -> bool) -> Result<()> {
        loop {
            while !until(self) && self.step()? {}
            if until(self) {
                return Ok(());
            }
            self.tx.flush(&mut self.sock)?;
            self.rx.fill(&mut self.sock)?;
        }
    }

    /// Handles one buffered PDU; false if none is complete.
    fn step(&mut self) -> Result<bool> {
        let Queue {
            rx,
            tx,
            slots,
            done,
            sock,
            maxh2c,
            ..
        } = self;
        let Some(p) = rx.next()? else {
            return Ok(false);
        };
        match p {
            Pdu::CapsuleResp { cqe } => {
                let cid = u16::from_le_bytes([cqe[12], cqe[13]]);
                let status = Status::from_field(u16::from_le_bytes([cqe[14], cqe[15]]));
                let dw0 = u64::from_le_bytes(cqe[0..8].try_into().expect("8 of 16 bytes"));
                complete(slot_of(slots, cid)?, status, dw0)?;
                done.push_back(cid);
            }
            Pdu::C2hData {
                hdr, success, data, ..
            } => {
                let slot = slot_of(slots, hdr.cccid)?;
                take_c2h(slot, &hdr, data)?;
                if success {
                    if slot.received != slot.len {
                        return Err(InitiatorError::Protocol("SUCCESS flag before all data"));
                    }
                    complete(slot, Status::SUCCESS, 0)?;
                    done.push_back(hdr.cccid);
                }
            }
            Pdu::R2t(r) => send_h2c(tx, sock, slot_of(slots, r.cccid)?, r, *maxh2c)?,
            Pdu::C2hTermReq { fes, fei, .. } => {
                return Err(InitiatorError::Terminated { fes, fei })
            }
            _ => return Err(InitiatorError::Protocol("unexpected PDU type")),
        }
        Ok(true)
    }
}

/// The in-flight command `cid` names.
fn slot_of(slots: &mut [Slot], cid: u16) -> Result<&mut Slot> {
    match slots.get_mut(cid as usize) {
        Some(s) if s.state == State::InFlight => Ok(s),
        _ => Err(InitiatorError::Protocol("PDU for a command not in flight")),
    }
}

fn complete(slot: &mut Slot, status: Status, dw0: u64) -> Result<()> {
    if status.is_success() && slot.dir == Dir::FromTarget && slot.received != slot.len {
        return Err(InitiatorError::Protocol(
            "success with less data than asked",
        ));
    }
    (slot.state, slot.status, slot.dw0) = (State::Done, status, dw0);
    Ok(())
}

/// Copies one C2HData PDU into the command's slot.
fn take_c2h(slot: &mut Slot, hdr: &DataHdr, data: &[u8]) -> Result<()> {
    let start = hdr.offset as usize;
    let end = start.checked_add(data.len()).filter(|&e| e <= slot.len);
    let (Some(end), Dir::FromTarget) = (end, slot.dir) else {
        return Err(InitiatorError::Protocol(
            "C2HData outside the command's data",
        ));
    };
    slot.buf[start..end].copy_from_slice(data);
    slot.received += data.len();
    Ok(())
}

/// Answers an R2T with H2CData PDUs of at most MAXH2CDATA bytes from the slot's data,
/// flushing whenever the send buffer could not take the next one.
fn send_h2c(
    tx: &mut Tx,
    sock: &mut TcpStream,
    slot: &Slot,
    r: pdu::R2t,
    maxh2c: usize,
) -> Result<()> {
    let (start, len) = (r.offset as usize, r.length as usize);
    let end = start.checked_add(len).filter(|&e| e <= slot.len && len > 0);
    let (Some(end), Dir::ToTarget(false)) = (end, slot.dir) else {
        return Err(InitiatorError::Protocol("R2T outside the command's data"));
    };
    let mut off = start;
    while off < end {
        let n = (end - off).min(maxh2c);
        if tx.buf.len() + Tx::pdu_bytes(n) > tx.buf.capacity() {
            tx.flush(sock)?;
        }
        let hdr = DataHdr {
            cccid: r.cccid,
            ttag: r.ttag,
            offset: off as u32,
            length: n as u32,
        };
        let flags = if off + n == end { FLAG_LAST_PDU } else { 0 };
        let fields = HdrFields::Data(hdr);
        tx.push(PduType::H2cData, flags, &fields, &slot.buf[off..off + n]);
        off += n;
    }
    Ok(())
}
