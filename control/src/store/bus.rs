//! The single journal writer. Every mutation of the cluster goes through here:
//! requests queue commands on a bounded channel; one thread takes as many as are waiting
//! (up to a bound), decides each against a working copy of the state so later commands see
//! earlier ones, appends all their events and projection rows in ONE synced write batch
//! (group commit: one fsync for many requests), then applies the events to the readers' state
//! and only then answers. An answer therefore means "durable and visible".
//!
//! No input fails a batch: each command, its metadata and its framed events are checked
//! against the journal's limits before they join the batch, and a command that does not fit
//! is refused alone. A writer that can no longer trust its state (it panicked, or an append
//! failed in a way that may have left the log ahead of it) ends the process: a supervisor
//! restarts evstor and replay recovers, instead of a server that refuses every write while
//! serving a frozen state.

use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use evstor_journal::limits::{APPEND_EVENTS_MAX, FIELD_BYTES_MAX};
use evstor_journal::{AppendBatch, EventLog, JournalError, NewEvent, ProjectionOp, RocksJournal};
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
        let loaded = rows::load_or_rebuild(&journal)?;
        let state = Arc::new(RwLock::new(loaded.clone()));
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE_MAX);
        let (seq_tx, seq_rx) = watch::channel(journal.head().last_seq());
        let writer = Writer {
            journal: journal.clone(),
            working: loaded,
            readers: state.clone(),
            last_seq: seq_tx,
            failpoint: Failpoint::from_env()?,
            appends: 0,
        };
        std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || {
                // A panic anywhere in the writer (decide, evolve, the journal) leaves a working
                // copy and a readers' state nobody can vouch for.
                if std::panic::catch_unwind(AssertUnwindSafe(|| writer.run(rx))).is_err() {
                    die("the journal writer panicked");
                }
            })
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

/// Fault injection for the crash-only tests, from `EVSTOR_FAILPOINT` (read once at start;
/// unset in production): `writer-panic-after:<n>` panics the writer right after its `n`th
/// append landed (durable, not yet answered); `writer-append-error-after:<n>` makes the
/// append after the `n`th fail as an I/O error with an unknown outcome would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failpoint {
    None,
    PanicAfter(u64),
    AppendErrorAfter(u64),
}

impl Failpoint {
    fn from_env() -> Result<Failpoint, ControlError> {
        let Ok(text) = std::env::var("EVSTOR_FAILPOINT") else {
            return Ok(Failpoint::None);
        };
        let parsed = match text.split_once(':') {
            Some(("writer-panic-after", n)) => n.parse().ok().map(Failpoint::PanicAfter),
            Some(("writer-append-error-after", n)) => {
                n.parse().ok().map(Failpoint::AppendErrorAfter)
            }
            _ => None,
        };
        let fp = parsed.ok_or_else(|| {
            ControlError::Internal(format!(
                "EVSTOR_FAILPOINT={text:?} is not a known failpoint"
            ))
        })?;
        tracing::warn!("failpoint armed: {fp:?}");
        Ok(fp)
    }
}

/// Ends the process at once: what the writer holds in memory can no longer be trusted, and
/// a restart rebuilds it from the journal. `abort` rather than `exit`: no destructor or
/// atexit handler runs against a RocksDB whose writer is in an unknown state.
fn die(why: &str) -> ! {
    tracing::error!(
        "FATAL: {why}; evstor exits so that a restart recovers every acknowledged change from \
         the journal"
    );
    std::process::abort()
}

/// Whether a failed append was refused before anything was written, with the writer's idea
/// of the log still right: then only that batch fails. Anything else (a RocksDB write error,
/// whose outcome is unknown, or a seq conflict, which means the writer is not the log's only
/// writer or lost track of it) leaves the writer unable to trust its state.
fn refused_before_write(e: &JournalError) -> bool {
    matches!(
        e,
        JournalError::FieldTooLong { .. } | JournalError::BatchTooLarge { .. }
    )
}

struct Writer {
    journal: Arc<RocksJournal>,
    /// The state with the current batch's events applied, ahead of the readers.
    working: State,
    readers: Arc<RwLock<State>>,
    last_seq: watch::Sender<u64>,
    failpoint: Failpoint,
    /// Appends made since start (for the failpoint).
    appends: u64,
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
            self.append(batch)
        };
        match result {
            Ok(()) => {
                if self.failpoint == Failpoint::PanicAfter(self.appends) {
                    panic!("failpoint writer-panic-after:{}", self.appends);
                }
                self.publish(&applied);
                for (job, outcome) in jobs.drain(..).zip(outcomes) {
                    let _ = job.reply.send(outcome.map_err(ControlError::Domain));
                }
            }
            Err(e) if !refused_before_write(&e) => die(&format!(
                "journal append failed with an unknown outcome: {e}"
            )),
            Err(e) => self.fail_batch(jobs, outcomes, &e),
        }
    }

    /// The journal refused the append before writing anything: every request that would have
    /// succeeded gets the error, and the working copy returns to the readers' state.
    fn fail_batch(&mut self, jobs: &mut Vec<Job>, outcomes: Vec<Outcome>, e: &JournalError) {
        tracing::error!(
            "journal append refused, batch of {} requests failed: {e}",
            jobs.len()
        );
        self.working = self
            .readers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (job, outcome) in jobs.drain(..).zip(outcomes) {
            let answer = match outcome {
                Ok(_) => Err(ControlError::Internal(format!(
                    "journal append failed: {e}"
                ))),
                Err(d) => Err(ControlError::Domain(d)),
            };
            let _ = job.reply.send(answer);
        }
    }

    fn append(&mut self, batch: AppendBatch) -> Result<(), JournalError> {
        self.appends += 1;
        if self.failpoint == Failpoint::AppendErrorAfter(self.appends - 1) {
            return Err(JournalError::Meta(format!(
                "failpoint writer-append-error-after:{}",
                self.appends - 1
            )));
        }
        self.journal.append(batch).map(|_| ())
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
        admit_meta(&job.meta)?;
        let ctx = Ctx {
            now_unix_ns: now,
            actor: job.meta.actor.clone(),
            seed: *uuid::Uuid::new_v4().as_bytes(),
        };
        let events = decide(&self.working, &ctx, &job.command)?;
        if batch.events.len() + events.len() > APPEND_EVENTS_MAX {
            return Err(DomainError::Unavailable(format!(
                "{} events do not fit in this journal append; retry",
                events.len()
            )));
        }
        let framed = self.frame(job, &events, now)?;
        let mut committed = Committed::default();
        for (event, mut new) in events.into_iter().zip(framed) {
            let at = Applied {
                seq: batch.first_seq + batch.events.len() as u64,
                time_unix_ns: now,
            };
            // Read again now the command's earlier events are applied (an event may belong to
            // an object an earlier one created); a project name is bounded by the event that
            // recorded it, which was checked in turn.
            let project = event.project(&self.working);
            if new.project != project {
                new.project = project.to_string();
            }
            batch.events.push(new);
            touched.extend(self.working.evolve(at, &event));
            committed.events.push((at.seq, event.clone()));
            applied.push((at, event));
        }
        Ok(committed)
    }

    /// Frames every event of one command and checks it against the journal's limits before
    /// any of them touches the working copy, so a command the journal would refuse is refused
    /// alone instead of failing the append of its whole batch.
    fn frame(&self, job: &Job, events: &[Event], now: u64) -> Result<Vec<NewEvent>, DomainError> {
        events
            .iter()
            .map(|event| {
                let project = event.project(&self.working);
                let new = codec::encode(event, project, &job.meta.actor, &job.meta.request_id, now);
                new.check().map_err(|e| {
                    DomainError::InvalidArgument(format!("the journal cannot record this: {e}"))
                })?;
                Ok(new)
            })
            .collect()
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

/// The request's actor and id go into every envelope it produces; refuse them before the
/// command is decided if the journal could not record them.
fn admit_meta(meta: &RequestMeta) -> Result<(), DomainError> {
    for (what, value) in [("actor", &meta.actor), ("request id", &meta.request_id)] {
        if value.len() > FIELD_BYTES_MAX {
            return Err(DomainError::InvalidArgument(format!(
                "{what} of {} bytes is longer than the journal's {FIELD_BYTES_MAX}",
                value.len()
            )));
        }
    }
    Ok(())
}

pub(crate) fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests_support {
    use super::*;
    use crate::domain::project::Command as ProjectCommand;

    /// A writer over `journal` with an empty state, as `Bus::start` builds one.
    pub fn writer_on(journal: &Arc<RocksJournal>) -> Writer {
        let (seq_tx, _seq_rx) = watch::channel(0);
        Writer {
            journal: journal.clone(),
            working: State::default(),
            readers: Arc::default(),
            last_seq: seq_tx,
            failpoint: Failpoint::None,
            appends: 0,
        }
    }

    /// A job creating project `name`.
    pub fn project_job(name: &str) -> (Job, oneshot::Receiver<Result<Committed, ControlError>>) {
        job(name, &format!("create-{name}"))
    }

    pub fn job(
        name: &str,
        request_id: &str,
    ) -> (Job, oneshot::Receiver<Result<Committed, ControlError>>) {
        let (reply, rx) = oneshot::channel();
        let command = Command::Project(ProjectCommand::CreateProject {
            name: name.into(),
            description: String::new(),
            default_policies: vec![],
        });
        let meta = RequestMeta {
            actor: "tester".into(),
            request_id: request_id.into(),
        };
        (
            Job {
                meta,
                command,
                reply,
            },
            rx,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::*;
    use super::*;
    use evstor_journal::OpenMode;

    #[test]
    fn a_command_the_journal_cannot_record_fails_alone_not_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Arc::new(RocksJournal::open(dir.path(), OpenMode::ReadWrite).unwrap());
        let mut writer = writer_on(&journal);
        let mut jobs = Vec::new();
        let mut replies = Vec::new();
        for i in 0..100 {
            let (j, rx) = if i == 50 {
                job("bad", &"r".repeat(2048))
            } else {
                job(&format!("p{i}"), &format!("r{i}"))
            };
            jobs.push(j);
            replies.push(rx);
        }
        writer.commit(&mut jobs);
        for (i, mut rx) in replies.into_iter().enumerate() {
            let answer = rx.try_recv().expect("every job is answered");
            if i == 50 {
                assert!(
                    matches!(
                        answer,
                        Err(ControlError::Domain(DomainError::InvalidArgument(_)))
                    ),
                    "{answer:?}"
                );
            } else {
                assert!(answer.is_ok(), "job {i}: {answer:?}");
            }
        }
        assert_eq!(journal.head().last_seq(), 99);
        let readers = writer.readers.read().unwrap();
        assert_eq!(readers.projects.by_name.len(), 99);
        assert!(readers.projects.get("bad").is_none());
        assert!(journal.verify().unwrap().is_ok());
        let diff = super::super::replay::compare_projections(&journal).unwrap();
        assert!(diff.differing_keys.is_empty(), "{:?}", diff.differing_keys);
    }
}

#[cfg(test)]
mod rows_version_tests {
    use super::tests_support::*;
    use super::*;
    use crate::store::{replay, rows};
    use evstor_journal::{OpenMode, ProjectionOp};

    /// A project row as version 1 stored it (before projects recorded their creation time).
    #[derive(serde::Serialize)]
    struct ProjectV1 {
        uuid: uuid::Uuid,
        name: String,
        description: String,
        default_policies: Vec<crate::domain::project::DefaultPolicy>,
    }

    #[test]
    fn rows_of_an_older_shape_are_rebuilt_from_the_events() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Arc::new(RocksJournal::open(dir.path(), OpenMode::ReadWrite).unwrap());
        rows::load_or_rebuild(&journal).unwrap(); // as `Bus::start` does: stamps the version
        let mut writer = writer_on(&journal);
        let mut jobs: Vec<Job> = (0..5).map(|i| project_job(&format!("p{i}")).0).collect();
        writer.commit(&mut jobs);
        assert!(rows::current(&journal).unwrap());
        // Make the data directory look like one written by version 1: old project rows, no
        // version row.
        let mut ops = vec![ProjectionOp::Delete {
            key: b"meta:rows-version".to_vec(),
        }];
        for p in writer.working.projects.by_name.values() {
            let old = ProjectV1 {
                uuid: p.uuid,
                name: p.name.clone(),
                description: p.description.clone(),
                default_policies: p.default_policies.clone(),
            };
            ops.push(ProjectionOp::Put {
                key: format!("project/{}", p.name).into_bytes(),
                value: bincode::serialize(&old).unwrap(),
            });
        }
        journal.rewrite_projections(ops).unwrap();
        assert!(!rows::current(&journal).unwrap());
        assert!(
            rows::load(&journal).is_err(),
            "old rows do not decode as new ones"
        );
        assert!(replay::compare_projections(&journal).unwrap().outdated);

        let loaded = rows::load_or_rebuild(&journal).unwrap();
        let (replayed, _) = replay::replay(&journal, replay::Until::All).unwrap();
        assert_eq!(rows::all(&loaded), rows::all(&replayed));
        assert_eq!(loaded.projects.by_name.len(), 5);
        assert!(rows::current(&journal).unwrap());
        let diff = replay::compare_projections(&journal).unwrap();
        assert!(!diff.outdated && diff.differing_keys.is_empty(), "{diff:?}");
    }
}
