//! Snapshots: point-in-time, read-only images of a volume; the source of clones and rollback.
//!
//! Lifecycle, like volumes: `CreateSnapshot` appends `SnapshotCreationRequested` (state
//! `Creating`); the volume's primary captures the data on every in-sync copy at one point
//! of the write stream and appends `SnapshotTaken` with the nodes that hold it (journals
//! from before replicated snapshots have `SnapshotBecameAvailable`: one holder).
//! `DeleteSnapshot` (or retention expiry, `SnapshotExpired`) moves it to `Deleting`; the
//! reconciler frees the data and appends `SnapshotDeleted`, after which it is gone.
//!
//! A snapshot outlives its volume: deleting a volume leaves its snapshots (and their clones)
//! alone, since the reference documents no refusal and a snapshot holds its own data.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::names::{check_description, check_etag, check_name};
use super::volume::{Label, Volume, VolumeRef, VolumeState};
use super::{Applied, Ctx, DomainError, Event as AnyEvent, RowKey, State};
use crate::limits::{API_DURATION_SECS_MAX, SNAPSHOTS_MAX};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotState {
    #[default]
    Unknown,
    Creating,
    Available,
    Deleting,
    Deleted,
    Failed,
}

/// How a command names a snapshot: by id, or by name within its project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotRef {
    Uuid(Uuid),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub uuid: Uuid,
    pub name: String,
    pub project: String,
    pub description: String,
    pub state: SnapshotState,
    pub source_volume: Uuid,
    pub source_volume_name: String,
    /// Copied from the volume at snapshot time.
    pub size_bytes: u64,
    pub sector_size: u32,
    pub replica_count: u32,
    pub compression: bool,
    pub acl: Vec<String>,
    pub ip_acl: Vec<String>,
    pub labels: Vec<Label>,
    pub node_uuid: Uuid,
    /// 0 means kept until deleted.
    pub retention_secs: u64,
    pub creation_unix_ns: u64,
    pub etag: u64,
    /// Volumes being rolled back to this snapshot right now (state `Rollback`). Kept here, not
    /// on the volume, so the volume's stored shape does not change; it also makes "is this
    /// snapshot in use" a local question.
    pub restoring: Vec<Uuid>,
    /// The nodes holding a copy of its data (`nodeList`), the primary that took it first;
    /// empty until taken. Every in-sync copy of the volume takes it at one point of the
    /// write stream; a copy that was out of sync then, or failed to, does not hold it.
    pub holders: Vec<Uuid>,
}

impl Snapshot {
    /// The snapshot `volume` would get now.
    pub fn of(volume: &Volume, uuid: Uuid, name: &str, now_unix_ns: u64) -> Snapshot {
        Snapshot {
            uuid,
            name: name.to_string(),
            project: volume.project.clone(),
            description: String::new(),
            state: SnapshotState::Creating,
            source_volume: volume.uuid,
            source_volume_name: volume.name.clone(),
            size_bytes: volume.size_bytes,
            sector_size: volume.sector_size,
            replica_count: volume.replica_count,
            compression: volume.compression,
            acl: volume.acl.clone(),
            ip_acl: volume.ip_acl.clone(),
            labels: volume.labels.clone(),
            node_uuid: volume.node_uuid,
            retention_secs: 0,
            creation_unix_ns: now_unix_ns,
            etag: 0,
            restoring: Vec::new(),
            holders: Vec::new(),
        }
    }

    /// The node that acts for the snapshot (releases it, expires it, serves clones and
    /// rollbacks from it): the source volume's primary if it holds the snapshot, else the
    /// first holder whose server is not failed, else the node that took it.
    pub fn agent(&self, state: &State) -> Uuid {
        let primary = state.volumes.get(self.source_volume).map(|v| v.node_uuid);
        let live = |n: &&Uuid| state.inventory.server_of(**n).is_none_or(|s| !s.failed);
        primary
            .filter(|p| self.holders.contains(p))
            .or_else(|| self.holders.iter().find(live).copied())
            .unwrap_or(self.node_uuid)
    }

    /// When retention runs out, if the snapshot has a retention time.
    pub fn expiry_unix_ns(&self) -> Option<u64> {
        (self.retention_secs > 0).then(|| {
            self.creation_unix_ns
                .saturating_add(self.retention_secs.saturating_mul(1_000_000_000))
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshots {
    pub by_uuid: BTreeMap<Uuid, Snapshot>,
}

impl Snapshots {
    pub fn get(&self, uuid: Uuid) -> Option<&Snapshot> {
        self.by_uuid.get(&uuid)
    }

    pub fn in_project<'a>(&'a self, project: &'a str) -> impl Iterator<Item = &'a Snapshot> {
        self.by_uuid.values().filter(move |s| s.project == project)
    }

    pub fn by_name(&self, project: &str, name: &str) -> Option<&Snapshot> {
        self.by_uuid
            .values()
            .find(|s| s.project == project && s.name == name)
    }

    /// Snapshots taken of `volume` (by id; they keep the id after the volume is gone).
    pub fn of_volume(&self, volume: Uuid) -> impl Iterator<Item = &Snapshot> {
        self.by_uuid
            .values()
            .filter(move |s| s.source_volume == volume)
    }

    /// Resolves a reference within `project`, or 404.
    pub fn resolve(&self, project: &str, r: &SnapshotRef) -> Result<&Snapshot, DomainError> {
        match r {
            SnapshotRef::Uuid(u) => self
                .get(*u)
                .filter(|s| s.project == project)
                .ok_or_else(|| DomainError::not_found("snapshot", u)),
            SnapshotRef::Name(n) => self
                .by_name(project, n)
                .ok_or_else(|| DomainError::not_found("snapshot", n)),
        }
    }

    fn update(&mut self, uuid: Uuid, at: Applied, change: impl FnOnce(&mut Snapshot)) {
        let s = self
            .by_uuid
            .get_mut(&uuid)
            .expect("invariant: snapshot events after creation name an existing snapshot");
        change(s);
        s.etag = at.seq;
    }
}

/// Everything a new snapshot needs; the API has parsed the retention time.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSnapshot {
    pub project: String,
    pub name: String,
    pub source: VolumeRef,
    pub description: String,
    /// 0 keeps the snapshot until it is deleted.
    pub retention_secs: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    CreateSnapshot(NewSnapshot),
    DeleteSnapshot {
        project: String,
        target: SnapshotRef,
        if_match: Option<String>,
    },
    /// Reconciler: the snapshot's data is captured on `holders` (the primary first).
    MarkSnapshotAvailable {
        uuid: Uuid,
        holders: Vec<Uuid>,
    },
    /// Reconciler: the snapshot's data is freed.
    FinishSnapshotDeletion {
        uuid: Uuid,
    },
    /// Reconciler: the retention time may have run out; deletes the snapshot if it has.
    ExpireSnapshot {
        uuid: Uuid,
    },
}

/// Append only: bincode stores the variant's position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// Boxed to keep the enum small; bincode encodes a box as its contents.
    SnapshotCreationRequested {
        snapshot: Box<Snapshot>,
    },
    SnapshotBecameAvailable {
        uuid: Uuid,
    },
    SnapshotDeletionRequested {
        uuid: Uuid,
    },
    SnapshotDeleted {
        uuid: Uuid,
    },
    /// Retention ran out; the snapshot is `Deleting` from here on.
    SnapshotExpired {
        uuid: Uuid,
    },
    /// The snapshot's data is captured on these nodes (the primary first); it is
    /// `Available`. (Journals before replicated snapshots have `SnapshotBecameAvailable`:
    /// then the node that took it held the only copy.)
    SnapshotTaken {
        uuid: Uuid,
        holders: Vec<Uuid>,
    },
    /// A copy of the volume that lacked the snapshot received it from the primary before
    /// its rebuild (recorded with the rebuild's completion): it holds it too.
    SnapshotCopied {
        uuid: Uuid,
        node: Uuid,
    },
}

impl Event {
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::SnapshotCreationRequested { .. } => "SnapshotCreationRequested",
            Event::SnapshotBecameAvailable { .. } => "SnapshotBecameAvailable",
            Event::SnapshotDeletionRequested { .. } => "SnapshotDeletionRequested",
            Event::SnapshotDeleted { .. } => "SnapshotDeleted",
            Event::SnapshotExpired { .. } => "SnapshotExpired",
            Event::SnapshotTaken { .. } => "SnapshotTaken",
            Event::SnapshotCopied { .. } => "SnapshotCopied",
        }
    }

    pub fn uuid(&self) -> Uuid {
        match self {
            Event::SnapshotCreationRequested { snapshot } => snapshot.uuid,
            Event::SnapshotBecameAvailable { uuid }
            | Event::SnapshotDeletionRequested { uuid }
            | Event::SnapshotDeleted { uuid }
            | Event::SnapshotExpired { uuid }
            | Event::SnapshotTaken { uuid, .. }
            | Event::SnapshotCopied { uuid, .. } => *uuid,
        }
    }

    pub fn project<'a>(&'a self, state: &'a State) -> &'a str {
        match self {
            Event::SnapshotCreationRequested { snapshot } => &snapshot.project,
            other => state
                .snapshots
                .get(other.uuid())
                .map(|s| s.project.as_str())
                .unwrap_or(""),
        }
    }
}

fn create(state: &State, ctx: &Ctx, n: &NewSnapshot) -> Result<Vec<AnyEvent>, DomainError> {
    state.projects.require(&n.project)?;
    check_name("snapshot", &n.name)?;
    check_description(&n.description)?;
    if n.retention_secs > API_DURATION_SECS_MAX {
        return Err(DomainError::InvalidArgument(format!(
            "retentionTime of {}s is longer than {API_DURATION_SECS_MAX}s",
            n.retention_secs
        )));
    }
    let volume = state.volumes.resolve(&n.project, &n.source)?;
    if state.snapshots.by_name(&n.project, &n.name).is_some() {
        return Err(DomainError::exists("snapshot", &n.name));
    }
    if state.snapshots.by_uuid.len() >= SNAPSHOTS_MAX {
        return Err(DomainError::ResourceExhausted(format!(
            "at most {SNAPSHOTS_MAX} snapshots"
        )));
    }
    match volume.state {
        VolumeState::Available => {}
        VolumeState::Deleting | VolumeState::Deleted | VolumeState::Failed => {
            return Err(DomainError::InvalidArgument(format!(
                "volume {} is {:?}",
                volume.uuid, volume.state
            )))
        }
        other => {
            return Err(DomainError::Unavailable(format!(
                "volume {} is {other:?}; retry when it is Available",
                volume.uuid
            )))
        }
    }
    let mut snapshot = Snapshot::of(volume, ctx.new_id(0), &n.name, ctx.now_unix_ns);
    snapshot.description = n.description.clone();
    snapshot.retention_secs = n.retention_secs;
    Ok(vec![AnyEvent::Snapshot(Event::SnapshotCreationRequested {
        snapshot: Box::new(snapshot),
    })])
}

/// Why `s` cannot go away right now, if something is still reading its data.
fn in_use(state: &State, s: &Snapshot) -> Option<String> {
    if let Some(v) = s.restoring.first() {
        return Some(format!(
            "volume {v} is being rolled back to snapshot {}",
            s.uuid
        ));
    }
    state
        .volumes
        .by_uuid
        .values()
        .find(|v| v.state == VolumeState::Creating && v.source_snapshot == Some(s.uuid))
        .map(|v| format!("clone {} of snapshot {} is being created", v.uuid, s.uuid))
}

fn delete(
    state: &State,
    s: &Snapshot,
    if_match: &Option<String>,
) -> Result<Vec<AnyEvent>, DomainError> {
    check_etag("snapshot", s.uuid, s.etag, if_match)?;
    match s.state {
        SnapshotState::Available => {}
        SnapshotState::Deleting | SnapshotState::Deleted | SnapshotState::Failed => {
            return Err(DomainError::InvalidArgument(format!(
                "snapshot {} is {:?}",
                s.uuid, s.state
            )))
        }
        other => {
            return Err(DomainError::Unavailable(format!(
                "snapshot {} is {other:?}; retry when it is Available",
                s.uuid
            )))
        }
    }
    if let Some(why) = in_use(state, s) {
        return Err(DomainError::Unavailable(format!("{why}; retry later")));
    }
    Ok(vec![AnyEvent::Snapshot(Event::SnapshotDeletionRequested {
        uuid: s.uuid,
    })])
}

/// Expires `uuid` if its retention ran out by `now`; otherwise (not yet, already going, or
/// still read by a clone or rollback) nothing happens and the reconciler asks again later.
fn expire(state: &State, now_unix_ns: u64, uuid: Uuid) -> Vec<AnyEvent> {
    match state.snapshots.get(uuid) {
        Some(s)
            if s.state == SnapshotState::Available
                && s.expiry_unix_ns().is_some_and(|t| t <= now_unix_ns)
                && in_use(state, s).is_none() =>
        {
            vec![AnyEvent::Snapshot(Event::SnapshotExpired { uuid })]
        }
        _ => vec![],
    }
}

pub fn decide(state: &State, ctx: &Ctx, cmd: &Command) -> Result<Vec<AnyEvent>, DomainError> {
    let settle = |from: SnapshotState, event: Event, uuid: &Uuid| match state.snapshots.get(*uuid) {
        Some(s) if s.state == from => vec![AnyEvent::Snapshot(event)],
        // Already settled (a reconciler retry after a crash): nothing to do.
        _ => vec![],
    };
    match cmd {
        Command::CreateSnapshot(n) => create(state, ctx, n),
        Command::DeleteSnapshot {
            project,
            target,
            if_match,
        } => delete(state, state.snapshots.resolve(project, target)?, if_match),
        Command::MarkSnapshotAvailable { uuid, holders } => Ok(settle(
            SnapshotState::Creating,
            Event::SnapshotTaken {
                uuid: *uuid,
                holders: holders.clone(),
            },
            uuid,
        )),
        Command::FinishSnapshotDeletion { uuid } => Ok(settle(
            SnapshotState::Deleting,
            Event::SnapshotDeleted { uuid: *uuid },
            uuid,
        )),
        Command::ExpireSnapshot { uuid } => Ok(expire(state, ctx.now_unix_ns, *uuid)),
    }
}

pub fn evolve(state: &mut State, at: Applied, event: &Event) -> Vec<RowKey> {
    let uuid = event.uuid();
    let snapshots = &mut state.snapshots;
    match event {
        Event::SnapshotCreationRequested { snapshot } => {
            let mut s = Snapshot::clone(snapshot);
            s.etag = at.seq;
            snapshots.by_uuid.insert(uuid, s);
        }
        Event::SnapshotBecameAvailable { .. } => snapshots.update(uuid, at, |s| {
            s.state = SnapshotState::Available;
            s.holders = vec![s.node_uuid];
        }),
        Event::SnapshotTaken { holders, .. } => snapshots.update(uuid, at, |s| {
            s.state = SnapshotState::Available;
            s.holders = holders.clone();
            if let Some(first) = holders.first() {
                s.node_uuid = *first;
            }
        }),
        Event::SnapshotCopied { node, .. } => snapshots.update(uuid, at, |s| {
            if !s.holders.contains(node) {
                s.holders.push(*node);
            }
        }),
        Event::SnapshotDeletionRequested { .. } | Event::SnapshotExpired { .. } => {
            snapshots.update(uuid, at, |s| s.state = SnapshotState::Deleting)
        }
        Event::SnapshotDeleted { .. } => {
            snapshots.by_uuid.remove(&uuid);
        }
    }
    vec![RowKey::Snapshot(uuid)]
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::domain::volume::tests::{new_volume, with_volume};
    use crate::domain::volume::{Command as VolumeCommand, Event as VolumeEvent};
    use crate::domain::{given_when, test_ctx, Command as AnyCommand};

    /// The uuid [`with_snapshot`] gives its snapshot (distinct from the volume's).
    pub(crate) const SNAP: Uuid = Uuid::from_u128(0x5a);

    pub(crate) fn new_snapshot(name: &str) -> NewSnapshot {
        NewSnapshot {
            project: "default".into(),
            name: name.into(),
            source: VolumeRef::Name("v1".into()),
            description: String::new(),
            retention_secs: 0,
        }
    }

    fn create_cmd(n: NewSnapshot) -> AnyCommand {
        AnyCommand::Snapshot(Command::CreateSnapshot(n))
    }

    fn del(target: SnapshotRef, if_match: Option<&str>) -> AnyCommand {
        AnyCommand::Snapshot(Command::DeleteSnapshot {
            project: "default".into(),
            target,
            if_match: if_match.map(str::to_string),
        })
    }

    /// The snapshot-creation event `n` yields on `given`, re-keyed to `uuid`.
    fn requested(given: &[AnyEvent], n: NewSnapshot, uuid: Uuid) -> AnyEvent {
        let mut events = given_when(given, create_cmd(n)).unwrap();
        let AnyEvent::Snapshot(Event::SnapshotCreationRequested { mut snapshot }) =
            events.remove(0)
        else {
            panic!("not a snapshot creation")
        };
        snapshot.uuid = uuid;
        AnyEvent::Snapshot(Event::SnapshotCreationRequested { snapshot })
    }

    /// [`with_volume`] plus snapshot `s1` (uuid [`SNAP`]) of `v1`, still `Creating`.
    pub(crate) fn with_creating_snapshot() -> Vec<AnyEvent> {
        let mut given = with_volume();
        given.push(requested(&given, new_snapshot("s1"), SNAP));
        given
    }

    /// [`with_volume`] plus an available snapshot `s1` (uuid [`SNAP`]) of `v1`.
    pub(crate) fn with_snapshot() -> Vec<AnyEvent> {
        let mut given = with_creating_snapshot();
        let node = taker(&given);
        given.push(AnyEvent::Snapshot(Event::SnapshotTaken {
            uuid: SNAP,
            holders: vec![node],
        }));
        given
    }

    /// The node the last requested snapshot in `given` names (its volume's primary).
    fn taker(given: &[AnyEvent]) -> Uuid {
        given
            .iter()
            .rev()
            .find_map(|e| match e {
                AnyEvent::Snapshot(Event::SnapshotCreationRequested { snapshot }) => {
                    Some(snapshot.node_uuid)
                }
                _ => None,
            })
            .expect("a requested snapshot")
    }

    fn err_of(given: &[AnyEvent], cmd: AnyCommand) -> DomainError {
        given_when(given, cmd).unwrap_err()
    }

    #[test]
    fn given_volume_when_create_snapshot_then_creating_copy_of_the_volume() {
        let mut n = new_snapshot("s1");
        n.description = "before upgrade".into();
        n.retention_secs = 3600;
        let events = given_when(&with_volume(), create_cmd(n)).unwrap();
        let [AnyEvent::Snapshot(Event::SnapshotCreationRequested { snapshot })] = &events[..]
        else {
            panic!("{events:?}")
        };
        assert_eq!(snapshot.state, SnapshotState::Creating);
        assert_eq!(snapshot.source_volume, test_ctx().new_id(0));
        assert_eq!(snapshot.source_volume_name, "v1");
        assert_eq!(snapshot.size_bytes, 1 << 30);
        assert_eq!(snapshot.description, "before upgrade");
        assert_eq!(
            snapshot.expiry_unix_ns(),
            Some(test_ctx().now_unix_ns + 3600 * 1_000_000_000)
        );
    }

    #[test]
    fn given_volume_when_retention_beyond_the_duration_range_then_400() {
        let mut n = new_snapshot("s1");
        n.retention_secs = u64::MAX;
        assert!(matches!(
            err_of(&with_volume(), create_cmd(n.clone())),
            DomainError::InvalidArgument(_)
        ));
        n.retention_secs = API_DURATION_SECS_MAX;
        assert!(given_when(&with_volume(), create_cmd(n)).is_ok());
    }

    #[test]
    fn given_snapshot_when_delete_with_garbage_etag_then_400() {
        let err = err_of(
            &with_snapshot(),
            del(SnapshotRef::Uuid(SNAP), Some("not-a-number")),
        );
        assert!(matches!(err, DomainError::InvalidArgument(_)), "{err:?}");
    }

    #[test]
    fn by_uuid_works_and_missing_volume_or_project_is_404() {
        let mut n = new_snapshot("s1");
        n.source = VolumeRef::Uuid(test_ctx().new_id(0));
        assert!(given_when(&with_volume(), create_cmd(n.clone())).is_ok());
        n.source = VolumeRef::Uuid(Uuid::nil());
        assert!(matches!(
            err_of(&with_volume(), create_cmd(n)),
            DomainError::NotFound(_)
        ));
        let mut n = new_snapshot("s1");
        n.source = VolumeRef::Name("nope".into());
        assert!(matches!(
            err_of(&with_volume(), create_cmd(n)),
            DomainError::NotFound(_)
        ));
        let mut n = new_snapshot("s1");
        n.project = "nope".into();
        assert!(matches!(
            err_of(&with_volume(), create_cmd(n)),
            DomainError::NotFound(_)
        ));
    }

    #[test]
    fn given_snapshot_when_create_same_name_then_409() {
        let err = err_of(&with_snapshot(), create_cmd(new_snapshot("s1")));
        assert!(matches!(err, DomainError::AlreadyExists(_)), "{err:?}");
    }

    #[test]
    fn bad_name_or_long_description_is_400() {
        let err = err_of(&with_volume(), create_cmd(new_snapshot("a b")));
        assert!(matches!(err, DomainError::InvalidArgument(_)));
        let mut n = new_snapshot("s1");
        n.description = "x".repeat(257);
        let err = err_of(&with_volume(), create_cmd(n));
        assert!(matches!(err, DomainError::InvalidArgument(_)));
    }

    #[test]
    fn volume_not_available_is_503_while_transient_and_400_when_deleting() {
        let mut creating = crate::domain::cluster::tests::bootstrap_events();
        creating.extend(
            given_when(
                &creating,
                AnyCommand::Volume(VolumeCommand::CreateVolume(new_volume("v1"))),
            )
            .unwrap(),
        );
        let err = err_of(&creating, create_cmd(new_snapshot("s1")));
        assert!(matches!(err, DomainError::Unavailable(_)), "{err:?}");
        let mut deleting = with_volume();
        deleting.push(AnyEvent::Volume(VolumeEvent::VolumeDeletionRequested {
            uuid: test_ctx().new_id(0),
        }));
        let err = err_of(&deleting, create_cmd(new_snapshot("s1")));
        assert!(matches!(err, DomainError::InvalidArgument(_)), "{err:?}");
    }

    #[test]
    fn lifecycle_creating_available_deleting_gone() {
        let given = with_creating_snapshot();
        let mark = AnyCommand::Snapshot(Command::MarkSnapshotAvailable {
            uuid: SNAP,
            holders: vec![taker(&given)],
        });
        let events = given_when(&given, mark.clone()).unwrap();
        assert_eq!(events[0].type_name(), "SnapshotTaken");
        // A retry after the fact is a no-op.
        assert!(given_when(&with_snapshot(), mark).unwrap().is_empty());

        let events =
            given_when(&with_snapshot(), del(SnapshotRef::Name("s1".into()), None)).unwrap();
        assert_eq!(events[0].type_name(), "SnapshotDeletionRequested");
        let mut deleting = with_snapshot();
        deleting.extend(events);
        let finish = AnyCommand::Snapshot(Command::FinishSnapshotDeletion { uuid: SNAP });
        let events = given_when(&deleting, finish.clone()).unwrap();
        assert_eq!(events[0].type_name(), "SnapshotDeleted");
        let mut gone = deleting.clone();
        gone.extend(events);
        assert!(given_when(&gone, finish).unwrap().is_empty());
        let err = err_of(&gone, del(SnapshotRef::Uuid(SNAP), None));
        assert!(matches!(err, DomainError::NotFound(_)));
    }

    #[test]
    fn the_holders_are_recorded_and_a_live_one_acts_for_the_snapshot() {
        let given = with_creating_snapshot();
        let primary = taker(&given);
        let (a, b) = (Uuid::from_u128(0xa), Uuid::from_u128(0xb));
        let mut state = State::default();
        let mut seq = 0;
        let mut apply = |state: &mut State, e: &AnyEvent| {
            seq += 1;
            state.evolve(
                Applied {
                    seq,
                    time_unix_ns: 1,
                },
                e,
            );
        };
        for e in &given {
            apply(&mut state, e);
        }
        // A journal from before replicated snapshots: the taker held the only copy.
        let mut old = state.clone();
        apply(
            &mut old,
            &AnyEvent::Snapshot(Event::SnapshotBecameAvailable { uuid: SNAP }),
        );
        assert_eq!(old.snapshots.get(SNAP).unwrap().holders, vec![primary]);
        // Taken by another primary (a failover came between request and capture).
        apply(
            &mut state,
            &AnyEvent::Snapshot(Event::SnapshotTaken {
                uuid: SNAP,
                holders: vec![a, b],
            }),
        );
        let s = state.snapshots.get(SNAP).unwrap();
        assert_eq!(
            (s.state, s.holders.clone()),
            (SnapshotState::Available, vec![a, b])
        );
        assert_eq!(s.node_uuid, a, "the primary that took it");
        // The volume's primary does not hold it (no server record: counted live): the first
        // live holder acts for it.
        assert_eq!(s.agent(&state), a);
    }

    #[test]
    fn delete_state_rules_and_etag() {
        // Creating → 503; Deleting → 400; wrong ETag → 412; right ETag → ok.
        let err = err_of(
            &with_creating_snapshot(),
            del(SnapshotRef::Uuid(SNAP), None),
        );
        assert!(matches!(err, DomainError::Unavailable(_)), "{err:?}");
        let mut deleting = with_snapshot();
        deleting.push(AnyEvent::Snapshot(Event::SnapshotDeletionRequested {
            uuid: SNAP,
        }));
        let err = err_of(&deleting, del(SnapshotRef::Uuid(SNAP), None));
        assert!(matches!(err, DomainError::InvalidArgument(_)), "{err:?}");
        let given = with_snapshot();
        let err = err_of(&given, del(SnapshotRef::Uuid(SNAP), Some("1")));
        assert!(matches!(err, DomainError::EtagMismatch(_)), "{err:?}");
        let etag = given.len().to_string();
        assert!(given_when(&given, del(SnapshotRef::Uuid(SNAP), Some(&etag))).is_ok());
        let err = err_of(&given, del(SnapshotRef::Name("nope".into()), None));
        assert!(matches!(err, DomainError::NotFound(_)));
    }

    #[test]
    fn a_snapshot_being_cloned_cannot_be_deleted_or_expire_yet() {
        let mut given = with_snapshot();
        let mut clone = new_volume("c1");
        clone.size_bytes = 0;
        clone.source_snapshot = Some(SnapshotRef::Name("s1".into()));
        let events = given_when(
            &given,
            AnyCommand::Volume(VolumeCommand::CreateVolume(clone)),
        )
        .unwrap();
        let AnyEvent::Volume(VolumeEvent::VolumeCreationRequested { volume }) = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(volume.source_snapshot, Some(SNAP));
        assert_eq!(volume.source_snapshot_name, "s1");
        assert_eq!(volume.size_bytes, 1 << 30);
        given.push(AnyEvent::Volume(VolumeEvent::VolumeCreationRequested {
            volume: Box::new(Volume {
                uuid: Uuid::from_u128(0xc1),
                ..Volume::clone(volume)
            }),
        }));
        let err = err_of(&given, del(SnapshotRef::Uuid(SNAP), None));
        assert!(matches!(err, DomainError::Unavailable(_)), "{err:?}");
    }

    #[test]
    fn expiry_happens_only_after_the_retention_time() {
        let now = test_ctx().now_unix_ns;
        let at = |secs_ago: u64, retention: u64| {
            let mut given = with_volume();
            let mut n = new_snapshot("s1");
            n.retention_secs = retention;
            let AnyEvent::Snapshot(Event::SnapshotCreationRequested { mut snapshot }) =
                requested(&given, n, SNAP)
            else {
                unreachable!()
            };
            snapshot.creation_unix_ns = now - secs_ago * 1_000_000_000;
            given.push(AnyEvent::Snapshot(Event::SnapshotCreationRequested {
                snapshot,
            }));
            given.push(AnyEvent::Snapshot(Event::SnapshotBecameAvailable {
                uuid: SNAP,
            }));
            given_when(
                &given,
                AnyCommand::Snapshot(Command::ExpireSnapshot { uuid: SNAP }),
            )
            .unwrap()
        };
        assert_eq!(at(10, 5)[0].type_name(), "SnapshotExpired");
        assert_eq!(at(5, 5)[0].type_name(), "SnapshotExpired");
        assert!(at(4, 5).is_empty(), "not yet");
        assert!(at(10_000, 0).is_empty(), "no retention: kept forever");
    }

    #[test]
    fn deleting_a_volume_keeps_its_snapshots_but_waits_for_one_being_taken() {
        let del_volume = AnyCommand::Volume(VolumeCommand::DeleteVolume {
            project: "default".into(),
            target: VolumeRef::Name("v1".into()),
            if_match: None,
        });
        let err = err_of(&with_creating_snapshot(), del_volume.clone());
        assert!(matches!(err, DomainError::Unavailable(_)), "{err:?}");
        let mut given = with_snapshot();
        given.extend(given_when(&given, del_volume).unwrap());
        given.push(AnyEvent::Volume(VolumeEvent::VolumeDeleted {
            uuid: test_ctx().new_id(0),
        }));
        let mut state = State::default();
        for (i, e) in given.iter().enumerate() {
            state.evolve(
                Applied {
                    seq: i as u64 + 1,
                    time_unix_ns: 1,
                },
                e,
            );
        }
        assert!(state.volumes.is_empty());
        assert_eq!(
            state.snapshots.get(SNAP).map(|s| s.state),
            Some(SnapshotState::Available)
        );
    }
}

/// Rollback is a volume command, but all its rules are about snapshots.
#[cfg(test)]
mod rollback_tests {
    use super::tests::{with_creating_snapshot, with_snapshot, SNAP};
    use super::*;
    use crate::domain::volume::tests::{new_volume, with_volume};
    use crate::domain::volume::{Command as VolumeCommand, Event as VolumeEvent};
    use crate::domain::{given_when, test_ctx, Command as AnyCommand};

    fn rollback(volume: &str, snapshot: SnapshotRef) -> AnyCommand {
        AnyCommand::Volume(VolumeCommand::RollbackVolume {
            project: "default".into(),
            target: VolumeRef::Name(volume.into()),
            snapshot,
        })
    }

    fn state_of(given: &[AnyEvent]) -> State {
        let mut state = State::default();
        for (i, e) in given.iter().enumerate() {
            state.evolve(
                Applied {
                    seq: i as u64 + 1,
                    time_unix_ns: 1,
                },
                e,
            );
        }
        state
    }

    #[test]
    fn given_snapshot_when_rollback_then_rollback_state_until_the_reconciler_finishes() {
        let mut given = with_snapshot();
        let events = given_when(&given, rollback("v1", SnapshotRef::Name("s1".into()))).unwrap();
        assert_eq!(events[0].type_name(), "VolumeRollbackRequested");
        given.extend(events);
        let vol = test_ctx().new_id(0);
        let s = state_of(&given);
        assert_eq!(s.volumes.get(vol).unwrap().state, VolumeState::Rollback);
        assert_eq!(s.snapshots.get(SNAP).unwrap().restoring, [vol]);
        // While it runs: no second rollback, no snapshot deletion.
        let err = given_when(&given, rollback("v1", SnapshotRef::Uuid(SNAP))).unwrap_err();
        assert!(matches!(err, DomainError::Unavailable(_)), "{err:?}");
        let del = AnyCommand::Snapshot(Command::DeleteSnapshot {
            project: "default".into(),
            target: SnapshotRef::Uuid(SNAP),
            if_match: None,
        });
        let err = given_when(&given, del.clone()).unwrap_err();
        assert!(matches!(err, DomainError::Unavailable(_)), "{err:?}");

        let finish = AnyCommand::Volume(VolumeCommand::FinishVolumeRollback {
            uuid: vol,
            rolled_back: Vec::new(),
        });
        let events = given_when(&given, finish.clone()).unwrap();
        assert_eq!(events[0].type_name(), "VolumeRolledBack");
        given.extend(events);
        let s = state_of(&given);
        assert_eq!(s.volumes.get(vol).unwrap().state, VolumeState::Available);
        assert!(s.snapshots.get(SNAP).unwrap().restoring.is_empty());
        assert!(given_when(&given, finish).unwrap().is_empty());
        assert!(given_when(&given, del).is_ok());
    }

    /// [`with_snapshot`] with the volume's second copy on node `x` (out of sync, or not).
    fn with_two_copies(x: Uuid, out_of_sync: bool) -> Vec<AnyEvent> {
        let mut given = with_snapshot();
        for e in &mut given {
            if let AnyEvent::Volume(VolumeEvent::VolumeCreationRequested { volume }) = e {
                volume.replica_count = 2;
                volume.replica_nodes = vec![x];
                if out_of_sync {
                    volume.out_of_sync = vec![x];
                }
            }
        }
        given
    }

    /// A rebuilt replica holds the snapshots copied to it before its rebuild from the
    /// decision that records it in sync; one deleted meanwhile, or another volume's, is
    /// not recorded, and the rebuild's completion comes last.
    #[test]
    fn a_rebuilt_replica_holds_the_snapshots_copied_to_it() {
        let x = Uuid::from_u128(0xa);
        let mut given = with_two_copies(x, true);
        let vol = test_ctx().new_id(0);
        let v = state_of(&given).volumes.get(vol).unwrap().clone();
        let other = Uuid::from_u128(0x5b);
        let rebuilt = |snapshots: Vec<Uuid>| {
            AnyCommand::Volume(VolumeCommand::MarkReplicaInSync {
                uuid: vol,
                node: x,
                epoch: v.epoch,
                copied_bytes: 1 << 20,
                snapshots,
            })
        };
        let events = given_when(&given, rebuilt(vec![SNAP, other])).unwrap();
        assert_eq!(
            events,
            [
                AnyEvent::Snapshot(Event::SnapshotCopied {
                    uuid: SNAP,
                    node: x
                }),
                AnyEvent::Volume(VolumeEvent::VolumeReplicaInSync {
                    uuid: vol,
                    node: x,
                    copied_bytes: 1 << 20
                }),
            ]
        );
        let mut after = given.clone();
        after.extend(events);
        let s = state_of(&after);
        assert_eq!(s.snapshots.get(SNAP).unwrap().holders.last(), Some(&x));
        assert!(s.volumes.get(vol).unwrap().out_of_sync.is_empty());
        // Deleted while the rebuild ran: the replica's agent releases its copy instead.
        given.push(AnyEvent::Snapshot(Event::SnapshotDeletionRequested {
            uuid: SNAP,
        }));
        let events = given_when(&given, rebuilt(vec![SNAP])).unwrap();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].type_name(), "VolumeReplicaInSync");
    }

    /// A copy rebuilt while a snapshot was taken (only in-sync copies take one) lacks it:
    /// its rebuild is not recorded, so it is rebuilt again and the snapshot copied first;
    /// once that snapshot is deleted, nothing is lacking.
    #[test]
    fn a_copy_that_lacks_a_snapshot_taken_during_its_rebuild_is_not_recorded_in_sync() {
        let x = Uuid::from_u128(0xa);
        let mut given = with_two_copies(x, true);
        let vol = test_ctx().new_id(0);
        let v = state_of(&given).volumes.get(vol).unwrap().clone();
        assert!(
            state_of(&given)
                .snapshots
                .get(SNAP)
                .unwrap()
                .holders
                .contains(&v.node_uuid),
            "the primary holds the snapshot"
        );
        let rebuilt = AnyCommand::Volume(VolumeCommand::MarkReplicaInSync {
            uuid: vol,
            node: x,
            epoch: v.epoch,
            copied_bytes: 1 << 20,
            snapshots: vec![],
        });
        match given_when(&given, rebuilt.clone()) {
            Err(DomainError::Unavailable(m)) => {
                assert!(m.contains(&SNAP.to_string()), "names the snapshot: {m}")
            }
            other => panic!("a copy lacking a snapshot recorded in sync: {other:?}"),
        }
        given.push(AnyEvent::Snapshot(Event::SnapshotDeletionRequested {
            uuid: SNAP,
        }));
        let events = given_when(&given, rebuilt).unwrap();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].type_name(), "VolumeReplicaInSync");
    }

    /// A replica that rolled back with the primary is in sync again when the rollback
    /// ends; a rebuild ending meanwhile (it copied the data from before) is not recorded.
    #[test]
    fn a_rollback_records_the_replicas_that_rolled_back_with_it_in_sync() {
        let x = Uuid::from_u128(0xa);
        let mut given = with_two_copies(x, false);
        let vol = test_ctx().new_id(0);
        given.extend(given_when(&given, rollback("v1", SnapshotRef::Uuid(SNAP))).unwrap());
        let v = state_of(&given).volumes.get(vol).unwrap().clone();
        assert_eq!(
            v.out_of_sync,
            [x],
            "the rollback rewrites the primary's copy first"
        );
        let rebuilt = AnyCommand::Volume(VolumeCommand::MarkReplicaInSync {
            uuid: vol,
            node: x,
            epoch: v.epoch,
            copied_bytes: 1 << 20,
            snapshots: vec![],
        });
        assert_eq!(
            given_when(&given, rebuilt).unwrap(),
            [],
            "not during a rollback"
        );
        let finish = AnyCommand::Volume(VolumeCommand::FinishVolumeRollback {
            uuid: vol,
            rolled_back: vec![x, Uuid::from_u128(0xb)],
        });
        let events = given_when(&given, finish).unwrap();
        assert_eq!(
            events,
            [
                AnyEvent::Volume(VolumeEvent::VolumeReplicaInSync {
                    uuid: vol,
                    node: x,
                    copied_bytes: 0
                }),
                AnyEvent::Volume(VolumeEvent::VolumeRolledBack { uuid: vol }),
            ],
            "only the volume's own replicas"
        );
        given.extend(events);
        let v = state_of(&given).volumes.get(vol).unwrap().clone();
        assert!(v.out_of_sync.is_empty());
        assert_eq!(v.state, VolumeState::Available);
    }

    #[test]
    fn rollback_errors() {
        // Missing volume or snapshot: 404.
        let err = given_when(&with_snapshot(), rollback("nope", SnapshotRef::Uuid(SNAP)));
        assert!(matches!(err, Err(DomainError::NotFound(_))), "{err:?}");
        let err = given_when(
            &with_snapshot(),
            rollback("v1", SnapshotRef::Name("x".into())),
        );
        assert!(matches!(err, Err(DomainError::NotFound(_))), "{err:?}");
        // Snapshot still being taken: 503.
        let err = given_when(
            &with_creating_snapshot(),
            rollback("v1", SnapshotRef::Uuid(SNAP)),
        );
        assert!(matches!(err, Err(DomainError::Unavailable(_))), "{err:?}");
        // Snapshot of another volume: 400.
        let mut given = with_snapshot();
        let mut other = given_when(
            &given,
            AnyCommand::Volume(VolumeCommand::CreateVolume(new_volume("v2"))),
        )
        .unwrap();
        if let AnyEvent::Volume(VolumeEvent::VolumeCreationRequested { volume }) = &mut other[0] {
            volume.uuid = Uuid::from_u128(0x2);
        }
        given.extend(other);
        given.push(AnyEvent::Volume(VolumeEvent::VolumeBecameAvailable {
            uuid: Uuid::from_u128(0x2),
        }));
        let err = given_when(&given, rollback("v2", SnapshotRef::Uuid(SNAP)));
        assert!(
            matches!(err, Err(DomainError::InvalidArgument(_))),
            "{err:?}"
        );
        // Volume being deleted: 503, as the reference documents.
        let mut deleting = with_snapshot();
        deleting.push(AnyEvent::Volume(VolumeEvent::VolumeDeletionRequested {
            uuid: test_ctx().new_id(0),
        }));
        let err = given_when(&deleting, rollback("v1", SnapshotRef::Uuid(SNAP)));
        assert!(matches!(err, Err(DomainError::Unavailable(_))), "{err:?}");
        // No snapshot at all by that name in the project.
        let err = given_when(
            &with_volume(),
            rollback("v1", SnapshotRef::Name("s1".into())),
        );
        assert!(matches!(err, Err(DomainError::NotFound(_))), "{err:?}");
    }
}
