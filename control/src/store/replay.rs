//! Replay: rebuild the state from the events alone, whole or up to a point, and compare it
//! with the stored projections.

use evstor_journal::{Envelope, EventLog, RocksJournal};

use super::{codec, rows};
use crate::domain::{Applied, State};
use crate::error::ControlError;

/// How far to replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    All,
    /// Up to and including this seq.
    Seq(u64),
    /// Up to and including the last event at or before this time.
    TimeUnixNs(u64),
}

impl Until {
    fn includes(&self, env: &Envelope) -> bool {
        match *self {
            Until::All => true,
            Until::Seq(s) => env.seq <= s,
            Until::TimeUnixNs(t) => env.time_unix_ns <= t,
        }
    }
}

/// Events read per chunk.
const REPLAY_CHUNK: usize = 8192;

/// Folds the journal into a fresh state. Returns the state and the last seq applied.
pub fn replay(journal: &RocksJournal, until: Until) -> Result<(State, u64), ControlError> {
    let mut state = State::default();
    let mut next = 1;
    let mut last = 0;
    loop {
        let chunk = journal.read(next, REPLAY_CHUNK)?;
        if chunk.is_empty() {
            break;
        }
        for env in &chunk {
            if !until.includes(env) {
                return Ok((state, last));
            }
            let event = codec::decode(env)?;
            state.evolve(
                Applied {
                    seq: env.seq,
                    time_unix_ns: env.time_unix_ns,
                },
                &event,
            );
            last = env.seq;
        }
        next = last + 1;
    }
    Ok((state, last))
}

/// Rows where the stored projections and a full replay disagree.
#[derive(Debug, Default)]
pub struct ProjectionDiff {
    pub differing_keys: Vec<String>,
    /// The rows are in an older shape (rebuilt from the events at the next start), so
    /// they were not compared.
    pub outdated: bool,
}

/// Replays everything and compares, row by row, with the stored projections.
pub fn compare_projections(journal: &RocksJournal) -> Result<ProjectionDiff, ControlError> {
    if !rows::current(journal)? {
        return Ok(ProjectionDiff {
            outdated: true,
            ..ProjectionDiff::default()
        });
    }
    let (replayed, _) = replay(journal, Until::All)?;
    let stored = rows::load(journal)?;
    let a = rows::all(&replayed);
    let b = rows::all(&stored);
    let mut diff = ProjectionDiff::default();
    for k in a.keys().chain(b.keys()) {
        if a.get(k) != b.get(k) {
            let k = String::from_utf8_lossy(k).into_owned();
            if !diff.differing_keys.contains(&k) {
                diff.differing_keys.push(k);
            }
        }
    }
    Ok(diff)
}
