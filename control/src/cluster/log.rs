//! The cluster log in etcd: the order every server's journal follows.
//!
//! One group commit is one etcd value under `log/<first seq>`: the stored bytes of its
//! envelopes (seq, time and hash chain decided by the server that appended it, so every
//! copy is byte-identical). The `head` key holds the [`Head`] after the newest batch. An
//! append is ONE transaction: compare the head's mod revision with the one the appender's
//! copy was built on (and, for the leader's orchestrator, that the leader key still has the
//! appender's epoch as its create revision), then put the head and the batch. So the batch
//! and the head move together, the batch's mod revision is the head's revision after it,
//! and two servers that decided against the same head cannot both win.
//!
//! A transaction whose compare fails reads back the head, the batch key it tried, and the
//! leader key in the same round trip, which tells the three cases apart: the log moved
//! (catch up and decide again), our own earlier attempt landed (a retry after a timeout),
//! or the epoch is gone (fenced).

use evstor_journal::{Envelope, Head};

use super::etcd::{prefix_end, Compare, EtcdClient, EtcdError, Kv, Op, OpResult, Range};
use super::Keys;
use crate::error::ControlError;
use crate::limits::LOG_FETCH_BATCHES_MAX;

/// Framing version of a stored batch (its first byte).
const BATCH_FORMAT: u8 = 1;

/// A batch read back from etcd.
#[derive(Debug, Clone, PartialEq)]
pub struct LogBatch {
    pub envelopes: Vec<Envelope>,
    /// The batch key's mod revision: the head's revision once this batch was appended.
    pub revision: i64,
}

impl LogBatch {
    pub fn first_seq(&self) -> u64 {
        self.envelopes.first().map_or(0, |e| e.seq)
    }

    pub fn last_seq(&self) -> u64 {
        self.envelopes.last().map_or(0, |e| e.seq)
    }
}

/// The etcd value of a batch.
pub fn encode_batch(envelopes: &[Envelope]) -> Vec<u8> {
    let stored: Vec<Vec<u8>> = envelopes.iter().map(Envelope::encode).collect();
    let mut out = vec![BATCH_FORMAT];
    out.extend(bincode::serialize(&stored).expect("invariant: byte vectors always serialize"));
    out
}

/// A batch from its etcd key-value, every envelope's checksum and seq checked.
pub fn decode_batch(keys: &Keys, kv: &Kv) -> Result<LogBatch, ControlError> {
    let corrupt = |why: String| {
        ControlError::Internal(format!(
            "cluster log batch {}: {why}",
            String::from_utf8_lossy(&kv.key)
        ))
    };
    let first = keys
        .log_seq(&kv.key)
        .ok_or_else(|| corrupt("not a log key".into()))?;
    let (format, body) = kv
        .value
        .split_first()
        .ok_or_else(|| corrupt("empty value".into()))?;
    if *format != BATCH_FORMAT {
        return Err(corrupt(format!(
            "batch format {format} (this server reads {BATCH_FORMAT}; is it older than the \
             cluster?)"
        )));
    }
    let stored: Vec<Vec<u8>> =
        bincode::deserialize(body).map_err(|e| corrupt(format!("cannot decode: {e}")))?;
    if stored.is_empty() {
        return Err(corrupt("no envelope".into()));
    }
    let envelopes = stored
        .iter()
        .enumerate()
        .map(|(i, bytes)| Envelope::decode(first + i as u64, bytes))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(LogBatch {
        envelopes,
        revision: kv.mod_revision,
    })
}

/// What became of an append.
#[derive(Debug, Clone, PartialEq)]
pub enum Appended {
    /// In the log, at this revision.
    Done { revision: i64 },
    /// Another server appended first: catch up and decide again. Carries the batches the
    /// failed transaction read back (from the seq we tried), so the loser of a race needs no
    /// extra round trip before it tries again (without it, a server that keeps winning
    /// starves the others).
    Behind(Vec<LogBatch>),
    /// The fence epoch no longer holds the leader key.
    Fenced,
}

/// What the log holds past a local head.
#[derive(Debug, Clone, PartialEq)]
pub enum Fetched {
    /// Batches continuing at the asked seq (empty: nothing new).
    Batches(Vec<LogBatch>),
    /// The batch that continues the asked seq was trimmed from etcd: the server must be
    /// brought up to the tail from a peer's checkpoint.
    TailPassed { next_seq: u64, head_next_seq: u64 },
}

/// The head as etcd stores it: the journal's [`Head`] (bincode), with the key's revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredHead {
    pub head: Head,
    pub revision: i64,
}

fn decode_head(kv: &Kv) -> Result<StoredHead, ControlError> {
    let head = bincode::deserialize(&kv.value)
        .map_err(|e| ControlError::Internal(format!("cluster log head: cannot decode: {e}")))?;
    Ok(StoredHead {
        head,
        revision: kv.mod_revision,
    })
}

fn range_result(r: Option<&OpResult>) -> Option<&Kv> {
    match r {
        Some(OpResult::Range(r)) => r.kvs.first(),
        _ => None,
    }
}

/// This server's handle on the cluster log.
pub struct ClusterLog {
    etcd: EtcdClient,
    keys: Keys,
    /// The head revision the local copy stands on; `None` until known (catch up first).
    known_rev: Option<i64>,
}

impl ClusterLog {
    pub fn new(etcd: EtcdClient, keys: Keys) -> ClusterLog {
        ClusterLog {
            etcd,
            keys,
            known_rev: None,
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The head in etcd, `None` for an empty prefix (a cluster not yet bootstrapped).
    pub fn read_head(&self) -> Result<Option<StoredHead>, ControlError> {
        let found = self.etcd.get(&self.keys.head())?;
        found.as_ref().map(decode_head).transpose()
    }

    /// Learns where the local copy stands: if `local` is etcd's head (or both are empty),
    /// appends may start at once; otherwise they wait for a catch-up.
    pub fn sync(&mut self, local: &Head) -> Result<Option<StoredHead>, ControlError> {
        let stored = self.read_head()?;
        self.known_rev = match &stored {
            None if local.next_seq == 1 => Some(0),
            Some(s) if s.head == *local => Some(s.revision),
            _ => None,
        };
        Ok(stored)
    }

    /// The local copy now includes the batch appended at `revision`.
    pub fn note_applied(&mut self, revision: i64) {
        self.known_rev = Some(revision);
    }

    /// Appends `envelopes` (placed against the local head, ending at `after`), fenced by
    /// the leader's `epoch` when given.
    pub fn append(
        &mut self,
        envelopes: &[Envelope],
        after: &Head,
        fence: Option<u64>,
    ) -> Result<Appended, EtcdError> {
        let Some(rev) = self.known_rev else {
            return Ok(Appended::Behind(vec![]));
        };
        let first = envelopes.first().map_or(0, |e| e.seq);
        let value = encode_batch(envelopes);
        let (head_key, log_key, leader_key) =
            (self.keys.head(), self.keys.log(first), self.keys.leader());
        let mut compare = vec![Compare::ModRevision(head_key.clone(), rev)];
        if let Some(epoch) = fence {
            compare.push(Compare::CreateRevision(leader_key.clone(), epoch as i64));
        }
        let head_bytes = bincode::serialize(after).expect("invariant: Head always serializes");
        let success = [
            Op::Put {
                key: head_key.clone(),
                value: head_bytes,
                lease: 0,
            },
            Op::Put {
                key: log_key.clone(),
                value: value.clone(),
                lease: 0,
            },
        ];
        let newer = Range {
            key: log_key.clone(),
            range_end: prefix_end(&self.keys.log_prefix()),
            limit: LOG_FETCH_BATCHES_MAX,
            ..Range::default()
        };
        let failure = [
            Op::Range(Range::key(&head_key)),
            Op::Range(newer),
            Op::Range(Range::key(&leader_key)),
        ];
        let t = self.etcd.txn(&compare, &success, &failure)?;
        if t.succeeded {
            self.known_rev = Some(t.revision);
            return Ok(Appended::Done {
                revision: t.revision,
            });
        }
        let head_rev = range_result(t.responses.first()).map_or(0, |kv| kv.mod_revision);
        if head_rev != rev {
            let ours = range_result(t.responses.get(1))
                .filter(|kv| kv.key == log_key && kv.value == value);
            // A retry (inside the client, after a timeout) of a transaction that had landed.
            if let Some(kv) = ours {
                self.known_rev = Some(kv.mod_revision);
                return Ok(Appended::Done {
                    revision: kv.mod_revision,
                });
            }
            let newer = match t.responses.get(1) {
                Some(OpResult::Range(r)) => r
                    .kvs
                    .iter()
                    .map(|kv| decode_batch(&self.keys, kv))
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap_or_default(),
                _ => vec![],
            };
            return Ok(Appended::Behind(newer));
        }
        Ok(Appended::Fenced)
    }

    /// The batches after `next_seq - 1`, in order, as far as one read goes. The batches and
    /// the head are read in one transaction (one revision), so "nothing at `next_seq` but the
    /// head is past it" really means trimmed, not "appended between two reads".
    pub fn fetch(&self, next_seq: u64) -> Result<Fetched, ControlError> {
        let log_prefix = self.keys.log_prefix();
        let batches = Range {
            key: self.keys.log(next_seq),
            range_end: prefix_end(&log_prefix),
            limit: LOG_FETCH_BATCHES_MAX,
            ..Range::default()
        };
        let t = self.etcd.txn(
            &[],
            &[Op::Range(batches), Op::Range(Range::key(&self.keys.head()))],
            &[],
        )?;
        let (found, head) = match (t.responses.first(), t.responses.get(1)) {
            (Some(OpResult::Range(found)), Some(OpResult::Range(head))) => (found, head),
            _ => {
                return Err(ControlError::Internal(
                    "cluster log: etcd answered a read without its results".into(),
                ))
            }
        };
        let head = head.kvs.first().map(decode_head).transpose()?;
        let Some(first) = found.kvs.first() else {
            // Nothing at or past `next_seq`: caught up, unless the head says otherwise.
            return match head {
                Some(s) if s.head.next_seq > next_seq => Ok(Fetched::TailPassed {
                    next_seq,
                    head_next_seq: s.head.next_seq,
                }),
                Some(s) if s.head.next_seq < next_seq => Err(ControlError::Internal(format!(
                    "the cluster log ends at seq {} but this server's journal is at {}: etcd \
                     lost data, or --etcd-prefix names another cluster",
                    s.head.next_seq - 1,
                    next_seq - 1
                ))),
                _ => Ok(Fetched::Batches(vec![])),
            };
        };
        if self.keys.log_seq(&first.key) != Some(next_seq) {
            return Ok(Fetched::TailPassed {
                next_seq,
                head_next_seq: self.keys.log_seq(&first.key).unwrap_or(0),
            });
        }
        let mut out = Vec::with_capacity(found.kvs.len());
        let mut expected = next_seq;
        for kv in &found.kvs {
            let b = decode_batch(&self.keys, kv)?;
            if b.first_seq() != expected {
                return Err(ControlError::Internal(format!(
                    "cluster log: batch at seq {} follows seq {}: a gap in the log",
                    b.first_seq(),
                    expected - 1
                )));
            }
            expected = b.last_seq() + 1;
            out.push(b);
        }
        Ok(Fetched::Batches(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use evstor_journal::{place, NewEvent};

    fn events(n: usize) -> Vec<NewEvent> {
        (0..n)
            .map(|i| NewEvent {
                time_unix_ns: 5,
                actor: "a".into(),
                project: String::new(),
                request_id: format!("r{i}"),
                event_type: "E".into(),
                schema_version: 1,
                payload: vec![i as u8],
            })
            .collect()
    }

    #[test]
    fn batches_round_trip_and_damage_is_caught() {
        let keys = Keys::new("/p/");
        let head = Head {
            next_seq: 7,
            last_time_unix_ns: 0,
            last_hash: [3; 32],
        };
        let (placed, _) = place(&head, events(3));
        let kv = Kv {
            key: keys.log(7),
            value: encode_batch(&placed),
            mod_revision: 99,
            ..Kv::default()
        };
        let b = decode_batch(&keys, &kv).unwrap();
        assert_eq!((b.first_seq(), b.last_seq(), b.revision), (7, 9, 99));
        assert_eq!(b.envelopes, placed);
        let mut wrong_key = kv.clone();
        wrong_key.key = keys.log(8);
        assert!(
            decode_batch(&keys, &wrong_key).is_err(),
            "seqs must match the key"
        );
        let mut flipped = kv.clone();
        let last = flipped.value.len() - 1;
        flipped.value[last] ^= 1;
        assert!(decode_batch(&keys, &flipped).is_err());
    }
}
