//! Projection rows: how each piece of [`State`] is keyed and stored in the `projections`
//! column family, and how the state is loaded back from those rows on start.

use std::collections::BTreeMap;

use evstor_journal::{EventLog, ProjectionOp, RocksJournal};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::domain::endpoint::AdminEndpoint;
use crate::domain::inventory::{Node, Server};
use crate::domain::policy::Policy;
use crate::domain::schedule::ResourcePolicy;
use crate::domain::snapshot::Snapshot;
use crate::domain::{RowKey, State};
use crate::error::ControlError;

/// Version of the rows' stored shape (bincode of the read-model structs). Rows are derived
/// data: when the code's version differs from the stored one, the rows are rebuilt from the
/// events at start ([`load_or_rebuild`]) rather than decoded. Bump it whenever a struct that
/// `value` encodes changes shape. 1: until projects recorded their creation time. 2: until
/// volumes had replica nodes, servers health and failure domains, the cluster its leader.
/// 3: until volumes had an epoch and out-of-sync replicas. 4: until volumes had a primary
/// being released and replica moves, and servers their last eviction. 5: until volumes had
/// their rebuild's progress. 6: until snapshots had the nodes holding them. 7: until volumes
/// had their deposed primary.
pub const ROWS_VERSION: u32 = 8;

/// The row holding the stored [`ROWS_VERSION`]; outside every `<kind>/` prefix.
const ROWS_VERSION_KEY: &[u8] = b"meta:rows-version";

/// The storage key of a row: `<kind>/<id>`.
pub fn key_bytes(key: &RowKey) -> Vec<u8> {
    match key {
        RowKey::Cluster => b"cluster/".to_vec(),
        RowKey::Project(n) => format!("project/{n}").into_bytes(),
        RowKey::Volume(u) => format!("volume/{u}").into_bytes(),
        RowKey::Snapshot(u) => format!("snapshot/{u}").into_bytes(),
        RowKey::Policy(u) => format!("policy/{u}").into_bytes(),
        RowKey::Credential(p, id) => format!("credential/{p}:{id}").into_bytes(),
        RowKey::ConfigParam(n) => format!("config/{n}").into_bytes(),
        RowKey::Flag(n) => format!("flag/{n}").into_bytes(),
        RowKey::Server(u) => format!("server/{u}").into_bytes(),
        RowKey::Node(u) => format!("node/{u}").into_bytes(),
        RowKey::Device(s) => format!("device/{s}").into_bytes(),
        RowKey::ResourcePolicy(u) => format!("schedule/{u}").into_bytes(),
        RowKey::Federation => b"federation/".to_vec(),
        RowKey::Idp(n) => format!("idp/{n}").into_bytes(),
        RowKey::IdpClient(n) => format!("idpclient/{n}").into_bytes(),
        RowKey::AuthMap(n) => format!("authmap/{n}").into_bytes(),
        RowKey::AdminEndpoint(s, p) => format!("endpoint/{s}/{p}").into_bytes(),
        RowKey::NodeRole(u) => format!("noderole/{u}").into_bytes(),
        RowKey::ServerCreation(u) => format!("servercreate/{u}").into_bytes(),
        RowKey::DeviceLed(s) => format!("deviceled/{s}").into_bytes(),
        RowKey::Spare(s) => format!("spare/{s}").into_bytes(),
    }
}

fn enc<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serialize(value).expect("invariant: projections always serialize")
}

/// The stored value of a row, `None` when the object no longer exists.
pub fn value(state: &State, key: &RowKey) -> Option<Vec<u8>> {
    match key {
        RowKey::Cluster => Some(enc(&state.cluster)),
        RowKey::Project(n) => state.projects.get(n).map(enc),
        RowKey::Volume(u) => state.volumes.get(*u).map(enc),
        RowKey::Snapshot(u) => state.snapshots.get(*u).map(enc),
        RowKey::Policy(u) => state.policies.get(*u).map(enc),
        RowKey::Credential(p, id) => state.credentials.get(p, id).map(enc),
        RowKey::ConfigParam(n) => state.config.values.get(n).map(enc),
        RowKey::Flag(n) => state.flags.values.get(n).map(enc),
        RowKey::Server(u) => state.inventory.servers.get(u).map(enc),
        RowKey::Node(u) => state.inventory.nodes.get(u).map(enc),
        RowKey::Device(s) => state.inventory.devices.get(s).map(enc),
        RowKey::ResourcePolicy(u) => state.resource_policies.get(*u).map(enc),
        // Present while enabled (absent reads as disabled).
        RowKey::Federation => state.federation.enabled.then(|| enc(&true)),
        RowKey::Idp(n) => state.federation.idps.get(n).map(enc),
        RowKey::IdpClient(n) => state.federation.clients.get(n).map(enc),
        RowKey::AuthMap(n) => state.federation.maps.get(n).map(enc),
        RowKey::AdminEndpoint(s, p) => state
            .endpoints
            .by_server
            .get(s)
            .and_then(|ports| ports.get(p))
            .map(enc),
        RowKey::NodeRole(u) => state.inventory.roles.get(u).map(enc),
        RowKey::ServerCreation(u) => state.inventory.created.get(u).map(enc),
        RowKey::DeviceLed(s) => state.inventory.leds.get(s).map(enc),
        RowKey::Spare(s) => state.inventory.spares.get(s).map(enc),
    }
}

/// Every row of a state, keyed by storage key: what the projections column family must hold.
pub fn all(state: &State) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut keys = vec![RowKey::Cluster];
    keys.extend(state.projects.by_name.keys().cloned().map(RowKey::Project));
    keys.extend(state.volumes.by_uuid.keys().map(|u| RowKey::Volume(*u)));
    keys.extend(state.snapshots.by_uuid.keys().map(|u| RowKey::Snapshot(*u)));
    keys.extend(state.policies.by_uuid.keys().map(|u| RowKey::Policy(*u)));
    keys.extend(
        state
            .credentials
            .by_kid
            .values()
            .map(|c| RowKey::Credential(c.project.clone(), c.id.clone())),
    );
    keys.extend(state.config.values.keys().cloned().map(RowKey::ConfigParam));
    keys.extend(state.flags.values.keys().cloned().map(RowKey::Flag));
    keys.extend(state.inventory.servers.keys().map(|u| RowKey::Server(*u)));
    keys.extend(state.inventory.nodes.keys().map(|u| RowKey::Node(*u)));
    keys.extend(state.inventory.devices.keys().cloned().map(RowKey::Device));
    keys.extend(state.inventory.roles.keys().map(|u| RowKey::NodeRole(*u)));
    keys.extend(
        state
            .inventory
            .created
            .keys()
            .map(|u| RowKey::ServerCreation(*u)),
    );
    keys.extend(state.inventory.leds.keys().cloned().map(RowKey::DeviceLed));
    keys.extend(state.inventory.spares.keys().cloned().map(RowKey::Spare));
    keys.extend(
        state
            .resource_policies
            .by_uuid
            .keys()
            .map(|u| RowKey::ResourcePolicy(*u)),
    );
    let f = &state.federation;
    if f.enabled {
        keys.push(RowKey::Federation);
    }
    keys.extend(f.idps.keys().cloned().map(RowKey::Idp));
    keys.extend(f.clients.keys().cloned().map(RowKey::IdpClient));
    keys.extend(f.maps.keys().cloned().map(RowKey::AuthMap));
    keys.extend(state.endpoints.by_server.values().flat_map(|ports| {
        ports
            .values()
            .map(|e| RowKey::AdminEndpoint(e.server, e.port))
    }));
    keys.iter()
        .filter_map(|k| value(state, k).map(|v| (key_bytes(k), v)))
        .collect()
}

/// Loads every row under `prefix`, handing each its id (the key after the prefix).
fn load_kind<T: DeserializeOwned>(
    journal: &RocksJournal,
    prefix: &str,
    mut insert: impl FnMut(String, T),
) -> Result<(), ControlError> {
    for (k, v) in journal.scan_projections(prefix.as_bytes())? {
        let key = String::from_utf8_lossy(&k).into_owned();
        let row = bincode::deserialize(&v).map_err(|e| ControlError::Projection {
            key: key.clone(),
            reason: e.to_string(),
        })?;
        insert(key[prefix.len()..].to_string(), row);
    }
    Ok(())
}

/// Whether the stored rows have the shape this code reads. A journal without events and
/// rows (a new one) has; rows without a version are version 1.
pub fn current(journal: &RocksJournal) -> Result<bool, ControlError> {
    let stored = journal.get_projection(ROWS_VERSION_KEY)?;
    let version =
        match stored.as_deref() {
            Some(raw) => u32::from_le_bytes(raw.try_into().map_err(|_| {
                ControlError::Internal(format!("rows version of {} bytes", raw.len()))
            })?),
            None if journal.head().last_seq() == 0 => ROWS_VERSION,
            None => 1,
        };
    Ok(version == ROWS_VERSION)
}

/// The state from the rows, after rebuilding them from the events if their stored shape is
/// older than this code's ([`ROWS_VERSION`]); stamps the version on a new journal.
pub fn load_or_rebuild(journal: &RocksJournal) -> Result<State, ControlError> {
    if current(journal)? {
        if journal.get_projection(ROWS_VERSION_KEY)?.is_none() {
            journal.rewrite_projections(vec![version_row()])?;
        }
        return load(journal);
    }
    tracing::warn!(
        "projection rows are in an older format; rebuilding them from the journal (rows version {ROWS_VERSION})"
    );
    let (state, _) = super::replay::replay(journal, super::replay::Until::All)?;
    let fresh = all(&state);
    let mut ops: Vec<ProjectionOp> = journal
        .scan_projections(b"")?
        .into_iter()
        .filter(|(k, _)| !fresh.contains_key(k))
        .map(|(key, _)| ProjectionOp::Delete { key })
        .collect();
    ops.extend(
        fresh
            .into_iter()
            .map(|(key, value)| ProjectionOp::Put { key, value }),
    );
    ops.push(version_row());
    journal.rewrite_projections(ops)?;
    load(journal)
}

fn version_row() -> ProjectionOp {
    ProjectionOp::Put {
        key: ROWS_VERSION_KEY.to_vec(),
        value: ROWS_VERSION.to_le_bytes().to_vec(),
    }
}

/// Rebuilds the state from the stored projection rows (no event is read).
pub fn load(journal: &RocksJournal) -> Result<State, ControlError> {
    let mut s = State::default();
    load_kind(journal, "cluster/", |_, c| s.cluster = c)?;
    load_kind(journal, "project/", |id, p| {
        s.projects.by_name.insert(id, p);
    })?;
    load_kind(journal, "volume/", |_, v| s.volumes.insert(v))?;
    load_kind(journal, "snapshot/", |_, x: Snapshot| {
        s.snapshots.by_uuid.insert(x.uuid, x);
    })?;
    load_kind(journal, "policy/", |_, p: Policy| {
        s.policies.by_uuid.insert(p.uuid, p);
    })?;
    load_kind(journal, "credential/", |id, c| {
        s.credentials.by_kid.insert(id, c);
    })?;
    load_kind(journal, "config/", |id, v| {
        s.config.values.insert(id, v);
    })?;
    load_kind(journal, "flag/", |id, v| {
        s.flags.values.insert(id, v);
    })?;
    load_kind(journal, "server/", |_, x: Server| {
        s.inventory.servers.insert(x.uuid, x);
    })?;
    load_kind(journal, "node/", |_, x: Node| {
        s.inventory.nodes.insert(x.uuid, x);
    })?;
    load_kind(journal, "device/", |id, x| {
        s.inventory.devices.insert(id, x);
    })?;
    load_kind(journal, "noderole/", |id, x| {
        if let Ok(u) = id.parse() {
            s.inventory.roles.insert(u, x);
        }
    })?;
    load_kind(journal, "servercreate/", |id, x| {
        if let Ok(u) = id.parse() {
            s.inventory.created.insert(u, x);
        }
    })?;
    load_kind(journal, "deviceled/", |id, x| {
        s.inventory.leds.insert(id, x);
    })?;
    load_kind(journal, "spare/", |id, x| {
        s.inventory.spares.insert(id, x);
    })?;
    load_kind(journal, "schedule/", |_, x: ResourcePolicy| {
        s.resource_policies.by_uuid.insert(x.uuid, x);
    })?;
    load_kind(journal, "federation/", |_, enabled| {
        s.federation.enabled = enabled
    })?;
    load_kind(journal, "idp/", |id, x| {
        s.federation.idps.insert(id, x);
    })?;
    load_kind(journal, "idpclient/", |id, x| {
        s.federation.clients.insert(id, x);
    })?;
    load_kind(journal, "authmap/", |id, x| {
        s.federation.maps.insert(id, x);
    })?;
    load_kind(journal, "endpoint/", |_, e: AdminEndpoint| {
        s.endpoints
            .by_server
            .entry(e.server)
            .or_default()
            .insert(e.port, e);
    })?;
    Ok(s)
}
