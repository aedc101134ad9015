//! The reassembler against a recording sink: however the stream is cut into chunks, the
//! sink sees the same PDUs and the same H2C payloads, digests checked, in order.

use super::*;
use crate::limits::MAX_H2C_DATA_BYTES;
use crate::pdu::{HdrFields, TxContext, FLAG_LAST_PDU};
use proptest::prelude::*;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Pdu(Vec<u8>),
    H2c {
        ttag: u16,
        offset: u32,
        data: Vec<u8>,
        last: bool,
        ok: bool,
    },
}

struct Rec {
    ctx: RxContext,
    events: Vec<Ev>,
    /// Refuse (stall) this many offers of whole PDUs.
    stall: usize,
}

impl Rec {
    fn new(digests: bool) -> Rec {
        Rec {
            ctx: RxContext {
                from_controller: false,
                hdgst: digests,
                ddgst: digests,
                data_align: 4,
                max_data: MAX_H2C_DATA_BYTES,
            },
            events: Vec::new(),
            stall: 0,
        }
    }
}

impl Sink for Rec {
    fn ctx(&self) -> RxContext {
        self.ctx
    }

    fn pdu(&mut self, bytes: &[u8]) -> Result<Flow, DatapathError> {
        if self.stall > 0 {
            self.stall -= 1;
            return Ok(Flow::Stalled);
        }
        self.events.push(Ev::Pdu(bytes.to_vec()));
        Ok(Flow::Taken)
    }

    fn h2c_begin(&mut self, hdr: &DataHdr, last: bool) -> Result<(), DatapathError> {
        self.events.push(Ev::H2c {
            ttag: hdr.ttag,
            offset: hdr.offset,
            data: Vec::new(),
            last,
            ok: false,
        });
        Ok(())
    }

    fn h2c_bytes(&mut self, hdr: &DataHdr, offset: u32, bytes: &[u8]) {
        let Some(Ev::H2c { data, .. }) = self.events.last_mut() else {
            panic!("payload outside an H2C PDU");
        };
        assert_eq!(
            offset,
            hdr.offset + data.len() as u32,
            "pieces arrive in order"
        );
        data.extend_from_slice(bytes);
    }

    fn h2c_end(&mut self, _: &DataHdr, _: bool, digest_ok: bool) -> Result<(), DatapathError> {
        let Some(Ev::H2c { ok, .. }) = self.events.last_mut() else {
            panic!("end outside an H2C PDU");
        };
        *ok = digest_ok;
        Ok(())
    }
}

/// A PDU of the stream and what the sink should see for it.
fn build(kind: u8, len: usize, digests: bool, corrupt: bool, n: u16) -> (Vec<u8>, Ev) {
    let tx = TxContext {
        hdgst: digests,
        ddgst: digests,
        data_align: 4,
    };
    // One byte at least: an H2CData PDU carries some (a zero `len` still sends one).
    let data: Vec<u8> = (0..len.max(1)).map(|i| (i as u8) ^ (n as u8)).collect();
    match kind % 3 {
        0 => {
            let mut sqe = [0u8; 64];
            sqe[2..4].copy_from_slice(&n.to_le_bytes());
            let d = &data[..len.min(crate::limits::IN_CAPSULE_DATA_BYTES)];
            let b = pdu::encode(&tx, PduType::CapsuleCmd, 0, &HdrFields::Cmd(&sqe), d);
            (b.clone(), Ev::Pdu(b))
        }
        1 => {
            let sqe = [n as u8; 64];
            let b = pdu::encode(&tx, PduType::CapsuleCmd, 0, &HdrFields::Cmd(&sqe), &[]);
            (b.clone(), Ev::Pdu(b))
        }
        _ => {
            let len = len.max(1);
            let hdr = DataHdr {
                cccid: n,
                ttag: n,
                offset: 4096,
                length: len as u32,
            };
            let last = n.is_multiple_of(2);
            let flags = if last { FLAG_LAST_PDU } else { 0 };
            let mut b = pdu::encode(
                &tx,
                PduType::H2cData,
                flags,
                &HdrFields::Data(hdr),
                &data[..len],
            );
            let bad = corrupt && digests;
            if bad {
                let at = b.len() - 1;
                b[at] ^= 0xff; // the data digest's last byte
            }
            let ev = Ev::H2c {
                ttag: n,
                offset: 4096,
                data: data[..len].to_vec(),
                last,
                ok: !bad,
            };
            (b, ev)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn any_chunking_yields_the_same_pdus(
        pdus in prop::collection::vec((any::<u8>(), 0usize..20_000, any::<bool>()), 1..12),
        digests in any::<bool>(),
        cuts in prop::collection::vec(1usize..9000, 1..40),
    ) {
        let mut stream = Vec::new();
        let mut want = Vec::new();
        for (n, (kind, len, corrupt)) in pdus.into_iter().enumerate() {
            let (b, ev) = build(kind, len, digests, corrupt, n as u16);
            stream.extend_from_slice(&b);
            want.push(ev);
        }
        let mut rx = Rx::new();
        let mut sink = Rec::new(digests);
        let (mut at, mut k) = (0, 0);
        while at < stream.len() {
            let n = cuts[k % cuts.len()].min(stream.len() - at);
            rx.feed(&stream[at..at + n], &mut sink).map_err(|f| TestCaseError::fail(format!("{}", f.err())))?;
            at += n;
            k += 1;
        }
        prop_assert_eq!(sink.events, want);
    }
}

#[test]
fn a_stalled_pdu_and_what_follows_wait_in_order_until_resumed() {
    let (a, ea) = build(0, 4096, false, false, 1);
    let (b, eb) = build(2, 9000, false, false, 2);
    let (c, ec) = build(1, 0, false, false, 3);
    let stream = [a, b, c].concat();
    for cut in [7, 100, 5000, stream.len()] {
        let mut rx = Rx::new();
        rx.set_backlog_max(1 << 20);
        let mut sink = Rec::new(false);
        sink.stall = 2; // refused on first offer and on the first resume
        for chunk in stream.chunks(cut) {
            rx.feed(chunk, &mut sink).expect("feed");
        }
        assert!(rx.stalled());
        assert!(sink.events.is_empty(), "nothing overtakes the stalled PDU");
        rx.resume(&mut sink).expect("resume");
        assert!(rx.stalled(), "still refused");
        rx.resume(&mut sink).expect("resume");
        assert!(!rx.stalled());
        assert_eq!(
            sink.events,
            vec![ea.clone(), eb.clone(), ec.clone()],
            "cut {cut}"
        );
        assert_eq!(
            rx.backlog.capacity(),
            0,
            "the backlog's memory is given back"
        );
    }
}

#[test]
fn a_host_that_floods_a_stalled_queue_is_cut_off() {
    let (a, _) = build(0, 4096, false, false, 1);
    let mut rx = Rx::new();
    rx.set_backlog_max(3 * a.len());
    let mut sink = Rec::new(false);
    sink.stall = usize::MAX;
    for _ in 0..3 {
        rx.feed(&a, &mut sink).expect("within the bound");
    }
    let f = rx.feed(&a, &mut sink).expect_err("past the bound");
    assert!(matches!(f.err(), DatapathError::Closed(_)));
}

#[test]
fn a_capsule_longer_than_the_in_capsule_limit_is_refused_even_when_split() {
    let tx = TxContext::plain();
    let sqe = [0u8; 64];
    let big = vec![0u8; RX_CARRY_BYTES];
    let b = pdu::encode(&tx, PduType::CapsuleCmd, 0, &HdrFields::Cmd(&sqe), &big);
    let mut rx = Rx::new();
    let mut sink = Rec::new(false);
    rx.feed(&b[..CH_LEN - 2], &mut sink)
        .expect("not enough to tell");
    let f = rx
        .feed(&b[CH_LEN - 2..100], &mut sink)
        .expect_err("too long to assemble");
    assert!(
        matches!(f.err(), DatapathError::Pdu(PduError::DataLength { .. })),
        "{}",
        f.err()
    );
    assert_eq!(
        &f.offending()[..CH_LEN],
        &b[..CH_LEN],
        "the header is echoed"
    );
    assert!(rx.carry.capacity() <= RX_CARRY_BYTES);
}
