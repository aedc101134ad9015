//! The evstor event log: an append-only, hash-chained journal of envelopes on RocksDB.
//!
//! Layout of this crate:
//! - [`envelope`]: the stored record (seq, time, actor, project, request id, type, schema
//!   version, payload) and its on-disk framing (crc32 + bincode), plus the hash chain.
//! - [`log`]: the [`EventLog`] trait, the seam for "append in order", and [`RocksJournal`],
//!   its RocksDB implementation where events and projection updates land in one synced write
//!   batch. A single server orders appends itself (`append`); in a cluster the order is
//!   decided elsewhere (etcd, by `evstor-control`) with [`place`], and every server applies
//!   the placed envelopes with `append_placed`, so every copy holds the same bytes.
//! - [`verify`]: checksum, gap and hash-chain verification.
//! - [`follow`]: a blocking follower that tails the log from a seq.
//!
//! The journal knows nothing of volumes or projects: payloads are opaque bytes and projections
//! are opaque key/value pairs owned by the caller.

pub mod envelope;
pub mod follow;
pub mod limits;
pub mod log;
pub mod verify;

pub use envelope::{Envelope, Hash, NewEvent, GENESIS_HASH};
pub use follow::Follower;
pub use log::{
    continues, place, AppendBatch, EventLog, Head, OpenMode, ProjectionOp, RocksJournal,
};
pub use verify::{VerifyProblem, VerifyReport};

/// Everything that can go wrong in the journal. Operating errors are returned, never panicked on.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("event {seq}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        seq: u64,
        stored: u32,
        computed: u32,
    },
    #[error("event {seq}: cannot decode envelope: {reason}")]
    Decode { seq: u64, reason: String },
    #[error(
        "envelope {seq} does not continue this log (expected seq {expected_seq} chained to the \
         local head): the copies diverged"
    )]
    Diverged { seq: u64, expected_seq: u64 },
    #[error("append expected first seq {expected} but the log is at {actual}")]
    SeqConflict { expected: u64, actual: u64 },
    #[error("append batch too large: {events} events (max {max})")]
    BatchTooLarge { events: usize, max: usize },
    #[error("event field {field} too long: {len} bytes (max {max})")]
    FieldTooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("the journal was opened read-only")]
    ReadOnly,
    #[error("missing column family {0}")]
    MissingColumnFamily(&'static str),
    #[error("corrupt metadata: {0}")]
    Meta(String),
}

pub type Result<T> = std::result::Result<T, JournalError>;
