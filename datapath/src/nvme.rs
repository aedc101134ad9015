//! NVMe command-set vocabulary: opcodes, status codes, SQE field access, CQE encoding.
//!
//! Pure data, no I/O: the controllers read commands and build completions only
//! through these helpers so byte offsets live in one place.

use crate::pdu::{CQE_LEN, SQE_LEN};

/// Admin opcodes.
pub mod admin {
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0a;
    /// Asynchronous Event Request.
    pub const ASYNC_EVENT: u8 = 0x0c;
    /// Keep Alive.
    pub const KEEP_ALIVE: u8 = 0x18;
}

/// NVM command set I/O opcodes.
pub mod io {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management.
    pub const DSM: u8 = 0x09;
}

/// Fabrics command opcode (both queues).
pub const FABRICS: u8 = 0x7f;

/// Fabrics command types (SQE byte 4).
pub mod fctype {
    /// Property Set.
    pub const PROPERTY_SET: u8 = 0x00;
    /// Connect.
    pub const CONNECT: u8 = 0x01;
    /// Property Get.
    pub const PROPERTY_GET: u8 = 0x04;
}

/// A completion status: status code type, status code, do-not-retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Status Code Type.
    pub sct: u8,
    /// Status Code.
    pub sc: u8,
    /// Do Not Retry.
    pub dnr: bool,
}

impl Status {
    /// Successful completion.
    pub const SUCCESS: Status = Status::generic(0x00, false);
    /// Invalid Command Opcode.
    pub const INVALID_OPCODE: Status = Status::generic(0x01, true);
    /// Invalid Field in Command.
    pub const INVALID_FIELD: Status = Status::generic(0x02, true);
    /// Command ID Conflict.
    pub const CID_CONFLICT: Status = Status::generic(0x03, true);
    /// Data Transfer Error.
    pub const DATA_XFER_ERROR: Status = Status::generic(0x04, false);
    /// Internal Error.
    pub const INTERNAL: Status = Status::generic(0x06, false);
    /// Command Abort Requested.
    pub const ABORT_REQUESTED: Status = Status::generic(0x07, false);
    /// Invalid Namespace or Format.
    pub const INVALID_NS: Status = Status::generic(0x0b, true);
    /// Data SGL Length Invalid.
    pub const SGL_LENGTH_INVALID: Status = Status::generic(0x0f, true);
    /// SGL Descriptor Type Invalid.
    pub const SGL_TYPE_INVALID: Status = Status::generic(0x11, true);
    /// Command Sequence Error.
    pub const CMD_SEQ_ERROR: Status = Status::generic(0x0c, true);
    /// Transient Transport Error.
    pub const TRANSIENT_TRANSPORT: Status = Status::generic(0x22, false);
    /// LBA Out of Range.
    pub const LBA_RANGE: Status = Status::generic(0x80, true);
    /// Capacity Exceeded (the pool under a thin namespace is full).
    pub const CAPACITY_EXCEEDED: Status = Status::generic(0x81, true);
    /// Namespace Not Ready.
    pub const NS_NOT_READY: Status = Status::generic(0x82, false);
    /// Path: Asymmetric Access Inaccessible (a multipath host retries on another path).
    pub const ANA_INACCESSIBLE: Status = Status {
        sct: 3,
        sc: 0x02,
        dnr: false,
    };
    /// Invalid Queue Identifier.
    pub const INVALID_QID: Status = Status::specific(0x01);
    /// Invalid Queue Size.
    pub const INVALID_QUEUE_SIZE: Status = Status::specific(0x02);
    /// Asynchronous Event Request Limit Exceeded.
    pub const AER_LIMIT: Status = Status::specific(0x05);
    /// Invalid Log Page.
    pub const INVALID_LOG_PAGE: Status = Status::specific(0x09);
    /// Feature Identifier Not Saveable.
    pub const FEATURE_NOT_SAVEABLE: Status = Status::specific(0x0d);
    /// Feature Not Changeable.
    pub const FEATURE_NOT_CHANGEABLE: Status = Status::specific(0x0e);
    /// Fabrics: Incompatible Format.
    pub const CONNECT_INCOMPATIBLE: Status = Status::specific(0x80);
    /// Fabrics: Controller Busy.
    pub const CONNECT_CTRL_BUSY: Status = Status::specific(0x81);
    /// Fabrics: Controller Busy without DNR: a capacity limit that may clear, so the host
    /// retries (Linux stops reconnecting after a DNR status).
    pub const CONNECT_CTRL_BUSY_RETRY: Status = Status {
        sct: 1,
        sc: 0x81,
        dnr: false,
    };
    /// Fabrics: Connect Invalid Parameters.
    pub const CONNECT_INVALID_PARAM: Status = Status::specific(0x82);
    /// Fabrics: Connect Invalid Host.
    pub const CONNECT_INVALID_HOST: Status = Status::specific(0x84);
    /// Media: Write Fault.
    pub const WRITE_FAULT: Status = Status {
        sct: 2,
        sc: 0x80,
        dnr: false,
    };
    /// Media: Unrecovered Read Error.
    pub const READ_ERROR: Status = Status {
        sct: 2,
        sc: 0x81,
        dnr: false,
    };

    const fn generic(sc: u8, dnr: bool) -> Status {
        Status { sct: 0, sc, dnr }
    }

    const fn specific(sc: u8) -> Status {
        Status {
            sct: 1,
            sc,
            dnr: true,
        }
    }

    /// The CQE status field (phase bit 0 left clear).
    pub fn field(self) -> u16 {
        let sf = ((self.sct as u16 & 0x7) << 8) | self.sc as u16;
        (sf << 1) | if self.dnr { 0x8000 } else { 0 }
    }

    /// Decodes a CQE status field (the inverse of [`Status::field`]; phase bit ignored).
    pub fn from_field(field: u16) -> Status {
        Status {
            sct: ((field >> 9) & 0x7) as u8,
            sc: (field >> 1) as u8,
            dnr: field & 0x8000 != 0,
        }
    }

    /// Whether this is a successful completion.
    pub fn is_success(self) -> bool {
        self.sct == 0 && self.sc == 0
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SCT {:#x} SC {:#04x}", self.sct, self.sc)?;
        if self.dnr {
            f.write_str(" (DNR)")?;
        }
        Ok(())
    }
}

/// Read-only view of a 64-byte submission queue entry.
#[derive(Clone, Copy)]
pub struct Sqe<'a>(pub &'a [u8; SQE_LEN]);

impl Sqe<'_> {
    fn u16_at(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.0[at], self.0[at + 1]])
    }

    fn u32_at(&self, at: usize) -> u32 {
        u32::from_le_bytes([self.0[at], self.0[at + 1], self.0[at + 2], self.0[at + 3]])
    }

    fn u64_at(&self, at: usize) -> u64 {
        (self.u32_at(at) as u64) | ((self.u32_at(at + 4) as u64) << 32)
    }

    /// Opcode.
    pub fn opcode(&self) -> u8 {
        self.0[0]
    }
    /// Flags byte (FUSE, PSDT).
    pub fn flags(&self) -> u8 {
        self.0[1]
    }
    /// Command identifier.
    pub fn cid(&self) -> u16 {
        self.u16_at(2)
    }
    /// Namespace identifier.
    pub fn nsid(&self) -> u32 {
        self.u32_at(4)
    }
    /// Fabrics command type (byte 4 of a fabrics command).
    pub fn fctype(&self) -> u8 {
        self.0[4]
    }
    /// Command dword `n` (10..=15).
    pub fn cdw(&self, n: usize) -> u32 {
        self.u32_at(n * 4)
    }
    /// Dword pair 10/11 as a 64-bit value (SLBA).
    pub fn cdw10_11(&self) -> u64 {
        self.u64_at(40)
    }
    /// Dword pair 12/13 as a 64-bit value.
    pub fn cdw12_13(&self) -> u64 {
        self.u64_at(48)
    }
    /// The SGL descriptor in DPTR.
    pub fn sgl(&self) -> Sgl {
        Sgl {
            addr: self.u64_at(24),
            length: self.u32_at(32),
            sgl_type: self.0[39],
        }
    }
    /// Connect: record format.
    pub fn connect_recfmt(&self) -> u16 {
        self.u16_at(40)
    }
    /// Connect: queue id.
    pub fn connect_qid(&self) -> u16 {
        self.u16_at(42)
    }
    /// Connect: submission queue size (0-based).
    pub fn connect_sqsize(&self) -> u16 {
        self.u16_at(44)
    }
    /// Connect: connect attributes.
    pub fn connect_cattr(&self) -> u8 {
        self.0[46]
    }
    /// Connect: keep alive timeout in milliseconds.
    pub fn connect_kato(&self) -> u32 {
        self.u32_at(48)
    }
    /// Property Get/Set: size attribute (0 = 4 bytes, 1 = 8 bytes).
    pub fn prop_attrib(&self) -> u8 {
        self.0[40] & 0x7
    }
    /// Property Get/Set: property offset.
    pub fn prop_offset(&self) -> u32 {
        self.u32_at(44)
    }
    /// Property Set: value.
    pub fn prop_value(&self) -> u64 {
        self.u64_at(48)
    }
}

/// SGL descriptor type byte for a data block with an offset address (in-capsule data).
pub const SGL_DATA_OFFSET: u8 = 0x01;
/// SGL descriptor type byte for a transport data block (data via R2T/C2HData).
pub const SGL_TRANSPORT_DATA: u8 = 0x5a;

/// The data pointer SGL descriptor of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sgl {
    /// Address (offset for in-capsule data).
    pub addr: u64,
    /// Transfer length in bytes.
    pub length: u32,
    /// Descriptor type (high nibble) and subtype (low nibble).
    pub sgl_type: u8,
}

/// Direction of a command's data transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// No data.
    None,
    /// Host to controller (write-like).
    H2c,
    /// Controller to host (read-like).
    C2h,
    /// Both: not supported by this target.
    Both,
}

/// Data direction of an opcode (bits 1:0), or of a fabrics command type.
pub fn data_dir(sqe: &Sqe<'_>) -> Dir {
    let bits = if sqe.opcode() == FABRICS {
        sqe.fctype()
    } else {
        sqe.opcode()
    };
    match bits & 0x3 {
        0 => Dir::None,
        1 => Dir::H2c,
        2 => Dir::C2h,
        _ => Dir::Both,
    }
}

/// Builds a 16-byte completion queue entry.
pub fn cqe(result: u64, sqhd: u16, sqid: u16, cid: u16, status: Status) -> [u8; CQE_LEN] {
    let mut c = [0u8; CQE_LEN];
    c[0..8].copy_from_slice(&result.to_le_bytes());
    c[8..10].copy_from_slice(&sqhd.to_le_bytes());
    c[10..12].copy_from_slice(&sqid.to_le_bytes());
    c[12..14].copy_from_slice(&cid.to_le_bytes());
    c[14..16].copy_from_slice(&status.field().to_le_bytes());
    c
}

/// Controller properties (Property Get/Set offsets).
pub mod prop {
    /// Controller Capabilities (8 bytes).
    pub const CAP: u32 = 0x00;
    /// Version.
    pub const VS: u32 = 0x08;
    /// Controller Configuration.
    pub const CC: u32 = 0x14;
    /// Controller Status.
    pub const CSTS: u32 = 0x1c;
    /// NVM Subsystem Reset.
    pub const NSSR: u32 = 0x20;
}

/// NVMe version 2.0 (VS property and Identify Controller VER).
pub const VERSION: u32 = 0x0002_0000;

/// Log page identifiers.
pub mod log {
    /// Error Information.
    pub const ERROR: u8 = 0x01;
    /// SMART / Health Information.
    pub const SMART: u8 = 0x02;
    /// Firmware Slot Information.
    pub const FW_SLOT: u8 = 0x03;
    /// Changed Namespace List.
    pub const CHANGED_NS: u8 = 0x04;
    /// Commands Supported and Effects.
    pub const CMD_EFFECTS: u8 = 0x05;
    /// Asymmetric Namespace Access.
    pub const ANA: u8 = 0x0c;
    /// Discovery.
    pub const DISCOVERY: u8 = 0x70;
}

/// Feature identifiers.
pub mod feat {
    /// Arbitration.
    pub const ARBITRATION: u8 = 0x01;
    /// Power Management.
    pub const POWER_MGMT: u8 = 0x02;
    /// Temperature Threshold.
    pub const TEMP_THRESH: u8 = 0x04;
    /// Error Recovery.
    pub const ERR_RECOVERY: u8 = 0x05;
    /// Volatile Write Cache.
    pub const VOLATILE_WC: u8 = 0x06;
    /// Number of Queues.
    pub const NUM_QUEUES: u8 = 0x07;
    /// Interrupt Coalescing.
    pub const IRQ_COALESCE: u8 = 0x08;
    /// Write Atomicity Normal.
    pub const WRITE_ATOMIC: u8 = 0x0a;
    /// Asynchronous Event Configuration.
    pub const ASYNC_EVENT: u8 = 0x0b;
    /// Keep Alive Timer.
    pub const KATO: u8 = 0x0f;
}

/// Asynchronous event completion DW0 values (type | info << 8 | log page << 16).
pub mod aen {
    /// Notice: namespace attribute changed (log page 0x04).
    pub const NS_CHANGED: u32 = 0x2 | (0x04 << 16);
    /// Notice: ANA change (log page 0x0c).
    pub const ANA_CHANGE: u32 = 0x2 | (0x03 << 8) | (0x0c << 16);
    /// OAES / AEC bit: namespace attribute notices.
    pub const CFG_NS_ATTR: u32 = 1 << 8;
    /// OAES / AEC bit: ANA change notices.
    pub const CFG_ANA_CHANGE: u32 = 1 << 11;
}

/// Well-known NQN of discovery controllers.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

#[cfg(test)]
mod tests {
    use super::Status;

    #[test]
    fn status_field_round_trips() {
        for s in [
            Status::SUCCESS,
            Status::LBA_RANGE,
            Status::INVALID_NS,
            Status::CONNECT_INVALID_PARAM,
            Status::READ_ERROR,
            Status::WRITE_FAULT,
        ] {
            assert_eq!(Status::from_field(s.field()), s);
            assert_eq!(Status::from_field(s.field() | 1), s, "phase bit ignored");
        }
    }
}
