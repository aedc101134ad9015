//! Turns one connection's byte stream, delivered in chunks of any size (one per receive
//! completion on the reactor's ring), back into PDUs. Pure: no sockets.
//!
//! - A PDU that lies whole inside a chunk is handed to the [`Sink`] in place (no copy).
//! - A PDU that straddles chunks is assembled in a small carry buffer first. Only PDUs of
//!   at most [`RX_CARRY_BYTES`] (a capsule with the largest in-capsule data) may straddle;
//!   a longer capsule ends the connection with "data transfer limit exceeded".
//! - H2C data payloads are streamed: once the header area has arrived and is valid, the
//!   payload goes piece by piece to its destination (the command's data buffer) with its
//!   data digest computed on the way, so a 128 KiB H2CData PDU needs no 128 KiB buffer.
//! - When the sink cannot take a PDU yet ([`Flow::Stalled`]: in-capsule data and no data
//!   buffer), the PDU and everything after it wait in a backlog, in order, until
//!   [`Rx::resume`]. The backlog is bounded ([`Rx::set_backlog_max`]): a host that keeps
//!   sending beyond what its queue depth allows while stalled ends its connection.
//!
//! The carry is allocated when first needed (most connections never need it: the
//! handshake and small capsules arrive whole), the backlog only while stalled.

use crate::error::DatapathError;
use crate::limits::{MAX_TERM_DATA_BYTES, RX_CARRY_BYTES};
use crate::pdu::{self, Check, DataHdr, PduError, PduType, RxContext, CH_LEN, DIGEST_LEN};
use crate::queue::Flow;

/// Who takes the PDUs.
pub trait Sink {
    /// The context the next PDU is checked against (it changes after ICReq).
    fn ctx(&self) -> RxContext;
    /// A whole PDU other than H2C data with a payload.
    fn pdu(&mut self, bytes: &[u8]) -> Result<Flow, DatapathError>;
    /// An H2C data PDU's validated header: the payload follows.
    fn h2c_begin(&mut self, hdr: &DataHdr, last: bool) -> Result<(), DatapathError>;
    /// Payload bytes at `offset` of the transfer.
    fn h2c_bytes(&mut self, hdr: &DataHdr, offset: u32, bytes: &[u8]);
    /// The payload (and its digest) is complete.
    fn h2c_end(&mut self, hdr: &DataHdr, last: bool, digest_ok: bool) -> Result<(), DatapathError>;
}

/// Why the stream ended, and the offending header bytes to echo in a terminate request.
/// Boxed: a failure ends the connection, so its one allocation is not per I/O, and the
/// `Result`s of the receive path stay small.
#[derive(Debug)]
pub struct Fail(Box<FailInner>);

#[derive(Debug)]
struct FailInner {
    err: DatapathError,
    hdr: [u8; MAX_TERM_DATA_BYTES],
    hdr_len: usize,
}

impl Fail {
    /// A failure, echoing up to [`MAX_TERM_DATA_BYTES`] of `offending`.
    pub fn new(err: DatapathError, offending: &[u8]) -> Fail {
        let mut hdr = [0u8; MAX_TERM_DATA_BYTES];
        let n = offending.len().min(MAX_TERM_DATA_BYTES);
        hdr[..n].copy_from_slice(&offending[..n]);
        Fail(Box::new(FailInner {
            err,
            hdr,
            hdr_len: n,
        }))
    }

    /// The error.
    pub fn err(&self) -> &DatapathError {
        &self.0.err
    }

    /// The offending PDU's first bytes.
    pub fn offending(&self) -> &[u8] {
        &self.0.hdr[..self.0.hdr_len]
    }
}

/// A PDU too long to assemble: only H2C data may exceed the carry, and it streams.
fn too_long(plen: usize, offending: &[u8]) -> Fail {
    let e = PduError::DataLength {
        len: plen.min(u32::MAX as usize) as u32,
        max: RX_CARRY_BYTES as u32,
    };
    Fail::new(e.into(), offending)
}

/// An H2C payload being streamed.
#[derive(Debug)]
struct Stream {
    hdr: DataHdr,
    last: bool,
    ddgst: bool,
    got: u32,
    crc: u32,
    digest: [u8; DIGEST_LEN],
    digest_got: usize,
    /// The header area, for a terminate request.
    head: [u8; MAX_TERM_DATA_BYTES],
    head_len: usize,
}

/// One connection's receive state.
#[derive(Debug, Default)]
pub struct Rx {
    carry: Vec<u8>,
    stream: Option<Stream>,
    /// The carry holds a whole PDU the sink refused (stalled).
    carry_pending: bool,
    stalled: bool,
    backlog: Vec<u8>,
    backlog_pos: usize,
    backlog_max: usize,
}

/// Where consuming a chunk stopped.
enum Stop {
    /// Everything was taken.
    All,
    /// The sink stalled; bytes from this offset on are not taken.
    At(usize),
}

impl Rx {
    /// A fresh stream. Nothing stalls before Connect; the queue sets the real backlog
    /// bound after it, this one only covers capsules a host pipelines behind its Connect.
    pub fn new() -> Rx {
        Rx {
            backlog_max: 2 * RX_CARRY_BYTES,
            ..Rx::default()
        }
    }

    /// Bounds what may wait while stalled (from the queue, after Connect).
    pub fn set_backlog_max(&mut self, bytes: usize) {
        self.backlog_max = bytes;
    }

    /// Whether the sink refused a PDU and bytes wait for [`Rx::resume`].
    pub fn stalled(&self) -> bool {
        self.stalled
    }

    /// Takes a chunk of the stream.
    pub fn feed(&mut self, chunk: &[u8], sink: &mut impl Sink) -> Result<(), Fail> {
        if self.stalled {
            return self.hold(chunk);
        }
        match self.consume(chunk, sink)? {
            Stop::All => Ok(()),
            Stop::At(at) => self.hold(&chunk[at..]),
        }
    }

    /// Offers the stalled PDU and the backlog again, in order.
    pub fn resume(&mut self, sink: &mut impl Sink) -> Result<(), Fail> {
        if !self.stalled {
            return Ok(());
        }
        if self.carry_pending {
            match sink.pdu(&self.carry) {
                Ok(Flow::Taken) => {
                    self.carry.clear();
                    self.carry_pending = false;
                }
                Ok(Flow::Stalled) => return Ok(()),
                Err(e) => return Err(Fail::new(e, &self.carry)),
            }
        }
        self.stalled = false;
        let backlog = std::mem::take(&mut self.backlog);
        let r = self.consume(&backlog[self.backlog_pos..], sink);
        self.backlog = backlog;
        match r? {
            Stop::All => {
                // Drained: give the memory back, stalls are rare.
                self.backlog = Vec::new();
                self.backlog_pos = 0;
            }
            Stop::At(at) => self.backlog_pos += at,
        }
        Ok(())
    }

    /// Keeps bytes that arrive while stalled.
    fn hold(&mut self, bytes: &[u8]) -> Result<(), Fail> {
        self.stalled = true;
        let waiting = self.backlog.len() - self.backlog_pos;
        if waiting + bytes.len() > self.backlog_max {
            let e = DatapathError::Closed("host sent more than its queue depth allows");
            return Err(Fail::new(e, &[]));
        }
        if self.backlog_pos > 0 && self.backlog_pos == self.backlog.len() {
            self.backlog.clear();
            self.backlog_pos = 0;
        }
        self.backlog.extend_from_slice(bytes);
        Ok(())
    }

    fn consume(&mut self, data: &[u8], sink: &mut impl Sink) -> Result<Stop, Fail> {
        let mut pos = 0;
        while pos < data.len() {
            if self.stream.is_some() {
                pos += self.stream_bytes(&data[pos..], sink)?;
                continue;
            }
            if !self.carry.is_empty() {
                pos += self.assemble(&data[pos..], sink)?;
                if self.stalled {
                    return Ok(Stop::At(pos));
                }
                continue;
            }
            let rest = &data[pos..];
            match self.whole(rest, sink)? {
                Some(n) => pos += n,
                None if self.stalled => return Ok(Stop::At(pos)),
                None => {
                    self.carry_bytes(rest)?;
                    return Ok(Stop::All);
                }
            }
        }
        Ok(Stop::All)
    }

    /// Handles the PDU at the start of `rest` if enough of it is there: returns the bytes
    /// taken, or None if it straddles the chunk (or the sink stalled on it).
    fn whole(&mut self, rest: &[u8], sink: &mut impl Sink) -> Result<Option<usize>, Fail> {
        if rest.len() < CH_LEN {
            return Ok(None);
        }
        let ctx = sink.ctx();
        let plen = match pdu::check(rest, &ctx) {
            Ok(Check::Complete(n)) => n,
            Ok(Check::NeedHeader) => return Ok(None),
            Err(e) => return Err(Fail::new(e.into(), rest)),
        };
        if let Some(area) = pdu::data_offset(&rest[..CH_LEN]) {
            if rest.len() < area {
                return Ok(None);
            }
            self.begin_stream(&rest[..area], sink)?;
            return Ok(Some(area));
        }
        if rest.len() < plen {
            if plen > RX_CARRY_BYTES {
                return Err(too_long(plen, rest));
            }
            return Ok(None);
        }
        match sink.pdu(&rest[..plen]) {
            Ok(Flow::Taken) => Ok(Some(plen)),
            Ok(Flow::Stalled) => {
                self.stalled = true;
                Ok(None)
            }
            Err(e) => Err(Fail::new(e, &rest[..plen])),
        }
    }

    /// Starts assembling a straddling PDU with the start of it (`whole` checked that the
    /// PDU fits the carry).
    fn carry_bytes(&mut self, bytes: &[u8]) -> Result<(), Fail> {
        if self.carry.capacity() == 0 {
            self.carry.reserve_exact(RX_CARRY_BYTES);
        }
        self.carry.extend_from_slice(bytes);
        Ok(())
    }

    /// Adds bytes to the PDU being assembled; returns the bytes taken. The carry never
    /// holds more than the PDU (or its header area): it is only started with a PDU's
    /// start that did not reach the end of its chunk.
    fn assemble(&mut self, data: &[u8], sink: &mut impl Sink) -> Result<usize, Fail> {
        let mut taken = 0;
        if self.carry.len() < CH_LEN {
            taken = (CH_LEN - self.carry.len()).min(data.len());
            self.carry.extend_from_slice(&data[..taken]);
            if self.carry.len() < CH_LEN {
                return Ok(taken);
            }
        }
        let ctx = sink.ctx();
        let plen = match pdu::check(&self.carry, &ctx) {
            Ok(Check::Complete(n)) => n,
            Ok(Check::NeedHeader) => return Ok(taken),
            Err(e) => return Err(Fail::new(e.into(), &self.carry)),
        };
        let area = pdu::data_offset(&self.carry[..CH_LEN]);
        let want = area.unwrap_or(plen);
        if want > RX_CARRY_BYTES {
            return Err(too_long(plen, &self.carry));
        }
        let n = want
            .saturating_sub(self.carry.len())
            .min(data.len() - taken);
        self.carry.extend_from_slice(&data[taken..taken + n]);
        taken += n;
        if self.carry.len() < want {
            return Ok(taken);
        }
        let carry = std::mem::take(&mut self.carry);
        let r = if area.is_some() {
            self.begin_stream(&carry, sink).map(|()| true)
        } else {
            match sink.pdu(&carry) {
                Ok(Flow::Taken) => Ok(true),
                Ok(Flow::Stalled) => Ok(false),
                Err(e) => Err(Fail::new(e, &carry)),
            }
        };
        self.carry = carry;
        if r? {
            self.carry.clear();
        } else {
            self.carry_pending = true;
            self.stalled = true;
        }
        Ok(taken)
    }

    /// Validates a data PDU's header area and starts streaming its payload.
    fn begin_stream(&mut self, area: &[u8], sink: &mut impl Sink) -> Result<(), Fail> {
        let ctx = sink.ctx();
        let head = pdu::parse_data_head(area, &ctx).map_err(|e| Fail::new(e.into(), area))?;
        if area[0] != PduType::H2cData as u8 {
            let e = PduError::Unexpected(area[0]);
            return Err(Fail::new(e.into(), area));
        }
        sink.h2c_begin(&head.hdr, head.last)
            .map_err(|e| Fail::new(e, area))?;
        let mut s = Stream {
            hdr: head.hdr,
            last: head.last,
            ddgst: head.ddgst,
            got: 0,
            crc: 0,
            digest: [0; DIGEST_LEN],
            digest_got: 0,
            head: [0; MAX_TERM_DATA_BYTES],
            head_len: area.len().min(MAX_TERM_DATA_BYTES),
        };
        s.head[..s.head_len].copy_from_slice(&area[..s.head_len]);
        self.stream = Some(s);
        Ok(())
    }

    /// Moves payload (then digest) bytes of the current stream; returns the bytes taken.
    fn stream_bytes(&mut self, data: &[u8], sink: &mut impl Sink) -> Result<usize, Fail> {
        let Some(s) = self.stream.as_mut() else {
            return Ok(0);
        };
        let mut taken = 0;
        if s.got < s.hdr.length {
            let n = ((s.hdr.length - s.got) as usize).min(data.len());
            let piece = &data[..n];
            sink.h2c_bytes(&s.hdr, s.hdr.offset + s.got, piece);
            if s.ddgst {
                s.crc = crc32c::crc32c_append(s.crc, piece);
            }
            s.got += n as u32;
            taken = n;
        }
        if s.got == s.hdr.length && s.ddgst && s.digest_got < DIGEST_LEN {
            let n = (DIGEST_LEN - s.digest_got).min(data.len() - taken);
            s.digest[s.digest_got..s.digest_got + n].copy_from_slice(&data[taken..taken + n]);
            s.digest_got += n;
            taken += n;
        }
        let done = s.got == s.hdr.length && (!s.ddgst || s.digest_got == DIGEST_LEN);
        if done {
            let ok = !s.ddgst || u32::from_le_bytes(s.digest) == s.crc;
            let (hdr, last) = (s.hdr, s.last);
            let (head, head_len) = (s.head, s.head_len);
            self.stream = None;
            sink.h2c_end(&hdr, last, ok)
                .map_err(|e| Fail::new(e, &head[..head_len]))?;
        }
        Ok(taken)
    }
}

#[cfg(test)]
mod tests;
