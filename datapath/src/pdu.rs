//! NVMe/TCP PDU codec: the wire format of the transport, with no I/O.
//!
//! Receiving is two steps, as in mini-redis: [`check`] looks only at the 8-byte
//! common header and says how many bytes the PDU needs (or why it is malformed),
//! then [`parse`] validates the whole PDU (digests, type-specific fields) and
//! borrows its payload. Sending is [`encode_header`] (header, header digest and
//! padding into a fixed scratch buffer) plus [`data_digest`], so data is never
//! copied into a frame. [`encode`] builds a complete PDU and is for tests and
//! cold paths.

use crate::limits::{MAX_HDR_BYTES, MAX_HLEN, MAX_TERM_DATA_BYTES};

/// Size of the common header every PDU starts with.
pub const CH_LEN: usize = 8;
/// Size of a header or data digest.
pub const DIGEST_LEN: usize = 4;
/// Size of an NVMe submission queue entry.
pub const SQE_LEN: usize = 64;
/// Size of an NVMe completion queue entry.
pub const CQE_LEN: usize = 16;

/// Header digest present (CH.FLAGS bit 0).
pub const FLAG_HDGST: u8 = 0x01;
/// Data digest present (CH.FLAGS bit 1).
pub const FLAG_DDGST: u8 = 0x02;
/// Last data PDU of a transfer (H2CData / C2HData).
pub const FLAG_LAST_PDU: u8 = 0x04;
/// C2HData: the command completed successfully, no CapsuleResp follows.
pub const FLAG_SUCCESS: u8 = 0x08;

/// ICReq/ICResp DIGEST field: header digest enabled.
pub const IC_HDGST_ENABLE: u8 = 0x01;
/// ICReq/ICResp DIGEST field: data digest enabled.
pub const IC_DDGST_ENABLE: u8 = 0x02;

/// Fatal error status: invalid PDU header field.
pub const FES_INVALID_HEADER_FIELD: u16 = 0x01;
/// Fatal error status: PDU sequence error.
pub const FES_PDU_SEQUENCE: u16 = 0x02;
/// Fatal error status: header digest error.
pub const FES_HEADER_DIGEST: u16 = 0x03;
/// Fatal error status: data transfer out of range.
pub const FES_DATA_OUT_OF_RANGE: u16 = 0x04;
/// Fatal error status: data transfer limit exceeded.
pub const FES_DATA_LIMIT_EXCEEDED: u16 = 0x05;
/// Fatal error status: unsupported parameter.
pub const FES_UNSUPPORTED_PARAMETER: u16 = 0x06;

/// PDU types (CH.PDU-TYPE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PduType {
    /// Initialize Connection Request (host to controller).
    IcReq = 0x00,
    /// Initialize Connection Response.
    IcResp = 0x01,
    /// Host to controller terminate connection request.
    H2cTermReq = 0x02,
    /// Controller to host terminate connection request.
    C2hTermReq = 0x03,
    /// Command capsule.
    CapsuleCmd = 0x04,
    /// Response capsule.
    CapsuleResp = 0x05,
    /// Host to controller data.
    H2cData = 0x06,
    /// Controller to host data.
    C2hData = 0x07,
    /// Ready to transfer.
    R2t = 0x09,
}

impl PduType {
    /// Decodes a PDU-TYPE byte.
    pub fn from_u8(v: u8) -> Option<PduType> {
        Some(match v {
            0x00 => PduType::IcReq,
            0x01 => PduType::IcResp,
            0x02 => PduType::H2cTermReq,
            0x03 => PduType::C2hTermReq,
            0x04 => PduType::CapsuleCmd,
            0x05 => PduType::CapsuleResp,
            0x06 => PduType::H2cData,
            0x07 => PduType::C2hData,
            0x09 => PduType::R2t,
            _ => return None,
        })
    }

    /// The fixed HLEN of this type.
    pub fn hlen(self) -> usize {
        match self {
            PduType::IcReq | PduType::IcResp => 128,
            PduType::CapsuleCmd => CH_LEN + SQE_LEN,
            PduType::CapsuleResp => CH_LEN + CQE_LEN,
            PduType::H2cTermReq
            | PduType::C2hTermReq
            | PduType::H2cData
            | PduType::C2hData
            | PduType::R2t => 24,
        }
    }

    /// Whether a PDU of this type may carry data after its header.
    fn carries_data(self) -> bool {
        matches!(
            self,
            PduType::CapsuleCmd | PduType::H2cData | PduType::C2hData
        )
    }

    /// Whether digests apply at all (IC and terminate PDUs never carry them).
    fn digestible(self) -> bool {
        !matches!(
            self,
            PduType::IcReq | PduType::IcResp | PduType::H2cTermReq | PduType::C2hTermReq
        )
    }

    /// Whether a host sends this type (as opposed to a controller).
    pub fn from_host(self) -> bool {
        matches!(
            self,
            PduType::IcReq | PduType::H2cTermReq | PduType::CapsuleCmd | PduType::H2cData
        )
    }
}

/// Why a PDU was rejected. Every variant maps to a terminate-request FES/FEI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    /// CH.PDU-TYPE is not a defined type.
    #[error("unknown PDU type {0:#04x}")]
    BadType(u8),
    /// A defined type that this side must never receive, or not in this state.
    #[error("PDU type {0:#04x} not expected here")]
    Unexpected(u8),
    /// CH.HLEN does not match the type.
    #[error("bad hlen {hlen} for PDU type {pdu_type:#04x}")]
    BadHlen {
        /// The PDU type.
        pdu_type: u8,
        /// The received HLEN.
        hlen: u8,
    },
    /// CH.PDO is inconsistent with HLEN, digests, alignment or PLEN.
    #[error("bad pdo {pdo}")]
    BadPdo {
        /// The received PDO.
        pdo: u8,
    },
    /// CH.PLEN is smaller than the header requires.
    #[error("plen {plen} too small")]
    PlenTooSmall {
        /// The received PLEN.
        plen: u32,
    },
    /// CH.PLEN exceeds what this side accepts.
    #[error("plen {plen} exceeds limit {max}")]
    PlenTooLarge {
        /// The received PLEN.
        plen: u32,
        /// The limit.
        max: u32,
    },
    /// CH.FLAGS disagree with the negotiated digests or the type.
    #[error("flags {flags:#04x} do not match the connection's digest settings")]
    BadFlags {
        /// The received flags.
        flags: u8,
    },
    /// The header digest does not match.
    #[error("header digest mismatch")]
    HeaderDigest,
    /// The data digest does not match.
    #[error("data digest mismatch")]
    DataDigest,
    /// A data length field disagrees with the PDU's size or limits.
    #[error("data length {len} invalid (limit {max})")]
    DataLength {
        /// The length carried or implied.
        len: u32,
        /// The largest acceptable length.
        max: u32,
    },
    /// An H2CData names a transfer tag / command that is not waiting for data.
    #[error("no transfer is waiting for tag {ttag} (cid {cccid})")]
    BadTransferTag {
        /// The tag.
        ttag: u16,
        /// The command ID.
        cccid: u16,
    },
    /// An ICReq/ICResp parameter the receiver cannot honour.
    #[error("unsupported parameter at byte {offset}")]
    Unsupported {
        /// Byte offset of the field within the PDU.
        offset: u32,
    },
}

impl PduError {
    /// Fatal Error Status for a terminate request reporting this error.
    pub fn fes(&self) -> u16 {
        match self {
            PduError::HeaderDigest => FES_HEADER_DIGEST,
            PduError::Unexpected(_) => FES_PDU_SEQUENCE,
            PduError::DataLength { .. } => FES_DATA_LIMIT_EXCEEDED,
            PduError::BadTransferTag { .. } => FES_INVALID_HEADER_FIELD,
            PduError::Unsupported { .. } => FES_UNSUPPORTED_PARAMETER,
            _ => FES_INVALID_HEADER_FIELD,
        }
    }

    /// Fatal Error Information: the byte offset of the offending field.
    pub fn fei(&self) -> u32 {
        match self {
            PduError::BadType(_) | PduError::Unexpected(_) => 0,
            PduError::BadFlags { .. } => 1,
            PduError::BadHlen { .. } => 2,
            PduError::BadPdo { .. } => 3,
            PduError::PlenTooSmall { .. } | PduError::PlenTooLarge { .. } => 4,
            PduError::Unsupported { offset } => *offset,
            PduError::DataLength { .. } => 16,
            PduError::BadTransferTag { .. } => 10,
            PduError::HeaderDigest | PduError::DataDigest => 0,
        }
    }
}

/// The 8-byte common header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommonHeader {
    /// PDU type.
    pub pdu_type: PduType,
    /// CH.FLAGS.
    pub flags: u8,
    /// Header length (without digest).
    pub hlen: u8,
    /// Offset of the data from the PDU start (0 if none).
    pub pdo: u8,
    /// Total PDU length.
    pub plen: u32,
}

/// What the receiving side negotiated and will accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxContext {
    /// Accept controller-sent PDU types (a host decoder) instead of host-sent ones.
    pub from_controller: bool,
    /// Header digests were negotiated.
    pub hdgst: bool,
    /// Data digests were negotiated.
    pub ddgst: bool,
    /// Required data alignment in bytes ((CPDA or HPDA + 1) * 4).
    pub data_align: usize,
    /// Largest data payload accepted in one PDU.
    pub max_data: u32,
}

impl RxContext {
    /// A controller's context before ICReq: no digests, nothing but an ICReq fits.
    pub fn controller_initial() -> RxContext {
        RxContext {
            from_controller: false,
            hdgst: false,
            ddgst: false,
            data_align: 4,
            max_data: 0,
        }
    }

    fn max_plen(&self) -> u32 {
        (MAX_HDR_BYTES + DIGEST_LEN) as u32 + self.max_data
    }
}

/// Result of [`check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Fewer than 8 bytes buffered.
    NeedHeader,
    /// The common header is acceptable; the PDU is `plen` bytes long.
    Complete(usize),
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// CRC32C (Castagnoli) as NVMe/TCP digests use it.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Data digest of a payload, in wire byte order.
pub fn data_digest(data: &[u8]) -> [u8; DIGEST_LEN] {
    crc32c(data).to_le_bytes()
}

/// Validates the common header at the front of `buf` without reading further.
pub fn check(buf: &[u8], rx: &RxContext) -> Result<Check, PduError> {
    if buf.len() < CH_LEN {
        return Ok(Check::NeedHeader);
    }
    let ch = check_header(&buf[..CH_LEN], rx)?;
    Ok(Check::Complete(ch.plen as usize))
}

fn check_header(b: &[u8], rx: &RxContext) -> Result<CommonHeader, PduError> {
    let pdu_type = PduType::from_u8(b[0]).ok_or(PduError::BadType(b[0]))?;
    if pdu_type.from_host() == rx.from_controller {
        return Err(PduError::Unexpected(b[0]));
    }
    let (flags, hlen, pdo, plen) = (b[1], b[2], b[3], le32(b, 4));
    if hlen as usize != pdu_type.hlen() {
        return Err(PduError::BadHlen {
            pdu_type: b[0],
            hlen,
        });
    }
    let hd = check_flags(pdu_type, flags, rx)?;
    let header_area = hlen as usize + hd;
    if (plen as usize) < header_area {
        return Err(PduError::PlenTooSmall { plen });
    }
    let max = match pdu_type {
        PduType::IcReq | PduType::IcResp => 128,
        PduType::H2cTermReq | PduType::C2hTermReq => (24 + MAX_TERM_DATA_BYTES) as u32,
        PduType::CapsuleResp | PduType::R2t => header_area as u32,
        _ => rx.max_plen(),
    };
    if plen > max {
        return Err(PduError::PlenTooLarge { plen, max });
    }
    if matches!(pdu_type, PduType::IcReq | PduType::IcResp) && plen != 128 {
        return Err(PduError::PlenTooSmall { plen });
    }
    check_pdo(pdu_type, flags, pdo, plen, header_area, rx)?;
    Ok(CommonHeader {
        pdu_type,
        flags,
        hlen,
        pdo,
        plen,
    })
}

/// Returns the header digest length implied by the flags, after checking them.
fn check_flags(t: PduType, flags: u8, rx: &RxContext) -> Result<usize, PduError> {
    let mut allowed = 0u8;
    if t.digestible() {
        allowed |= FLAG_HDGST | FLAG_DDGST;
    }
    if matches!(t, PduType::H2cData | PduType::C2hData) {
        allowed |= FLAG_LAST_PDU;
    }
    if t == PduType::C2hData {
        allowed |= FLAG_SUCCESS;
    }
    let bad = flags & !allowed != 0
        || (t.digestible() && ((flags & FLAG_HDGST != 0) != rx.hdgst))
        || (flags & FLAG_DDGST != 0 && !rx.ddgst)
        || (flags & FLAG_SUCCESS != 0 && flags & FLAG_LAST_PDU == 0);
    if bad {
        return Err(PduError::BadFlags { flags });
    }
    Ok(if flags & FLAG_HDGST != 0 {
        DIGEST_LEN
    } else {
        0
    })
}

fn check_pdo(
    t: PduType,
    flags: u8,
    pdo: u8,
    plen: u32,
    header_area: usize,
    rx: &RxContext,
) -> Result<(), PduError> {
    let plen = plen as usize;
    let dd = if flags & FLAG_DDGST != 0 {
        DIGEST_LEN
    } else {
        0
    };
    if !t.carries_data() {
        return if dd != 0 {
            Err(PduError::BadFlags { flags })
        } else {
            Ok(())
        };
    }
    if plen == header_area {
        // No data: PDO is meaningless, and a data digest cannot be present.
        return if dd != 0 {
            Err(PduError::BadFlags { flags })
        } else {
            Ok(())
        };
    }
    if rx.ddgst && dd == 0 {
        return Err(PduError::BadFlags { flags });
    }
    let pdo_us = pdo as usize;
    if pdo_us < header_area || !pdo_us.is_multiple_of(rx.data_align.max(1)) || pdo_us + dd > plen {
        return Err(PduError::BadPdo { pdo });
    }
    if pdo_us + dd == plen {
        // A data PDU that claims data but carries zero bytes of it.
        return Err(PduError::DataLength {
            len: 0,
            max: rx.max_data,
        });
    }
    let data_len = (plen - pdo_us - dd) as u32;
    if data_len > rx.max_data {
        return Err(PduError::DataLength {
            len: data_len,
            max: rx.max_data,
        });
    }
    Ok(())
}

/// ICReq fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcReq {
    /// PDU format version (0).
    pub pfv: u16,
    /// Host PDU data alignment (0-based, units of 4 bytes).
    pub hpda: u8,
    /// Requested digests (IC_HDGST_ENABLE | IC_DDGST_ENABLE).
    pub digest: u8,
    /// Max outstanding R2T per command (0-based).
    pub maxr2t: u32,
}

/// ICResp fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcResp {
    /// PDU format version (0).
    pub pfv: u16,
    /// Controller PDU data alignment (0-based, units of 4 bytes).
    pub cpda: u8,
    /// Enabled digests.
    pub digest: u8,
    /// MAXH2CDATA in bytes.
    pub maxh2cdata: u32,
}

/// Fields shared by H2CData and C2HData.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHdr {
    /// Command capsule CID the data belongs to.
    pub cccid: u16,
    /// Transfer tag (from the R2T; reserved in C2HData).
    pub ttag: u16,
    /// Offset of this data within the command's transfer.
    pub offset: u32,
    /// Number of data bytes in this PDU.
    pub length: u32,
}

/// R2T fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct R2t {
    /// Command capsule CID.
    pub cccid: u16,
    /// Transfer tag the host echoes in H2CData.
    pub ttag: u16,
    /// Offset of the requested data.
    pub offset: u32,
    /// Length of the requested data.
    pub length: u32,
}

/// A parsed PDU borrowing its payload from the receive buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pdu<'a> {
    /// ICReq.
    IcReq(IcReq),
    /// ICResp.
    IcResp(IcResp),
    /// H2CTermReq with the echoed header bytes.
    H2cTermReq {
        /// Fatal error status.
        fes: u16,
        /// Fatal error information.
        fei: u32,
        /// Offending PDU header.
        data: &'a [u8],
    },
    /// C2HTermReq with the echoed header bytes.
    C2hTermReq {
        /// Fatal error status.
        fes: u16,
        /// Fatal error information.
        fei: u32,
        /// Offending PDU header.
        data: &'a [u8],
    },
    /// Command capsule with optional in-capsule data.
    CapsuleCmd {
        /// The submission queue entry.
        sqe: &'a [u8; SQE_LEN],
        /// In-capsule data (may be empty).
        data: &'a [u8],
    },
    /// Response capsule.
    CapsuleResp {
        /// The completion queue entry.
        cqe: &'a [u8; CQE_LEN],
    },
    /// Host to controller data.
    H2cData {
        /// Data header fields.
        hdr: DataHdr,
        /// LAST_PDU flag.
        last: bool,
        /// The data.
        data: &'a [u8],
    },
    /// Controller to host data.
    C2hData {
        /// Data header fields.
        hdr: DataHdr,
        /// LAST_PDU flag.
        last: bool,
        /// SUCCESS flag.
        success: bool,
        /// The data.
        data: &'a [u8],
    },
    /// Ready to transfer.
    R2t(R2t),
}

/// Fully validates one PDU (`buf` is exactly `plen` bytes, as [`check`] reported).
pub fn parse<'a>(buf: &'a [u8], rx: &RxContext) -> Result<Pdu<'a>, PduError> {
    parse_with(buf, rx, true)
}

/// As [`parse`]; with `verify_ddgst` false the data digest is not checked. A receiver
/// that got [`PduError::DataDigest`] uses this to learn which command the data was for,
/// since a data digest error fails that command, not the connection.
pub fn parse_with<'a>(
    buf: &'a [u8],
    rx: &RxContext,
    verify_ddgst: bool,
) -> Result<Pdu<'a>, PduError> {
    if buf.len() < CH_LEN {
        return Err(PduError::PlenTooSmall {
            plen: buf.len() as u32,
        });
    }
    let ch = check_header(&buf[..CH_LEN], rx)?;
    if buf.len() != ch.plen as usize {
        return Err(PduError::PlenTooSmall { plen: ch.plen });
    }
    let hlen = ch.hlen as usize;
    let hd = if ch.flags & FLAG_HDGST != 0 {
        DIGEST_LEN
    } else {
        0
    };
    if hd != 0 && le32(buf, hlen) != crc32c(&buf[..hlen]) {
        return Err(PduError::HeaderDigest);
    }
    let data = payload(buf, &ch, hlen + hd, verify_ddgst)?;
    let h = &buf[..hlen];
    Ok(match ch.pdu_type {
        PduType::IcReq => Pdu::IcReq(IcReq {
            pfv: le16(h, 8),
            hpda: h[10],
            digest: h[11],
            maxr2t: le32(h, 12),
        }),
        PduType::IcResp => Pdu::IcResp(IcResp {
            pfv: le16(h, 8),
            cpda: h[10],
            digest: h[11],
            maxh2cdata: le32(h, 12),
        }),
        PduType::H2cTermReq => Pdu::H2cTermReq {
            fes: le16(h, 8),
            fei: le32(h, 10),
            data,
        },
        PduType::C2hTermReq => Pdu::C2hTermReq {
            fes: le16(h, 8),
            fei: le32(h, 10),
            data,
        },
        PduType::CapsuleCmd => Pdu::CapsuleCmd {
            sqe: sub_array(h, CH_LEN),
            data,
        },
        PduType::CapsuleResp => Pdu::CapsuleResp {
            cqe: sub_array(h, CH_LEN),
        },
        PduType::H2cData | PduType::C2hData => data_pdu(&ch, h, data)?,
        PduType::R2t => Pdu::R2t(R2t {
            cccid: le16(h, 8),
            ttag: le16(h, 10),
            offset: le32(h, 12),
            length: le32(h, 16),
        }),
    })
}

/// The header of a data PDU (H2CData or C2HData) that carries data, validated as
/// [`parse`] validates it, from its header area alone, so that its payload can be moved
/// to its destination as it arrives instead of being buffered whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHead {
    /// Data header fields.
    pub hdr: DataHdr,
    /// LAST_PDU flag.
    pub last: bool,
    /// SUCCESS flag (C2HData only).
    pub success: bool,
    /// A data digest follows the payload.
    pub ddgst: bool,
}

/// For a PDU whose common header passed [`check`]: the length of its header area (its
/// PDO) if it is a data PDU carrying data, else None (parse such a PDU whole).
pub fn data_offset(common: &[u8]) -> Option<usize> {
    if common.len() < CH_LEN {
        return None;
    }
    let t = PduType::from_u8(common[0])?;
    if !matches!(t, PduType::H2cData | PduType::C2hData) {
        return None;
    }
    let hd = if common[1] & FLAG_HDGST != 0 {
        DIGEST_LEN
    } else {
        0
    };
    let plen = le32(common, 4) as usize;
    (plen > t.hlen() + hd).then_some(common[3] as usize)
}

/// Validates a data PDU's header area (`area` is exactly [`data_offset`] bytes): common
/// header, header digest, and that DATAL matches the payload PLEN leaves. The payload's
/// data digest, if any, is the receiver's to check as the payload streams by.
pub fn parse_data_head(area: &[u8], rx: &RxContext) -> Result<DataHead, PduError> {
    if area.len() < CH_LEN {
        return Err(PduError::PlenTooSmall {
            plen: area.len() as u32,
        });
    }
    let ch = check_header(&area[..CH_LEN], rx)?;
    let pdo = ch.pdo as usize;
    if data_offset(&area[..CH_LEN]) != Some(pdo) || area.len() != pdo {
        return Err(PduError::BadPdo { pdo: ch.pdo });
    }
    let hlen = ch.hlen as usize;
    if ch.flags & FLAG_HDGST != 0 && le32(area, hlen) != crc32c(&area[..hlen]) {
        return Err(PduError::HeaderDigest);
    }
    let ddgst = ch.flags & FLAG_DDGST != 0;
    let dd = if ddgst { DIGEST_LEN } else { 0 };
    let data_len = ch.plen as usize - pdo - dd;
    let h = &area[..hlen];
    let hdr = DataHdr {
        cccid: le16(h, 8),
        ttag: le16(h, 10),
        offset: le32(h, 12),
        length: le32(h, 16),
    };
    if hdr.length as usize != data_len {
        return Err(PduError::DataLength {
            len: hdr.length,
            max: data_len as u32,
        });
    }
    Ok(DataHead {
        hdr,
        last: ch.flags & FLAG_LAST_PDU != 0,
        success: ch.flags & FLAG_SUCCESS != 0,
        ddgst,
    })
}

fn sub_array<const N: usize>(h: &[u8], at: usize) -> &[u8; N] {
    match h[at..at + N].try_into() {
        Ok(a) => a,
        // check_header guarantees hlen == CH_LEN + N for these types.
        Err(_) => unreachable!("hlen was validated against the PDU type"),
    }
}

/// The payload bytes (data, or the echoed header of a terminate request), digest checked.
fn payload<'a>(
    buf: &'a [u8],
    ch: &CommonHeader,
    header_area: usize,
    verify_ddgst: bool,
) -> Result<&'a [u8], PduError> {
    let plen = buf.len();
    if matches!(ch.pdu_type, PduType::H2cTermReq | PduType::C2hTermReq) {
        return Ok(&buf[header_area..]);
    }
    if plen == header_area {
        return Ok(&[]);
    }
    let dd = if ch.flags & FLAG_DDGST != 0 {
        DIGEST_LEN
    } else {
        0
    };
    let data = &buf[ch.pdo as usize..plen - dd];
    if verify_ddgst && dd != 0 && le32(buf, plen - dd) != crc32c(data) {
        return Err(PduError::DataDigest);
    }
    Ok(data)
}

fn data_pdu<'a>(ch: &CommonHeader, h: &[u8], data: &'a [u8]) -> Result<Pdu<'a>, PduError> {
    let hdr = DataHdr {
        cccid: le16(h, 8),
        ttag: le16(h, 10),
        offset: le32(h, 12),
        length: le32(h, 16),
    };
    if hdr.length as usize != data.len() || data.is_empty() {
        return Err(PduError::DataLength {
            len: hdr.length,
            max: data.len() as u32,
        });
    }
    let last = ch.flags & FLAG_LAST_PDU != 0;
    Ok(if ch.pdu_type == PduType::H2cData {
        Pdu::H2cData { hdr, last, data }
    } else {
        Pdu::C2hData {
            hdr,
            last,
            success: ch.flags & FLAG_SUCCESS != 0,
            data,
        }
    })
}

/// What the sending side negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxContext {
    /// Append header digests.
    pub hdgst: bool,
    /// Append data digests.
    pub ddgst: bool,
    /// The receiver's data alignment in bytes ((HPDA or CPDA + 1) * 4).
    pub data_align: usize,
}

impl TxContext {
    /// Before ICReq/ICResp: no digests.
    pub fn plain() -> TxContext {
        TxContext {
            hdgst: false,
            ddgst: false,
            data_align: 4,
        }
    }
}

/// Type-specific header fields for [`encode_header`].
#[derive(Debug, Clone, Copy)]
pub enum HdrFields<'a> {
    /// ICReq.
    IcReq(IcReq),
    /// ICResp.
    IcResp(IcResp),
    /// A terminate request (either direction is chosen by `pdu_type`).
    Term {
        /// Fatal error status.
        fes: u16,
        /// Fatal error information.
        fei: u32,
    },
    /// A command capsule.
    Cmd(&'a [u8; SQE_LEN]),
    /// A response capsule.
    Resp(&'a [u8; CQE_LEN]),
    /// H2CData/C2HData.
    Data(DataHdr),
    /// R2T.
    R2t(R2t),
}

/// Writes a PDU's header area (header, header digest, padding up to PDO) into `out`.
///
/// `extra_flags` adds LAST_PDU/SUCCESS; digest flags come from `tx`. Returns the
/// header area length; the caller sends `data_len` bytes of data and, when
/// `tx.ddgst` and `data_len > 0` (non-terminate types), [`data_digest`] after it.
pub fn encode_header(
    out: &mut [u8; MAX_HDR_BYTES],
    tx: &TxContext,
    pdu_type: PduType,
    extra_flags: u8,
    fields: &HdrFields<'_>,
    data_len: usize,
) -> usize {
    let hlen = pdu_type.hlen();
    out[..hlen].fill(0);
    let digestible = pdu_type.digestible();
    let hd = if digestible && tx.hdgst {
        DIGEST_LEN
    } else {
        0
    };
    let dd = if digestible && tx.ddgst && data_len > 0 {
        DIGEST_LEN
    } else {
        0
    };
    let mut flags = extra_flags;
    if hd != 0 {
        flags |= FLAG_HDGST;
    }
    if dd != 0 {
        flags |= FLAG_DDGST;
    }
    let area = if data_len > 0 && pdu_type.carries_data() {
        (hlen + hd).next_multiple_of(tx.data_align.max(4))
    } else {
        hlen + hd
    };
    let pdo = if data_len > 0 && pdu_type.carries_data() {
        area
    } else {
        0
    };
    out[0] = pdu_type as u8;
    out[1] = flags;
    out[2] = hlen as u8;
    out[3] = pdo as u8;
    put32(out, 4, (area + data_len + dd) as u32);
    write_fields(&mut out[..hlen], fields);
    if hd != 0 {
        let d = crc32c(&out[..hlen]);
        put32(out, hlen, d);
    }
    out[hlen + hd..area].fill(0);
    area
}

fn write_fields(h: &mut [u8], fields: &HdrFields<'_>) {
    match fields {
        HdrFields::IcReq(r) => {
            put16(h, 8, r.pfv);
            h[10] = r.hpda;
            h[11] = r.digest;
            put32(h, 12, r.maxr2t);
        }
        HdrFields::IcResp(r) => {
            put16(h, 8, r.pfv);
            h[10] = r.cpda;
            h[11] = r.digest;
            put32(h, 12, r.maxh2cdata);
        }
        HdrFields::Term { fes, fei } => {
            put16(h, 8, *fes);
            put32(h, 10, *fei);
        }
        HdrFields::Cmd(sqe) => h[CH_LEN..CH_LEN + SQE_LEN].copy_from_slice(&sqe[..]),
        HdrFields::Resp(cqe) => h[CH_LEN..CH_LEN + CQE_LEN].copy_from_slice(&cqe[..]),
        HdrFields::Data(d) => {
            put16(h, 8, d.cccid);
            put16(h, 10, d.ttag);
            put32(h, 12, d.offset);
            put32(h, 16, d.length);
        }
        HdrFields::R2t(r) => {
            put16(h, 8, r.cccid);
            put16(h, 10, r.ttag);
            put32(h, 12, r.offset);
            put32(h, 16, r.length);
        }
    }
}

/// Builds a complete PDU (header area, data, data digest). Allocates: cold paths and tests.
pub fn encode(
    tx: &TxContext,
    pdu_type: PduType,
    extra_flags: u8,
    fields: &HdrFields<'_>,
    data: &[u8],
) -> Vec<u8> {
    let mut hdr = [0u8; MAX_HDR_BYTES];
    let n = encode_header(&mut hdr, tx, pdu_type, extra_flags, fields, data.len());
    let mut v = Vec::with_capacity(n + data.len() + DIGEST_LEN);
    v.extend_from_slice(&hdr[..n]);
    v.extend_from_slice(data);
    if pdu_type.digestible() && tx.ddgst && !data.is_empty() {
        v.extend_from_slice(&data_digest(data));
    }
    v
}

/// Builds a C2HTermReq echoing up to [`MAX_TERM_DATA_BYTES`] of the offending header.
pub fn encode_term(err: &PduError, offending: &[u8]) -> Vec<u8> {
    let n = offending.len().min(MAX_TERM_DATA_BYTES).min(MAX_HLEN);
    encode(
        &TxContext::plain(),
        PduType::C2hTermReq,
        0,
        &HdrFields::Term {
            fes: err.fes(),
            fei: err.fei(),
        },
        &offending[..n],
    )
}

#[cfg(test)]
mod tests;
