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
//!
//! In cluster mode (`Bus::start_cluster`) the same writer orders its batches through the
//! etcd cluster log ([`crate::cluster::log`]): it decides a batch against its working copy,
//! places the envelopes after the local head, and appends them to etcd with one compare-and-
//! swap on the log's head. If another server appended first, it applies the new batches
//! (catch-up) and decides the same commands again against the new state; on success it
//! writes the batch locally exactly as followers do. Batches other servers append reach it
//! from the follower ([`crate::cluster::follow`]) and through the same apply path, so this
//! thread stays the only writer of the local journal. A batch is bounded in bytes
//! ([`LOG_BATCH_BYTES_MAX`]) so one group commit fits in one etcd value. When etcd cannot
//! order a batch in time (no quorum) its requests are answered 503 and nothing is applied.

use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use evstor_journal::limits::{APPEND_EVENTS_MAX, FIELD_BYTES_MAX};
use evstor_journal::{
    place, AppendBatch, Envelope, EventLog, Head, JournalError, NewEvent, ProjectionOp,
    RocksJournal,
};
use tokio::sync::{mpsc, oneshot, watch};

use super::{codec, rows};
use crate::cluster::log::{Appended, ClusterLog, Fetched, LogBatch};
use crate::domain::{decide, Applied, Command, Ctx, DomainError, Event, RowKey, State};
use crate::error::ControlError;
use crate::limits::{
    COMMAND_QUEUE_MAX, GROUP_COMMIT_COMMANDS_MAX, LOG_APPEND_RACE_MS, LOG_BATCH_BYTES_MAX,
    LOG_POLL_MS,
};
use crate::metrics::Metrics;

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
    /// The leader epoch an orchestrator command is fenced by (cluster mode).
    fence: Option<u64>,
}

/// What the writer thread is asked to do.
enum Msg {
    /// Boxed: a job is large and the other messages are small.
    Job(Box<Job>),
    /// Batches other servers appended to the cluster log (from the follower).
    Remote(Vec<LogBatch>),
    /// The log may have moved: look (the follower lost its watch).
    Poke,
    /// The server stops: commit what came before, then end ([`Bus::stop`]).
    Stop,
}

/// The follower's way into the writer: new batches of the cluster log.
#[derive(Clone)]
pub struct RemoteFeed {
    tx: mpsc::Sender<Msg>,
}

impl RemoteFeed {
    /// Hands batches to the writer (blocking while its queue is full). False once the
    /// writer is gone.
    pub fn send(&self, batches: Vec<LogBatch>) -> bool {
        self.tx.blocking_send(Msg::Remote(batches)).is_ok()
    }

    /// Asks the writer to look for new batches itself.
    pub fn poke(&self) -> bool {
        self.tx.blocking_send(Msg::Poke).is_ok()
    }
}

/// Handle to the writer and the readers' state. Cheap to clone.
#[derive(Clone)]
pub struct Bus {
    tx: mpsc::Sender<Msg>,
    state: Arc<RwLock<State>>,
    journal: Arc<RocksJournal>,
    last_seq: watch::Receiver<u64>,
    metrics: Arc<Metrics>,
    /// The writer thread, until [`Bus::stop`] joins it.
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl Bus {
    /// Loads the state from the projections and starts the writer thread (one server: the
    /// local journal orders appends itself).
    pub fn start(journal: Arc<RocksJournal>) -> Result<Bus, ControlError> {
        Bus::start_with(journal, None)
    }

    /// As [`Bus::start`], ordering appends through the cluster log. The writer first applies
    /// what the log holds past the local head.
    pub fn start_cluster(journal: Arc<RocksJournal>, log: ClusterLog) -> Result<Bus, ControlError> {
        Bus::start_with(journal, Some(log))
    }

    fn start_with(
        journal: Arc<RocksJournal>,
        cluster: Option<ClusterLog>,
    ) -> Result<Bus, ControlError> {
        let loaded = rows::load_or_rebuild(&journal)?;
        let state = Arc::new(RwLock::new(loaded.clone()));
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE_MAX);
        let (seq_tx, seq_rx) = watch::channel(journal.head().last_seq());
        let metrics = Arc::new(Metrics::default());
        let writer = Writer {
            metrics: metrics.clone(),
            journal: journal.clone(),
            working: loaded,
            readers: state.clone(),
            last_seq: seq_tx,
            failpoint: Failpoint::from_env()?,
            appends: 0,
            cluster,
        };
        let writer = std::thread::Builder::new()
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
            metrics,
            writer: Arc::new(Mutex::new(Some(writer))),
        })
    }

    /// Stops the writer once the requests queued before this call are committed, and
    /// waits for it to end: nobody writes the journal any more, so the process can exit
    /// without its RocksDB being written while it closes. Later requests fail as
    /// [`ControlError::ShuttingDown`].
    pub async fn stop(&self) {
        let _ = self.tx.send(Msg::Stop).await;
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = writer {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }

    /// Decides and durably commits one command. Returns once the events are on disk and
    /// visible to readers.
    pub async fn submit(
        &self,
        meta: RequestMeta,
        command: Command,
    ) -> Result<Committed, ControlError> {
        self.send(meta, command, None).await
    }

    /// As [`Bus::submit`] for the leader's orchestrator: the append also requires that the
    /// leader key still carries `epoch` (refused with [`ControlError::Fenced`] otherwise).
    pub async fn submit_fenced(
        &self,
        meta: RequestMeta,
        command: Command,
        epoch: u64,
    ) -> Result<Committed, ControlError> {
        self.send(meta, command, Some(epoch)).await
    }

    async fn send(
        &self,
        meta: RequestMeta,
        command: Command,
        fence: Option<u64>,
    ) -> Result<Committed, ControlError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Job(Box::new(Job {
                meta,
                command,
                reply,
                fence,
            })))
            .await
            .map_err(|_| ControlError::ShuttingDown)?;
        rx.await.map_err(|_| ControlError::ShuttingDown)?
    }

    /// The feed the cluster follower hands new log batches through.
    pub fn remote_feed(&self) -> RemoteFeed {
        RemoteFeed {
            tx: self.tx.clone(),
        }
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

    /// The server's event metrics (`/metrics`).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Watch of the last committed seq, for followers (reconcilers, event streams).
    pub fn last_seq(&self) -> watch::Receiver<u64> {
        self.last_seq.clone()
    }
}

/// Fault injection for the crash-only tests, from `EVSTOR_FAILPOINT` (read once at start;
/// unset in production): `writer-panic-after:<n>` panics the writer right after its `n`th
/// append landed (durable, not yet answered); `writer-append-error-after:<n>` makes the
/// append after the `n`th fail as an I/O error with an unknown outcome would
/// (`orchestrator-ignore-lease` belongs to the cluster orchestrator).
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
            // The cluster orchestrator's failpoint (see `cluster::member`) and the
            // reconciler's (`reconcile::rebuilt_record_delay`); none for the writer.
            None if text == "orchestrator-ignore-lease" => return Ok(Failpoint::None),
            Some(("rebuilt-record-delay-ms", _)) => return Ok(Failpoint::None),
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
    /// Append latency and group sizes.
    metrics: Arc<Metrics>,
    /// The state with the current batch's events applied, ahead of the readers.
    working: State,
    readers: Arc<RwLock<State>>,
    last_seq: watch::Sender<u64>,
    failpoint: Failpoint,
    /// Appends made since start (for the failpoint).
    appends: u64,
    /// Cluster mode: where the order of appends is decided.
    cluster: Option<ClusterLog>,
}

type Outcome = Result<Committed, DomainError>;

/// A batch decided against the working copy, not yet appended.
#[derive(Default)]
struct Staged {
    batch: AppendBatch,
    touched: BTreeSet<RowKey>,
    applied: Vec<(Applied, Event)>,
    outcomes: Vec<Outcome>,
    /// Bytes of the framed events (cluster mode bounds it).
    bytes: usize,
}

/// Whether a staged job made it into the batch.
enum Staging {
    Done(Outcome),
    /// The batch is full: the job goes into the next one.
    Deferred,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let poll = self
            .cluster
            .is_some()
            .then(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
            })
            .transpose();
        let poll = match poll {
            Ok(p) => p,
            Err(e) => die(&format!("the journal writer cannot build its timer: {e}")),
        };
        if self.cluster.is_some() {
            self.catch_up_logged();
        }
        let mut jobs = Vec::with_capacity(GROUP_COMMIT_COMMANDS_MAX);
        loop {
            let msg = match &poll {
                None => rx.blocking_recv(),
                Some(rt) => {
                    let wait = Duration::from_millis(LOG_POLL_MS);
                    // The timer must be made inside the runtime it runs on.
                    match rt.block_on(async { tokio::time::timeout(wait, rx.recv()).await }) {
                        Ok(m) => m,
                        Err(_) => {
                            self.catch_up_logged();
                            continue;
                        }
                    }
                }
            };
            match msg {
                None => {
                    tracing::info!("journal writer stopped: every request handle is gone");
                    return;
                }
                Some(Msg::Stop) => break,
                Some(Msg::Remote(batches)) => self.apply_remote(batches),
                Some(Msg::Poke) => self.catch_up_logged(),
                Some(Msg::Job(first)) => {
                    jobs.push(*first);
                    let mut stop = false;
                    while jobs.len() < GROUP_COMMIT_COMMANDS_MAX {
                        match rx.try_recv() {
                            Ok(Msg::Job(job)) => jobs.push(*job),
                            // Apply before deciding: the batch then builds on it.
                            Ok(Msg::Remote(batches)) => self.apply_remote(batches),
                            Ok(Msg::Poke) => {}
                            Ok(Msg::Stop) => {
                                stop = true;
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.commit(&mut jobs);
                    if stop {
                        break;
                    }
                }
            }
        }
        tracing::info!("journal writer stopped: the server stops");
    }

    fn commit(&mut self, jobs: &mut Vec<Job>) {
        if self.cluster.is_some() {
            // Jobs fenced by an epoch go alone: a failed fence must not fail anyone else.
            while !jobs.is_empty() {
                let fence = jobs[0].fence;
                let n = jobs.iter().take_while(|j| j.fence == fence).count();
                let group: Vec<Job> = jobs.drain(..n).collect();
                self.commit_cluster(group, fence);
            }
            return;
        }
        let head = self.journal.head();
        let now = now_unix_ns().max(head.last_time_unix_ns);
        let staged = self.stage_all(jobs, head.next_seq, now, usize::MAX);
        let Staged {
            mut batch,
            touched,
            applied,
            outcomes,
            ..
        } = staged;
        let result = if batch.events.is_empty() {
            Ok(())
        } else {
            batch.projections = self.row_ops(&touched);
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

    /// Stages jobs in order until one does not fit in `bytes_max` (it and the rest are
    /// left for the next batch); returns what was staged, one outcome per staged job.
    fn stage_all(&mut self, jobs: &[Job], first_seq: u64, now: u64, bytes_max: usize) -> Staged {
        let mut staged = Staged {
            batch: AppendBatch {
                first_seq,
                ..AppendBatch::default()
            },
            ..Staged::default()
        };
        for job in jobs {
            match self.stage(job, now, &mut staged, bytes_max) {
                Staging::Done(outcome) => staged.outcomes.push(outcome),
                Staging::Deferred => break,
            }
        }
        staged
    }

    fn row_ops(&self, touched: &BTreeSet<RowKey>) -> Vec<ProjectionOp> {
        touched
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
            .collect()
    }

    /// The working copy goes back to what readers see (a batch that did not land).
    fn reset_working(&mut self) {
        self.working = self
            .readers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
    }

    /// The journal refused the append before writing anything: every request that would have
    /// succeeded gets the error, and the working copy returns to the readers' state.
    fn fail_batch(&mut self, jobs: &mut Vec<Job>, outcomes: Vec<Outcome>, e: &JournalError) {
        tracing::error!(
            "journal append refused, batch of {} requests failed: {e}",
            jobs.len()
        );
        self.reset_working();
        answer_failed(jobs.drain(..).zip(outcomes), || {
            ControlError::Internal(format!("journal append failed: {e}"))
        });
    }

    fn append(&mut self, batch: AppendBatch) -> Result<(), JournalError> {
        self.appends += 1;
        if self.failpoint == Failpoint::AppendErrorAfter(self.appends - 1) {
            return Err(JournalError::Meta(format!(
                "failpoint writer-append-error-after:{}",
                self.appends - 1
            )));
        }
        let (events, started) = (batch.events.len(), Instant::now());
        let appended = self.journal.append(batch).map(|_| ());
        match &appended {
            Ok(()) => self
                .metrics
                .journal_appended(events, started.elapsed().as_secs_f64()),
            Err(_) => self.metrics.journal_append_failed(),
        }
        appended
    }

    /// Decides one job against the working state and stages its events.
    fn stage(&mut self, job: &Job, now: u64, staged: &mut Staged, bytes_max: usize) -> Staging {
        if let Err(e) = admit_meta(&job.meta) {
            return Staging::Done(Err(e));
        }
        let ctx = Ctx {
            now_unix_ns: now,
            actor: job.meta.actor.clone(),
            seed: *uuid::Uuid::new_v4().as_bytes(),
        };
        let events = match decide(&self.working, &ctx, &job.command) {
            Ok(e) => e,
            Err(e) => return Staging::Done(Err(e)),
        };
        let batch = &mut staged.batch;
        if batch.events.len() + events.len() > APPEND_EVENTS_MAX {
            if batch.events.is_empty() {
                return Staging::Done(Err(DomainError::InvalidArgument(format!(
                    "{} events are more than one journal append holds",
                    events.len()
                ))));
            }
            return Staging::Deferred;
        }
        let framed = match self.frame(job, &events, now) {
            Ok(f) => f,
            Err(e) => return Staging::Done(Err(e)),
        };
        let bytes: usize = framed.iter().map(framed_bytes).sum();
        if staged.bytes + bytes > bytes_max {
            if batch.events.is_empty() {
                return Staging::Done(Err(DomainError::InvalidArgument(format!(
                    "this change takes {bytes} bytes in the journal, more than one cluster log \
                     batch holds ({bytes_max})"
                ))));
            }
            return Staging::Deferred;
        }
        staged.bytes += bytes;
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
            staged.touched.extend(self.working.evolve(at, &event));
            committed.events.push((at.seq, event.clone()));
            staged.applied.push((at, event));
        }
        Staging::Done(Ok(committed))
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

/// About what a framed event takes in the log (its stored envelope).
fn framed_bytes(e: &NewEvent) -> usize {
    // seq, time, schema, hash, length prefixes and the checksum: under 100 bytes.
    100 + e.actor.len()
        + e.project.len()
        + e.request_id.len()
        + e.event_type.len()
        + e.payload.len()
}

/// Answers jobs whose batch did not land: a job its command refused keeps that answer, the
/// others get `error()`.
fn answer_failed(jobs: impl Iterator<Item = (Job, Outcome)>, error: impl Fn() -> ControlError) {
    for (job, outcome) in jobs {
        let answer = match outcome {
            Ok(_) => Err(error()),
            Err(d) => Err(ControlError::Domain(d)),
        };
        let _ = job.reply.send(answer);
    }
}

/// Cluster mode: ordering batches through the etcd log and applying everyone's batches.
impl Writer {
    fn log(&mut self) -> &mut ClusterLog {
        self.cluster
            .as_mut()
            .expect("invariant: cluster paths run only with a cluster log")
    }

    /// Commits `jobs` (all with the same fence) through the cluster log, as many batches as
    /// they need; every job is answered.
    fn commit_cluster(&mut self, mut jobs: Vec<Job>, fence: Option<u64>) {
        let race_deadline = Instant::now() + Duration::from_millis(LOG_APPEND_RACE_MS);
        while !jobs.is_empty() {
            let head = self.journal.head();
            let now = now_unix_ns().max(head.last_time_unix_ns);
            let staged = self.stage_all(&jobs, head.next_seq, now, LOG_BATCH_BYTES_MAX);
            let taken = staged.outcomes.len();
            if staged.batch.events.is_empty() {
                answer(jobs.drain(..taken), staged.outcomes);
                continue;
            }
            let projections = self.row_ops(&staged.touched);
            let (placed, after) = place(&head, staged.batch.events);
            let started = Instant::now();
            let appended = self.log().append(&placed, &after, fence);
            match &appended {
                Ok(Appended::Done { .. }) => self
                    .metrics
                    .journal_appended(placed.len(), started.elapsed().as_secs_f64()),
                Ok(Appended::Fenced) | Err(_) => self.metrics.journal_append_failed(),
                // Lost a race: decided again and retried, nobody was failed.
                Ok(Appended::Behind(_)) => {}
            }
            match appended {
                Ok(Appended::Done { .. }) => {
                    self.land(&placed, projections, &staged.applied);
                    answer(jobs.drain(..taken), staged.outcomes);
                }
                Ok(Appended::Behind(newer)) if Instant::now() < race_deadline => {
                    self.reset_working();
                    if let Err(e) = self.after_lost_race(&newer) {
                        fail_all(&mut jobs, vec![], || {
                            ControlError::ClusterUnavailable(e.to_string())
                        });
                    }
                }
                Ok(Appended::Behind(_)) => {
                    self.reset_working();
                    fail_all(&mut jobs, vec![], || {
                        ControlError::ClusterUnavailable(
                            "other servers kept appending first; retry".into(),
                        )
                    });
                }
                Ok(Appended::Fenced) => {
                    self.reset_working();
                    let epoch = fence.unwrap_or(0);
                    tracing::warn!(
                        "orchestrator append refused by etcd: epoch {epoch} no longer holds the \
                         leader key (fenced)"
                    );
                    let fenced: Vec<Job> = jobs.drain(..taken).collect();
                    answer_failed(fenced.into_iter().zip(staged.outcomes), || {
                        ControlError::Fenced(format!(
                            "epoch {epoch} no longer holds the leader key"
                        ))
                    });
                }
                Err(e) => {
                    // Not acknowledged; it may still land, and then arrives like anyone's.
                    self.reset_working();
                    tracing::warn!("cluster log append failed: {e}");
                    fail_all(&mut jobs, staged.outcomes, || {
                        ControlError::ClusterUnavailable(e.to_string())
                    });
                }
            }
        }
    }

    /// Another server appended first: apply what the failed transaction read back, or read
    /// the log when that was not all.
    fn after_lost_race(&mut self, newer: &[LogBatch]) -> Result<(), ControlError> {
        let applied = newer.iter().all(|b| self.apply_batch(b));
        if newer.is_empty() || !applied {
            self.catch_up()?;
        }
        Ok(())
    }

    /// Writes a batch the cluster log holds into the local journal and shows it to readers.
    /// The log has it: a local failure leaves this copy behind, and only a restart (which
    /// catches up) repairs that.
    fn land(
        &mut self,
        placed: &[Envelope],
        projections: Vec<ProjectionOp>,
        applied: &[(Applied, Event)],
    ) {
        if let Err(e) = self.journal.append_placed(placed, projections) {
            die(&format!(
                "the journal cannot take a batch the cluster log holds (seq {}): {e}",
                placed.first().map_or(0, |e| e.seq)
            ));
        }
        self.publish(applied);
    }

    /// Applies a batch another server appended (or ours, echoed): events decoded, rows
    /// computed by `evolve`, the chain checked against the local head. False when it does
    /// not follow the local head (a gap: fetch).
    fn apply_batch(&mut self, batch: &LogBatch) -> bool {
        let head: Head = self.journal.head();
        if batch.last_seq() < head.next_seq {
            return true; // already here (our own append, or a repeat)
        }
        if batch.first_seq() != head.next_seq {
            return false;
        }
        let mut touched = BTreeSet::new();
        let mut applied = Vec::with_capacity(batch.envelopes.len());
        for env in &batch.envelopes {
            let event = match codec::decode(env) {
                Ok(e) => e,
                Err(e) => die(&format!(
                    "cannot apply cluster log event {}: {e} (is this server older than the \
                     cluster?)",
                    env.seq
                )),
            };
            let at = Applied {
                seq: env.seq,
                time_unix_ns: env.time_unix_ns,
            };
            touched.extend(self.working.evolve(at, &event));
            applied.push((at, event));
        }
        let projections = self.row_ops(&touched);
        if let Err(e) = self.journal.append_placed(&batch.envelopes, projections) {
            die(&format!(
                "corruption: the cluster log's batch at seq {} does not continue this \
                 server's journal: {e}",
                batch.first_seq()
            ));
        }
        self.publish(&applied);
        self.log().note_applied(batch.revision);
        true
    }

    /// Applies batches from the follower; a gap is filled by reading the log.
    fn apply_remote(&mut self, batches: Vec<LogBatch>) {
        for b in &batches {
            if !self.apply_batch(b) {
                self.catch_up_logged();
                return;
            }
        }
    }

    /// Applies everything the log holds past the local head.
    fn catch_up(&mut self) -> Result<(), ControlError> {
        loop {
            let next = self.journal.head().next_seq;
            let fetched = self.log().fetch(next)?;
            let batches = match fetched {
                Fetched::Batches(b) => b,
                Fetched::TailPassed {
                    next_seq,
                    head_next_seq,
                } => die(&format!(
                    "this server fell behind the cluster log's tail (it needs seq {next_seq}, \
                     etcd keeps from {head_next_seq}); restart it to catch up from a peer"
                )),
            };
            if batches.is_empty() {
                let local = self.journal.head();
                self.log().sync(&local)?;
                return Ok(());
            }
            for b in &batches {
                if !self.apply_batch(b) {
                    return Err(ControlError::Internal(format!(
                        "cluster log batch at seq {} does not follow seq {}",
                        b.first_seq(),
                        self.journal.head().last_seq()
                    )));
                }
            }
        }
    }

    fn catch_up_logged(&mut self) {
        if let Err(e) = self.catch_up() {
            tracing::debug!("catching up with the cluster log: {e}");
        }
    }
}

/// Answers every job (the first ones with their staged `outcomes`) without a commit.
fn fail_all(jobs: &mut Vec<Job>, outcomes: Vec<Outcome>, error: impl Fn() -> ControlError) {
    let mut outcomes = outcomes.into_iter();
    let all = jobs
        .drain(..)
        .map(|j| (j, outcomes.next().unwrap_or(Ok(Committed::default()))));
    answer_failed(all, error);
}

fn answer(jobs: impl Iterator<Item = Job>, outcomes: Vec<Outcome>) {
    for (job, outcome) in jobs.zip(outcomes) {
        let _ = job.reply.send(outcome.map_err(ControlError::Domain));
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
            metrics: Arc::default(),
            journal: journal.clone(),
            working: State::default(),
            readers: Arc::default(),
            last_seq: seq_tx,
            failpoint: Failpoint::None,
            appends: 0,
            cluster: None,
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
                fence: None,
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

    /// A stopping server: what was asked before `stop` is committed, the writer is gone
    /// when it returns (nothing writes the journal while the process exits), and a later
    /// request fails as shutting down.
    #[tokio::test]
    async fn stop_commits_what_came_before_and_ends_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Arc::new(RocksJournal::open(dir.path(), OpenMode::ReadWrite).unwrap());
        let bus = Bus::start(journal.clone()).unwrap();
        let command = |name: &str| {
            Command::Project(crate::domain::project::Command::CreateProject {
                name: name.into(),
                description: String::new(),
                default_policies: vec![],
            })
        };
        let asked: Vec<_> = (0..20)
            .map(|i| {
                let (bus, cmd) = (bus.clone(), command(&format!("p{i}")));
                tokio::spawn(async move { bus.submit(RequestMeta::system("test"), cmd).await })
            })
            .collect();
        // Every request is in the writer's queue before the stop is.
        while bus.tx.capacity() > COMMAND_QUEUE_MAX - 20 && journal.head().last_seq() < 20 {
            tokio::task::yield_now().await;
        }
        bus.stop().await;
        for a in asked {
            a.await.unwrap().expect("asked before the stop: committed");
        }
        assert_eq!(journal.head().last_seq(), 20);
        assert!(
            bus.writer.lock().unwrap().is_none(),
            "the writer was joined"
        );
        let late = bus
            .submit(RequestMeta::system("test"), command("late"))
            .await;
        assert!(matches!(late, Err(ControlError::ShuttingDown)), "{late:?}");
        assert_eq!(
            journal.head().last_seq(),
            20,
            "nothing written after the stop"
        );
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
