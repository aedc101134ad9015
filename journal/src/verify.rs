//! Proving the log intact: every checksum, no gaps, an unbroken hash chain, and a head that
//! matches the last event.

use crate::envelope::{hash_stored, Envelope, GENESIS_HASH};
use crate::log::{EventLog, RocksJournal};
use crate::{JournalError, Result};

/// Most problems one report lists; past the first few the rest is noise.
const PROBLEMS_MAX: usize = 100;

/// One thing wrong with the stored log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyProblem {
    /// The seq where the problem shows.
    pub seq: u64,
    pub what: String,
}

/// The outcome of [`RocksJournal::verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub events_checked: u64,
    pub problems: Vec<VerifyProblem>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    fn problem(&mut self, seq: u64, what: String) {
        if self.problems.len() < PROBLEMS_MAX {
            self.problems.push(VerifyProblem { seq, what });
        }
    }
}

impl RocksJournal {
    /// Walks the whole log. Storage errors are returned; corruption is reported.
    pub fn verify(&self) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let mut expected_seq = 1u64;
        let mut prev_hash = GENESIS_HASH;
        loop {
            let chunk = self.raw_from(expected_seq)?;
            if chunk.is_empty() {
                break;
            }
            for (seq, stored) in chunk {
                if seq != expected_seq {
                    report.problem(expected_seq, format!("gap: next stored event is {seq}"));
                }
                match Envelope::decode(seq, &stored) {
                    // The link this event recorded no longer matches its predecessor's bytes:
                    // the predecessor was rewritten (with a valid checksum), so blame it.
                    Ok(env) if env.prev_hash != prev_hash => {
                        let blamed = seq.saturating_sub(1).max(1);
                        report.problem(
                            blamed,
                            format!(
                                "hash chain broken: event {blamed} was rewritten \
                                 (event {seq} recorded a different hash for it)"
                            ),
                        )
                    }
                    Ok(_) => {}
                    Err(JournalError::Checksum { .. }) => {
                        report.problem(seq, "checksum mismatch: stored bytes changed".into())
                    }
                    Err(e) => report.problem(seq, e.to_string()),
                }
                prev_hash = hash_stored(&stored);
                expected_seq = seq + 1;
                report.events_checked += 1;
            }
        }
        let head = self.head();
        if head.next_seq != expected_seq {
            report.problem(
                head.next_seq,
                format!(
                    "head says next seq {} but the log ends at {}",
                    head.next_seq,
                    expected_seq - 1
                ),
            );
        } else if head.last_hash != prev_hash {
            report.problem(
                head.last_seq(),
                "head hash differs from the last event: last event was changed".into(),
            );
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{AppendBatch, OpenMode};
    use crate::NewEvent;

    fn journal_with(n: u64) -> (tempfile::TempDir, RocksJournal) {
        let dir = tempfile::tempdir().unwrap();
        let j = RocksJournal::open(dir.path(), OpenMode::ReadWrite).unwrap();
        for seq in 1..=n {
            j.append(AppendBatch {
                first_seq: seq,
                events: vec![NewEvent {
                    time_unix_ns: seq,
                    actor: "a".into(),
                    project: "p".into(),
                    request_id: format!("r{seq}"),
                    event_type: "E".into(),
                    schema_version: 1,
                    payload: seq.to_le_bytes().to_vec(),
                }],
                projections: vec![],
            })
            .unwrap();
        }
        (dir, j)
    }

    #[test]
    fn clean_log_verifies() {
        let (_d, j) = journal_with(20);
        let report = j.verify().unwrap();
        assert!(report.is_ok(), "{report:?}");
        assert_eq!(report.events_checked, 20);
    }

    #[test]
    fn flipped_byte_is_reported_at_its_seq() {
        let (_d, j) = journal_with(10);
        let mut raw = j.read_raw(4).unwrap().unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        j.overwrite_raw_for_tamper_test(4, &raw).unwrap();
        let report = j.verify().unwrap();
        assert_eq!(report.problems[0].seq, 4, "{report:?}");
    }

    #[test]
    fn rewritten_event_with_valid_checksum_breaks_the_chain() {
        let (_d, j) = journal_with(10);
        let mut env = j.read(6, 1).unwrap().remove(0);
        env.actor = "mallory".into();
        j.overwrite_raw_for_tamper_test(6, &env.encode()).unwrap();
        let report = j.verify().unwrap();
        assert_eq!(report.problems[0].seq, 6, "{report:?}");
    }

    #[test]
    fn rewritten_last_event_is_caught_by_the_head() {
        let (_d, j) = journal_with(3);
        let mut env = j.read(3, 1).unwrap().remove(0);
        env.payload = vec![9];
        j.overwrite_raw_for_tamper_test(3, &env.encode()).unwrap();
        let report = j.verify().unwrap();
        assert_eq!(report.problems[0].seq, 3, "{report:?}");
    }
}
