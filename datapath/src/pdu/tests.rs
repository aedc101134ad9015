//! PDU codec tests: round trips (proptest), digests, and every malformed-PDU class.

use proptest::prelude::*;

use super::*;

fn ctrl_rx(hdgst: bool, ddgst: bool) -> RxContext {
    RxContext {
        from_controller: false,
        hdgst,
        ddgst,
        data_align: 4,
        max_data: 64 * 1024,
    }
}

fn host_rx(hdgst: bool, ddgst: bool) -> RxContext {
    RxContext {
        from_controller: true,
        ..ctrl_rx(hdgst, ddgst)
    }
}

fn tx(hdgst: bool, ddgst: bool) -> TxContext {
    TxContext {
        hdgst,
        ddgst,
        data_align: 4,
    }
}

/// check + parse, asserting that check agreed on the length.
fn decode<'a>(buf: &'a [u8], rx: &RxContext) -> Result<Pdu<'a>, PduError> {
    match check(buf, rx)? {
        Check::Complete(n) => assert_eq!(n, buf.len(), "check length"),
        Check::NeedHeader => panic!("complete PDU reported as short"),
    }
    parse(buf, rx)
}

fn sample_cmd(data: &[u8], t: &TxContext) -> Vec<u8> {
    let mut sqe = [0u8; SQE_LEN];
    sqe[0] = 0x01;
    sqe[2] = 0x34;
    encode(t, PduType::CapsuleCmd, 0, &HdrFields::Cmd(&sqe), data)
}

fn sample_h2c(len: usize, t: &TxContext) -> Vec<u8> {
    let d = DataHdr {
        cccid: 1,
        ttag: 2,
        offset: 0,
        length: len as u32,
    };
    encode(
        t,
        PduType::H2cData,
        FLAG_LAST_PDU,
        &HdrFields::Data(d),
        &vec![0x5a; len],
    )
}

#[test]
fn crc32c_matches_the_castagnoli_check_value() {
    assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    assert_eq!(data_digest(b"123456789"), [0x83, 0x92, 0x06, 0xe3]);
}

#[test]
fn icreq_round_trips_and_never_carries_digests() {
    let req = IcReq {
        pfv: 0,
        hpda: 0,
        digest: IC_HDGST_ENABLE | IC_DDGST_ENABLE,
        maxr2t: 0,
    };
    let b = encode(
        &tx(true, true),
        PduType::IcReq,
        0,
        &HdrFields::IcReq(req),
        &[],
    );
    assert_eq!(b.len(), 128);
    assert_eq!(&b[..8], &[0, 0, 128, 0, 128, 0, 0, 0]);
    assert_eq!(
        decode(&b, &RxContext::controller_initial()),
        Ok(Pdu::IcReq(req))
    );
}

#[test]
fn header_digest_follows_the_header_and_covers_it() {
    let b = sample_cmd(&[], &tx(true, false));
    assert_eq!(b.len(), 72 + 4);
    assert_eq!(b[1], FLAG_HDGST);
    assert_eq!(&b[72..76], &crc32c(&b[..72]).to_le_bytes());
}

#[test]
fn in_capsule_data_sits_at_pdo_with_its_digest_last() {
    let data = [7u8; 100];
    let b = sample_cmd(&data, &tx(true, true));
    assert_eq!(b[3], 76, "pdo = hlen + hdgst");
    assert_eq!(b.len(), 76 + 100 + 4);
    assert_eq!(&b[176..], &data_digest(&data));
    match decode(&b, &ctrl_rx(true, true)) {
        Ok(Pdu::CapsuleCmd { data: d, sqe }) => {
            assert_eq!(d, &data[..]);
            assert_eq!(sqe[2], 0x34);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn c2h_data_honours_the_hosts_alignment() {
    let t = TxContext {
        hdgst: false,
        ddgst: false,
        data_align: 32,
    };
    let d = DataHdr {
        cccid: 9,
        ttag: 0,
        offset: 0,
        length: 8,
    };
    let b = encode(
        &t,
        PduType::C2hData,
        FLAG_LAST_PDU,
        &HdrFields::Data(d),
        &[1; 8],
    );
    assert_eq!(b[3], 32);
    assert!(b[24..32].iter().all(|&x| x == 0));
    let rx = RxContext {
        data_align: 32,
        ..host_rx(false, false)
    };
    assert!(matches!(
        decode(&b, &rx),
        Ok(Pdu::C2hData { last: true, .. })
    ));
}

#[test]
fn short_buffers_ask_for_more() {
    assert_eq!(
        check(&[4, 0, 72], &ctrl_rx(false, false)),
        Ok(Check::NeedHeader)
    );
    let b = sample_cmd(&[], &tx(false, false));
    assert_eq!(
        check(&b[..8], &ctrl_rx(false, false)),
        Ok(Check::Complete(72))
    );
}

/// A table of malformed PDUs: (what, bytes, receiver, expected error).
fn malformed() -> Vec<(&'static str, Vec<u8>, RxContext, PduError)> {
    let plain = ctrl_rx(false, false);
    let digests = ctrl_rx(true, true);
    let mut v = Vec::new();

    let mut b = sample_cmd(&[], &tx(false, false));
    b[0] = 0x08;
    v.push(("undefined type", b, plain, PduError::BadType(0x08)));

    let resp = encode(
        &tx(false, false),
        PduType::CapsuleResp,
        0,
        &HdrFields::Resp(&[0; 16]),
        &[],
    );
    v.push((
        "controller PDU sent to a controller",
        resp,
        plain,
        PduError::Unexpected(0x05),
    ));

    let mut b = sample_cmd(&[], &tx(false, false));
    b[2] = 73;
    v.push((
        "hlen",
        b,
        plain,
        PduError::BadHlen {
            pdu_type: 4,
            hlen: 73,
        },
    ));

    let mut b = sample_cmd(&[1; 16], &tx(false, false));
    b[3] = 40;
    v.push((
        "pdo inside the header",
        b,
        plain,
        PduError::BadPdo { pdo: 40 },
    ));

    let mut b = sample_cmd(&[1; 16], &tx(false, false));
    b[3] = 74;
    v.push(("pdo misaligned", b, plain, PduError::BadPdo { pdo: 74 }));

    let mut b = sample_cmd(&[1; 16], &tx(false, false));
    b[3] = 200;
    v.push(("pdo beyond plen", b, plain, PduError::BadPdo { pdo: 200 }));

    let mut b = sample_cmd(&[], &tx(false, false));
    b[4] = 60;
    v.push((
        "plen below hlen",
        b,
        plain,
        PduError::PlenTooSmall { plen: 60 },
    ));

    let mut b = sample_cmd(&[], &tx(false, false));
    b[4..8].copy_from_slice(&(1u32 << 30).to_le_bytes());
    let max = plain.max_plen();
    v.push((
        "plen huge",
        b,
        plain,
        PduError::PlenTooLarge { plen: 1 << 30, max },
    ));

    let b = sample_cmd(&[], &tx(false, false));
    v.push((
        "header digest missing",
        b,
        digests,
        PduError::BadFlags { flags: 0 },
    ));

    let b = sample_cmd(&[1; 8], &tx(true, true));
    v.push((
        "digests not negotiated",
        b,
        plain,
        PduError::BadFlags {
            flags: FLAG_HDGST | FLAG_DDGST,
        },
    ));

    let mut b = sample_cmd(&[], &tx(false, false));
    b[1] = FLAG_LAST_PDU;
    v.push((
        "LAST_PDU on a capsule",
        b,
        plain,
        PduError::BadFlags {
            flags: FLAG_LAST_PDU,
        },
    ));

    let mut b = sample_cmd(&[], &tx(true, false));
    b[10] ^= 0xff;
    v.push((
        "header digest",
        b,
        ctrl_rx(true, false),
        PduError::HeaderDigest,
    ));

    let mut b = sample_cmd(&[1; 8], &tx(true, true));
    b[80] ^= 1;
    v.push(("data digest", b, digests, PduError::DataDigest));

    let b = sample_h2c(64 * 1024 + 4, &tx(false, false));
    v.push((
        "data beyond the limit",
        b,
        plain,
        PduError::DataLength {
            len: 64 * 1024 + 4,
            max: 64 * 1024,
        },
    ));

    let mut b = sample_h2c(16, &tx(false, false));
    b[16] = 17;
    v.push((
        "DATAL disagrees with plen",
        b,
        plain,
        PduError::DataLength { len: 17, max: 16 },
    ));

    let mut b = sample_h2c(16, &tx(false, false));
    b[4] = 24;
    b.truncate(24);
    v.push((
        "H2CData without data",
        b,
        plain,
        PduError::DataLength { len: 16, max: 0 },
    ));

    let term = encode(
        &tx(false, false),
        PduType::H2cTermReq,
        0,
        &HdrFields::Term { fes: 1, fei: 0 },
        &[0; 200],
    );
    v.push((
        "terminate request too long",
        term,
        plain,
        PduError::PlenTooLarge {
            plen: 224,
            max: 152,
        },
    ));

    let mut ic = encode(
        &tx(false, false),
        PduType::IcReq,
        0,
        &HdrFields::IcReq(IcReq {
            pfv: 0,
            hpda: 0,
            digest: 0,
            maxr2t: 0,
        }),
        &[],
    );
    ic[4] = 129;
    v.push((
        "ICReq plen",
        ic,
        RxContext::controller_initial(),
        PduError::PlenTooLarge {
            plen: 129,
            max: 128,
        },
    ));
    v
}

#[test]
fn every_malformed_class_is_rejected_with_its_error() {
    for (what, bytes, rx, want) in malformed() {
        let got = match check(&bytes, &rx) {
            Err(e) => Err(e),
            Ok(_) => parse(&bytes, &rx).map(|_| ()),
        };
        assert_eq!(got, Err(want.clone()), "{what}");
        assert!(want.fes() >= FES_INVALID_HEADER_FIELD && want.fes() <= FES_UNSUPPORTED_PARAMETER);
    }
}

#[test]
fn terminate_request_echoes_the_offending_header() {
    let bad = sample_cmd(&[], &tx(false, false));
    let t = encode_term(&PduError::HeaderDigest, &bad);
    match decode(&t, &host_rx(false, false)) {
        Ok(Pdu::C2hTermReq { fes, fei, data }) => {
            assert_eq!(fes, FES_HEADER_DIGEST);
            assert_eq!(fei, 0);
            assert_eq!(data, &bad[..]);
        }
        other => panic!("unexpected {other:?}"),
    }
}

fn arb_data() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..2048)
}

proptest! {
    #[test]
    fn capsule_cmd_round_trips(sqe in prop::array::uniform32(any::<u8>()), tail in prop::array::uniform32(any::<u8>()),
                               data in arb_data(), hd in any::<bool>(), dd in any::<bool>()) {
        let mut full = [0u8; SQE_LEN];
        full[..32].copy_from_slice(&sqe);
        full[32..].copy_from_slice(&tail);
        let b = encode(&tx(hd, dd), PduType::CapsuleCmd, 0, &HdrFields::Cmd(&full), &data);
        let got = decode(&b, &ctrl_rx(hd, dd));
        prop_assert_eq!(got, Ok(Pdu::CapsuleCmd { sqe: &full, data: &data }));
    }

    #[test]
    fn capsule_resp_round_trips(cqe in prop::array::uniform16(any::<u8>()), hd in any::<bool>()) {
        let b = encode(&tx(hd, false), PduType::CapsuleResp, 0, &HdrFields::Resp(&cqe), &[]);
        prop_assert_eq!(decode(&b, &host_rx(hd, false)), Ok(Pdu::CapsuleResp { cqe: &cqe }));
    }

    #[test]
    fn data_pdus_round_trip(cccid in any::<u16>(), ttag in any::<u16>(), offset in any::<u32>(),
                            data in prop::collection::vec(any::<u8>(), 1..4096),
                            last in any::<bool>(), success in any::<bool>(), hd in any::<bool>(), dd in any::<bool>()) {
        let hdr = DataHdr { cccid, ttag, offset, length: data.len() as u32 };
        let lf = if last { FLAG_LAST_PDU } else { 0 };
        let b = encode(&tx(hd, dd), PduType::H2cData, lf, &HdrFields::Data(hdr), &data);
        prop_assert_eq!(decode(&b, &ctrl_rx(hd, dd)), Ok(Pdu::H2cData { hdr, last, data: &data }));
        let success = success && last;
        let sf = if success { FLAG_SUCCESS } else { 0 };
        let b = encode(&tx(hd, dd), PduType::C2hData, lf | sf, &HdrFields::Data(hdr), &data);
        prop_assert_eq!(decode(&b, &host_rx(hd, dd)), Ok(Pdu::C2hData { hdr, last, success, data: &data }));
    }

    #[test]
    fn r2t_and_ic_round_trip(cccid in any::<u16>(), ttag in any::<u16>(), offset in any::<u32>(), length in any::<u32>(),
                             hpda in 0u8..32, digest in 0u8..4, maxr2t in any::<u32>(), hd in any::<bool>()) {
        let r = R2t { cccid, ttag, offset, length };
        let b = encode(&tx(hd, false), PduType::R2t, 0, &HdrFields::R2t(r), &[]);
        prop_assert_eq!(decode(&b, &host_rx(hd, false)), Ok(Pdu::R2t(r)));
        let req = IcReq { pfv: 0, hpda, digest, maxr2t };
        let b = encode(&TxContext::plain(), PduType::IcReq, 0, &HdrFields::IcReq(req), &[]);
        prop_assert_eq!(decode(&b, &RxContext::controller_initial()), Ok(Pdu::IcReq(req)));
        let resp = IcResp { pfv: 0, cpda: hpda, digest, maxh2cdata: maxr2t };
        let b = encode(&TxContext::plain(), PduType::IcResp, 0, &HdrFields::IcResp(resp), &[]);
        let rx = RxContext { from_controller: true, ..RxContext::controller_initial() };
        prop_assert_eq!(decode(&b, &rx), Ok(Pdu::IcResp(resp)));
    }

    #[test]
    fn term_reqs_round_trip(fes in any::<u16>(), fei in any::<u32>(), data in prop::collection::vec(any::<u8>(), 0..128)) {
        let f = HdrFields::Term { fes, fei };
        let b = encode(&tx(true, true), PduType::H2cTermReq, 0, &f, &data);
        prop_assert_eq!(decode(&b, &ctrl_rx(true, true)), Ok(Pdu::H2cTermReq { fes, fei, data: &data }));
        let b = encode(&tx(true, true), PduType::C2hTermReq, 0, &f, &data);
        prop_assert_eq!(decode(&b, &host_rx(true, true)), Ok(Pdu::C2hTermReq { fes, fei, data: &data }));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512),
                                   hd in any::<bool>(), dd in any::<bool>(), from_ctrl in any::<bool>()) {
        let rx = RxContext { from_controller: from_ctrl, ..ctrl_rx(hd, dd) };
        let _ = check(&bytes, &rx);
        let _ = parse(&bytes, &rx);
    }

    #[test]
    fn corrupting_one_byte_never_panics(flip in 0usize..200, bit in 0u8..8, hd in any::<bool>(), dd in any::<bool>()) {
        let mut b = sample_cmd(&[9u8; 100], &tx(hd, dd));
        let at = flip % b.len();
        b[at] ^= 1 << bit;
        let rx = ctrl_rx(hd, dd);
        if let Ok(Check::Complete(n)) = check(&b, &rx) {
            if n <= b.len() {
                let _ = parse(&b[..n], &rx);
            }
        }
    }
}
