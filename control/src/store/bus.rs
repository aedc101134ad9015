//! The single journal writer. Every mutation of the cluster goes through here:
//! requests queue commands on a bounded channel; one thread takes as many as are waiting
//! (up to a bound), decides each against a working copy of the state so later commands see
//! earlier ones, appends all their events and projection rows in ONE synced write batch
//! (group commit: one fsync for many requests), then applies the events to the readers' state
//! and only then answers. An answer therefore means "durable and visible".

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use evstor_journal::{AppendBatch, EventLog, ProjectionOp, RocksJournal};
use tokio::sync::{mpsc, oneshot, watch};

use super::{codec, rows};
use crate::domain::{decide, Applied, Command, Ctx, DomainError, Event, RowKey, State};
use crate::error::ControlError;
use crate::limits::{COMMAND_QUEUE_MAX, GROUP_COMMIT_COMMANDS_MAX};

/// Who asked, for the envelope.
#[derive(Debug, Clone)]
pub struct RequestMeta {
    pub actor: String,
    pub request_id: String,
}

impl RequestMeta {
    pub fn system(what: &str) -> RequestMeta {
        RequestMeta {
            actor: "system".into(),
            request_id: what.into(),
        }
    }
}

/// What a committed command produced: its events with their seqs.
#[derive(Debug, Clone, Default)]
pub struct Committed {
    pub events: Vec<(u64, Event)>,
}

struct Job {
    meta: RequestMeta,
    command: Command,
    reply: oneshot::Sender<Result<Committed, ControlError>>,
}

/// Handle to the writer and the readers' state. Cheap to clone.
#[derive(Clone)]
pub struct Bus {
    tx: mpsc::Sender<Job>,
    state: Arc<RwLock<State>>,
    journal: Arc<RocksJournal>,
    last_seq: watch::Receiver<u64>,
}

impl Bus {
    /// Loads the state from the projections and starts the writer thread.
    pub fn start(journal: Arc<RocksJournal>) -> Result<Bus, ControlError> {
        let loaded = rows::load(&journal)?;
        let state = Arc::new(RwLock::new(loaded.clone()));
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE_MAX);
        let (seq_tx, seq_rx) = watch::channel(journal.head().last_seq());
        let writer = Writer {
            journal: journal.clone(),
            working: loaded,
            readers: state.clone(),
            last_seq: seq_tx,
        };
        std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| ControlError::Internal(format!("spawn journal writer: {e}")))?;
        Ok(Bus {
            tx,
            state,
            journal,
            last_seq: seq_rx,
        })
    }

    /// Decides and durably commits one command. Returns once the events are on disk and
    /// visible to readers.
    pub async fn submit(
        &self,
        meta: RequestMeta,
        command: Command,
    ) -> Result<Committed, ControlError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job {
                meta,
                command,
                reply,
            })
            .await
            .map_err(|_| ControlError::ShuttingDown)?;
        rx.await.map_err(|_| ControlError::ShuttingDown)?
    }

    /// The readers' state: everything acknowledged so far.
    pub fn state(&self) -> RwLockReadGuard<'_, State> {
        // A panic while holding the lock can only come from `evolve` hitting corruption;
        // the state is then still the last fully applied one.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn journal(&self) -> &Arc<RocksJournal> {
        &self.journal
    }

    /// Watch of the last committed seq, for followers (reconcilers, event streams).
    pub fn last_seq(&self) -> watch::Receiver<u64> {
        self.last_seq.clone()
    }
}

struct Writer {
    journal: Arc<RocksJournal>,
    /// The state with the current batch's events applied, ahead of the readers.
    working: State,
    readers: Arc<RwLock<State>>,
    last_seq: watch::Sender<u64>,
}

type Outcome = Result<Committed, DomainError>;

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut jobs = Vec::with_capacity(GROUP_COMMIT_COMMANDS_MAX);
        while let Some(first) = rx.blocking_recv() {
            jobs.push(first);
            while jobs.len() < GROUP_COMMIT_COMMANDS_MAX {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            self.commit(&mut jobs);
        }
        tracing::info!("journal writer stopped: every request handle is gone");
    }

    fn commit(&mut self, jobs: &mut Vec<Job>) {
        let head = self.journal.head();
        let now = now_unix_ns().max(head.last_time_unix_ns);
        let mut batch = AppendBatch {
            first_seq: head.next_seq,
            ..AppendBatch::default()
        };
        let mut touched = BTreeSet::new();
        let mut applied = Vec::new();
        let outcomes: Vec<Outcome> = jobs
            .iter()
            .map(|job| self.stage(job, now, &mut batch, &mut touched, &mut applied))
            .collect();
        let result = if batch.events.is_empty() {
            Ok(())
        } else {
            batch.projections = touched
                .iter()
                .map(|k| match rows::value(&self.working, k) {
                    Some(value) => ProjectionOp::Put {
                        key: rows::key_bytes(k),
                        value,
                    },
                    None => ProjectionOp::Delete {
                        key: rows::key_bytes(k),
                    },
                })
                .collect();
            self.journal.append(batch).map(|_| ())
        };
        match result {
            Ok(()) => {
                self.publish(&applied);
                for (job, outcome) in jobs.drain(..).zip(outcomes) {
                    let _ = job.reply.send(outcome.map_err(ControlError::Domain));
                }
            }
            Err(e) => {
                tracing::error!(
                    "journal append failed, batch of {} requests refused: {e}",
                    jobs.len()
                );
                self.working = self
                    .readers
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                let msg = e.to_string();
                for (job, outcome) in jobs.drain(..).zip(outcomes) {
                    let answer = match outcome {
                        Ok(_) => Err(ControlError::Internal(format!(
                            "journal append failed: {msg}"
                        ))),
                        Err(d) => Err(ControlError::Domain(d)),
                    };
                    let _ = job.reply.send(answer);
                }
            }
        }
    }

    /// Decides one job against the working state and stages its events.
    fn stage(
        &mut self,
        job: &Job,
        now: u64,
        batch: &mut AppendBatch,
        touched: &mut BTreeSet<RowKey>,
        applied: &mut Vec<(Applied, Event)>,
    ) -> Outcome {
        let ctx = Ctx {
            now_unix_ns: now,
            actor: job.meta.actor.clone(),
            seed: *uuid::Uuid::new_v4().as_bytes(),
        };
        let events = decide(&self.working, &ctx, &job.command)?;
        let mut committed = Committed::default();
        for event in events {
            let at = Applied {
                seq: batch.first_seq + batch.events.len() as u64,
                time_unix_ns: now,
            };
            let project = event.project(&self.working).to_string();
            batch.events.push(codec::encode(
                &event,
                &project,
                &job.meta.actor,
                &job.meta.request_id,
                now,
            ));
            touched.extend(self.working.evolve(at, &event));
            committed.events.push((at.seq, event.clone()));
            applied.push((at, event));
        }
        Ok(committed)
    }

    fn publish(&self, applied: &[(Applied, Event)]) {
        let Some((last, _)) = applied.last() else {
            return;
        };
        {
            let mut readers = self.readers.write().unwrap_or_else(|p| p.into_inner());
            for (at, event) in applied {
                readers.evolve(*at, event);
            }
        }
        self.last_seq.send_replace(last.seq);
    }
}

pub(crate) fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
