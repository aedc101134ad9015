//! Each image's change log: when it last changed each chunk of [`CHANGE_CHUNK_BYTES`],
//! kept as long as [`CHANGE_LOG_KEEP_MS`] and persisted with the mappings it describes.
//!
//! Replication asks it after a failover: the copies of a volume may differ only where the
//! deposed primary's last writes (never acknowledged) reached some copies and not others,
//! and those are among the chunks each copy changed shortly before it learned of the new
//! primary. The new primary copies just those (and what it changed since) instead of the
//! whole volume.
//!
//! A chunk's row is written in the same metadata batch as the mapping of the write that
//! changed it (or, for a trim, in a batch before it), so after a crash every change whose
//! mapping survived has its row. Rows are rewritten at most every
//! [`CHANGE_LOG_REFRESH_MS`] per chunk: a chunk's recorded time may be that much earlier
//! than its last change, never later.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::blockstore::tree::HashMap;
use crate::limits::{BLOCK_BYTES, CHANGE_CHUNK_BYTES, CHANGE_LOG_KEEP_MS, CHANGE_LOG_REFRESH_MS};

/// Milliseconds since the Unix epoch (the log outlives the process).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One image's log, in memory (its rows hold the same).
#[derive(Debug, Default)]
pub struct ChangeLog {
    /// Chunk → when it was last recorded changed (Unix ms). Every host write looks it up:
    /// the tree's fast hasher, not SipHash.
    chunks: HashMap<u64, u64>,
    /// The newest change (Unix ms; 0: none recorded).
    last_ms: u64,
    /// When entries older than [`CHANGE_LOG_KEEP_MS`] were last dropped from memory.
    pruned_ms: u64,
    /// Entries older than this were dropped: a question reaching further back has no
    /// answer.
    forgot_before: u64,
    /// Its rows could not be read: what changed is unknown.
    lost: bool,
}

impl ChangeLog {
    /// A log holding `rows` (chunk, Unix ms) as read back from the metadata, rows older
    /// than `forgot_before` having been dropped.
    pub fn from_rows(rows: impl IntoIterator<Item = (u64, u64)>, forgot_before: u64) -> ChangeLog {
        let chunks: HashMap<u64, u64> = rows.into_iter().collect();
        let last_ms = chunks.values().copied().max().unwrap_or(0);
        ChangeLog {
            chunks,
            last_ms,
            pruned_ms: 0,
            forgot_before,
            lost: false,
        }
    }

    /// A log whose rows could not be read: it answers no question.
    pub fn lost() -> ChangeLog {
        ChangeLog {
            lost: true,
            ..ChangeLog::default()
        }
    }

    /// Records that blocks `[first, first + n)` changed at `now`; `persist(chunk, ms)` is
    /// called for each chunk whose row must be (re)written.
    pub fn record(&mut self, first: u64, n: u64, now: u64, mut persist: impl FnMut(u64, u64)) {
        if n == 0 {
            return;
        }
        let per_chunk = CHANGE_CHUNK_BYTES / BLOCK_BYTES;
        let (from, to) = (first / per_chunk, (first + n - 1) / per_chunk);
        for c in from..=to {
            let at = self.chunks.entry(c).or_insert(0);
            if now.saturating_sub(*at) >= CHANGE_LOG_REFRESH_MS || *at > now {
                *at = now;
                persist(c, now);
            }
        }
        self.last_ms = self.last_ms.max(now);
        if now.saturating_sub(self.pruned_ms) >= CHANGE_LOG_KEEP_MS {
            self.pruned_ms = now;
            let keep_from = now.saturating_sub(CHANGE_LOG_KEEP_MS);
            self.chunks.retain(|_, at| *at >= keep_from);
            self.forgot_before = self.forgot_before.max(keep_from);
        }
    }

    /// The newest recorded change (Unix ms; 0 when none is); None if the log was lost.
    pub fn last_ms(&self) -> Option<u64> {
        (!self.lost).then_some(self.last_ms)
    }

    /// Chunks recorded changed at or after `since_ms`, in order; None if the log was lost
    /// or no longer reaches that far back.
    pub fn since(&self, since_ms: u64) -> Option<Vec<u64>> {
        if self.lost || since_ms < self.forgot_before {
            return None;
        }
        let mut v: Vec<u64> = self
            .chunks
            .iter()
            .filter(|(_, at)| **at >= since_ms)
            .map(|(c, _)| *c)
            .collect();
        v.sort_unstable();
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PER_CHUNK: u64 = CHANGE_CHUNK_BYTES / BLOCK_BYTES;

    #[test]
    fn a_change_is_recorded_for_every_chunk_it_touches_and_rows_are_refreshed_sparingly() {
        let mut log = ChangeLog::default();
        let mut rows = Vec::new();
        log.record(PER_CHUNK - 1, 2, 10_000, |c, ms| rows.push((c, ms)));
        assert_eq!(rows, vec![(0, 10_000), (1, 10_000)]);
        rows.clear();
        log.record(0, 1, 10_000 + CHANGE_LOG_REFRESH_MS - 1, |c, ms| {
            rows.push((c, ms))
        });
        assert!(rows.is_empty(), "recorded moments ago: no new row");
        assert_eq!(log.last_ms(), Some(10_000 + CHANGE_LOG_REFRESH_MS - 1));
        log.record(0, 1, 10_000 + CHANGE_LOG_REFRESH_MS, |c, ms| {
            rows.push((c, ms))
        });
        assert_eq!(rows, vec![(0, 10_000 + CHANGE_LOG_REFRESH_MS)]);
        assert_eq!(log.since(10_001), Some(vec![0]));
        assert_eq!(log.since(0), Some(vec![0, 1]));
        assert_eq!(
            ChangeLog::lost().since(0),
            None,
            "a lost log answers nothing"
        );
    }

    #[test]
    fn entries_older_than_the_keep_time_leave_memory_and_rows_read_back_whole() {
        let mut log = ChangeLog::default();
        log.record(0, 1, 1_000, |_, _| {});
        log.record(5 * PER_CHUNK, 1, 1_000 + CHANGE_LOG_KEEP_MS + 1, |_, _| {});
        assert_eq!(
            log.since(0),
            None,
            "chunk 0 was forgotten: no answer that far back"
        );
        assert_eq!(log.since(1_000 + 1), Some(vec![5]));
        let back = ChangeLog::from_rows([(3, 50), (9, 70)], 40);
        assert_eq!((back.last_ms(), back.since(60)), (Some(70), Some(vec![9])));
        assert_eq!(back.since(39), None);
    }
}
