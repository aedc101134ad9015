//! Reconcilers: long operations are an intent event plus a completion event. The reconciler
//! wakes on every commit (and when a snapshot's retention runs out), looks for volumes and
//! snapshots whose intent is not yet done (`Creating`, `Deleting`, `Rollback`, expired),
//! drives the data path, and appends the completion. It is level-triggered, so after a crash
//! it simply finds the unfinished work in the projections and resumes. Snapshot schedules
//! are the same kind of work: a policy with a slot due (`schedule::due_fires`) becomes a
//! `FireResourcePolicy` command, and the reconciler also wakes at the next slot.
//!
//! In cluster mode every server runs one as its agent, scoped to its own node: the data-plane
//! steps of the volumes and snapshots whose primary it is (the completions it appends are
//! idempotent commands, so a repeat after a crash changes nothing), the images of the
//! volumes it holds a replica of (no completion: the primary's writes fill them), the
//! release of images of volumes that no longer name it (a copy moved away; found from the
//! state and the block store, so also after a restart), and the recording of replicas its
//! primaries could not write to.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use uuid::Uuid;

use crate::domain::schedule::{self, Command as ScheduleCommand};
use crate::domain::snapshot::{Command as SnapshotCommand, Snapshot, SnapshotState};
use crate::domain::volume::{Command as VolumeCommand, Volume, VolumeState};
use crate::domain::{Command, State};
use crate::limits::SCHEDULE_CLOCK_SCALE_MAX;
use crate::store::{Bus, RequestMeta};

/// What the control plane asks of the data path. Calls may block (file I/O); the reconciler
/// runs them off the async runtime.
pub trait DataPlane: Send + Sync + 'static {
    /// Makes the volume servable (backing storage exists with the volume's size).
    fn prepare(&self, volume: &Volume) -> std::io::Result<()>;
    /// As `prepare`, for a clone: its storage starts as a copy of the snapshot's.
    fn prepare_clone(&self, volume: &Volume, snapshot: Uuid) -> std::io::Result<()>;
    /// Releases the volume's storage for good.
    fn release(&self, uuid: Uuid) -> std::io::Result<()>;
    /// Captures the source volume's data as the snapshot's, on this node (the volume's
    /// primary) and every in-sync replica at one point of the write stream; returns the
    /// nodes that hold it, this one first. A repeat takes it again, whole.
    fn take_snapshot(&self, snapshot: &Snapshot) -> std::io::Result<Vec<Uuid>>;
    /// Releases the snapshot's storage for good.
    fn release_snapshot(&self, uuid: Uuid) -> std::io::Result<()>;
    /// Replaces the volume's data with the snapshot's, on this node (its primary) and on
    /// `replicas` (those holding the snapshot, with their replication addresses); returns
    /// the replicas that did (they hold the primary's data again).
    fn rollback(
        &self,
        volume: &Volume,
        snapshot: Uuid,
        replicas: &[(Uuid, std::net::SocketAddr)],
    ) -> std::io::Result<Vec<Uuid>>;
    /// Hands the data path the namespace table implied by `state` (volumes, sizes, ACLs):
    /// every `Available` volume, and every `Creating` one whose storage is ready. An error
    /// names a namespace the target could not serve; the rest are served, and the next call
    /// publishes again even if `state` did not change.
    fn publish(&self, state: &State) -> std::io::Result<()>;
    /// Whether hosts can reach the volume now (always true without a target).
    fn serves(&self, volume: &Volume) -> bool;
    /// When the last table withheld something that becomes servable with time alone (a
    /// promoted replica waits out the read lease it gave the former primary): publish again
    /// after this.
    fn publish_again_in(&self) -> Option<Duration> {
        None
    }
    /// Checksum mismatches the data path saw since the last call, to record as events.
    fn take_media_errors(&self) -> Vec<evstor_datapath::blockstore::MediaError>;
    /// Replicas this node's primaries could not write to since the last call, to record
    /// out of sync (their writes wait for that).
    fn take_replica_failures(&self) -> Vec<crate::dataplane::ReplicaFailure> {
        Vec::new()
    }
    /// The snapshots this node's block store holds a copy of.
    fn snapshots_held(&self) -> Vec<Uuid> {
        Vec::new()
    }
    /// Whether this node's block store holds the image `uuid` now.
    fn holds(&self, uuid: Uuid) -> bool {
        let _ = uuid;
        false
    }
    /// Copies to the replica on `node` what it misses of `volume` (this node is its
    /// primary): first the snapshots of `snapshots` it does not hold (every snapshot of the
    /// volume this node holds, oldest first, with whether the replica holds it), then the
    /// volume's data. Blocks for as long as the copy takes.
    fn rebuild(
        &self,
        volume: &Volume,
        node: Uuid,
        snapshots: &[(Uuid, bool)],
    ) -> std::io::Result<Rebuilt> {
        let _ = (volume, node, snapshots);
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }
    /// Brings `volume`'s in-sync replicas (this node took over as its primary) level with
    /// this copy where a failover may have left them apart; returns the bytes sent (0 when
    /// nothing was to do).
    fn repair(&self, volume: &Volume) -> std::io::Result<u64> {
        let _ = volume;
        Ok(0)
    }
    /// The volumes whose replicas [`DataPlane::repair`] still has to bring level.
    fn repairs_pending(&self) -> Vec<Uuid> {
        Vec::new()
    }
    /// How far the running (or last) rebuild of `volume`'s replica on `node` got, in
    /// percent.
    fn rebuild_percent(&self, volume: Uuid, node: Uuid) -> Option<u8> {
        let _ = (volume, node);
        None
    }
}

/// What a rebuild did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rebuilt {
    /// Bytes sent (the snapshots' included).
    pub copied_bytes: u64,
    /// The snapshots it copied to the replica (which holds them from now on).
    pub snapshots: Vec<Uuid>,
}

/// How often out-of-sync replicas are looked for (and a failed rebuild tried again).
const REBUILD_RETRY: Duration = Duration::from_secs(1);
/// How often a running rebuild's progress is looked at (and recorded at each tenth).
const REBUILD_PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How often the data path is asked for failed replicas (their writes wait meanwhile).
const REPLICA_FAILURE_POLL: Duration = Duration::from_millis(50);
/// Pause before retrying data-path work that failed.
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// Longest sleep between looks at the state when nothing is due (a bound, not a timer); also
/// how late a media error the data path saw may reach the journal.
const IDLE_WAKE_MAX: Duration = Duration::from_secs(5);

/// One piece of unfinished work, with what to copy or free.
#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    CreateVolume(Volume),
    CloneVolume(Volume, Uuid),
    DeleteVolume(Uuid),
    TakeSnapshot(Snapshot),
    DeleteSnapshot(Uuid),
    /// The volume, the snapshot, and the replicas holding it (with their replication
    /// addresses): they roll back with the primary.
    Rollback(Volume, Uuid, Vec<(Uuid, std::net::SocketAddr)>),
    /// No data work: ask the domain to expire the snapshot.
    Expire(Uuid),
    /// No data work: ask the domain to fire the resource policy's due slot (with the
    /// schedule clock scale, 1 outside tests).
    Fire(Uuid, u32),
}

/// Everything unfinished in `state` at `now_unix_ns`, in the order it must run (snapshots are
/// taken before anything rewrites or frees a volume, oldest request first, so one requested
/// after another never holds an earlier state of the volume), and when the next retention
/// expiry is due. Pure, so crash resumption is just calling it again.
pub fn pending(state: &State, now_unix_ns: u64) -> (Vec<Work>, Option<u64>) {
    let mut work = Vec::new();
    let mut next_expiry = None::<u64>;
    let mut creating: Vec<&Snapshot> = state
        .snapshots
        .by_uuid
        .values()
        .filter(|s| s.state == SnapshotState::Creating)
        .collect();
    creating.sort_by_key(|s| (s.creation_unix_ns, s.uuid));
    work.extend(creating.into_iter().cloned().map(Work::TakeSnapshot));
    for s in state.snapshots.by_uuid.values() {
        if s.state != SnapshotState::Available {
            continue;
        }
        match s.expiry_unix_ns() {
            Some(t) if t <= now_unix_ns => work.push(Work::Expire(s.uuid)),
            Some(t) => next_expiry = Some(next_expiry.map_or(t, |n| n.min(t))),
            None => {}
        }
    }
    for v in state.volumes.by_uuid.values() {
        match v.state {
            VolumeState::Creating => work.push(match v.source_snapshot {
                Some(s) => Work::CloneVolume(v.clone(), s),
                None => Work::CreateVolume(v.clone()),
            }),
            VolumeState::Rollback => {
                let from = state
                    .snapshots
                    .by_uuid
                    .values()
                    .find(|s| s.restoring.contains(&v.uuid));
                if let Some(s) = from {
                    let replicas = s
                        .holders
                        .iter()
                        .filter(|n| v.replica_nodes.contains(n))
                        .filter_map(|n| {
                            let node = state.inventory.nodes.get(n)?;
                            Some((*n, crate::dataplane::replication_addr(&node.nvme_endpoint)?))
                        })
                        .collect();
                    work.push(Work::Rollback(v.clone(), s.uuid, replicas));
                }
            }
            _ => {}
        }
    }
    for v in state.volumes.by_uuid.values() {
        if v.state == VolumeState::Deleting {
            work.push(Work::DeleteVolume(v.uuid));
        }
    }
    for s in state.snapshots.by_uuid.values() {
        if s.state == SnapshotState::Deleting {
            work.push(Work::DeleteSnapshot(s.uuid));
        }
    }
    (work, next_expiry)
}

/// Whether `w` is the work of `node`'s agent: the node is the primary of the volume, or
/// acts for the snapshot ([`Snapshot::agent`]) (`None`: one server does everything).
pub fn is_for(state: &State, w: &Work, node: Option<Uuid>) -> bool {
    let Some(node) = node else {
        return true;
    };
    let volume_on = |u: &Uuid| state.volumes.get(*u).is_some_and(|v| v.node_uuid == node);
    let snapshot_on = |u: &Uuid| {
        state
            .snapshots
            .get(*u)
            .is_some_and(|s| s.agent(state) == node)
    };
    match w {
        Work::CreateVolume(v) | Work::CloneVolume(v, _) | Work::Rollback(v, ..) => {
            v.node_uuid == node
        }
        Work::DeleteVolume(u) => volume_on(u),
        // The volume's primary takes its snapshots (on every in-sync copy).
        Work::TakeSnapshot(s) => {
            state
                .volumes
                .get(s.source_volume)
                .map_or(s.node_uuid, |v| v.node_uuid)
                == node
        }
        Work::DeleteSnapshot(u) | Work::Expire(u) => snapshot_on(u),
        // The primary of the volume takes its snapshots, so its agent fires its schedules
        // (a fire is idempotent per slot, so even two agents would take one snapshot).
        Work::Fire(u, _) => state
            .resource_policies
            .get(*u)
            .is_some_and(|p| volume_on(&p.volume)),
    }
}

/// What a node's agent does with replica images.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplicaWork {
    /// Replicas to create (idempotent).
    pub hold: Vec<Volume>,
    /// Replicas of volumes being deleted (or failed) to release.
    pub release: Vec<Uuid>,
    /// Volumes that no longer name the node (a copy moved away): to release where the
    /// store still has them.
    pub departed: Vec<Uuid>,
    /// The snapshots whose copies the node keeps ([`snapshots_kept`]); its store's others
    /// are released.
    pub keep_snapshots: HashSet<Uuid>,
}

/// The snapshots whose copy `node` keeps: the ones being taken (a replica takes its copy
/// before anyone knows whether it holds one), the ones it holds, and the ones it releases
/// itself as their agent. A copy of any other (deleted, or taken where it turned out not
/// to count) is released.
pub fn snapshots_kept(state: &State, node: Uuid) -> HashSet<Uuid> {
    let rebuilding = |volume: Uuid| {
        state
            .volumes
            .get(volume)
            .is_some_and(|v| v.out_of_sync.contains(&node) && v.replica_nodes.contains(&node))
    };
    state
        .snapshots
        .by_uuid
        .values()
        .filter(|s| match s.state {
            SnapshotState::Creating => true,
            SnapshotState::Deleting => s.agent(state) == node,
            // A copy being rebuilt receives the snapshots it lacks first; the rebuild's
            // completion makes it a holder.
            SnapshotState::Available => s.holders.contains(&node) || rebuilding(s.source_volume),
            _ => s.holders.contains(&node),
        })
        .map(|s| s.uuid)
        .collect()
}

/// The replica work of `node`, by what `state` says: volumes that name it as a replica,
/// by state, and volumes that name it no more.
pub fn replica_work(state: &State, node: Uuid) -> ReplicaWork {
    let mut w = ReplicaWork {
        keep_snapshots: snapshots_kept(state, node),
        ..ReplicaWork::default()
    };
    for v in state.volumes.by_uuid.values() {
        if !v.nodes().any(|n| n == node) {
            // A volume only comes back to a node as a new out-of-sync replica, rebuilt with
            // a full copy, so an image it left behind is never needed again.
            w.departed.push(v.uuid);
            continue;
        }
        if !v.replica_nodes.contains(&node) {
            continue;
        }
        match v.state {
            VolumeState::Deleting | VolumeState::Deleted | VolumeState::Failed => {
                w.release.push(v.uuid)
            }
            _ => w.hold.push(v.clone()),
        }
    }
    w
}

/// Creates and releases this node's replica images; `held` remembers what is done. `work`
/// comes from the state just published, so an image released here is no longer in the
/// target's table or the replication listener's set.
async fn replicas(data: &Arc<dyn DataPlane>, work: ReplicaWork, held: &mut HashSet<Uuid>) {
    let ReplicaWork {
        mut hold,
        mut release,
        departed,
        keep_snapshots,
    } = work;
    hold.retain(|v| !held.contains(&v.uuid));
    // Released on every pass while the volume is being deleted (idempotent), also after a
    // restart that forgot what it held; a departed copy only if the store still has it.
    release.extend(
        departed
            .into_iter()
            .filter(|u| held.contains(u) || data.holds(*u)),
    );
    for v in hold {
        let worker = data.clone();
        let uuid = v.uuid;
        match tokio::task::spawn_blocking(move || worker.prepare(&v)).await {
            Ok(Ok(())) => {
                held.insert(uuid);
            }
            Ok(Err(e)) => tracing::warn!("replica image of volume {uuid}: {e}"),
            Err(e) => tracing::error!("replica image task of volume {uuid}: {e}"),
        }
    }
    for uuid in release {
        let worker = data.clone();
        if let Ok(Ok(())) = tokio::task::spawn_blocking(move || worker.release(uuid)).await {
            held.remove(&uuid);
        }
    }
    for uuid in data.snapshots_held() {
        if keep_snapshots.contains(&uuid) {
            continue;
        }
        let worker = data.clone();
        match tokio::task::spawn_blocking(move || worker.release_snapshot(uuid)).await {
            Ok(Ok(())) => tracing::info!("released this node's copy of snapshot {uuid}"),
            Ok(Err(e)) => tracing::warn!("releasing this node's copy of snapshot {uuid}: {e}"),
            Err(e) => tracing::error!("snapshot release task of {uuid}: {e}"),
        }
    }
}

/// Records replicas this node's primaries could not write to as out of sync, soon after the
/// data path reports them: their writes are held until the new in-sync set is published.
/// A command that fails (no etcd quorum, a newer epoch) is not retried here: the held writes
/// time out, the host retries them, and the still-failed replica is reported again.
async fn record_replica_failures(
    bus: Bus,
    data: Arc<dyn DataPlane>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        for f in data.take_replica_failures() {
            tracing::warn!(volume = %f.volume, node = %f.node, "replica failed; recording it out of sync");
            let cmd = Command::Volume(VolumeCommand::MarkReplicaOutOfSync {
                uuid: f.volume,
                node: f.node,
                epoch: f.epoch,
            });
            if let Err(e) = bus.submit(RequestMeta::system("datapath"), cmd).await {
                tracing::warn!(
                    "recording replica {} of {} out of sync failed: {e}",
                    f.node,
                    f.volume
                );
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(REPLICA_FAILURE_POLL) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

/// The replicas `node`'s primaries should rebuild: out of sync, on a server the leader
/// does not hold failed, of available volumes, and not on their way out (a move's new copy
/// is rebuilt instead of the one it replaces).
pub fn rebuild_work(state: &State, node: Uuid) -> Vec<(Volume, Uuid)> {
    let live = |n: Uuid| state.inventory.server_of(n).is_some_and(|s| !s.failed);
    state
        .volumes
        .by_uuid
        .values()
        .filter(|v| v.node_uuid == node && v.state == VolumeState::Available)
        .flat_map(|v| {
            v.out_of_sync
                .iter()
                .filter(|r| live(**r) && !v.replacing.iter().any(|m| m.replaces == **r))
                .map(|r| (v.clone(), *r))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The snapshots of `v` a rebuild of its replica on `replica` starts from: every one this
/// node (its primary) holds, oldest first, with whether the replica holds it too.
pub fn seed_plan(state: &State, v: &Volume, node: Uuid, replica: Uuid) -> Vec<(Uuid, bool)> {
    let mut held: Vec<&Snapshot> = state
        .snapshots
        .by_uuid
        .values()
        .filter(|s| {
            s.source_volume == v.uuid
                && s.state == SnapshotState::Available
                && s.holders.contains(&node)
        })
        .collect();
    held.sort_by_key(|s| (s.creation_unix_ns, s.uuid));
    held.iter()
        .map(|s| (s.uuid, s.holders.contains(&replica)))
        .collect()
}

/// Rebuilds this node's primaries' out-of-sync replicas, one at a time, and records each
/// that finished (`MarkReplicaInSync`). A rebuild that fails is tried again later.
async fn rebuild_replicas(
    bus: Bus,
    data: Arc<dyn DataPlane>,
    mut shutdown: watch::Receiver<bool>,
    node: Uuid,
) {
    loop {
        let pending = data.repairs_pending();
        let primaries: Vec<Volume> = {
            let state = bus.state();
            pending
                .iter()
                .filter_map(|u| state.volumes.get(*u))
                .filter(|v| v.node_uuid == node && v.state == VolumeState::Available)
                .cloned()
                .collect()
        };
        for v in primaries {
            let worker = data.clone();
            let volume = v.clone();
            match tokio::task::spawn_blocking(move || worker.repair(&volume)).await {
                Ok(Ok(0)) => {}
                Ok(Ok(copied_bytes)) => {
                    tracing::info!(volume = %v.uuid, copied_bytes, "replicas repaired after a failover");
                }
                Ok(Err(e)) => tracing::info!(volume = %v.uuid, "repair not done: {e}"),
                Err(e) => tracing::error!("repair task of volume {}: {e}", v.uuid),
            }
        }
        let work = rebuild_work(&bus.state(), node);
        for (v, replica) in work {
            let worker = data.clone();
            let volume = v.clone();
            let plan = seed_plan(&bus.state(), &v, node, replica);
            let task = tokio::task::spawn_blocking(move || worker.rebuild(&volume, replica, &plan));
            match with_progress(&bus, &data, &v, replica, task).await {
                Ok(Ok(Rebuilt {
                    copied_bytes,
                    snapshots,
                })) => {
                    tracing::info!(
                        volume = %v.uuid,
                        %replica,
                        copied_bytes,
                        snapshots = snapshots.len(),
                        "replica rebuilt"
                    );
                    if let Some(gap) = rebuilt_record_delay() {
                        tokio::time::sleep(gap).await;
                    }
                    let cmd = Command::Volume(VolumeCommand::MarkReplicaInSync {
                        uuid: v.uuid,
                        node: replica,
                        epoch: v.epoch,
                        copied_bytes,
                        snapshots,
                    });
                    if let Err(e) = bus.submit(RequestMeta::system("datapath"), cmd).await {
                        tracing::warn!("recording replica {replica} of {} rebuilt: {e}", v.uuid);
                    }
                }
                Ok(Err(e)) => tracing::info!(volume = %v.uuid, %replica, "rebuild not done: {e}"),
                Err(e) => tracing::error!("rebuild task of volume {}: {e}", v.uuid),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(REBUILD_RETRY) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

/// Test failpoint `EVSTOR_FAILPOINT=rebuilt-record-delay-ms:N`: the agent waits N ms
/// between a finished rebuild and asking to record it, widening the gap in which the
/// replica takes writes as in sync while the control plane still has it out of sync.
fn rebuilt_record_delay() -> Option<Duration> {
    let text = std::env::var("EVSTOR_FAILPOINT").ok()?;
    let ms = text
        .strip_prefix("rebuilt-record-delay-ms:")?
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms))
}

/// Waits for a rebuild of the replica on `node`, recording its progress at each tenth
/// (`RecordRebuildProgress`) while it runs.
async fn with_progress<T>(
    bus: &Bus,
    data: &Arc<dyn DataPlane>,
    v: &Volume,
    node: Uuid,
    mut task: tokio::task::JoinHandle<T>,
) -> Result<T, tokio::task::JoinError> {
    let mut reported = 0;
    loop {
        tokio::select! {
            r = &mut task => return r,
            _ = tokio::time::sleep(REBUILD_PROGRESS_EVERY) => {}
        }
        let step = data
            .rebuild_percent(v.uuid, node)
            .and_then(|p| progress_step(reported, p));
        let Some(percent) = step else { continue };
        reported = percent;
        let cmd = Command::Volume(VolumeCommand::RecordRebuildProgress {
            uuid: v.uuid,
            node,
            epoch: v.epoch,
            percent,
        });
        if let Err(e) = bus.submit(RequestMeta::system("datapath"), cmd).await {
            tracing::info!("recording the rebuild progress of {}: {e}", v.uuid);
        }
    }
}

/// The tenth a rebuild at `percent` has reached, if past the one last `reported` (100 is
/// left to `VolumeReplicaInSync`).
pub fn progress_step(reported: u8, percent: u8) -> Option<u8> {
    let tenth = percent.min(99) / 10 * 10;
    (tenth > reported).then_some(tenth)
}

/// Runs until `shutdown` turns true, doing the work of `node` (`None`: all of it).
pub async fn run(
    bus: Bus,
    data: Arc<dyn DataPlane>,
    mut shutdown: watch::Receiver<bool>,
    node: Option<Uuid>,
) {
    let mut seq = bus.last_seq();
    let mut held = HashSet::new();
    let clock_scale = schedule_clock_scale();
    if let Some(n) = node {
        tokio::spawn(record_replica_failures(
            bus.clone(),
            data.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(rebuild_replicas(
            bus.clone(),
            data.clone(),
            shutdown.clone(),
            n,
        ));
    }
    loop {
        let now = crate::store::bus::now_unix_ns();
        // The state read below holds at least this seq (`/metrics`: reconciler lag).
        let seen = *seq.borrow_and_update();
        let (work, next_expiry, mut failed, released, replica) = {
            let state = bus.state();
            let published = data.publish(&state);
            if let Err(e) = &published {
                tracing::warn!("namespace publication incomplete, will retry: {e}");
            }
            // Volumes this node handed over: the table just published no longer serves
            // them as primary, so the new primary may start.
            let released: Vec<Uuid> = match (node, &published) {
                (Some(n), Ok(())) => state
                    .volumes
                    .by_uuid
                    .values()
                    .filter(|v| v.releasing == Some(n))
                    .map(|v| v.uuid)
                    .collect(),
                _ => Vec::new(),
            };
            let (mut work, next_expiry) = pending(&state, now);
            let (fires, next_fire) = schedule::due_fires(&state, now, clock_scale);
            work.extend(fires.into_iter().map(|u| Work::Fire(u, clock_scale)));
            work.retain(|w| is_for(&state, w, node));
            let next_expiry = [next_expiry, next_fire].into_iter().flatten().min();
            let mut replica = node.map(|n| replica_work(&state, n));
            if published.is_err() {
                // The target may still serve what moved away: keep it until it does not.
                if let Some(r) = &mut replica {
                    r.departed.clear();
                }
            }
            (work, next_expiry, published.is_err(), released, replica)
        };
        for uuid in released {
            let Some(n) = node else { break };
            let cmd = Command::Volume(VolumeCommand::ReleasePrimary { uuid, node: n });
            if let Err(e) = bus.submit(RequestMeta::system("datapath"), cmd).await {
                tracing::warn!("releasing volume {uuid} to its new primary failed: {e}");
            }
        }
        if let Some(r) = replica {
            replicas(&data, r, &mut held).await;
        }
        for e in data.take_media_errors() {
            let cmd = Command::Volume(VolumeCommand::RecordDataIntegrityError {
                uuid: e.image,
                block: e.block,
            });
            if let Err(err) = bus.submit(RequestMeta::system("datapath"), cmd).await {
                tracing::warn!("recording a media error of {} failed: {err}", e.image);
            }
        }
        for w in work {
            failed |= !step(&bus, &data, w).await;
        }
        bus.metrics().reconciled(seen);
        let idle = match next_expiry {
            Some(t) => Duration::from_nanos(t.saturating_sub(now)).min(IDLE_WAKE_MAX),
            None => IDLE_WAKE_MAX,
        };
        let idle = data.publish_again_in().map_or(idle, |t| t.min(idle));
        let wait = async {
            if failed {
                tokio::time::sleep(RETRY_DELAY).await;
            } else {
                let _ = tokio::time::timeout(idle, seq.changed()).await;
            }
        };
        tokio::select! {
            _ = wait => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

/// `EVSTOR_SCHEDULE_CLOCK_SCALE`, read once: TEST ONLY. Makes snapshot schedules run this
/// many times faster than real time (3600: an hourly schedule fires every second, and its
/// snapshots' retention shrinks alike). Unset, empty or unreadable: 1, real time.
fn schedule_clock_scale() -> u32 {
    let Ok(text) = std::env::var("EVSTOR_SCHEDULE_CLOCK_SCALE") else {
        return 1;
    };
    match text.trim().parse::<u32>() {
        Ok(n) if (1..=SCHEDULE_CLOCK_SCALE_MAX).contains(&n) => {
            if n > 1 {
                tracing::warn!("EVSTOR_SCHEDULE_CLOCK_SCALE={n}: snapshot schedules run {n}x faster than real time (test only)");
            }
            n
        }
        _ => {
            tracing::warn!(
                "EVSTOR_SCHEDULE_CLOCK_SCALE={text:?} ignored: not 1-{SCHEDULE_CLOCK_SCALE_MAX}"
            );
            1
        }
    }
}

/// The completion command for `w`, and a name for logs.
fn completion(w: &Work) -> (Command, String) {
    match w {
        Work::CreateVolume(v) | Work::CloneVolume(v, _) => (
            Command::Volume(VolumeCommand::MarkVolumeAvailable { uuid: v.uuid }),
            format!("volume {}", v.uuid),
        ),
        Work::DeleteVolume(u) => (
            Command::Volume(VolumeCommand::FinishVolumeDeletion { uuid: *u }),
            format!("volume {u}"),
        ),
        Work::Rollback(v, ..) => (
            Command::Volume(VolumeCommand::FinishVolumeRollback {
                uuid: v.uuid,
                rolled_back: Vec::new(),
            }),
            format!("volume {}", v.uuid),
        ),
        Work::TakeSnapshot(s) => (
            Command::Snapshot(SnapshotCommand::MarkSnapshotAvailable {
                uuid: s.uuid,
                holders: Vec::new(),
            }),
            format!("snapshot {}", s.uuid),
        ),
        Work::DeleteSnapshot(u) => (
            Command::Snapshot(SnapshotCommand::FinishSnapshotDeletion { uuid: *u }),
            format!("snapshot {u}"),
        ),
        Work::Expire(u) => (
            Command::Snapshot(SnapshotCommand::ExpireSnapshot { uuid: *u }),
            format!("snapshot {u}"),
        ),
        Work::Fire(u, scale) => (
            Command::Schedule(ScheduleCommand::FireResourcePolicy {
                uuid: *u,
                clock_scale: *scale,
            }),
            format!("resource policy {u}"),
        ),
    }
}

/// Does the data-path part of `work`; a snapshot's completion learns who holds it.
fn execute(data: &dyn DataPlane, work: Work, completion: &mut Command) -> std::io::Result<()> {
    match work {
        Work::CreateVolume(v) => data.prepare(&v),
        Work::CloneVolume(v, s) => data.prepare_clone(&v, s),
        Work::DeleteVolume(u) => data.release(u),
        Work::TakeSnapshot(s) => {
            let taken = data.take_snapshot(&s)?;
            if let Command::Snapshot(SnapshotCommand::MarkSnapshotAvailable { holders, .. }) =
                completion
            {
                *holders = taken;
            }
            Ok(())
        }
        Work::DeleteSnapshot(u) => data.release_snapshot(u),
        Work::Rollback(v, s, replicas) => {
            let rolled = data.rollback(&v, s, &replicas)?;
            if let Command::Volume(VolumeCommand::FinishVolumeRollback { rolled_back, .. }) =
                completion
            {
                *rolled_back = rolled;
            }
            Ok(())
        }
        Work::Expire(_) | Work::Fire(..) => Ok(()),
    }
}

/// A volume is `Available` only once hosts can reach it: its storage is ready (the caller
/// saw to that) and the target serves its namespace.
fn serve_now(bus: &Bus, data: &dyn DataPlane, v: &Volume) -> std::io::Result<()> {
    data.publish(&bus.state())?;
    if data.serves(v) {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "the target does not serve namespace {}",
            v.nsid
        )))
    }
}

/// Does one piece of data-path work and records its completion; false if it must be retried.
async fn step(bus: &Bus, data: &Arc<dyn DataPlane>, work: Work) -> bool {
    let (command, what) = completion(&work);
    let servable = match &work {
        Work::CreateVolume(v) | Work::CloneVolume(v, _) => Some(v.clone()),
        _ => None,
    };
    let worker = data.clone();
    let done = tokio::task::spawn_blocking(move || {
        let mut command = command;
        execute(worker.as_ref(), work, &mut command).map(|()| command)
    })
    .await;
    let command = match done {
        Ok(Ok(command)) => command,
        Ok(Err(e)) => {
            tracing::warn!("data path work for {what} failed, will retry: {e}");
            return false;
        }
        Err(e) => {
            tracing::error!("data path task for {what} panicked: {e}");
            return false;
        }
    };
    if let Some(v) = servable {
        if let Err(e) = serve_now(bus, data.as_ref(), &v) {
            tracing::warn!("{what} is ready but not served, will retry: {e}");
            return false;
        }
    }
    match bus.submit(RequestMeta::system("reconciler"), command).await {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!("recording completion for {what} failed, will retry: {e}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::snapshot::tests::{with_creating_snapshot, with_snapshot, SNAP};
    use crate::domain::snapshot::Event as SnapshotEvent;
    use crate::domain::volume::Event as VolumeEvent;
    use crate::domain::{test_ctx, Applied, Event};

    fn state_of(given: &[Event]) -> State {
        let mut state = State::default();
        for (i, e) in given.iter().enumerate() {
            let at = Applied {
                seq: i as u64 + 1,
                time_unix_ns: 1,
            };
            state.evolve(at, e);
        }
        state
    }

    fn kinds(work: &[Work]) -> Vec<&'static str> {
        work.iter()
            .map(|w| match w {
                Work::CreateVolume(_) => "create",
                Work::CloneVolume(..) => "clone",
                Work::DeleteVolume(_) => "delete-volume",
                Work::TakeSnapshot(_) => "snapshot",
                Work::DeleteSnapshot(_) => "delete-snapshot",
                Work::Rollback(..) => "rollback",
                Work::Expire(_) => "expire",
                Work::Fire(..) => "fire",
            })
            .collect()
    }

    #[test]
    fn snapshots_are_taken_first_and_settled_state_needs_nothing() {
        let state = state_of(&with_creating_snapshot());
        let (work, next) = pending(&state, 0);
        assert_eq!(kinds(&work), ["snapshot"]);
        assert_eq!(next, None);
        let (work, _) = pending(&state_of(&with_snapshot()), 0);
        assert!(work.is_empty());
    }

    #[test]
    fn rollback_and_deletions_are_found_with_their_snapshot() {
        let mut given = with_snapshot();
        let vol = test_ctx().new_id(0);
        given.push(Event::Volume(VolumeEvent::VolumeRollbackRequested {
            uuid: vol,
            snapshot: SNAP,
        }));
        let (work, _) = pending(&state_of(&given), 0);
        assert!(matches!(&work[..], [Work::Rollback(v, s, _)] if v.uuid == vol && *s == SNAP));
        given.push(Event::Volume(VolumeEvent::VolumeRolledBack { uuid: vol }));
        given.push(Event::Volume(VolumeEvent::VolumeDeletionRequested {
            uuid: vol,
        }));
        given.push(Event::Snapshot(SnapshotEvent::SnapshotDeletionRequested {
            uuid: SNAP,
        }));
        let (work, _) = pending(&state_of(&given), 0);
        assert_eq!(kinds(&work), ["delete-volume", "delete-snapshot"]);
    }

    #[test]
    fn snapshots_are_taken_in_the_order_they_were_requested() {
        let mut state = state_of(&with_creating_snapshot());
        let first = state.snapshots.by_uuid[&SNAP].clone();
        // Two more requests, the later ones with smaller ids: the id order is not the order.
        for (n, uuid) in [(1, Uuid::from_u128(2)), (2, Uuid::from_u128(1))] {
            let mut s = first.clone();
            s.uuid = uuid;
            s.creation_unix_ns = first.creation_unix_ns + n;
            state.snapshots.by_uuid.insert(uuid, s);
        }
        let taken: Vec<Uuid> = pending(&state, 0)
            .0
            .iter()
            .map(|w| match w {
                Work::TakeSnapshot(s) => s.uuid,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(taken, [SNAP, Uuid::from_u128(2), Uuid::from_u128(1)]);
    }

    /// The bootstrapped state with `v1` copied on nodes 1 (primary), 2 and 3, each on a
    /// server of its own; node 3 is a move's new copy replacing node 2.
    fn moving() -> (State, Uuid) {
        use crate::domain::volume::{tests::with_volume, Replacement};
        let mut state = state_of(&with_volume());
        let server = state.inventory.servers.values().next().unwrap().clone();
        let node = state.inventory.nodes.values().next().unwrap().clone();
        for n in 1..=3u128 {
            let mut s = server.clone();
            s.uuid = Uuid::from_u128(100 + n);
            let mut d = node.clone();
            (d.uuid, d.server_uuid) = (Uuid::from_u128(n), s.uuid);
            state.inventory.servers.insert(s.uuid, s);
            state.inventory.nodes.insert(d.uuid, d);
        }
        let uuid = test_ctx().new_id(0);
        let mut v = state.volumes.get(uuid).unwrap().clone();
        let node = Uuid::from_u128;
        v.node_uuid = node(1);
        v.replica_nodes = vec![node(2), node(3)];
        v.out_of_sync = vec![node(2), node(3)];
        v.replacing = vec![Replacement {
            node: node(3),
            replaces: node(2),
        }];
        state.volumes.insert(v);
        (state, uuid)
    }

    #[test]
    fn the_primary_rebuilds_a_moves_new_copy_not_the_one_it_replaces() {
        let (state, uuid) = moving();
        let work: Vec<(Uuid, Uuid)> = rebuild_work(&state, Uuid::from_u128(1))
            .into_iter()
            .map(|(v, n)| (v.uuid, n))
            .collect();
        assert_eq!(work, [(uuid, Uuid::from_u128(3))]);
    }

    #[test]
    fn a_node_a_copy_left_releases_it_and_others_keep_theirs() {
        let (mut state, uuid) = moving();
        let of = |state: &State, n: u128| replica_work(state, Uuid::from_u128(n));
        assert_eq!(of(&state, 2).hold.len(), 1);
        assert!(of(&state, 2).departed.is_empty());
        // The move completed: node 2 holds no copy any more.
        let mut v = state.volumes.get(uuid).unwrap().clone();
        v.replica_nodes = vec![Uuid::from_u128(3)];
        v.out_of_sync.clear();
        v.replacing.clear();
        state.volumes.insert(v);
        let w = of(&state, 2);
        assert_eq!((w.hold.len(), w.release.len()), (0, 0));
        assert_eq!(w.departed, [uuid]);
        assert!(of(&state, 3).departed.is_empty() && of(&state, 1).departed.is_empty());
    }

    /// A rebuild starts from every snapshot of the volume its primary holds, oldest first,
    /// flagged by whether the replica holds it; a copy being rebuilt keeps the snapshots it
    /// receives until the rebuild's completion makes it a holder, and no longer after it
    /// left without becoming one.
    #[test]
    fn a_rebuild_copies_the_primarys_snapshots_and_the_copy_keeps_them() {
        let (mut state, uuid) = moving();
        let template = state_of(&with_snapshot())
            .snapshots
            .get(SNAP)
            .unwrap()
            .clone();
        let node = Uuid::from_u128;
        let snap = |id: u128, at: u64, holders: Vec<Uuid>, st: SnapshotState| {
            let mut s = template.clone();
            (s.uuid, s.source_volume, s.creation_unix_ns) = (Uuid::from_u128(id), uuid, at);
            (s.holders, s.state) = (holders, st);
            s
        };
        for s in [
            snap(0x12, 20, vec![node(1)], SnapshotState::Available),
            snap(0x11, 10, vec![node(1), node(2)], SnapshotState::Available),
            snap(0x13, 5, vec![node(2)], SnapshotState::Available),
            snap(0x14, 1, vec![node(1)], SnapshotState::Deleting),
        ] {
            state.snapshots.by_uuid.insert(s.uuid, s);
        }
        let v = state.volumes.get(uuid).unwrap().clone();
        let (a, b) = (Uuid::from_u128(0x11), Uuid::from_u128(0x12));
        assert_eq!(
            seed_plan(&state, &v, node(1), node(3)),
            [(a, false), (b, false)]
        );
        assert_eq!(
            seed_plan(&state, &v, node(1), node(2)),
            [(a, true), (b, false)]
        );
        let kept = snapshots_kept(&state, node(3));
        assert!(kept.contains(&a) && kept.contains(&b), "{kept:?}");
        assert!(!kept.contains(&Uuid::from_u128(0x14)), "being deleted");
        // The move was given up: node 3 is no copy of the volume any more.
        let mut v = v;
        v.replica_nodes = vec![node(2)];
        v.out_of_sync = vec![node(2)];
        v.replacing.clear();
        state.volumes.insert(v);
        assert!(snapshots_kept(&state, node(3)).is_empty());
    }

    #[test]
    fn rebuild_progress_is_recorded_at_each_tenth_and_never_at_100() {
        assert_eq!(progress_step(0, 9), None);
        assert_eq!(progress_step(0, 10), Some(10));
        assert_eq!(progress_step(10, 19), None);
        assert_eq!(progress_step(10, 47), Some(40));
        assert_eq!(progress_step(40, 100), Some(90));
        assert_eq!(progress_step(90, 100), None);
    }

    #[test]
    fn retention_is_due_or_scheduled() {
        let mut state = state_of(&with_snapshot());
        let s = state.snapshots.by_uuid.get_mut(&SNAP).unwrap();
        s.retention_secs = 2;
        let expiry = s.expiry_unix_ns().unwrap();
        assert_eq!(pending(&state, expiry - 1), (vec![], Some(expiry)));
        assert_eq!(kinds(&pending(&state, expiry).0), ["expire"]);
    }
}

#[cfg(test)]
#[path = "reconcile_schedule_sim.rs"]
mod schedule_sim;
