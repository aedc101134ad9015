//! Synchronous replication of a volume's writes from its primary to its replicas.
//!
//! The primary's namespace is a [`Replicated`] backend: every write, write-zeroes,
//! deallocate and flush goes to the local image and, as one more part of the same command,
//! to each in-sync replica through a [`Link`] to the replica's server; the command completes
//! (the queue state machine counts the parts) only when every copy has it. A replica's
//! server runs a [`ReplicaServer`] that applies the frames to its own image of the volume.
//!
//! The protocol is internal and small on purpose: one request frame per backend part
//! (header + data, both CRC32C-checked) and one 16-byte answer, pipelined on one TCP
//! connection per peer (driven by a reactor's ring, see [`LinkEngine`]), answered in
//! batches that share one metadata commit. Every frame
//! carries the volume's epoch; a replica refuses frames of an epoch older than the newest
//! it has seen ([`FENCED`]), so a deposed primary cannot get a write acknowledged.
//!
//! Reads are served from the primary's own copy, which is stale once another server was
//! promoted and took a write. Every frame a replica accepts is also a promise (the read
//! lease, [`REPLICA_READ_LEASE_MS`]): the replica will not serve the volume itself, if
//! promoted, until that long after the frame arrived. The primary reads locally while it
//! holds an unexpired promise from every replica that takes its writes (its writes renew
//! them); otherwise the read also sends each of them an [`Op::Ping`] and completes only
//! when all answered: one that knows a newer epoch answers [`FENCED`], and the read fails
//! as a path error instead of returning stale data. A replica promoted by a failover waits
//! out the promises it gave before its data path serves ([`ReplicaServer::lease_given_for`]).
//!
//! A snapshot of a replicated volume is taken on every in-sync copy at the same point of
//! the write stream ([`snapshot_members`]). A copy that lacks some of them (a new replica,
//! or one that was away) receives them before its rebuild ([`seed_snapshots`]).
//!
//! A replica that fails (connection lost, no answer in [`REPLICA_IO_TIMEOUT_MS`], an I/O
//! error) is never silently skipped: its parts are held and the failure reported
//! ([`ReplicaHub::take_failures`]); only when the control plane has recorded the replica
//! out of sync and published a table without it do the held parts complete (the copy is no
//! longer owed), so an acknowledged write is always on every in-sync copy.
//!
//! [`REPLICA_IO_TIMEOUT_MS`]: crate::limits::REPLICA_IO_TIMEOUT_MS
//! [`REPLICA_READ_LEASE_MS`]: crate::limits::REPLICA_READ_LEASE_MS

mod backend;
mod engine;
mod link;
mod member;
mod rebuild;
mod seed;
mod server;
mod snapshot;

pub use backend::{Member, Replicated};
pub use engine::{LinkEngine, LinkHome};
pub use link::{Link, ReplicaHub};
pub use member::{MemberState, Mode};
pub use rebuild::{rebuild, repair};
pub use seed::{seed_snapshots, SnapshotSource, StoreSnapshots};
pub use server::{HeldCopy, Hooks, ReplicaImage, ReplicaServer, SnapshotHook};
pub use snapshot::{rollback_members, snapshot_members};

use std::sync::OnceLock;
use std::time::Instant;

use crate::limits::REPLICA_FRAME_DATA_MAX;

/// Nanoseconds since the first call in this process, on the monotonic clock: read leases
/// are kept in atomics as instants of this clock.
pub(crate) fn clock_ns(t: Instant) -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    // One nanosecond past the base at least, so 0 can mean "never".
    (t.saturating_duration_since(base).as_nanos() as u64).saturating_add(1)
}

/// Request frame header bytes.
pub const HDR_BYTES: usize = 64;
/// Answer frame bytes.
pub const ANSWER_BYTES: usize = 16;
const REQ_MAGIC: [u8; 4] = *b"EVRP";
const ANS_MAGIC: [u8; 4] = *b"EVRA";
/// FUA flag bit.
const FLAG_FUA: u8 = 1;

/// Answer status: the replica has seen a newer epoch of the volume (this primary is stale).
pub const FENCED: i32 = -libc::ESTALE;
/// Answer status: the replica does not hold the volume (yet).
pub const NOT_HELD: i32 = -libc::ENOENT;
/// [`Op::Recent`]'s answer: no more chunks.
pub const RECENT_END: i32 = -libc::ENODATA;
/// [`Op::Recent`]'s answer: the copy keeps no usable record of its recent changes.
pub const RECENT_UNKNOWN: i32 = -libc::EOPNOTSUPP;

/// What a frame asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Write the frame's data.
    Write {
        /// Force Unit Access.
        fua: bool,
    },
    /// Make the range read as zeroes.
    WriteZeroes,
    /// Discard the range.
    Deallocate,
    /// Make completed writes durable.
    Flush,
    /// Rebuild: the primary's data of the range, written only to blocks no live write has
    /// reached since the rebuild started.
    Copy,
    /// Rebuild: as [`Op::Copy`], for a range that reads as zeroes (no data follows).
    CopyZeroes,
    /// Rebuild begins: from now on the replica remembers which blocks live writes reach.
    RebuildStart,
    /// Rebuild ends: the replica forgets them.
    RebuildEnd,
    /// Nothing to apply: the answer says whether the sender is still the volume's primary
    /// here (and renews its read lease).
    Ping,
    /// Take a snapshot of the copy (the snapshot's 16-byte id is the data), after every
    /// frame received before it; one left by an earlier attempt is replaced.
    Snapshot,
    /// After a failover (the frame's epoch is the new primary's): the answer is the first
    /// chunk at or after `offset` (in [`CHANGE_CHUNK_BYTES`]) this copy changed shortly
    /// before it learned of that epoch, [`RECENT_END`] when there is none, or
    /// [`RECENT_UNKNOWN`] when the copy cannot tell (then anything may differ).
    ///
    /// [`CHANGE_CHUNK_BYTES`]: crate::limits::CHANGE_CHUNK_BYTES
    Recent,
    /// Replace the copy's data with its copy of a snapshot (the snapshot's 16-byte id is
    /// the data), after every frame received before it.
    Rollback,
    /// Take a snapshot the copy did not hold, whose data the primary has just copied into
    /// it (the snapshot's 16-byte id is the data): see [`seed_snapshots`].
    SeedSnapshot,
}

impl Op {
    fn code(self) -> (u8, u8) {
        match self {
            Op::Write { fua } => (1, if fua { FLAG_FUA } else { 0 }),
            Op::WriteZeroes => (2, 0),
            Op::Deallocate => (3, 0),
            Op::Flush => (4, 0),
            Op::Copy => (5, 0),
            Op::CopyZeroes => (6, 0),
            Op::RebuildStart => (7, 0),
            Op::RebuildEnd => (8, 0),
            Op::Ping => (9, 0),
            Op::Snapshot => (10, 0),
            Op::Recent => (11, 0),
            Op::Rollback => (12, 0),
            Op::SeedSnapshot => (13, 0),
        }
    }

    fn from_code(op: u8, flags: u8) -> Option<Op> {
        Some(match op {
            1 => Op::Write {
                fua: flags & FLAG_FUA != 0,
            },
            2 => Op::WriteZeroes,
            3 => Op::Deallocate,
            4 => Op::Flush,
            5 => Op::Copy,
            6 => Op::CopyZeroes,
            7 => Op::RebuildStart,
            8 => Op::RebuildEnd,
            9 => Op::Ping,
            10 => Op::Snapshot,
            11 => Op::Recent,
            12 => Op::Rollback,
            13 => Op::SeedSnapshot,
            _ => return None,
        })
    }

    /// Whether data follows the header.
    pub fn has_data(self) -> bool {
        matches!(
            self,
            Op::Write { .. } | Op::Copy | Op::Snapshot | Op::Rollback | Op::SeedSnapshot
        )
    }

    /// Whether it changes the replica's data (a replica that misses it misses data).
    pub fn changes_data(self) -> bool {
        matches!(
            self,
            Op::Write { .. } | Op::WriteZeroes | Op::Deallocate | Op::Copy | Op::CopyZeroes
        )
    }

    /// Whether it is a rebuild's copy.
    pub fn is_copy(self) -> bool {
        matches!(self, Op::Copy | Op::CopyZeroes)
    }

    /// Whether it is applied alone, after everything received before it: a rebuild's copy
    /// (the blocks it may not overwrite are then known), a snapshot (the same point of the
    /// write stream as the primary's), a rollback, or a copied snapshot.
    pub fn runs_alone(self) -> bool {
        self.is_copy() || self.runs_hook()
    }

    /// Whether the replica runs it through one of its image hooks (a snapshot, a
    /// rollback, a copied snapshot), off the listener's thread.
    pub fn runs_hook(self) -> bool {
        matches!(self, Op::Snapshot | Op::Rollback | Op::SeedSnapshot)
    }
}

/// One request: a backend part of a volume's command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// What to do.
    pub op: Op,
    /// The volume (its image on the replica).
    pub volume: [u8; 16],
    /// The sender's epoch of the volume.
    pub epoch: u64,
    /// Byte offset in the volume.
    pub offset: u64,
    /// Byte length (of data, for writes; of the range otherwise).
    pub len: u32,
    /// The link's request id, echoed in the answer.
    pub id: u32,
    /// The sending process's incarnation (its [`ReplicaHub`]'s, set by the link): a
    /// primary that restarted at the same epoch is told apart from the one before.
    pub session: u64,
}

/// Why a header was refused (the connection cannot be trusted after it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Not a frame of this protocol.
    #[error("bad magic")]
    Magic,
    /// The header's checksum does not match.
    #[error("header checksum mismatch")]
    HeaderDigest,
    /// The data's checksum does not match.
    #[error("data checksum mismatch")]
    DataDigest,
    /// Unknown operation.
    #[error("unknown operation {0}")]
    Op(u8),
    /// Longer than a frame may carry.
    #[error("frame of {0} bytes is longer than {REPLICA_FRAME_DATA_MAX}")]
    Length(u32),
}

impl Frame {
    /// The header, with the data's checksum (`data` is empty unless the op writes data).
    pub fn encode(&self, data: &[u8], out: &mut [u8; HDR_BYTES]) {
        out.fill(0);
        let (op, flags) = self.op.code();
        out[0..4].copy_from_slice(&REQ_MAGIC);
        out[4] = op;
        out[5] = flags;
        out[8..24].copy_from_slice(&self.volume);
        out[24..32].copy_from_slice(&self.epoch.to_le_bytes());
        out[32..40].copy_from_slice(&self.offset.to_le_bytes());
        out[40..44].copy_from_slice(&self.len.to_le_bytes());
        out[44..48].copy_from_slice(&self.id.to_le_bytes());
        out[52..56].copy_from_slice(&crc32c::crc32c(data).to_le_bytes());
        out[56..64].copy_from_slice(&self.session.to_le_bytes());
        let hcrc = header_crc(out);
        out[48..52].copy_from_slice(&hcrc.to_le_bytes());
    }

    /// Parses a header; returns the frame and the data checksum to verify.
    pub fn decode(b: &[u8; HDR_BYTES]) -> Result<(Frame, u32), WireError> {
        if b[0..4] != REQ_MAGIC {
            return Err(WireError::Magic);
        }
        if header_crc(b) != le32(&b[48..52]) {
            return Err(WireError::HeaderDigest);
        }
        let op = Op::from_code(b[4], b[5]).ok_or(WireError::Op(b[4]))?;
        let len = le32(&b[40..44]);
        if op.has_data() && len as usize > REPLICA_FRAME_DATA_MAX {
            return Err(WireError::Length(len));
        }
        let mut volume = [0u8; 16];
        volume.copy_from_slice(&b[8..24]);
        let frame = Frame {
            op,
            volume,
            epoch: le64(&b[24..32]),
            offset: le64(&b[32..40]),
            len,
            id: le32(&b[44..48]),
            session: le64(&b[56..64]),
        };
        Ok((frame, le32(&b[52..56])))
    }
}

/// The header's own checksum: every byte but the two checksums (48..56).
fn header_crc(b: &[u8; HDR_BYTES]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&b[..48]), &b[56..64])
}

/// Encodes an answer: request id and status (0, or -errno).
pub fn encode_answer(id: u32, status: i32, out: &mut [u8; ANSWER_BYTES]) {
    out[0..4].copy_from_slice(&ANS_MAGIC);
    out[4..8].copy_from_slice(&id.to_le_bytes());
    out[8..12].copy_from_slice(&status.to_le_bytes());
    let crc = crc32c::crc32c(&out[..12]);
    out[12..16].copy_from_slice(&crc.to_le_bytes());
}

/// Parses an answer into (request id, status).
pub fn decode_answer(b: &[u8; ANSWER_BYTES]) -> Result<(u32, i32), WireError> {
    if b[0..4] != ANS_MAGIC {
        return Err(WireError::Magic);
    }
    if crc32c::crc32c(&b[..12]) != le32(&b[12..16]) {
        return Err(WireError::HeaderDigest);
    }
    Ok((le32(&b[4..8]), le32(&b[8..12]) as i32))
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(op: Op) -> Frame {
        Frame {
            op,
            volume: [7; 16],
            epoch: 42,
            offset: 1 << 33,
            len: 8192,
            id: 9,
            session: 0x5e55_1017,
        }
    }

    #[test]
    fn frames_round_trip_with_their_data_checksum() {
        let data = vec![0x5a; 8192];
        for op in [
            Op::Write { fua: true },
            Op::Write { fua: false },
            Op::WriteZeroes,
            Op::Deallocate,
            Op::Flush,
            Op::Copy,
            Op::CopyZeroes,
            Op::RebuildStart,
            Op::RebuildEnd,
            Op::Ping,
            Op::Snapshot,
            Op::Recent,
            Op::Rollback,
            Op::SeedSnapshot,
        ] {
            let mut h = [0u8; HDR_BYTES];
            frame(op).encode(&data, &mut h);
            let (f, crc) = Frame::decode(&h).expect("decodes");
            assert_eq!(f, frame(op));
            assert_eq!(crc, crc32c::crc32c(&data));
        }
    }

    #[test]
    fn a_flipped_header_bit_or_an_oversized_frame_is_refused() {
        let mut h = [0u8; HDR_BYTES];
        frame(Op::Flush).encode(&[], &mut h);
        h[30] ^= 1;
        assert_eq!(Frame::decode(&h), Err(WireError::HeaderDigest));
        let mut big = frame(Op::Write { fua: false });
        big.len = REPLICA_FRAME_DATA_MAX as u32 + 1;
        big.encode(&[], &mut h);
        assert_eq!(Frame::decode(&h), Err(WireError::Length(big.len)));
        h[0] = b'X';
        assert_eq!(Frame::decode(&h), Err(WireError::Magic));
    }

    #[test]
    fn answers_round_trip_and_are_checked() {
        let mut a = [0u8; ANSWER_BYTES];
        encode_answer(77, FENCED, &mut a);
        assert_eq!(decode_answer(&a), Ok((77, FENCED)));
        a[9] ^= 0x10;
        assert_eq!(decode_answer(&a), Err(WireError::HeaderDigest));
    }
}
