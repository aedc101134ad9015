//! Event ⇄ envelope payload. Payloads are bincode of [`Event`]; bincode encodes enum variants
//! by position, so variants are only ever appended, never reordered or removed, and a payload
//! change bumps [`SCHEMA_VERSION`] with an upcast from the old shape added in [`decode`].

use evstor_journal::{Envelope, NewEvent};
use serde::Deserialize;
use uuid::Uuid;

use crate::domain::volume::{self, Label, ProtectionState, Volume, VolumeState};
use crate::domain::Event;
use crate::error::ControlError;

/// Version of the payload schema written today. 2: volumes carry their replica nodes
/// (`Volume::replica_nodes`), so `VolumeCreationRequested` grew a field. 3: volumes carry
/// their epoch and out-of-sync replicas (`Volume::epoch`, `Volume::out_of_sync`), and
/// later (still written as 3) the primary being released (`Volume::releasing`). 4: volumes
/// carry their replica moves (`Volume::replacing`). 5: volumes carry their rebuild's
/// progress (`Volume::rebuild_percent`). 6: snapshots carry the nodes holding them
/// (`Snapshot::holders`), so `SnapshotCreationRequested` grew a field. 7: volumes carry
/// their deposed primary (`Volume::deposed`, their last field).
pub const SCHEMA_VERSION: u16 = 7;

/// Frames a domain event for the journal.
pub fn encode(event: &Event, project: &str, actor: &str, request_id: &str, time: u64) -> NewEvent {
    NewEvent {
        time_unix_ns: time,
        actor: actor.to_string(),
        project: project.to_string(),
        request_id: request_id.to_string(),
        event_type: event.type_name().to_string(),
        schema_version: SCHEMA_VERSION,
        payload: bincode::serialize(event).expect("invariant: domain events always serialize"),
    }
}

/// Reads a stored event back, upcasting old schema versions to today's shape.
pub fn decode(env: &Envelope) -> Result<Event, ControlError> {
    let bad = |e: bincode::Error| ControlError::Codec {
        seq: env.seq,
        reason: e.to_string(),
    };
    let event: Event = match env.schema_version {
        7 => bincode::deserialize(&env.payload).map_err(bad)?,
        5 | 6 if is_volume_creation(&env.payload) => {
            upcast_v6_volume_creation(&env.payload).map_err(bad)?
        }
        6 => bincode::deserialize(&env.payload).map_err(bad)?,
        1..=5 if is_snapshot_creation(&env.payload) => {
            upcast_snapshot_creation(&env.payload).map_err(bad)?
        }
        5 => bincode::deserialize(&env.payload).map_err(bad)?,
        4 => upcast_v4(&env.payload).map_err(bad)?,
        3 => upcast_v3(&env.payload).map_err(bad)?,
        2 => upcast_v2(&env.payload).map_err(bad)?,
        1 => upcast_v1(&env.payload).map_err(bad)?,
        v => {
            return Err(ControlError::Codec {
                seq: env.seq,
                reason: format!("unknown schema version {v} of {}", env.event_type),
            })
        }
    };
    if event.type_name() != env.event_type {
        return Err(ControlError::Codec {
            seq: env.seq,
            reason: format!(
                "envelope says {} but the payload is {}",
                env.event_type,
                event.type_name()
            ),
        });
    }
    Ok(event)
}

/// bincode's variant indexes of `Event::Volume` and `volume::Event::VolumeCreationRequested`.
const VOLUME_EVENT: u32 = 2;
const VOLUME_CREATION_REQUESTED: u32 = 0;
/// bincode's variant indexes of `Event::Snapshot` and `SnapshotCreationRequested`.
const SNAPSHOT_EVENT: u32 = 3;
const SNAPSHOT_CREATION_REQUESTED: u32 = 0;

/// Whether a payload starts with the two variant tags `outer`, `inner`.
fn tagged(payload: &[u8], outer: u32, inner: u32) -> bool {
    let tag = |at: usize| {
        payload
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    tag(0) == Some(outer) && tag(4) == Some(inner)
}

fn is_snapshot_creation(payload: &[u8]) -> bool {
    tagged(payload, SNAPSHOT_EVENT, SNAPSHOT_CREATION_REQUESTED)
}

/// Schemas 5 and 6: a volume ended with its rebuild's progress, before its deposed
/// primary. The volume is the payload's last field, so today's shape is the old bytes
/// followed by `None` (bincode: one 0 byte).
fn upcast_v6_volume_creation(payload: &[u8]) -> bincode::Result<Event> {
    let mut today = payload.to_vec();
    today.push(0);
    bincode::deserialize(&today)
}

/// Schemas 1 to 5: a snapshot ended with `restoring`, before its holders. The snapshot is
/// the payload's last field, so today's shape is the old bytes followed by an empty list
/// (bincode: a `u64` length of 0); it is taken by no one yet.
fn upcast_snapshot_creation(payload: &[u8]) -> bincode::Result<Event> {
    let mut today = payload.to_vec();
    today.extend_from_slice(&0u64.to_le_bytes());
    bincode::deserialize(&today)
}

/// A volume as schema 1 stored it: no replica nodes.
#[derive(Deserialize)]
struct VolumeV1 {
    uuid: Uuid,
    name: String,
    project: String,
    state: VolumeState,
    protection: ProtectionState,
    replica_count: u32,
    nsid: u32,
    acl: Vec<String>,
    ip_acl: Vec<String>,
    compression: bool,
    size_bytes: u64,
    sector_size: u32,
    source_snapshot: Option<Uuid>,
    source_snapshot_name: String,
    qos_policy: Option<Uuid>,
    labels: Vec<Label>,
    node_uuid: Uuid,
    creation_unix_ns: u64,
    etag: u64,
}

/// Schemas 1 to 3 differ from 4 only in `VolumeCreationRequested`; every other payload
/// decodes as it is.
fn is_volume_creation(payload: &[u8]) -> bool {
    tagged(payload, VOLUME_EVENT, VOLUME_CREATION_REQUESTED)
}

/// Schema 1: a volume then had one node.
fn upcast_v1(payload: &[u8]) -> bincode::Result<Event> {
    if !is_volume_creation(payload) {
        return bincode::deserialize(payload);
    }
    let (_, _, v): (u32, u32, VolumeV1) = bincode::deserialize(payload)?;
    Ok(creation(volume_of(v, Vec::new())))
}

/// Schema 2: replicas were placeholders that received no data, so they start out of sync.
fn upcast_v2(payload: &[u8]) -> bincode::Result<Event> {
    if !is_volume_creation(payload) {
        return bincode::deserialize(payload);
    }
    // Schema 2's volume is schema 1's followed by its replica nodes.
    let (_, _, v, replicas): (u32, u32, VolumeV1, Vec<Uuid>) = bincode::deserialize(payload)?;
    Ok(creation(volume_of(v, replicas)))
}

/// Schema 3's additions to schema 2's volume.
#[derive(Deserialize)]
struct VolumeV3Tail {
    replica_nodes: Vec<Uuid>,
    epoch: u64,
    out_of_sync: Vec<Uuid>,
}

/// Schema 3: no replica moves. Its volumes were written with and without `releasing`
/// (added after schema 3 without a bump): the payload's length tells, as nothing follows a
/// volume in its event.
fn upcast_v3(payload: &[u8]) -> bincode::Result<Event> {
    if !is_volume_creation(payload) {
        return bincode::deserialize(payload);
    }
    let mut rest = std::io::Cursor::new(payload);
    let (_, _, v, tail): (u32, u32, VolumeV1, VolumeV3Tail) = bincode::deserialize_from(&mut rest)?;
    let releasing: Option<Uuid> = if (rest.position() as usize) < payload.len() {
        bincode::deserialize_from(&mut rest)?
    } else {
        None
    };
    Ok(creation(volume_v3(v, tail, releasing)))
}

/// Today's volume from schema 3's parts; its replicas and protection are as stored (not
/// schema 2's placeholders).
fn volume_v3(v: VolumeV1, tail: VolumeV3Tail, releasing: Option<Uuid>) -> Volume {
    let protection = v.protection;
    let mut volume = volume_of(v, tail.replica_nodes);
    volume.protection = protection;
    volume.epoch = tail.epoch;
    volume.out_of_sync = tail.out_of_sync;
    volume.releasing = releasing;
    volume
}

/// Schema 4: no rebuild progress. Its volume is schema 3's (with `releasing`) followed by
/// its replica moves.
fn upcast_v4(payload: &[u8]) -> bincode::Result<Event> {
    if !is_volume_creation(payload) {
        return bincode::deserialize(payload);
    }
    type V4 = (
        u32,
        u32,
        VolumeV1,
        VolumeV3Tail,
        Option<Uuid>,
        Vec<volume::Replacement>,
    );
    let (_, _, v, tail, releasing, replacing): V4 = bincode::deserialize(payload)?;
    let mut volume = volume_v3(v, tail, releasing);
    volume.replacing = replacing;
    Ok(creation(volume))
}

fn creation(volume: Volume) -> Event {
    Event::Volume(volume::Event::VolumeCreationRequested {
        volume: Box::new(volume),
    })
}

/// Today's volume from an old one: epoch 0 (evolve sets it from the event's seq) and every
/// replica out of sync.
fn volume_of(v: VolumeV1, replica_nodes: Vec<Uuid>) -> Volume {
    Volume {
        uuid: v.uuid,
        name: v.name,
        project: v.project,
        state: v.state,
        protection: if replica_nodes.is_empty() {
            v.protection
        } else {
            ProtectionState::Degraded
        },
        replica_count: v.replica_count,
        nsid: v.nsid,
        acl: v.acl,
        ip_acl: v.ip_acl,
        compression: v.compression,
        size_bytes: v.size_bytes,
        sector_size: v.sector_size,
        source_snapshot: v.source_snapshot,
        source_snapshot_name: v.source_snapshot_name,
        qos_policy: v.qos_policy,
        labels: v.labels,
        node_uuid: v.node_uuid,
        creation_unix_ns: v.creation_unix_ns,
        etag: v.etag,
        releasing: None,
        deposed: None,
        replacing: Vec::new(),
        rebuild_percent: 0,
        out_of_sync: replica_nodes.clone(),
        replica_nodes,
        epoch: 0,
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::volume::tests::with_volume;

    /// A stored event of `event_type` in schema `version`.
    fn envelope(event_type: &str, version: u16, payload: &[u8]) -> Envelope {
        Envelope {
            seq: 1,
            time_unix_ns: 1,
            actor: String::new(),
            project: String::new(),
            request_id: String::new(),
            event_type: event_type.into(),
            schema_version: version,
            payload: payload.to_vec(),
            prev_hash: Default::default(),
        }
    }

    /// Schema 1 bytes of the first volume event of `with_volume`, as version 1 wrote them.
    fn v1_bytes(v: &Volume) -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct V1<'a> {
            uuid: Uuid,
            name: &'a str,
            project: &'a str,
            state: VolumeState,
            protection: ProtectionState,
            replica_count: u32,
            nsid: u32,
            acl: &'a [String],
            ip_acl: &'a [String],
            compression: bool,
            size_bytes: u64,
            sector_size: u32,
            source_snapshot: Option<Uuid>,
            source_snapshot_name: &'a str,
            qos_policy: Option<Uuid>,
            labels: &'a [Label],
            node_uuid: Uuid,
            creation_unix_ns: u64,
            etag: u64,
        }
        let old = V1 {
            uuid: v.uuid,
            name: &v.name,
            project: &v.project,
            state: v.state,
            protection: v.protection,
            replica_count: v.replica_count,
            nsid: v.nsid,
            acl: &v.acl,
            ip_acl: &v.ip_acl,
            compression: v.compression,
            size_bytes: v.size_bytes,
            sector_size: v.sector_size,
            source_snapshot: v.source_snapshot,
            source_snapshot_name: &v.source_snapshot_name,
            qos_policy: v.qos_policy,
            labels: &v.labels,
            node_uuid: v.node_uuid,
            creation_unix_ns: v.creation_unix_ns,
            etag: v.etag,
        };
        bincode::serialize(&(VOLUME_EVENT, VOLUME_CREATION_REQUESTED, old)).unwrap()
    }

    #[test]
    fn schema_1_volume_creation_is_upcast_and_other_events_decode_as_they_are() {
        let events = with_volume();
        let created = events
            .iter()
            .find_map(|e| match e {
                Event::Volume(volume::Event::VolumeCreationRequested { volume }) => {
                    Some(volume.clone())
                }
                _ => None,
            })
            .unwrap();
        assert_eq!(
            upcast_v1(&v1_bytes(&created)).unwrap(),
            Event::Volume(volume::Event::VolumeCreationRequested {
                volume: created.clone()
            })
        );
        for e in &events {
            if !matches!(
                e,
                Event::Volume(volume::Event::VolumeCreationRequested { .. })
            ) {
                assert_eq!(&upcast_v1(&bincode::serialize(e).unwrap()).unwrap(), e);
            }
        }
    }

    /// The volume `with_volume` creates.
    fn created_volume() -> Box<Volume> {
        with_volume()
            .iter()
            .find_map(|e| match e {
                Event::Volume(volume::Event::VolumeCreationRequested { volume }) => {
                    Some(volume.clone())
                }
                _ => None,
            })
            .unwrap()
    }

    #[test]
    fn schema_2_volume_creation_starts_with_its_replicas_out_of_sync() {
        let mut created = created_volume();
        let replicas = vec![Uuid::from_u128(7), Uuid::from_u128(8)];
        // Schema 2 bytes: schema 1's volume followed by its replica nodes.
        let mut v2 = v1_bytes(&created);
        v2.extend(bincode::serialize(&replicas).unwrap());
        created.replica_nodes = replicas.clone();
        created.out_of_sync = replicas;
        created.protection = ProtectionState::Degraded;
        assert_eq!(
            upcast_v2(&v2).unwrap(),
            Event::Volume(volume::Event::VolumeCreationRequested { volume: created })
        );
    }

    #[test]
    fn schema_3_and_4_volume_creations_decode_to_todays_volume() {
        let mut created = created_volume();
        created.replica_nodes = vec![Uuid::from_u128(7), Uuid::from_u128(8)];
        created.out_of_sync = vec![Uuid::from_u128(8)];
        created.epoch = 5;
        created.protection = ProtectionState::Degraded;
        // Schema 3 bytes: schema 1's volume, then replica nodes, epoch and out-of-sync ones.
        let mut v3 = v1_bytes(&created);
        v3.extend(bincode::serialize(&created.replica_nodes).unwrap());
        v3.extend(bincode::serialize(&created.epoch).unwrap());
        v3.extend(bincode::serialize(&created.out_of_sync).unwrap());
        let want = |v: &Volume| {
            Event::Volume(volume::Event::VolumeCreationRequested {
                volume: Box::new(v.clone()),
            })
        };
        assert_eq!(upcast_v3(&v3).unwrap(), want(&created));
        // As written after `releasing` joined schema 3.
        created.releasing = Some(Uuid::from_u128(9));
        v3.extend(bincode::serialize(&created.releasing).unwrap());
        assert_eq!(upcast_v3(&v3).unwrap(), want(&created));
        // Other events decode as they are.
        let other = Event::Volume(volume::Event::VolumeReplicaInSync {
            uuid: created.uuid,
            node: Uuid::from_u128(8),
            copied_bytes: 1,
        });
        assert_eq!(
            upcast_v3(&bincode::serialize(&other).unwrap()).unwrap(),
            other
        );
        // Schema 4: schema 3's volume (with `releasing`), then its replica moves.
        created.replacing = vec![volume::Replacement {
            node: Uuid::from_u128(10),
            replaces: Uuid::from_u128(8),
        }];
        let mut v4 = v3.clone();
        v4.extend(bincode::serialize(&created.replacing).unwrap());
        assert_eq!(upcast_v4(&v4).unwrap(), want(&created));
        assert_eq!(created.rebuild_percent, 0);
        // Schemas 5 and 6: schema 4's volume, then its rebuild's progress.
        let mut v6 = v4.clone();
        v6.push(created.rebuild_percent);
        let env = |version, payload: &[u8]| envelope("VolumeCreationRequested", version, payload);
        for version in [5, 6] {
            assert_eq!(decode(&env(version, &v6)).unwrap(), want(&created));
        }
        // Schema 7 appends the deposed primary.
        created.deposed = Some(Uuid::from_u128(11));
        let today = bincode::serialize(&want(&created)).unwrap();
        assert_eq!(decode(&env(7, &today)).unwrap(), want(&created));
        assert!(
            decode(&env(7, &v6)).is_err(),
            "schema 7 has the deposed primary"
        );
    }

    #[test]
    fn schema_5_snapshot_creation_decodes_with_no_holders() {
        use crate::domain::snapshot::{self, tests::with_creating_snapshot};
        let created = with_creating_snapshot()
            .into_iter()
            .find(|e| {
                matches!(
                    e,
                    Event::Snapshot(snapshot::Event::SnapshotCreationRequested { .. })
                )
            })
            .unwrap();
        let Event::Snapshot(snapshot::Event::SnapshotCreationRequested { snapshot: s }) = &created
        else {
            unreachable!()
        };
        assert!(s.holders.is_empty());
        // Schema 5 bytes: today's without the (empty) holders list at the end.
        let today = bincode::serialize(&created).unwrap();
        let v5 = &today[..today.len() - 8];
        let env = |version, payload: &[u8]| envelope("SnapshotCreationRequested", version, payload);
        for version in 1..=5 {
            assert_eq!(
                decode(&env(version, v5)).unwrap(),
                created,
                "schema {version}"
            );
        }
        assert_eq!(decode(&env(6, &today)).unwrap(), created);
        assert!(
            decode(&env(6, v5)).is_err(),
            "today's schema has the holders"
        );
    }
}
