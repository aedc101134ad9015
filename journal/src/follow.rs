//! Tailing the log: a follower reads forward from a seq and blocks for new events.

use std::sync::Arc;
use std::time::Duration;

use crate::envelope::Envelope;
use crate::log::EventLog;
use crate::Result;

/// Reads the log forward from a position, waiting for appends when caught up.
pub struct Follower<L: EventLog + ?Sized> {
    log: Arc<L>,
    next_seq: u64,
    batch_max: usize,
}

impl<L: EventLog + ?Sized> Follower<L> {
    /// Follows from `from_seq` (inclusive), returning at most `batch_max` events per call.
    pub fn new(log: Arc<L>, from_seq: u64, batch_max: usize) -> Self {
        Follower {
            log,
            next_seq: from_seq.max(1),
            batch_max: batch_max.max(1),
        }
    }

    /// The seq the next returned event will have.
    pub fn position(&self) -> u64 {
        self.next_seq
    }

    /// The next events, waiting up to `timeout` when none are there; empty on timeout.
    pub fn next_batch(&mut self, timeout: Duration) -> Result<Vec<Envelope>> {
        if self.log.head().next_seq <= self.next_seq {
            self.log.wait_past(self.next_seq - 1, timeout);
        }
        let batch = self.log.read(self.next_seq, self.batch_max)?;
        if let Some(last) = batch.last() {
            self.next_seq = last.seq + 1;
        }
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{AppendBatch, OpenMode, RocksJournal};
    use crate::NewEvent;

    #[test]
    fn follower_sees_events_appended_later() {
        let dir = tempfile::tempdir().unwrap();
        let j = Arc::new(RocksJournal::open(dir.path(), OpenMode::ReadWrite).unwrap());
        let mut f = Follower::new(j.clone(), 1, 10);
        assert!(f.next_batch(Duration::from_millis(10)).unwrap().is_empty());
        let writer = {
            let j = j.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                j.append(AppendBatch {
                    first_seq: 1,
                    events: vec![NewEvent {
                        time_unix_ns: 0,
                        actor: "a".into(),
                        project: String::new(),
                        request_id: "r".into(),
                        event_type: "E".into(),
                        schema_version: 1,
                        payload: vec![],
                    }],
                    projections: vec![],
                })
                .unwrap();
            })
        };
        let got = f.next_batch(Duration::from_secs(5)).unwrap();
        writer.join().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(f.position(), 2);
    }
}
