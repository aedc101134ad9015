//! Ordered, durable append: the [`EventLog`] seam and its RocksDB implementation.
//!
//! Column families: `events` (key: big-endian seq → framed envelope), `projections` (opaque
//! keys owned by the caller, written in the same batch as the events that produced them) and
//! `meta` (the head: next seq, last time, last hash). One append is one RocksDB write batch
//! with a synced WAL, so an acknowledged append is durable and never half-applied.

use std::path::Path;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use rocksdb::{ColumnFamily, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};

use crate::envelope::{hash_stored, Envelope, Hash, NewEvent, GENESIS_HASH};
use crate::limits::{APPEND_EVENTS_MAX, READ_EVENTS_MAX};
use crate::{JournalError, Result};

const CF_EVENTS: &str = "events";
const CF_PROJECTIONS: &str = "projections";
const CF_META: &str = "meta";
const META_HEAD: &[u8] = b"head";

/// Where the log stands: the seq the next event gets, and what it must chain to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub next_seq: u64,
    pub last_time_unix_ns: u64,
    pub last_hash: Hash,
}

impl Head {
    const EMPTY: Head = Head {
        next_seq: 1,
        last_time_unix_ns: 0,
        last_hash: GENESIS_HASH,
    };

    /// The same head with another next seq (tests build impossible heads with it).
    #[cfg(test)]
    fn clone_with_seq(&self, next_seq: u64) -> Head {
        Head { next_seq, ..*self }
    }

    /// Seq of the newest event, 0 when the log is empty.
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }
}

/// A change to a projection row, committed atomically with the events that caused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProjectionOp {
    Put { key: Vec<u8>, value: Vec<u8> },
    Delete { key: Vec<u8> },
}

/// One atomic append: events and the projection rows they produce.
#[derive(Debug, Clone, Default)]
pub struct AppendBatch {
    /// The seq the caller decided against; the append fails if the log moved on meanwhile.
    pub first_seq: u64,
    pub events: Vec<NewEvent>,
    pub projections: Vec<ProjectionOp>,
}

/// The seam for "append in order". The single-server default orders appends itself; a
/// multi-server backend orders them through consensus and applies them here in the same way.
pub trait EventLog: Send + Sync {
    /// The current head.
    fn head(&self) -> Head;
    /// Appends durably (synced) or not at all; returns the placed envelopes.
    fn append(&self, batch: AppendBatch) -> Result<Vec<Envelope>>;
    /// Up to `max` envelopes starting at `from_seq` (inclusive), checksums verified.
    fn read(&self, from_seq: u64, max: usize) -> Result<Vec<Envelope>>;
    /// Blocks until the log holds an event past `seq` or `timeout` passes; returns the last seq.
    fn wait_past(&self, seq: u64, timeout: Duration) -> u64;
    /// Appends envelopes whose seq, time and chain were decided elsewhere (by [`place`] on
    /// the server that won the cluster's order), with the projection rows this server
    /// computed for them. They must continue this log exactly: the first seq is the head's
    /// next, each links to the hash of the one before (the first to the head's), else
    /// [`JournalError::Diverged`] and nothing is written. Returns the new head.
    fn append_placed(&self, envelopes: &[Envelope], projections: Vec<ProjectionOp>)
        -> Result<Head>;
}

/// Places `events` after `head`: gapless seqs, times that never go backwards, each envelope
/// linked to the hash of the one before. Pure, so the server that orders a batch and every
/// server that applies it agree on every byte (and so on every hash).
pub fn place(head: &Head, events: Vec<NewEvent>) -> (Vec<Envelope>, Head) {
    let mut next = *head;
    let mut placed = Vec::with_capacity(events.len());
    for event in events {
        let time = event.time_unix_ns.max(next.last_time_unix_ns);
        let envelope = event.place(next.next_seq, time, next.last_hash);
        next = Head {
            next_seq: next.next_seq + 1,
            last_time_unix_ns: time,
            last_hash: hash_stored(&envelope.encode()),
        };
        placed.push(envelope);
    }
    (placed, next)
}

/// Checks that `envelopes` continue `head` exactly; returns the head after them.
pub fn continues(head: &Head, envelopes: &[Envelope]) -> Result<Head> {
    let mut next = *head;
    for e in envelopes {
        if e.seq != next.next_seq || e.prev_hash != next.last_hash {
            return Err(JournalError::Diverged {
                seq: e.seq,
                expected_seq: next.next_seq,
            });
        }
        next = Head {
            next_seq: e.seq + 1,
            last_time_unix_ns: e.time_unix_ns.max(next.last_time_unix_ns),
            last_hash: hash_stored(&e.encode()),
        };
    }
    Ok(next)
}

/// Whether the journal may be written; read-only opens work beside a running server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    ReadWrite,
    ReadOnly,
}

/// The RocksDB journal.
pub struct RocksJournal {
    db: DB,
    mode: OpenMode,
    head: Mutex<Head>,
    appended: Condvar,
}

impl RocksJournal {
    /// RocksDB's own statistics text (`rocksdb.stats`: compaction, write stalls, levels),
    /// for support bundles.
    pub fn rocksdb_stats(&self) -> String {
        self.db
            .property_value("rocksdb.stats")
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    /// Opens (creating when read-write and absent) the journal in `path`.
    pub fn open(path: &Path, mode: OpenMode) -> Result<RocksJournal> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_keep_log_file_num(4);
        let cfs = [CF_EVENTS, CF_PROJECTIONS, CF_META];
        let db = match mode {
            OpenMode::ReadWrite => DB::open_cf(&opts, path, cfs)?,
            OpenMode::ReadOnly => DB::open_cf_for_read_only(&opts, path, cfs, false)?,
        };
        let head = match db.get_cf(cf(&db, CF_META)?, META_HEAD)? {
            Some(raw) => {
                bincode::deserialize(&raw).map_err(|e| JournalError::Meta(format!("head: {e}")))?
            }
            None => Head::EMPTY,
        };
        Ok(RocksJournal {
            db,
            mode,
            head: Mutex::new(head),
            appended: Condvar::new(),
        })
    }

    fn lock_head(&self) -> MutexGuard<'_, Head> {
        // A poisoned lock means a writer panicked mid-append; the head it guards is still the
        // last durable one because it is only replaced after the write succeeded.
        self.head.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cf(&self, name: &'static str) -> Result<&ColumnFamily> {
        cf(&self.db, name)
    }

    /// One projection row.
    pub fn get_projection(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(CF_PROJECTIONS)?, key)?)
    }

    /// Every projection row whose key starts with `prefix`, in key order.
    pub fn scan_projections(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut rows = Vec::new();
        let iter = self.db.iterator_cf(
            self.cf(CF_PROJECTIONS)?,
            IteratorMode::From(prefix, rocksdb::Direction::Forward),
        );
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            rows.push((k.to_vec(), v.to_vec()));
        }
        Ok(rows)
    }

    /// Replaces projection rows in one synced batch without appending an event, for a caller
    /// that rebuilds its rows from the events (a changed row format). The head stays put: the
    /// rows must still be what the events up to it imply, which only the caller can know.
    pub fn rewrite_projections(&self, ops: Vec<ProjectionOp>) -> Result<()> {
        if self.mode == OpenMode::ReadOnly {
            return Err(JournalError::ReadOnly);
        }
        let _head = self.lock_head();
        let projections_cf = self.cf(CF_PROJECTIONS)?;
        let mut write = WriteBatch::default();
        for op in ops {
            match op {
                ProjectionOp::Put { key, value } => write.put_cf(projections_cf, key, value),
                ProjectionOp::Delete { key } => write.delete_cf(projections_cf, key),
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(write, &wo)?;
        Ok(())
    }

    /// The stored bytes of one event, unverified: for forensics and tamper tests.
    pub fn read_raw(&self, seq: u64) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(CF_EVENTS)?, seq.to_be_bytes())?)
    }

    /// Overwrites the stored bytes of one event without any check. This breaks the log on
    /// purpose; it exists so tests can prove that `verify` notices.
    pub fn overwrite_raw_for_tamper_test(&self, seq: u64, stored: &[u8]) -> Result<()> {
        if self.mode == OpenMode::ReadOnly {
            return Err(JournalError::ReadOnly);
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_EVENTS)?, seq.to_be_bytes(), stored);
        Ok(self.db.write_opt(batch, &wo)?)
    }

    /// Iterates stored events from `from_seq` without decoding, for verification.
    pub(crate) fn raw_from(&self, from_seq: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        let key = from_seq.to_be_bytes();
        let iter = self.db.iterator_cf(
            self.cf(CF_EVENTS)?,
            IteratorMode::From(&key, rocksdb::Direction::Forward),
        );
        for item in iter.take(READ_EVENTS_MAX) {
            let (k, v) = item?;
            out.push((key_seq(&k)?, v.to_vec()));
        }
        Ok(out)
    }

    /// One synced write batch: the envelopes, the rows and the head after them.
    fn write_placed(
        &self,
        envelopes: &[Envelope],
        projections: Vec<ProjectionOp>,
        next: &Head,
    ) -> Result<()> {
        let mut write = WriteBatch::default();
        let events_cf = self.cf(CF_EVENTS)?;
        for envelope in envelopes {
            write.put_cf(events_cf, envelope.seq.to_be_bytes(), envelope.encode());
        }
        let projections_cf = self.cf(CF_PROJECTIONS)?;
        for op in projections {
            match op {
                ProjectionOp::Put { key, value } => write.put_cf(projections_cf, key, value),
                ProjectionOp::Delete { key } => write.delete_cf(projections_cf, key),
            }
        }
        let head_bytes = bincode::serialize(next).expect("invariant: Head always serializes");
        write.put_cf(self.cf(CF_META)?, META_HEAD, head_bytes);
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(write, &wo)?;
        Ok(())
    }

    /// A consistent copy of the whole journal (events, rows, head) in `dir`, which must not
    /// exist: hard links to the immutable files where possible. For a server that joins
    /// behind the cluster log's tail.
    pub fn checkpoint(&self, dir: &Path) -> Result<()> {
        rocksdb::checkpoint::Checkpoint::new(&self.db)?.create_checkpoint(dir)?;
        Ok(())
    }

    fn check_batch(&self, batch: &AppendBatch, head: &Head) -> Result<()> {
        if self.mode == OpenMode::ReadOnly {
            return Err(JournalError::ReadOnly);
        }
        if batch.first_seq != head.next_seq {
            return Err(JournalError::SeqConflict {
                expected: batch.first_seq,
                actual: head.next_seq,
            });
        }
        if batch.events.len() > APPEND_EVENTS_MAX {
            return Err(JournalError::BatchTooLarge {
                events: batch.events.len(),
                max: APPEND_EVENTS_MAX,
            });
        }
        batch.events.iter().try_for_each(NewEvent::check)
    }
}

fn cf<'a>(db: &'a DB, name: &'static str) -> Result<&'a ColumnFamily> {
    db.cf_handle(name)
        .ok_or(JournalError::MissingColumnFamily(name))
}

fn key_seq(key: &[u8]) -> Result<u64> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| JournalError::Meta(format!("event key of {} bytes", key.len())))?;
    Ok(u64::from_be_bytes(bytes))
}

impl EventLog for RocksJournal {
    fn head(&self) -> Head {
        *self.lock_head()
    }

    fn append(&self, batch: AppendBatch) -> Result<Vec<Envelope>> {
        let mut head = self.lock_head();
        self.check_batch(&batch, &head)?;
        let (placed, next) = place(&head, batch.events);
        self.write_placed(&placed, batch.projections, &next)?;
        *head = next;
        drop(head);
        self.appended.notify_all();
        Ok(placed)
    }

    fn append_placed(
        &self,
        envelopes: &[Envelope],
        projections: Vec<ProjectionOp>,
    ) -> Result<Head> {
        let mut head = self.lock_head();
        if self.mode == OpenMode::ReadOnly {
            return Err(JournalError::ReadOnly);
        }
        if envelopes.len() > APPEND_EVENTS_MAX {
            return Err(JournalError::BatchTooLarge {
                events: envelopes.len(),
                max: APPEND_EVENTS_MAX,
            });
        }
        let next = continues(&head, envelopes)?;
        self.write_placed(envelopes, projections, &next)?;
        *head = next;
        drop(head);
        self.appended.notify_all();
        Ok(next)
    }

    fn read(&self, from_seq: u64, max: usize) -> Result<Vec<Envelope>> {
        let max = max.min(READ_EVENTS_MAX);
        let key = from_seq.to_be_bytes();
        let iter = self.db.iterator_cf(
            self.cf(CF_EVENTS)?,
            IteratorMode::From(&key, rocksdb::Direction::Forward),
        );
        let mut out = Vec::with_capacity(max.min(1024));
        for item in iter.take(max) {
            let (k, v) = item?;
            out.push(Envelope::decode(key_seq(&k)?, &v)?);
        }
        Ok(out)
    }

    fn wait_past(&self, seq: u64, timeout: Duration) -> u64 {
        let head = self.lock_head();
        let (head, _) = self
            .appended
            .wait_timeout_while(head, timeout, |h| h.last_seq() <= seq)
            .unwrap_or_else(|p| p.into_inner());
        head.last_seq()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn event(kind: &str, payload: &[u8]) -> NewEvent {
        NewEvent {
            time_unix_ns: 1,
            actor: "t".into(),
            project: "p".into(),
            request_id: "r".into(),
            event_type: kind.into(),
            schema_version: 1,
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn append_read_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = RocksJournal::open(dir.path(), OpenMode::ReadWrite).unwrap();
            let placed = j
                .append(AppendBatch {
                    first_seq: 1,
                    events: vec![event("A", b"1"), event("B", b"2")],
                    projections: vec![ProjectionOp::Put {
                        key: b"k".to_vec(),
                        value: b"v".to_vec(),
                    }],
                })
                .unwrap();
            assert_eq!(placed.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
            assert_eq!(placed[0].prev_hash, GENESIS_HASH);
            assert_eq!(placed[1].prev_hash, hash_stored(&placed[0].encode()));
        }
        let j = RocksJournal::open(dir.path(), OpenMode::ReadOnly).unwrap();
        assert_eq!(j.head().next_seq, 3);
        let read = j.read(2, 10).unwrap();
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].event_type, "B");
        assert_eq!(j.get_projection(b"k").unwrap(), Some(b"v".to_vec()));
    }

    #[test]
    fn stale_first_seq_is_refused_and_nothing_written() {
        let dir = tempfile::tempdir().unwrap();
        let j = RocksJournal::open(dir.path(), OpenMode::ReadWrite).unwrap();
        let batch = AppendBatch {
            first_seq: 5,
            events: vec![event("A", b"")],
            projections: vec![],
        };
        assert!(matches!(
            j.append(batch),
            Err(JournalError::SeqConflict {
                expected: 5,
                actual: 1
            })
        ));
        assert_eq!(j.head().next_seq, 1);
        assert!(j.read(1, 10).unwrap().is_empty());
    }

    #[test]
    fn placed_envelopes_applied_elsewhere_give_the_same_log() {
        let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = RocksJournal::open(a_dir.path(), OpenMode::ReadWrite).unwrap();
        let b = RocksJournal::open(b_dir.path(), OpenMode::ReadWrite).unwrap();
        for round in 0..3u8 {
            let (placed, next) = place(&b.head(), vec![event("A", &[round]), event("B", b"")]);
            let head = a.append_placed(&placed, vec![]).unwrap();
            assert_eq!(head, next);
            assert_eq!(b.append_placed(&placed, vec![]).unwrap(), next);
        }
        assert_eq!(a.head(), b.head());
        assert_eq!(a.read_raw(6).unwrap(), b.read_raw(6).unwrap());
        assert!(a.verify().unwrap().is_ok());
    }

    #[test]
    fn placed_envelopes_that_do_not_continue_the_log_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let j = RocksJournal::open(dir.path(), OpenMode::ReadWrite).unwrap();
        j.append(AppendBatch {
            first_seq: 1,
            events: vec![event("A", b"")],
            projections: vec![],
        })
        .unwrap();
        // Placed against another history: right seq, wrong predecessor.
        let (forked, _) = place(&Head::EMPTY.clone_with_seq(2), vec![event("B", b"")]);
        assert!(matches!(
            j.append_placed(&forked, vec![]),
            Err(JournalError::Diverged { seq: 2, .. })
        ));
        // A gap.
        let (ahead, _) = place(&j.head().clone_with_seq(3), vec![event("C", b"")]);
        assert!(matches!(
            j.append_placed(&ahead, vec![]),
            Err(JournalError::Diverged { seq: 3, .. })
        ));
        assert_eq!(j.head().next_seq, 2);
        assert!(j.read(2, 10).unwrap().is_empty());
    }

    #[test]
    fn time_never_goes_backwards() {
        let dir = tempfile::tempdir().unwrap();
        let j = RocksJournal::open(dir.path(), OpenMode::ReadWrite).unwrap();
        let mut late = event("A", b"");
        late.time_unix_ns = 100;
        let early = event("B", b"");
        let placed = j
            .append(AppendBatch {
                first_seq: 1,
                events: vec![late, early],
                projections: vec![],
            })
            .unwrap();
        assert_eq!(placed[1].time_unix_ns, 100);
    }
}
