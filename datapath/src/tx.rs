//! PDUs a queue has produced and not yet handed to the kernel, double-buffered: one batch
//! is staged while the other is in flight as one `sendmsg` on the reactor's ring.
//!
//! A batch holds PDU headers (and digests) in a small area and refers to data by command
//! slot, so C2H data goes to the socket straight from the command's buffer. Slots whose
//! data a batch refers to are *held* until that batch has been sent: the buffer must not
//! be reused while the kernel may still read it. The header area is sized from the queue
//! depth, so a batch never fills up while the host respects its depth: it holds at most
//! one PDU group (R2T, or data + response) per command, plus AER completions and one
//! terminate request.

use std::time::Instant;

/// One piece of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seg {
    /// Bytes `start..end` of the batch's header area.
    Hdr {
        /// First byte.
        start: u32,
        /// One past the last byte.
        end: u32,
    },
    /// The first `len` bytes of slot `i`'s data buffer.
    Slot {
        /// The slot.
        i: u16,
        /// Bytes.
        len: u32,
    },
}

impl Seg {
    /// Bytes this piece sends.
    pub fn len(&self) -> usize {
        match *self {
            Seg::Hdr { start, end } => (end - start) as usize,
            Seg::Slot { len, .. } => len as usize,
        }
    }
}

/// One batch.
#[derive(Debug)]
pub struct Batch {
    hdrs: Vec<u8>,
    segs: Vec<Seg>,
    held: Vec<u16>,
    bytes: usize,
}

impl Batch {
    fn new(hdr_bytes: usize, segs: usize, held: usize) -> Batch {
        Batch {
            // Capacity only: pages are touched as headers are written.
            hdrs: Vec::with_capacity(hdr_bytes),
            segs: Vec::with_capacity(segs),
            held: Vec::with_capacity(held),
            bytes: 0,
        }
    }

    fn clear(&mut self) {
        self.hdrs.clear();
        self.segs.clear();
        self.held.clear();
        self.bytes = 0;
    }

    /// The pieces, in order.
    pub fn segs(&self) -> &[Seg] {
        &self.segs
    }

    /// The header area.
    pub fn hdrs(&self) -> &[u8] {
        &self.hdrs
    }

    /// Total bytes the batch sends.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Slots held until the batch is sent.
    pub fn held(&self) -> &[u16] {
        &self.held
    }
}

/// A queue's send side: the staging batch and the batch in flight.
#[derive(Debug)]
pub struct Tx {
    stage: Batch,
    flight: Batch,
    in_flight: bool,
    /// Bytes of the flight batch the kernel has taken (a short send resumes after them).
    sent: usize,
    /// When the flight batch was handed to the kernel (the send timeout runs from here).
    since: Option<Instant>,
}

impl Tx {
    /// Batches of `hdr_bytes` of headers, `segs` pieces and `held` slots each.
    pub fn new(hdr_bytes: usize, segs: usize, held: usize) -> Tx {
        Tx {
            stage: Batch::new(hdr_bytes, segs, held),
            flight: Batch::new(hdr_bytes, segs, held),
            in_flight: false,
            sent: 0,
            since: None,
        }
    }

    /// Whether `bytes` of headers in up to `segs` more pieces fit the staging batch.
    pub fn has_room(&self, bytes: usize, segs: usize) -> bool {
        self.stage.hdrs.len() + bytes <= self.stage.hdrs.capacity()
            && self.stage.segs.len() + segs <= self.stage.segs.capacity()
    }

    /// Appends header bytes, merging with the previous piece when contiguous. The caller
    /// checked [`Tx::has_room`].
    pub fn push_hdr(&mut self, bytes: &[u8]) {
        let b = &mut self.stage;
        let start = b.hdrs.len() as u32;
        b.hdrs.extend_from_slice(bytes);
        let end = b.hdrs.len() as u32;
        b.bytes += bytes.len();
        match b.segs.last_mut() {
            Some(Seg::Hdr { end: e, .. }) if *e == start => *e = end,
            _ => b.segs.push(Seg::Hdr { start, end }),
        }
    }

    /// Appends the first `len` bytes of slot `i`'s buffer and holds the slot.
    pub fn push_slot(&mut self, i: u16, len: u32) {
        let b = &mut self.stage;
        b.segs.push(Seg::Slot { i, len });
        b.bytes += len as usize;
        b.held.push(i);
    }

    /// Whether anything is staged.
    pub fn staged(&self) -> bool {
        !self.stage.segs.is_empty()
    }

    /// When the batch in flight was handed over.
    pub fn in_flight_since(&self) -> Option<Instant> {
        self.since.filter(|_| self.in_flight)
    }

    /// Makes the staging batch the flight batch, if nothing is in flight and something is
    /// staged. The caller then sends [`Tx::flight`] from byte [`Tx::sent`].
    pub fn start(&mut self, now: Instant) -> bool {
        if self.in_flight || !self.staged() {
            return false;
        }
        std::mem::swap(&mut self.stage, &mut self.flight);
        self.in_flight = true;
        self.sent = 0;
        self.since = Some(now);
        true
    }

    /// The batch in flight.
    pub fn flight(&self) -> &Batch {
        &self.flight
    }

    /// Bytes of the flight batch already sent.
    pub fn sent(&self) -> usize {
        self.sent
    }

    /// The kernel took `n` more bytes of the flight batch. Returns true once all of it was
    /// sent: the caller then releases [`Batch::held`] and calls [`Tx::finish`].
    pub fn advance(&mut self, n: usize) -> bool {
        self.sent += n;
        self.sent >= self.flight.bytes
    }

    /// Ends the flight (after its held slots were released).
    pub fn finish(&mut self) {
        self.flight.clear();
        self.in_flight = false;
        self.sent = 0;
        self.since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_merge_and_slots_are_held_until_the_flight_ends() {
        let mut tx = Tx::new(64, 8, 4);
        tx.push_hdr(&[1, 2, 3]);
        tx.push_hdr(&[4]);
        tx.push_slot(7, 100);
        tx.push_hdr(&[5, 6]);
        assert_eq!(
            tx.stage.segs(),
            &[
                Seg::Hdr { start: 0, end: 4 },
                Seg::Slot { i: 7, len: 100 },
                Seg::Hdr { start: 4, end: 6 }
            ]
        );
        assert!(tx.start(Instant::now()));
        assert!(!tx.start(Instant::now()), "one flight at a time");
        tx.push_hdr(&[9]);
        assert!(tx.staged(), "staging goes on while a batch is in flight");
        assert_eq!(tx.flight().bytes(), 106);
        assert_eq!(tx.flight().held(), &[7]);
        assert!(!tx.advance(50), "a short send");
        assert!(tx.advance(56));
        tx.finish();
        assert!(tx.start(Instant::now()), "the next batch goes");
        assert_eq!(tx.flight().bytes(), 1);
    }

    #[test]
    fn room_is_bounded_by_capacity() {
        let tx = Tx::new(8, 2, 1);
        assert!(tx.has_room(8, 2));
        assert!(!tx.has_room(9, 1));
        assert!(!tx.has_room(1, 3));
    }
}
