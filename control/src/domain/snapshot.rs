//! Snapshots: point-in-time, read-only images of a volume; the source of clones and rollback.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::volume::{Label, Volume};
use super::{Applied, Ctx, DomainError, Event as AnyEvent, RowKey, State};

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
        }
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

    /// Resolves a reference within `project`, or 404.
    pub fn resolve(&self, project: &str, r: &SnapshotRef) -> Result<&Snapshot, DomainError> {
        match r {
            SnapshotRef::Uuid(u) => self
                .get(*u)
                .filter(|s| s.project == project)
                .ok_or_else(|| DomainError::not_found("snapshot", u)),
            SnapshotRef::Name(n) => self
                .by_uuid
                .values()
                .find(|s| s.project == project && s.name == *n)
                .ok_or_else(|| DomainError::not_found("snapshot", n)),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {}

impl Event {
    pub fn type_name(&self) -> &'static str {
        match *self {}
    }

    pub fn project<'a>(&'a self, _state: &'a State) -> &'a str {
        match *self {}
    }
}

pub fn decide(_: &State, _: &Ctx, cmd: &Command) -> Result<Vec<AnyEvent>, DomainError> {
    match *cmd {}
}

pub fn evolve(_: &mut State, _: Applied, event: &Event) -> Vec<RowKey> {
    match *event {}
}
