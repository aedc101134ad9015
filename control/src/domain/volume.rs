//! Volumes: thin block devices served as NVMe namespaces of the cluster subsystem.
//!
//! Lifecycle: `CreateVolume` appends `VolumeCreationRequested` (state `Creating`); the
//! reconciler prepares the data path and appends `VolumeBecameAvailable`. `DeleteVolume`
//! appends `VolumeDeletionRequested` (state `Deleting`); the reconciler tears the namespace
//! down and appends `VolumeDeleted`, after which the volume is gone. `RollbackVolume` appends
//! `VolumeRollbackRequested` (state `Rollback`, the namespace is withdrawn); the reconciler
//! copies the snapshot's data back and appends `VolumeRolledBack` (state `Available`).
//!
//! Copies: the primary (`node_uuid`) and the replicas (`replica_nodes`); a copy is in sync
//! when it is the primary or a replica not recorded out of sync. `protectionState` is
//! `FullyProtected` while the in-sync copies are at least `replicaCount`, else `Degraded`.
//! A replica moves make-before-break (an eviction, ordered by the leader with
//! `MoveReplica`): `VolumeReplicaAdded` adds the new node out of sync (the primary's agent
//! rebuilds it with a full copy while the old one keeps receiving writes) and records the
//! pending replacement (`Volume::replacing`); the decision that records the new copy in
//! sync also removes the old one (`VolumeReplicaRemoved`), so the volume never has fewer
//! in-sync copies than before. When the copy leaving is the primary, it leaves with the
//! planned hand-over of the primary instead (`PromoteReplica`), once the new copy is in
//! sync. The old node's agent then releases its image.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::inventory::ServerState;
use super::names::{check_etag, check_name, check_nqn};
use super::policy::PolicyRef;
use super::snapshot::{Event as SnapshotEvent, SnapshotRef, SnapshotState};
use super::{Applied, Ctx, DomainError, Event as AnyEvent, RowKey, State};
use crate::limits::{ACL_ENTRIES_MAX, LABELS_MAX, VOLUMES_MAX, VOLUME_BYTES_MAX, VOLUME_MOVES_MAX};

pub const ALLOW_ANY: &str = "ALLOW_ANY";
pub const ALLOW_NONE: &str = "ALLOW_NONE";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum VolumeState {
    #[default]
    Unknown,
    Creating,
    Available,
    Deleting,
    Deleted,
    Failed,
    Updating,
    Rollback,
    Migrating,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProtectionState {
    #[default]
    Unknown,
    FullyProtected,
    Degraded,
    ReadOnly,
    NotAvailable,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Label {
    pub key: String,
    pub value: String,
}

/// A replica move in progress: `node` was added (out of sync) to take over the copy on
/// `replaces`, which leaves once `node` is in sync (a primary: once it was handed over).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replacement {
    pub node: Uuid,
    pub replaces: Uuid,
}

/// How a command names a volume: by id, or by name within its project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeRef {
    Uuid(Uuid),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Volume {
    pub uuid: Uuid,
    pub name: String,
    pub project: String,
    pub state: VolumeState,
    pub protection: ProtectionState,
    pub replica_count: u32,
    pub nsid: u32,
    /// Host NQNs, or one of `ALLOW_ANY` / `ALLOW_NONE`.
    pub acl: Vec<String>,
    /// IP addresses, or one of `ALLOW_ANY` / `ALLOW_NONE`.
    pub ip_acl: Vec<String>,
    pub compression: bool,
    pub size_bytes: u64,
    pub sector_size: u32,
    pub source_snapshot: Option<Uuid>,
    pub source_snapshot_name: String,
    pub qos_policy: Option<Uuid>,
    pub labels: Vec<Label>,
    /// The primary: the node whose data path serves the volume.
    pub node_uuid: Uuid,
    pub creation_unix_ns: u64,
    /// Seq of the last event that changed this volume; its ETag.
    pub etag: u64,
    /// The other `replica_count - 1` nodes, on distinct servers (distinct failure domains
    /// when there are enough). The primary writes every change to the ones in sync.
    pub replica_nodes: Vec<Uuid>,
    /// The primary's term: the seq of the event that made the current primary (its
    /// creation). Every replicated write carries it; replicas refuse older ones.
    pub epoch: u64,
    /// Replica nodes recorded out of sync: they receive no writes until rebuilt.
    pub out_of_sync: Vec<Uuid>,
    /// A planned hand-over in progress: the previous primary, which has not yet confirmed
    /// that it stopped serving (the new primary serves only after that, or once that
    /// server failed).
    pub releasing: Option<Uuid>,
    /// Replica moves in progress (at most [`VOLUME_MOVES_MAX`]).
    pub replacing: Vec<Replacement>,
    /// How far the rebuild of an out-of-sync replica has got, in percent, as its primary
    /// last reported (`rebuildProgress`; 0 when a copy falls out of sync or a rebuild
    /// ends).
    pub rebuild_percent: u8,
    /// The primary the last failover or hand-over replaced, while its copy is out of sync:
    /// it held every acknowledged write then, so the new primary rebuilds it from what
    /// changed around and since the switch (when it saw the switch happen) rather than
    /// copying everything. (Last: event schema 7 appended it.)
    pub deposed: Option<Uuid>,
}

impl Volume {
    /// The replicas that hold every acknowledged write.
    pub fn in_sync_replicas(&self) -> impl Iterator<Item = Uuid> + '_ {
        self.replica_nodes
            .iter()
            .copied()
            .filter(|n| !self.out_of_sync.contains(n))
    }

    /// Every copy that holds every acknowledged write: the primary and the in-sync replicas.
    pub fn in_sync_copies(&self) -> impl Iterator<Item = Uuid> + '_ {
        std::iter::once(self.node_uuid).chain(self.in_sync_replicas())
    }

    /// Protection as the copies in sync make it: an extra copy being rebuilt (a replica
    /// move) leaves a volume with enough in-sync copies `FullyProtected`.
    pub(super) fn protection_now(&self) -> ProtectionState {
        if self.in_sync_copies().count() >= self.replica_count as usize {
            ProtectionState::FullyProtected
        } else {
            ProtectionState::Degraded
        }
    }

    /// Every node holding a copy, primary first.
    pub fn nodes(&self) -> impl Iterator<Item = Uuid> + '_ {
        std::iter::once(self.node_uuid).chain(self.replica_nodes.iter().copied())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Volumes {
    pub by_uuid: BTreeMap<Uuid, Volume>,
    /// `(project, name)` → uuid; derived from `by_uuid`, rebuilt by [`Volumes::insert`].
    #[serde(skip)]
    by_name: BTreeMap<(String, String), Uuid>,
    /// Namespace ids in use; derived from `by_uuid` like `by_name`.
    #[serde(skip)]
    nsids: BTreeSet<u32>,
}

impl Volumes {
    /// Adds or replaces a volume, keeping the name and nsid indexes true.
    pub fn insert(&mut self, v: Volume) {
        if let Some(old) = self.by_uuid.get(&v.uuid) {
            self.by_name
                .remove(&(old.project.clone(), old.name.clone()));
            self.nsids.remove(&old.nsid);
        }
        self.by_name
            .insert((v.project.clone(), v.name.clone()), v.uuid);
        self.nsids.insert(v.nsid);
        self.by_uuid.insert(v.uuid, v);
    }

    fn remove(&mut self, uuid: Uuid) {
        if let Some(old) = self.by_uuid.remove(&uuid) {
            self.by_name.remove(&(old.project, old.name));
            self.nsids.remove(&old.nsid);
        }
    }

    pub fn get(&self, uuid: Uuid) -> Option<&Volume> {
        self.by_uuid.get(&uuid)
    }

    pub fn by_name(&self, project: &str, name: &str) -> Option<&Volume> {
        let uuid = self.by_name.get(&(project.to_string(), name.to_string()))?;
        self.by_uuid.get(uuid)
    }

    /// Resolves a reference within `project`, or 404.
    pub fn resolve(&self, project: &str, r: &VolumeRef) -> Result<&Volume, DomainError> {
        let found = match r {
            VolumeRef::Uuid(u) => self.get(*u).filter(|v| v.project == project),
            VolumeRef::Name(n) => self.by_name(project, n),
        };
        found.ok_or_else(|| match r {
            VolumeRef::Uuid(u) => DomainError::not_found("volume", u),
            VolumeRef::Name(n) => DomainError::not_found("volume", n),
        })
    }

    pub fn in_project<'a>(&'a self, project: &'a str) -> impl Iterator<Item = &'a Volume> {
        self.by_uuid.values().filter(move |v| v.project == project)
    }

    pub fn len(&self) -> usize {
        self.by_uuid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_uuid.is_empty()
    }

    /// Lowest namespace id not held by a volume.
    fn free_nsid(&self) -> u32 {
        let mut nsid = 1;
        for &n in &self.nsids {
            if n != nsid {
                break;
            }
            nsid += 1;
        }
        nsid
    }
}

/// Everything a new volume needs; the API has already parsed sizes and flags.
#[derive(Debug, Clone, PartialEq)]
pub struct NewVolume {
    pub project: String,
    pub name: String,
    /// 0 means "as large as the source snapshot" for clones.
    pub size_bytes: u64,
    pub acl: Vec<String>,
    /// `None` means the default, `ALLOW_ANY`.
    pub ip_acl: Option<Vec<String>>,
    pub compression: bool,
    pub replica_count: u32,
    /// 0 means the default, 4096.
    pub sector_size: u32,
    pub source_snapshot: Option<SnapshotRef>,
    pub qos: Option<PolicyRef>,
    pub labels: Vec<Label>,
}

/// A change to an existing volume; `None` leaves a field alone.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct VolumeChange {
    pub acl: Option<Vec<String>>,
    pub ip_acl: Option<Vec<String>>,
    pub size_bytes: Option<u64>,
    pub force: bool,
    pub compression: Option<bool>,
    pub qos: Option<PolicyRef>,
    pub labels: Option<Vec<Label>>,
    pub new_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    CreateVolume(NewVolume),
    UpdateVolume {
        project: String,
        target: VolumeRef,
        if_match: Option<String>,
        change: VolumeChange,
    },
    DeleteVolume {
        project: String,
        target: VolumeRef,
        if_match: Option<String>,
    },
    /// Reconciler: the data path serves the volume now.
    MarkVolumeAvailable {
        uuid: Uuid,
    },
    /// Reconciler: the data path released the volume.
    FinishVolumeDeletion {
        uuid: Uuid,
    },
    /// Restores the volume's data from one of its own snapshots.
    RollbackVolume {
        project: String,
        target: VolumeRef,
        snapshot: SnapshotRef,
    },
    /// Reconciler: the snapshot's data is back in the volume.
    FinishVolumeRollback {
        uuid: Uuid,
        /// Replicas that rolled back with the primary: in sync again.
        rolled_back: Vec<Uuid>,
    },
    /// Data path: a block of the volume failed its checksum on read.
    RecordDataIntegrityError {
        uuid: Uuid,
        block: u64,
    },
    /// The primary (at `epoch`) could not write to the replica on `node`.
    MarkReplicaOutOfSync {
        uuid: Uuid,
        node: Uuid,
        epoch: u64,
    },
    /// The primary (at `epoch`) rebuilt the replica on `node`, sending `copied_bytes`,
    /// after copying it `snapshots` it lacked.
    MarkReplicaInSync {
        uuid: Uuid,
        node: Uuid,
        epoch: u64,
        copied_bytes: u64,
        snapshots: Vec<Uuid>,
    },
    /// Leader (at `leader_epoch`): the primary's server failed (or, `planned`, was
    /// disabled); the in-sync replica on `node` takes over.
    PromoteReplica {
        uuid: Uuid,
        node: Uuid,
        leader_epoch: u64,
        planned: bool,
    },
    /// The previous primary (a planned hand-over) stopped serving the volume.
    ReleasePrimary {
        uuid: Uuid,
        node: Uuid,
    },
    /// Leader (at `leader_epoch`), evicting a server: the copy on `from` moves to `to` (a
    /// node holding no copy, on an enabled, live server), make-before-break.
    MoveReplica {
        uuid: Uuid,
        from: Uuid,
        to: Uuid,
        leader_epoch: u64,
    },
    /// Leader (at `leader_epoch`): the move's new copy on `node` cannot complete (its
    /// server failed or was disabled); it leaves, and the move may start again elsewhere.
    CancelReplicaMove {
        uuid: Uuid,
        node: Uuid,
        leader_epoch: u64,
    },
    /// The primary (at `epoch`) has rebuilt `percent` of what the replica on `node` missed.
    RecordRebuildProgress {
        uuid: Uuid,
        node: Uuid,
        epoch: u64,
        percent: u8,
    },
}

/// Append only: bincode stores the variant's position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// Boxed: a volume is far larger than any other event (bincode stores it as is).
    VolumeCreationRequested {
        volume: Box<Volume>,
    },
    VolumeBecameAvailable {
        uuid: Uuid,
    },
    VolumeUpdated {
        uuid: Uuid,
        change: VolumeDelta,
    },
    VolumeDeletionRequested {
        uuid: Uuid,
    },
    VolumeDeleted {
        uuid: Uuid,
    },
    VolumeRollbackRequested {
        uuid: Uuid,
        snapshot: Uuid,
    },
    VolumeRolledBack {
        uuid: Uuid,
    },
    VolumeDataIntegrityError {
        uuid: Uuid,
        block: u64,
    },
    /// The primary could not write to this replica; it no longer receives writes.
    VolumeReplicaOutOfSync {
        uuid: Uuid,
        node: Uuid,
        epoch: u64,
    },
    /// The in-sync replica on `node` became the primary (a new epoch: this event's seq);
    /// the old primary is now an out-of-sync replica.
    VolumePrimaryChanged {
        uuid: Uuid,
        node: Uuid,
        old: Uuid,
    },
    /// The primary rebuilt this replica (copying `copied_bytes`); it receives writes again.
    VolumeReplicaInSync {
        uuid: Uuid,
        node: Uuid,
        copied_bytes: u64,
    },
    /// A planned hand-over (the primary's server was disabled): as `VolumePrimaryChanged`,
    /// but the new primary serves only once the old one released the volume.
    VolumePrimaryHandedOver {
        uuid: Uuid,
        node: Uuid,
        old: Uuid,
    },
    /// The old primary of a hand-over stopped serving the volume.
    VolumePrimaryReleased {
        uuid: Uuid,
    },
    /// A new replica on `node`, out of sync until the primary rebuilt it with a full copy;
    /// `replacing`: the copy it takes over from, which leaves once it is in sync.
    VolumeReplicaAdded {
        uuid: Uuid,
        node: Uuid,
        replacing: Option<Uuid>,
    },
    /// The replica on `node` left the volume (a move completed, or one aborted); its
    /// node's agent releases the image.
    VolumeReplicaRemoved {
        uuid: Uuid,
        node: Uuid,
    },
    /// The rebuild of the replica on `node` has copied `percent` of what it missed (the
    /// primary reports every tenth, for rebuilds that take a while).
    VolumeRebuildProgressed {
        uuid: Uuid,
        node: Uuid,
        percent: u8,
    },
}

/// The resolved form of a [`VolumeChange`] as stored in the journal.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct VolumeDelta {
    pub acl: Option<Vec<String>>,
    pub ip_acl: Option<Vec<String>>,
    pub size_bytes: Option<u64>,
    pub compression: Option<bool>,
    pub qos_policy: Option<Option<Uuid>>,
    pub labels: Option<Vec<Label>>,
    pub name: Option<String>,
}

impl Event {
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::VolumeCreationRequested { .. } => "VolumeCreationRequested",
            Event::VolumeBecameAvailable { .. } => "VolumeBecameAvailable",
            Event::VolumeUpdated { .. } => "VolumeUpdated",
            Event::VolumeDeletionRequested { .. } => "VolumeDeletionRequested",
            Event::VolumeDeleted { .. } => "VolumeDeleted",
            Event::VolumeRollbackRequested { .. } => "VolumeRollbackRequested",
            Event::VolumeRolledBack { .. } => "VolumeRolledBack",
            Event::VolumeDataIntegrityError { .. } => "VolumeDataIntegrityError",
            Event::VolumeReplicaOutOfSync { .. } => "VolumeReplicaOutOfSync",
            Event::VolumePrimaryChanged { .. } => "VolumePrimaryChanged",
            Event::VolumeReplicaInSync { .. } => "VolumeReplicaInSync",
            Event::VolumePrimaryHandedOver { .. } => "VolumePrimaryHandedOver",
            Event::VolumePrimaryReleased { .. } => "VolumePrimaryReleased",
            Event::VolumeReplicaAdded { .. } => "VolumeReplicaAdded",
            Event::VolumeReplicaRemoved { .. } => "VolumeReplicaRemoved",
            Event::VolumeRebuildProgressed { .. } => "VolumeRebuildProgressed",
        }
    }

    pub fn uuid(&self) -> Uuid {
        match self {
            Event::VolumeCreationRequested { volume } => volume.uuid,
            Event::VolumeBecameAvailable { uuid }
            | Event::VolumeUpdated { uuid, .. }
            | Event::VolumeDeletionRequested { uuid }
            | Event::VolumeDeleted { uuid }
            | Event::VolumeRollbackRequested { uuid, .. }
            | Event::VolumeRolledBack { uuid }
            | Event::VolumeDataIntegrityError { uuid, .. }
            | Event::VolumeReplicaOutOfSync { uuid, .. }
            | Event::VolumePrimaryChanged { uuid, .. }
            | Event::VolumeReplicaInSync { uuid, .. }
            | Event::VolumePrimaryHandedOver { uuid, .. }
            | Event::VolumeReplicaAdded { uuid, .. }
            | Event::VolumeReplicaRemoved { uuid, .. }
            | Event::VolumeRebuildProgressed { uuid, .. }
            | Event::VolumePrimaryReleased { uuid } => *uuid,
        }
    }

    pub fn project<'a>(&'a self, state: &'a State) -> &'a str {
        match self {
            Event::VolumeCreationRequested { volume } => &volume.project,
            other => state
                .volumes
                .get(other.uuid())
                .map(|v| v.project.as_str())
                .unwrap_or(""),
        }
    }
}

/// Checks a host or IP access list: `ALLOW_ANY` or `ALLOW_NONE` alone, or distinct host NQNs
/// (see [`check_nqn`]) or distinct IP addresses. The data path matches addresses exactly, so
/// a CIDR range is refused rather than stored as an entry that never matches.
pub fn check_acl(what: &str, entries: &[String], ip: bool) -> Result<(), DomainError> {
    let bad = |why: String| {
        Err(DomainError::InvalidArgument(format!(
            "invalid {what}: {why}"
        )))
    };
    if entries.is_empty() {
        return bad(format!("empty; use [\"{ALLOW_NONE}\"] to deny all hosts"));
    }
    if entries.len() > ACL_ENTRIES_MAX {
        return bad(format!("more than {ACL_ENTRIES_MAX} entries"));
    }
    let special = entries.iter().any(|e| e == ALLOW_ANY || e == ALLOW_NONE);
    if special && entries.len() > 1 {
        return bad(format!("{ALLOW_ANY} and {ALLOW_NONE} must stand alone"));
    }
    let mut seen = HashSet::with_capacity(entries.len());
    for e in entries
        .iter()
        .filter(|e| *e != ALLOW_ANY && *e != ALLOW_NONE)
    {
        let key = if ip {
            match e.parse::<IpAddr>() {
                // IPv4-mapped IPv6 is the same host to the data path.
                Ok(a) => a.to_canonical().to_string(),
                Err(_) if e.contains('/') => {
                    return bad(format!(
                        "{e:?} is a range; list IP addresses (ranges are not supported)"
                    ))
                }
                Err(_) => return bad(format!("{e:?} is not an IP address")),
            }
        } else {
            if let Err(why) = check_nqn(e) {
                return bad(format!("{e:?} is not an NVMe qualified name: {why}"));
            }
            e.clone()
        };
        if !seen.insert(key) {
            return bad(format!("{e:?} is listed twice"));
        }
    }
    Ok(())
}

fn check_labels(labels: &[Label]) -> Result<(), DomainError> {
    if labels.len() > LABELS_MAX {
        return Err(DomainError::InvalidArgument(format!(
            "at most {LABELS_MAX} labels"
        )));
    }
    let mut keys = HashSet::with_capacity(labels.len());
    for l in labels {
        check_name("label key", &l.key)?;
        check_name("label value", &l.value)?;
        if !keys.insert(&l.key) {
            return Err(DomainError::InvalidArgument(format!(
                "label key {:?} is given twice",
                l.key
            )));
        }
    }
    Ok(())
}

fn check_size(size_bytes: u64, sector_size: u32) -> Result<u64, DomainError> {
    if size_bytes == 0 || size_bytes > VOLUME_BYTES_MAX {
        return Err(DomainError::InvalidArgument(format!(
            "size must be a positive byte count of at most {VOLUME_BYTES_MAX}"
        )));
    }
    // Whole blocks only: a host addresses the namespace in sectors, and a partial last
    // sector would be either invisible or larger than asked for.
    if !size_bytes.is_multiple_of(u64::from(sector_size)) {
        return Err(DomainError::InvalidArgument(format!(
            "size {size_bytes} is not a multiple of the sector size {sector_size}"
        )));
    }
    Ok(size_bytes)
}

fn create(state: &State, ctx: &Ctx, n: &NewVolume) -> Result<Vec<AnyEvent>, DomainError> {
    state.projects.require(&n.project)?;
    check_name("volume", &n.name)?;
    if state.volumes.by_name(&n.project, &n.name).is_some() {
        return Err(DomainError::exists("volume", &n.name));
    }
    if state.volumes.len() >= VOLUMES_MAX {
        return Err(DomainError::ResourceExhausted(format!(
            "at most {VOLUMES_MAX} volumes"
        )));
    }
    let servers = state.inventory.servers.len() as u32;
    if !(1..=3).contains(&n.replica_count) || n.replica_count > servers.max(1) {
        return Err(DomainError::InvalidArgument(format!(
            "replicaCount {} must be between 1 and 3 and at most the number of servers ({servers})",
            n.replica_count
        )));
    }
    if state.inventory.nodes.is_empty() {
        return Err(DomainError::Unavailable(
            "the cluster has no node yet".into(),
        ));
    }
    let sector_size = match n.sector_size {
        0 | 4096 => 4096,
        // The data path exposes 4 KiB logical blocks only; accepting 512 would hand the host
        // a namespace whose block size differs from what the volume says.
        512 => {
            return Err(DomainError::InvalidArgument(
                "sectorSize 512 is not supported: evstor volumes have 4096-byte sectors".into(),
            ))
        }
        other => {
            return Err(DomainError::InvalidArgument(format!(
                "sectorSize {other} is not 512 or 4096"
            )))
        }
    };
    check_acl("acl", &n.acl, false)?;
    let ip_acl = n
        .ip_acl
        .clone()
        .unwrap_or_else(|| vec![ALLOW_ANY.to_string()]);
    check_acl("IPAcl", &ip_acl, true)?;
    let mut labels = n.labels.clone();
    check_labels(&labels)?;
    let mut size = n.size_bytes;
    let mut source = None;
    let mut pinned = None;
    if let Some(r) = &n.source_snapshot {
        let snap = state.snapshots.resolve(&n.project, r)?;
        if snap.state != SnapshotState::Available {
            return Err(DomainError::Unavailable(format!(
                "snapshot {} is {:?}, not Available",
                snap.uuid, snap.state
            )));
        }
        if size == 0 {
            size = snap.size_bytes;
        } else if size < snap.size_bytes {
            return Err(DomainError::InvalidArgument(format!(
                "a clone cannot be smaller than its snapshot ({} bytes)",
                snap.size_bytes
            )));
        }
        if labels.is_empty() {
            labels = snap.labels.clone();
        }
        source = Some((snap.uuid, snap.name.clone()));
        // A clone shares the snapshot's blocks, so its primary is a node that holds them.
        pinned = Some(snap.agent(state));
    }
    let size_bytes = check_size(size, sector_size)?;
    let qos_policy = match &n.qos {
        Some(r) => Some(state.policies.resolve_for(&n.project, r)?.uuid),
        None => state.projects.default_qos(&n.project),
    };
    let nodes = super::inventory::place(state, n.replica_count as usize, pinned)?;
    let is_clone = source.is_some();
    let volume = Volume {
        uuid: ctx.new_id(0),
        name: n.name.clone(),
        project: n.project.clone(),
        state: VolumeState::Creating,
        // A clone's replicas start without the snapshot's data (snapshots live on the
        // primary): they are out of sync until rebuilt.
        protection: if n.replica_count > 1 && is_clone {
            ProtectionState::Degraded
        } else {
            ProtectionState::FullyProtected
        },
        replica_count: n.replica_count,
        nsid: state.volumes.free_nsid(),
        acl: n.acl.clone(),
        ip_acl,
        compression: n.compression,
        size_bytes,
        sector_size,
        source_snapshot: source.as_ref().map(|s| s.0),
        source_snapshot_name: source.map(|s| s.1).unwrap_or_default(),
        qos_policy,
        labels,
        node_uuid: nodes[0],
        creation_unix_ns: ctx.now_unix_ns,
        etag: 0,
        replica_nodes: nodes[1..].to_vec(),
        epoch: 0,
        releasing: None,
        replacing: Vec::new(),
        deposed: None,
        rebuild_percent: 0,
        out_of_sync: if is_clone {
            nodes[1..].to_vec()
        } else {
            Vec::new()
        },
    };
    Ok(vec![AnyEvent::Volume(Event::VolumeCreationRequested {
        volume: Box::new(volume),
    })])
}

fn require_settled(v: &Volume) -> Result<(), DomainError> {
    match v.state {
        VolumeState::Available => Ok(()),
        VolumeState::Deleting | VolumeState::Deleted | VolumeState::Failed => Err(
            DomainError::InvalidArgument(format!("volume {} is {:?}", v.uuid, v.state)),
        ),
        _ => Err(DomainError::Unavailable(format!(
            "volume {} is {:?}; retry when it is Available",
            v.uuid, v.state
        ))),
    }
}

fn update(
    state: &State,
    v: &Volume,
    if_match: &Option<String>,
    c: &VolumeChange,
) -> Result<Vec<AnyEvent>, DomainError> {
    check_etag("volume", v.uuid, v.etag, if_match)?;
    require_settled(v)?;
    let mut d = VolumeDelta::default();
    if let Some(acl) = &c.acl {
        check_acl("acl", acl, false)?;
        d.acl = Some(acl.clone());
    }
    if let Some(acl) = &c.ip_acl {
        check_acl("IPAcl", acl, true)?;
        d.ip_acl = Some(acl.clone());
    }
    if let Some(size) = c.size_bytes {
        let size = check_size(size, v.sector_size)?;
        if size < v.size_bytes && !c.force {
            return Err(DomainError::InvalidArgument(format!(
                "shrinking volume {} from {} to {size} bytes needs Force",
                v.uuid, v.size_bytes
            )));
        }
        d.size_bytes = (size != v.size_bytes).then_some(size);
    }
    d.compression = c.compression;
    if let Some(r) = &c.qos {
        d.qos_policy = Some(Some(state.policies.resolve_for(&v.project, r)?.uuid));
    }
    if let Some(labels) = &c.labels {
        check_labels(labels)?;
        d.labels = Some(labels.clone());
    }
    if let Some(name) = &c.new_name {
        check_name("volume", name)?;
        if *name != v.name && state.volumes.by_name(&v.project, name).is_some() {
            return Err(DomainError::exists("volume", name));
        }
        d.name = Some(name.clone());
    }
    if d == VolumeDelta::default() {
        return Ok(vec![]);
    }
    Ok(vec![AnyEvent::Volume(Event::VolumeUpdated {
        uuid: v.uuid,
        change: d,
    })])
}

fn delete(
    state: &State,
    v: &Volume,
    if_match: &Option<String>,
) -> Result<Vec<AnyEvent>, DomainError> {
    check_etag("volume", v.uuid, v.etag, if_match)?;
    require_settled(v)?;
    // Snapshots outlive their volume, but one being taken still reads the volume's data.
    if let Some(s) = state
        .snapshots
        .of_volume(v.uuid)
        .find(|s| s.state == SnapshotState::Creating)
    {
        return Err(DomainError::Unavailable(format!(
            "snapshot {} of volume {} is being taken; retry when it is Available",
            s.uuid, v.uuid
        )));
    }
    Ok(vec![AnyEvent::Volume(Event::VolumeDeletionRequested {
        uuid: v.uuid,
    })])
}

pub fn decide(state: &State, ctx: &Ctx, cmd: &Command) -> Result<Vec<AnyEvent>, DomainError> {
    match cmd {
        Command::CreateVolume(n) => create(state, ctx, n),
        Command::UpdateVolume {
            project,
            target,
            if_match,
            change,
        } => update(
            state,
            state.volumes.resolve(project, target)?,
            if_match,
            change,
        ),
        Command::DeleteVolume {
            project,
            target,
            if_match,
        } => delete(state, state.volumes.resolve(project, target)?, if_match),
        Command::RollbackVolume {
            project,
            target,
            snapshot,
        } => rollback(state, state.volumes.resolve(project, target)?, snapshot),
        Command::MarkVolumeAvailable { uuid } => match state.volumes.get(*uuid) {
            Some(v) if v.state == VolumeState::Creating => {
                Ok(vec![AnyEvent::Volume(Event::VolumeBecameAvailable {
                    uuid: *uuid,
                })])
            }
            // Already settled (a reconciler retry after a crash): nothing to do.
            _ => Ok(vec![]),
        },
        Command::FinishVolumeDeletion { uuid } => match state.volumes.get(*uuid) {
            Some(v) if v.state == VolumeState::Deleting => {
                Ok(vec![AnyEvent::Volume(Event::VolumeDeleted { uuid: *uuid })])
            }
            _ => Ok(vec![]),
        },
        Command::FinishVolumeRollback { uuid, rolled_back } => match state.volumes.get(*uuid) {
            Some(v) if v.state == VolumeState::Rollback => {
                // Nothing wrote to the volume meanwhile: a replica that rolled back to its
                // copy of the snapshot holds what the primary holds.
                let mut events: Vec<AnyEvent> = rolled_back
                    .iter()
                    .filter(|n| v.out_of_sync.contains(n) && v.replica_nodes.contains(n))
                    .map(|n| {
                        AnyEvent::Volume(Event::VolumeReplicaInSync {
                            uuid: *uuid,
                            node: *n,
                            copied_bytes: 0,
                        })
                    })
                    .collect();
                events.push(AnyEvent::Volume(Event::VolumeRolledBack { uuid: *uuid }));
                Ok(events)
            }
            _ => Ok(vec![]),
        },
        Command::RecordDataIntegrityError { uuid, block } => match state.volumes.get(*uuid) {
            Some(_) => Ok(vec![AnyEvent::Volume(Event::VolumeDataIntegrityError {
                uuid: *uuid,
                block: *block,
            })]),
            // A volume deleted meanwhile: nothing left to report on.
            None => Ok(vec![]),
        },
        Command::MarkReplicaOutOfSync { uuid, node, epoch } => {
            let Some(v) = primary_at(state, *uuid, *epoch)? else {
                return Ok(vec![]);
            };
            if !v.replica_nodes.contains(node) || v.out_of_sync.contains(node) {
                return Ok(vec![]);
            }
            Ok(vec![AnyEvent::Volume(Event::VolumeReplicaOutOfSync {
                uuid: *uuid,
                node: *node,
                epoch: *epoch,
            })])
        }
        Command::PromoteReplica {
            uuid,
            node,
            leader_epoch,
            planned,
        } => promote(state, *uuid, *node, *leader_epoch, *planned),
        Command::ReleasePrimary { uuid, node } => match state.volumes.get(*uuid) {
            Some(v) if v.releasing == Some(*node) => {
                Ok(vec![AnyEvent::Volume(Event::VolumePrimaryReleased {
                    uuid: *uuid,
                })])
            }
            _ => Ok(vec![]),
        },
        Command::MarkReplicaInSync {
            uuid,
            node,
            epoch,
            copied_bytes,
            snapshots,
        } => mark_in_sync(state, *uuid, *node, *epoch, *copied_bytes, snapshots),
        Command::MoveReplica {
            uuid,
            from,
            to,
            leader_epoch,
        } => move_replica(state, *uuid, *from, *to, *leader_epoch),
        Command::CancelReplicaMove {
            uuid,
            node,
            leader_epoch,
        } => cancel_move(state, *uuid, *node, *leader_epoch),
        Command::RecordRebuildProgress {
            uuid,
            node,
            epoch,
            percent,
        } => {
            let Some(v) = primary_at(state, *uuid, *epoch)? else {
                return Ok(vec![]);
            };
            // Only forward, only below done (`VolumeReplicaInSync` says that), only for a
            // copy still out of sync.
            if !v.out_of_sync.contains(node) || *percent <= v.rebuild_percent || *percent >= 100 {
                return Ok(vec![]);
            }
            Ok(vec![AnyEvent::Volume(Event::VolumeRebuildProgressed {
                uuid: *uuid,
                node: *node,
                percent: *percent,
            })])
        }
    }
}

/// The primary (at `epoch`) rebuilt the replica on `node`, which holds `snapshots` from
/// now on too (those still there). A move completes in the same decision: the copy it
/// replaces leaves only now (a primary leaves with its hand-over).
fn mark_in_sync(
    state: &State,
    uuid: Uuid,
    node: Uuid,
    epoch: u64,
    copied_bytes: u64,
    snapshots: &[Uuid],
) -> Result<Vec<AnyEvent>, DomainError> {
    let Some(v) = primary_at(state, uuid, epoch)? else {
        return Ok(vec![]);
    };
    // A rollback rewrites the primary's copy: a rebuild that ended meanwhile copied the
    // data from before it (the rollback's completion decides which replicas are in sync).
    if v.state == VolumeState::Rollback {
        return Ok(vec![]);
    }
    if !v.out_of_sync.contains(&node) || !v.replica_nodes.contains(&node) {
        return Ok(vec![]);
    }
    // An in-sync copy holds every snapshot its primary holds. One taken while this copy
    // was being rebuilt (only in-sync copies take a snapshot) was not copied to it: the
    // rebuild is not recorded, and the next one copies it first (`reconcile::seed_plan`).
    let mut lacking: Vec<Uuid> = state
        .snapshots
        .by_uuid
        .values()
        .filter(|s| {
            s.source_volume == uuid
                && s.state == SnapshotState::Available
                && s.holders.contains(&v.node_uuid)
                && !s.holders.contains(&node)
                && !snapshots.contains(&s.uuid)
        })
        .map(|s| s.uuid)
        .collect();
    lacking.sort();
    if let Some(s) = lacking.first() {
        return Err(DomainError::Unavailable(format!(
            "the copy of volume {uuid} on node {node} lacks snapshot {s}, taken while it was \
             rebuilt: it is rebuilt again"
        )));
    }
    // A snapshot deleted meanwhile is released by the replica's agent like any other.
    let mut events: Vec<AnyEvent> = snapshots
        .iter()
        .filter(|s| {
            state.snapshots.get(**s).is_some_and(|s| {
                s.source_volume == uuid
                    && s.state == SnapshotState::Available
                    && !s.holders.contains(&node)
            })
        })
        .map(|s| AnyEvent::Snapshot(SnapshotEvent::SnapshotCopied { uuid: *s, node }))
        .collect();
    events.push(AnyEvent::Volume(Event::VolumeReplicaInSync {
        uuid,
        node,
        copied_bytes,
    }));
    events.extend(
        v.replacing
            .iter()
            .filter(|r| r.node == node && v.replica_nodes.contains(&r.replaces))
            .map(|r| removed(uuid, r.replaces)),
    );
    Ok(events)
}

/// The leader drops a move's new copy on `node` (nothing if no such move runs).
fn cancel_move(
    state: &State,
    uuid: Uuid,
    node: Uuid,
    leader_epoch: u64,
) -> Result<Vec<AnyEvent>, DomainError> {
    super::cluster::check_epoch(state, leader_epoch)?;
    let pending = state
        .volumes
        .get(uuid)
        .is_some_and(|v| v.replacing.iter().any(|r| r.node == node));
    Ok(if pending {
        vec![removed(uuid, node)]
    } else {
        vec![]
    })
}

fn removed(uuid: Uuid, node: Uuid) -> AnyEvent {
    AnyEvent::Volume(Event::VolumeReplicaRemoved { uuid, node })
}

/// A replica move ordered by the leader. A repeat (the copy already left `from`, or a move
/// of the volume is running) or a volume that is not `Available` is nothing; a target that
/// cannot take a copy is refused.
fn move_replica(
    state: &State,
    uuid: Uuid,
    from: Uuid,
    to: Uuid,
    leader_epoch: u64,
) -> Result<Vec<AnyEvent>, DomainError> {
    super::cluster::check_epoch(state, leader_epoch)?;
    let Some(v) = state.volumes.get(uuid) else {
        return Ok(vec![]);
    };
    if v.state != VolumeState::Available
        || !v.nodes().any(|n| n == from)
        || v.replacing.len() >= VOLUME_MOVES_MAX
    {
        return Ok(vec![]);
    }
    let placeable = state.inventory.server_of(to).is_some_and(|s| s.placeable());
    if v.nodes().any(|n| n == to) || !placeable {
        return Err(DomainError::FailedPrecondition(format!(
            "node {to} cannot take a copy of volume {uuid}: it holds one already, or its \
             server is not enabled and live"
        )));
    }
    Ok(vec![AnyEvent::Volume(Event::VolumeReplicaAdded {
        uuid,
        node: to,
        replacing: Some(from),
    })])
}

/// Drops the moves away from `nodes` that have not completed (an aborted eviction): each
/// new copy leaves again, so the volume is as it was.
pub fn abort_moves(state: &State, nodes: &[Uuid]) -> Vec<AnyEvent> {
    state
        .volumes
        .by_uuid
        .values()
        .flat_map(|v| {
            v.replacing
                .iter()
                .filter(|r| nodes.contains(&r.replaces))
                .map(|r| removed(v.uuid, r.node))
        })
        .collect()
}

/// The volume, if it exists, for a command its primary issued at `epoch`: a primary of an
/// older term may not change the in-sync set (Conflict).
fn primary_at(state: &State, uuid: Uuid, epoch: u64) -> Result<Option<&Volume>, DomainError> {
    match state.volumes.get(uuid) {
        Some(v) if v.epoch != epoch => Err(DomainError::Conflict(format!(
            "volume {uuid} is at epoch {}, not {epoch}",
            v.epoch
        ))),
        v => Ok(v),
    }
}

/// A failover ordered by the leader: only while the primary's server is failed, and only
/// to an in-sync replica on a server that is not.
fn promote(
    state: &State,
    uuid: Uuid,
    node: Uuid,
    leader_epoch: u64,
    planned: bool,
) -> Result<Vec<AnyEvent>, DomainError> {
    super::cluster::check_epoch(state, leader_epoch)?;
    let Some(v) = state.volumes.get(uuid) else {
        return Ok(vec![]);
    };
    let failed = |n: Uuid| state.inventory.server_of(n).is_none_or(|s| s.failed);
    let disabled = |n: Uuid| {
        state
            .inventory
            .server_of(n)
            .is_some_and(|s| s.state == ServerState::Disabled)
    };
    // A primary being moved (its server evicted, its node replaced) is handed over to its
    // replacement even while its server stays enabled.
    let replaced_by = |n: Uuid| {
        v.replacing
            .iter()
            .any(|r| r.replaces == v.node_uuid && r.node == n)
    };
    let due = if planned {
        (disabled(v.node_uuid) || replaced_by(node))
            && !failed(v.node_uuid)
            && v.releasing.is_none()
    } else {
        failed(v.node_uuid)
    };
    if !due {
        return Ok(vec![]);
    }
    if !v.in_sync_replicas().any(|r| r == node) || failed(node) || disabled(node) {
        return Err(DomainError::FailedPrecondition(format!(
            "node {node} holds no in-sync copy of volume {uuid} on a live, enabled server"
        )));
    }
    let old = v.node_uuid;
    let mut events = vec![AnyEvent::Volume(if planned {
        Event::VolumePrimaryHandedOver { uuid, node, old }
    } else {
        Event::VolumePrimaryChanged { uuid, node, old }
    })];
    // The old primary was being moved and its replacement is in sync (it may be the new
    // primary): it leaves now, as a replica would when its replacement got in sync.
    let replaced = v
        .replacing
        .iter()
        .any(|r| r.replaces == old && (r.node == node || !v.out_of_sync.contains(&r.node)));
    if replaced {
        events.push(removed(uuid, old));
    }
    Ok(events)
}

/// Where the leader moves `v`'s primary, and whether the move is planned: when its
/// server failed, to the first in-sync replica on a live server; when the primary is
/// being moved and its new copy is in sync, to that copy (planned, also while its server
/// is enabled: a node replacement); when it was disabled (and is alive, with no hand-over
/// running), to an in-sync replica on a live, enabled server.
pub fn failover_target(state: &State, v: &Volume) -> Option<(Uuid, bool)> {
    let server = |n: Uuid| state.inventory.server_of(n);
    let failed = |n: Uuid| server(n).is_none_or(|s| s.failed);
    let enabled = |n: Uuid| server(n).is_some_and(|s| s.state == ServerState::Enabled);
    if v.state != VolumeState::Available {
        return None;
    }
    if failed(v.node_uuid) {
        return v
            .in_sync_replicas()
            .find(|r| !failed(*r))
            .map(|n| (n, false));
    }
    let replacement = v
        .replacing
        .iter()
        .filter(|r| r.replaces == v.node_uuid)
        .map(|r| r.node)
        .find(|n| v.in_sync_replicas().any(|r| r == *n) && !failed(*n) && enabled(*n));
    if let Some(n) = replacement.filter(|_| v.releasing.is_none()) {
        return Some((n, true));
    }
    if !enabled(v.node_uuid) && v.releasing.is_none() {
        return v
            .in_sync_replicas()
            .find(|r| !failed(*r) && enabled(*r))
            .map(|n| (n, true));
    }
    None
}

/// The snapshot must be an available snapshot of this very volume, and nothing else may be
/// happening to the volume (the reference answers 503 for a volume being deleted).
fn rollback(state: &State, v: &Volume, r: &SnapshotRef) -> Result<Vec<AnyEvent>, DomainError> {
    let snap = state.snapshots.resolve(&v.project, r)?;
    if snap.source_volume != v.uuid {
        return Err(DomainError::InvalidArgument(format!(
            "snapshot {} was taken of volume {}, not of {}",
            snap.uuid, snap.source_volume_name, v.name
        )));
    }
    match snap.state {
        SnapshotState::Available => {}
        SnapshotState::Creating => {
            return Err(DomainError::Unavailable(format!(
                "snapshot {} is still being taken; retry when it is Available",
                snap.uuid
            )))
        }
        other => {
            return Err(DomainError::InvalidArgument(format!(
                "snapshot {} is {other:?}",
                snap.uuid
            )))
        }
    }
    match v.state {
        VolumeState::Available => {}
        VolumeState::Failed => {
            return Err(DomainError::InvalidArgument(format!(
                "volume {} is Failed",
                v.uuid
            )))
        }
        other => {
            return Err(DomainError::Unavailable(format!(
                "volume {} is {other:?}; cannot roll it back now",
                v.uuid
            )))
        }
    }
    if let Some(s) = state
        .snapshots
        .of_volume(v.uuid)
        .find(|s| s.state == SnapshotState::Creating)
    {
        return Err(DomainError::Unavailable(format!(
            "snapshot {} of volume {} is being taken; retry when it is Available",
            s.uuid, v.uuid
        )));
    }
    // The primary rewrites its copy from its own copy of the snapshot (the replicas are
    // then rebuilt from it).
    if !snap.holders.contains(&v.node_uuid) {
        let held: Vec<String> = snap.holders.iter().map(|n| n.to_string()).collect();
        return Err(DomainError::InvalidArgument(format!(
            "snapshot {} has no copy on node {}, volume {}'s primary (its copies are on: {})",
            snap.uuid,
            v.node_uuid,
            v.uuid,
            held.join(", ")
        )));
    }
    Ok(vec![AnyEvent::Volume(Event::VolumeRollbackRequested {
        uuid: v.uuid,
        snapshot: snap.uuid,
    })])
}

pub fn evolve(state: &mut State, at: Applied, event: &Event) -> Vec<RowKey> {
    let uuid = event.uuid();
    if let Event::VolumeCreationRequested { volume } = event {
        let mut v = Volume::clone(volume);
        v.etag = at.seq;
        v.epoch = at.seq;
        state.volumes.insert(v);
        return vec![RowKey::Volume(uuid)];
    }
    if let Event::VolumeDeleted { .. } = event {
        state.volumes.remove(uuid);
        return vec![RowKey::Volume(uuid)];
    }
    let mut v = state
        .volumes
        .get(uuid)
        .cloned()
        .expect("invariant: volume events after creation name an existing volume");
    v.etag = at.seq;
    let mut rows = vec![RowKey::Volume(uuid)];
    match event {
        Event::VolumeBecameAvailable { .. } => v.state = VolumeState::Available,
        Event::VolumeDeletionRequested { .. } => v.state = VolumeState::Deleting,
        Event::VolumeUpdated { change: d, .. } => apply_delta(&mut v, d),
        Event::VolumeRollbackRequested { snapshot, .. } => {
            v.state = VolumeState::Rollback;
            // The rollback rewrites the primary's copy only.
            v.out_of_sync = v.replica_nodes.clone();
            v.deposed = None;
            v.protection = v.protection_now();
            v.rebuild_percent = 0;
            let s = state
                .snapshots
                .by_uuid
                .get_mut(snapshot)
                .expect("invariant: a rollback names an existing snapshot");
            s.restoring.push(uuid);
            rows.push(RowKey::Snapshot(*snapshot));
        }
        Event::VolumeRolledBack { .. } => {
            v.state = VolumeState::Available;
            for s in state.snapshots.by_uuid.values_mut() {
                if s.restoring.contains(&uuid) {
                    s.restoring.retain(|r| *r != uuid);
                    rows.push(RowKey::Snapshot(s.uuid));
                }
            }
        }
        Event::VolumeDataIntegrityError { .. } => {}
        Event::VolumeReplicaOutOfSync { node, .. } => {
            if !v.out_of_sync.contains(node) {
                v.out_of_sync.push(*node);
            }
            v.protection = v.protection_now();
            v.rebuild_percent = 0;
        }
        Event::VolumeReplicaInSync { node, .. } => {
            v.out_of_sync.retain(|n| n != node);
            v.deposed = v.deposed.filter(|d| d != node);
            v.protection = v.protection_now();
            v.rebuild_percent = 0;
        }
        Event::VolumeRebuildProgressed { percent, .. } => v.rebuild_percent = *percent,
        Event::VolumePrimaryChanged { node, old, .. }
        | Event::VolumePrimaryHandedOver { node, old, .. } => {
            for r in v.replica_nodes.iter_mut().filter(|r| **r == *node) {
                *r = *old;
            }
            v.node_uuid = *node;
            v.out_of_sync.retain(|n| n != node);
            if !v.out_of_sync.contains(old) {
                v.out_of_sync.push(*old);
            }
            v.epoch = at.seq;
            v.deposed = Some(*old);
            v.protection = v.protection_now();
            v.rebuild_percent = 0;
            v.releasing = match event {
                Event::VolumePrimaryHandedOver { .. } => Some(*old),
                _ => None,
            };
        }
        Event::VolumePrimaryReleased { .. } => v.releasing = None,
        Event::VolumeReplicaAdded {
            node, replacing, ..
        } => {
            if !v.replica_nodes.contains(node) {
                v.replica_nodes.push(*node);
            }
            if !v.out_of_sync.contains(node) {
                v.out_of_sync.push(*node);
            }
            if let Some(old) = replacing {
                v.replacing.push(Replacement {
                    node: *node,
                    replaces: *old,
                });
            }
            v.protection = v.protection_now();
            v.rebuild_percent = 0;
        }
        Event::VolumeReplicaRemoved { node, .. } => {
            v.replica_nodes.retain(|n| n != node);
            v.out_of_sync.retain(|n| n != node);
            v.deposed = v.deposed.filter(|d| d != node);
            v.replacing
                .retain(|r| r.node != *node && r.replaces != *node);
            v.protection = v.protection_now();
        }
        Event::VolumeCreationRequested { .. } | Event::VolumeDeleted { .. } => {
            unreachable!("handled above")
        }
    }
    state.volumes.insert(v);
    rows
}

fn apply_delta(v: &mut Volume, d: &VolumeDelta) {
    if let Some(acl) = &d.acl {
        v.acl = acl.clone();
    }
    if let Some(acl) = &d.ip_acl {
        v.ip_acl = acl.clone();
    }
    if let Some(size) = d.size_bytes {
        v.size_bytes = size;
    }
    if let Some(c) = d.compression {
        v.compression = c;
    }
    if let Some(q) = d.qos_policy {
        v.qos_policy = q;
    }
    if let Some(labels) = &d.labels {
        v.labels = labels.clone();
    }
    if let Some(name) = &d.name {
        v.name = name.clone();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::domain::cluster::tests::bootstrap_events;
    use crate::domain::{given_when, test_ctx, Command as AnyCommand};

    pub(crate) fn new_volume(name: &str) -> NewVolume {
        NewVolume {
            project: "default".into(),
            name: name.into(),
            size_bytes: 1 << 30,
            acl: vec![ALLOW_ANY.into()],
            ip_acl: None,
            compression: false,
            replica_count: 1,
            sector_size: 0,
            source_snapshot: None,
            qos: None,
            labels: vec![],
        }
    }

    fn create_cmd(n: NewVolume) -> AnyCommand {
        AnyCommand::Volume(Command::CreateVolume(n))
    }

    /// Bootstrap plus an available volume `v1` (its uuid is `test_ctx().new_id(0)`).
    /// `with_volume`, with a second copy on node `x`.
    fn with_replica_on(x: Uuid) -> Vec<AnyEvent> {
        let mut given = with_volume();
        for e in &mut given {
            if let AnyEvent::Volume(Event::VolumeCreationRequested { volume }) = e {
                volume.replica_count = 2;
                volume.replica_nodes = vec![x];
            }
        }
        given
    }

    pub(crate) fn with_volume() -> Vec<AnyEvent> {
        let mut given = bootstrap_events();
        given.extend(given_when(&given, create_cmd(new_volume("v1"))).unwrap());
        given.push(AnyEvent::Volume(Event::VolumeBecameAvailable {
            uuid: test_ctx().new_id(0),
        }));
        given
    }

    fn err_of(given: &[AnyEvent], cmd: AnyCommand) -> DomainError {
        given_when(given, cmd).unwrap_err()
    }

    #[test]
    fn given_bootstrap_when_create_then_creating_with_nsid_1() {
        let events = given_when(&bootstrap_events(), create_cmd(new_volume("v1"))).unwrap();
        let [AnyEvent::Volume(Event::VolumeCreationRequested { volume })] = &events[..] else {
            panic!("{events:?}")
        };
        assert_eq!(volume.state, VolumeState::Creating);
        assert_eq!(volume.nsid, 1);
        assert_eq!(volume.ip_acl, [ALLOW_ANY]);
        assert_eq!(volume.sector_size, 4096);
    }

    #[test]
    fn given_volume_when_create_same_name_then_409() {
        let err = err_of(&with_volume(), create_cmd(new_volume("v1")));
        assert!(matches!(err, DomainError::AlreadyExists(_)));
    }

    #[test]
    fn bad_inputs_are_400() {
        type Mutation = Box<dyn Fn(&mut NewVolume)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("bad name", Box::new(|n| n.name = "a b".into())),
            ("zero size", Box::new(|n| n.size_bytes = 0)),
            ("too big", Box::new(|n| n.size_bytes = VOLUME_BYTES_MAX + 1)),
            ("replicas 0", Box::new(|n| n.replica_count = 0)),
            (
                "replicas 2 on one server",
                Box::new(|n| n.replica_count = 2),
            ),
            ("replicas 4", Box::new(|n| n.replica_count = 4)),
            ("empty acl", Box::new(|n| n.acl = vec![])),
            ("acl not nqn", Box::new(|n| n.acl = vec!["host1".into()])),
            (
                "ALLOW_ANY not alone",
                Box::new(|n| n.acl = vec![ALLOW_ANY.into(), "nqn.x".into()]),
            ),
            (
                "ip acl not ip",
                Box::new(|n| n.ip_acl = Some(vec!["nope".into()])),
            ),
            ("sector size", Box::new(|n| n.sector_size = 1000)),
            ("512-byte sectors", Box::new(|n| n.sector_size = 512)),
            ("partial sector", Box::new(|n| n.size_bytes = 6144)),
            ("under one sector", Box::new(|n| n.size_bytes = 512)),
            (
                "nqn with NUL",
                Box::new(|n| n.acl = vec![format!("{HOST_A}\0")]),
            ),
            (
                "nqn with a non-UUID",
                Box::new(|n| n.acl = vec!["nqn.2014-08.org.nvmexpress:uuid:host".into()]),
            ),
            (
                "nqn without a date",
                Box::new(|n| n.acl = vec!["nqn.com.example:a".into()]),
            ),
            (
                "nqn too long",
                Box::new(|n| n.acl = vec![format!("nqn.2014-08.com.example:{}", "x".repeat(200))]),
            ),
            (
                "nqn twice",
                Box::new(|n| n.acl = vec![HOST_A.into(), HOST_B.into(), HOST_A.into()]),
            ),
            (
                "ip twice",
                Box::new(|n| n.ip_acl = Some(vec!["10.0.0.1".into(), "10.0.0.1".into()])),
            ),
            (
                "ip twice, once IPv4-mapped",
                Box::new(|n| n.ip_acl = Some(vec!["10.0.0.1".into(), "::ffff:10.0.0.1".into()])),
            ),
            (
                "ip range",
                Box::new(|n| n.ip_acl = Some(vec!["10.0.0.0/8".into()])),
            ),
            (
                "ip with NUL",
                Box::new(|n| n.ip_acl = Some(vec!["10.0.0.1\0".into()])),
            ),
            (
                "label key twice",
                Box::new(|n| {
                    n.labels = ["a", "a"]
                        .iter()
                        .map(|k| Label {
                            key: (*k).into(),
                            value: "v".into(),
                        })
                        .collect()
                }),
            ),
            (
                "label",
                Box::new(|n| {
                    n.labels = vec![Label {
                        key: "a b".into(),
                        value: "v".into(),
                    }]
                }),
            ),
        ];
        for (what, mutate) in cases {
            let mut n = new_volume("v2");
            mutate(&mut n);
            let err = err_of(&bootstrap_events(), create_cmd(n));
            assert!(
                matches!(err, DomainError::InvalidArgument(_)),
                "{what}: {err:?}"
            );
        }
    }

    const HOST_A: &str = "nqn.2014-08.org.nvmexpress:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6";
    const HOST_B: &str = "nqn.2014-08.com.example:host-b";

    #[test]
    fn given_bootstrap_when_create_with_distinct_valid_acls_then_created() {
        let mut n = new_volume("v2");
        n.acl = vec![HOST_A.into(), HOST_B.into()];
        n.ip_acl = Some(vec!["10.0.0.1".into(), "fe80::1".into()]);
        let events = given_when(&bootstrap_events(), create_cmd(n)).unwrap();
        let [AnyEvent::Volume(Event::VolumeCreationRequested { volume })] = &events[..] else {
            panic!("{events:?}")
        };
        assert_eq!(volume.acl, [HOST_A, HOST_B]);
    }

    #[test]
    fn given_volume_when_update_acl_with_duplicates_or_garbage_etag_then_400() {
        let given = with_volume();
        let upd = |if_match: Option<&str>, acl: Vec<String>| {
            AnyCommand::Volume(Command::UpdateVolume {
                project: "default".into(),
                target: VolumeRef::Name("v1".into()),
                if_match: if_match.map(str::to_string),
                change: VolumeChange {
                    acl: Some(acl),
                    ..Default::default()
                },
            })
        };
        let dup = vec![HOST_B.to_string(), HOST_B.to_string()];
        assert!(matches!(
            err_of(&given, upd(None, dup)),
            DomainError::InvalidArgument(_)
        ));
        for garbage in ["abc", "", "1.5", "\u{7f}"] {
            assert!(
                matches!(
                    err_of(&given, upd(Some(garbage), vec![HOST_A.into()])),
                    DomainError::InvalidArgument(_)
                ),
                "{garbage:?}"
            );
        }
        let etag = given.len().to_string();
        assert_eq!(
            given_when(&given, upd(Some(&etag), vec![HOST_A.into()]))
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn missing_project_is_404_and_size_must_be_whole_sectors() {
        let mut n = new_volume("v");
        n.project = "nope".into();
        assert!(matches!(
            err_of(&bootstrap_events(), create_cmd(n)),
            DomainError::NotFound(_)
        ));
        let mut n = new_volume("v");
        n.size_bytes = 5000;
        assert!(matches!(
            err_of(&bootstrap_events(), create_cmd(n)),
            DomainError::InvalidArgument(_)
        ));
        let mut n = new_volume("v");
        n.size_bytes = 8192;
        let events = given_when(&bootstrap_events(), create_cmd(n)).unwrap();
        let AnyEvent::Volume(Event::VolumeCreationRequested { volume }) = &events[0] else {
            panic!()
        };
        assert_eq!(volume.size_bytes, 8192);
    }

    #[test]
    fn update_checks_etag_and_shrink_needs_force() {
        let given = with_volume();
        let uuid = test_ctx().new_id(0);
        let upd = |if_match: Option<&str>, change: VolumeChange| {
            AnyCommand::Volume(Command::UpdateVolume {
                project: "default".into(),
                target: VolumeRef::Uuid(uuid),
                if_match: if_match.map(str::to_string),
                change,
            })
        };
        let grow = VolumeChange {
            size_bytes: Some(2 << 30),
            ..Default::default()
        };
        assert!(matches!(
            err_of(&given, upd(Some("1"), grow.clone())),
            DomainError::EtagMismatch(_)
        ));
        let etag = given.len().to_string();
        assert_eq!(given_when(&given, upd(Some(&etag), grow)).unwrap().len(), 1);
        let shrink = VolumeChange {
            size_bytes: Some(1 << 20),
            ..Default::default()
        };
        assert!(matches!(
            err_of(&given, upd(None, shrink.clone())),
            DomainError::InvalidArgument(_)
        ));
        let forced = VolumeChange {
            force: true,
            ..shrink
        };
        assert!(given_when(&given, upd(None, forced)).is_ok());
    }

    #[test]
    fn delete_lifecycle_and_states() {
        let given = with_volume();
        let uuid = test_ctx().new_id(0);
        let del = AnyCommand::Volume(Command::DeleteVolume {
            project: "default".into(),
            target: VolumeRef::Name("v1".into()),
            if_match: None,
        });
        let events = given_when(&given, del.clone()).unwrap();
        assert_eq!(events[0].type_name(), "VolumeDeletionRequested");
        let mut deleting = given.clone();
        deleting.extend(events);
        assert!(matches!(
            err_of(&deleting, del.clone()),
            DomainError::InvalidArgument(_)
        ));
        // A volume still being created answers 503.
        let mut creating = bootstrap_events();
        creating.extend(given_when(&creating, create_cmd(new_volume("v1"))).unwrap());
        assert!(matches!(
            err_of(&creating, del),
            DomainError::Unavailable(_)
        ));
        let finish = AnyCommand::Volume(Command::FinishVolumeDeletion { uuid });
        let done = given_when(&deleting, finish).unwrap();
        assert_eq!(done[0].type_name(), "VolumeDeleted");
    }

    #[test]
    fn given_two_volumes_when_third_created_then_nsids_are_distinct() {
        let mut given = bootstrap_events();
        for name in ["a", "b"] {
            let mut ctx_events = given_when(&given, create_cmd(new_volume(name))).unwrap();
            // Distinct uuids: the test ctx seed is fixed, so vary it through the name.
            if let AnyEvent::Volume(Event::VolumeCreationRequested { volume }) = &mut ctx_events[0]
            {
                volume.uuid = Uuid::from_u128(name.as_bytes()[0] as u128);
            }
            given.extend(ctx_events);
        }
        let events = given_when(&given, create_cmd(new_volume("c"))).unwrap();
        let AnyEvent::Volume(Event::VolumeCreationRequested { volume }) = &events[0] else {
            panic!("{events:?}")
        };
        let mut state = State::default();
        for (i, e) in given.iter().enumerate() {
            state.evolve(
                Applied {
                    seq: i as u64 + 1,
                    time_unix_ns: 0,
                },
                e,
            );
        }
        let mut nsids: Vec<u32> = state.volumes.by_uuid.values().map(|v| v.nsid).collect();
        nsids.push(volume.nsid);
        assert_eq!(nsids.len(), 3);
        nsids.sort_unstable();
        assert_eq!(nsids, [1, 2, 3]);
    }

    /// State after `events` (seq = position + 1).
    fn state_after(events: &[AnyEvent]) -> State {
        let mut state = State::default();
        for (i, e) in events.iter().enumerate() {
            let at = Applied {
                seq: i as u64 + 1,
                time_unix_ns: 0,
            };
            state.evolve(at, e);
        }
        state
    }

    #[test]
    fn rebuild_progress_moves_forward_for_an_out_of_sync_copy_of_the_current_primary() {
        let x = Uuid::from_u128(0xa);
        let mut given = with_replica_on(x);
        let uuid = test_ctx().new_id(0);
        let epoch = state_after(&given).volumes.get(uuid).unwrap().epoch;
        let report = |percent| {
            AnyCommand::Volume(Command::RecordRebuildProgress {
                uuid,
                node: x,
                epoch,
                percent,
            })
        };
        assert_eq!(
            given_when(&given, report(30)).unwrap(),
            [],
            "an in-sync copy has no rebuild"
        );
        given.push(AnyEvent::Volume(Event::VolumeReplicaOutOfSync {
            uuid,
            node: x,
            epoch,
        }));
        let progressed = given_when(&given, report(30)).unwrap();
        assert_eq!(
            progressed,
            [AnyEvent::Volume(Event::VolumeRebuildProgressed {
                uuid,
                node: x,
                percent: 30
            })]
        );
        given.extend(progressed);
        assert_eq!(
            state_after(&given)
                .volumes
                .get(uuid)
                .unwrap()
                .rebuild_percent,
            30
        );
        assert_eq!(
            given_when(&given, report(20)).unwrap(),
            [],
            "never backwards"
        );
        assert_eq!(
            given_when(&given, report(100)).unwrap(),
            [],
            "done is in sync"
        );
        let stale = AnyCommand::Volume(Command::RecordRebuildProgress {
            uuid,
            node: x,
            epoch: epoch + 1,
            percent: 50,
        });
        assert!(
            given_when(&given, stale).is_err(),
            "another primary's report"
        );
        given.push(AnyEvent::Volume(Event::VolumeReplicaInSync {
            uuid,
            node: x,
            copied_bytes: 1 << 20,
        }));
        assert_eq!(
            state_after(&given)
                .volumes
                .get(uuid)
                .unwrap()
                .rebuild_percent,
            0
        );
    }

    #[test]
    fn a_failover_records_the_deposed_primary_until_its_copy_is_in_sync_again() {
        let x = Uuid::from_u128(0xa);
        let mut given = with_replica_on(x);
        let uuid = test_ctx().new_id(0);
        let old = state_after(&given).volumes.get(uuid).unwrap().node_uuid;
        let volume = |g: &[AnyEvent]| state_after(g).volumes.get(uuid).unwrap().clone();
        assert_eq!(volume(&given).deposed, None);
        given.push(AnyEvent::Volume(Event::VolumePrimaryChanged {
            uuid,
            node: x,
            old,
        }));
        let v = volume(&given);
        assert_eq!((v.node_uuid, v.deposed), (x, Some(old)));
        assert_eq!(v.out_of_sync, vec![old]);
        given.push(AnyEvent::Volume(Event::VolumeReplicaInSync {
            uuid,
            node: old,
            copied_bytes: 1 << 20,
        }));
        assert_eq!(volume(&given).deposed, None, "rebuilt: no longer deposed");
    }

    #[test]
    fn protection_counts_in_sync_copies_so_a_moves_extra_copy_keeps_it_full() {
        let (x, y) = (Uuid::from_u128(0xa), Uuid::from_u128(0xb));
        let mut given = with_replica_on(x);
        let uuid = test_ctx().new_id(0);
        let protection = |g: &[AnyEvent]| state_after(g).volumes.get(uuid).unwrap().protection;
        assert_eq!(protection(&given), ProtectionState::FullyProtected);
        given.push(AnyEvent::Volume(Event::VolumeReplicaAdded {
            uuid,
            node: y,
            replacing: Some(x),
        }));
        // Two in-sync copies of two, one more being rebuilt.
        assert_eq!(protection(&given), ProtectionState::FullyProtected);
        let epoch = state_after(&given).volumes.get(uuid).unwrap().epoch;
        given.push(AnyEvent::Volume(Event::VolumeReplicaOutOfSync {
            uuid,
            node: x,
            epoch,
        }));
        assert_eq!(protection(&given), ProtectionState::Degraded);
        let synced = given_when(
            &given,
            AnyCommand::Volume(Command::MarkReplicaInSync {
                uuid,
                node: y,
                epoch,
                copied_bytes: 1 << 30,
                snapshots: vec![],
            }),
        )
        .unwrap();
        assert_eq!(
            synced,
            [
                AnyEvent::Volume(Event::VolumeReplicaInSync {
                    uuid,
                    node: y,
                    copied_bytes: 1 << 30
                }),
                AnyEvent::Volume(Event::VolumeReplicaRemoved { uuid, node: x }),
            ]
        );
        given.extend(synced);
        let v = state_after(&given).volumes.get(uuid).unwrap().clone();
        assert_eq!(
            (v.replica_nodes, v.protection),
            (vec![y], ProtectionState::FullyProtected)
        );
        assert!(v.out_of_sync.is_empty() && v.replacing.is_empty());
    }

    #[test]
    fn nsids_are_reused_lowest_first() {
        let mut v = Volumes::default();
        for (i, nsid) in [1u32, 2, 4].into_iter().enumerate() {
            let mut vol =
                match &given_when(&bootstrap_events(), create_cmd(new_volume("x"))).unwrap()[0] {
                    AnyEvent::Volume(Event::VolumeCreationRequested { volume }) => {
                        Volume::clone(volume)
                    }
                    _ => unreachable!(),
                };
            vol.uuid = Uuid::from_u128(i as u128);
            vol.name = format!("v{i}");
            vol.nsid = nsid;
            v.insert(vol);
        }
        assert_eq!(v.free_nsid(), 3);
    }
}
