//! `GET /api/v2/events` and `GET /api/v2/projects/{projectName}/events`, served from the
//! journal itself: every envelope is one `Event` whose `ID` is its seq.
//!
//! Paging: events come oldest first; `nextToken` is the ID of the first event of the next page
//! (absent on the last page). A request examines at most [`EVENTS_SCAN_MAX`] envelopes; a page
//! cut short by that bound still carries a `nextToken`, so every page is cheap and walking the
//! tokens visits every matching event exactly once.
//!
//! Mapping (evstor's choices, stable): `Type` is the component the event is about (volume
//! events `Volume`, server/node/device registration `Server`/`Node`/`NVMeSSD`, everything else
//! `Cluster`); `Severity` is `Info` for creations, `Low` for changes, `Medium` for deletions;
//! `ReportingService` is `API` for requests and `CM` for the cluster's own work (bootstrap,
//! reconcilers); `EventName` is the journal's event type; `EventCode` is
//! `100 × (family + 1) + variant`, both positions stable because variants are only appended.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use evstor_journal::{Envelope, EventLog, RocksJournal};
use serde_json::{json, Value};

use super::auth::Principal;
use super::error::{ApiError, ApiResult};
use super::json::Obj;
use super::{App, Query};
use crate::domain::{credential, inventory, Event, State as DomainState};
use crate::limits::{EVENTS_READ_CHUNK, EVENTS_SCAN_MAX, LIST_PAGE_MAX};
use crate::store::codec;

pub fn routes() -> Router<App> {
    Router::new()
        .route("/api/v2/events", get(list_unscoped))
        .route("/api/v2/projects/{projectName}/events", get(list_scoped))
}

/// `Event.EventType`, by number.
pub const EVENT_TYPES: [&str; 8] = [
    "UnknownType",
    "Cluster",
    "Node",
    "Volume",
    "NVMeSSD",
    "Server",
    "DataIntegrity",
    "ClusterEncryption",
];
/// `Event.EventSeverity`, by number (the zero value is misspelt in the API).
pub const SEVERITIES: [&str; 6] = [
    "UnkownSeverity",
    "Info",
    "Low",
    "Medium",
    "High",
    "Critical",
];
const CLUSTER: usize = 1;
const NODE: usize = 2;
const VOLUME: usize = 3;
const NVME_SSD: usize = 4;
const SERVER: usize = 5;
const INFO: usize = 1;
const LOW: usize = 2;
const MEDIUM: usize = 3;
const HIGH: usize = 4;

/// What the filters of one request ask for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    pub project: Option<String>,
    pub from_seq: u64,
    pub since_unix_ns: Option<u64>,
    pub until_unix_ns: Option<u64>,
    pub limit: usize,
    pub severities: Vec<usize>,
    pub component: Option<usize>,
}

/// An enum query value: its name (any case) or its number.
fn enum_value(names: &[&str], key: &str, text: &str) -> ApiResult<usize> {
    if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(text)) {
        return Ok(i);
    }
    text.parse::<usize>()
        .ok()
        .filter(|n| *n < names.len())
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "{key}={text:?} is not one of {}",
                names[1..].join(", ")
            ))
        })
}

fn time_param(q: &Query, key: &str) -> ApiResult<Option<u64>> {
    let Some(text) = q.get(key) else {
        return Ok(None);
    };
    let t = humantime::parse_rfc3339_weak(text).map_err(|e| {
        ApiError::bad_request(format!(
            "{key}={text:?} is not a UTC ISO-8601 time like 2000-01-01T12:00:00.000Z: {e}"
        ))
    })?;
    let ns = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos().min(u128::from(u64::MAX)) as u64)
        .unwrap_or(0);
    Ok(Some(ns))
}

impl Filter {
    /// Reads the query; `project` comes from the path or the `projectName` query key.
    pub fn parse(q: &Query, project: Option<String>) -> ApiResult<Filter> {
        let limit = match q.get("limit") {
            None => LIST_PAGE_MAX,
            Some(text) => match text.parse::<i64>() {
                Ok(0) => LIST_PAGE_MAX,
                Ok(n) if n > 0 => (n as u64).min(LIST_PAGE_MAX as u64) as usize,
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "limit={text:?} is not a positive number"
                    )))
                }
            },
        };
        let from_seq = match q.get("nextToken") {
            None => 1,
            Some(t) => t.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!("nextToken={t:?} is not an event ID"))
            })?,
        };
        let severities = q
            .all("severity")
            .into_iter()
            .filter(|s| !s.is_empty())
            .map(|s| enum_value(&SEVERITIES, "severity", s))
            .collect::<ApiResult<Vec<_>>>()?;
        let component = q
            .get("componentType")
            .map(|t| enum_value(&EVENT_TYPES, "componentType", t))
            .transpose()?;
        let f = Filter {
            project,
            from_seq: from_seq.max(1),
            since_unix_ns: time_param(q, "since")?,
            until_unix_ns: time_param(q, "until")?,
            limit,
            severities,
            component,
        };
        let kinds = [
            f.project.is_some(),
            !f.severities.is_empty(),
            f.component.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() > 1 {
            return Err(ApiError::unimplemented(
                "specify only a single parameter to filter events: componentType, projectName or severity",
            ));
        }
        Ok(f)
    }
}

/// How one domain event reads in the API.
#[derive(Debug, Clone, PartialEq)]
pub struct Described {
    pub kind: usize,
    pub severity: usize,
    /// The component's state after the event, if it has one.
    pub status: &'static str,
    pub description: String,
    /// `(key, object)` of the `ComponentInfo` oneof.
    pub component: (&'static str, Value),
}

/// Severity and status by event type; types not listed are `Info` with no status.
fn severity_of(type_name: &str) -> (usize, &'static str) {
    match type_name {
        "VolumeCreationRequested" => (INFO, "Creating"),
        "VolumeBecameAvailable" => (INFO, "Available"),
        "VolumeUpdated" => (LOW, "Available"),
        "VolumeDeletionRequested" => (MEDIUM, "Deleting"),
        "VolumeDeleted" => (MEDIUM, "Deleted"),
        "ServerRegistered" => (INFO, "Enabled"),
        "NodeRegistered" => (INFO, "Active"),
        "DeviceAdded" => (INFO, "Healthy"),
        "VolumeDataIntegrityError" => (HIGH, "Available"),
        "ServerFailed" => (HIGH, "Failed"),
        "ServerRecovered" => (INFO, "Enabled"),
        "ServerDisabled" => (LOW, "Disabled"),
        "ServerEnabled" => (LOW, "Enabled"),
        "VolumeReplicaOutOfSync" => (HIGH, "Degraded"),
        "VolumePrimaryChanged" => (HIGH, "Degraded"),
        "VolumeReplicaInSync" => (INFO, "FullyProtected"),
        "VolumePrimaryHandedOver" => (LOW, "Available"),
        "VolumePrimaryReleased" => (INFO, "Available"),
        "VolumeReplicaAdded" => (LOW, "Available"),
        "VolumeReplicaRemoved" => (LOW, "Available"),
        "VolumeRebuildProgressed" => (INFO, "Degraded"),
        "ServerEvictionStarted" => (LOW, "Disabled"),
        "ServerEvictionCompleted" => (INFO, "Disabled"),
        "ServerEvictionAborted" => (MEDIUM, "Enabled"),
        "ServerEvictionFailed" => (HIGH, "Disabled"),
        "NodeReplacementStarted" => (LOW, "Detaching"),
        "NodeReplacementCompleted" => (INFO, "Unattached"),
        "ServerCreated" => (INFO, "Creating"),
        "CreatedServerJoined" => (INFO, "Enabled"),
        "DeviceLedPatternSet" => (INFO, "Healthy"),
        t if t.ends_with("Deleted") || t.ends_with("DeletionRequested") => (MEDIUM, ""),
        t if t.ends_with("Updated") || t.ends_with("Enabled") || t.ends_with("Disabled") => {
            (LOW, "")
        }
        _ => (INFO, ""),
    }
}

fn id_name(id: &str, name: &str) -> Value {
    Obj::new().str("ID", id).str("Name", name).build()
}

fn cluster_component(state: &DomainState) -> (&'static str, Value) {
    let c = &state.cluster;
    (
        "ComponentClusterInfo",
        id_name(&c.uuid.to_string(), &c.name),
    )
}

/// The component an event is about, its type, and a phrase naming it.
fn component(
    state: &DomainState,
    env: &Envelope,
    event: &Event,
) -> (usize, (&'static str, Value), String) {
    match event {
        Event::Volume(e) => {
            let uuid = e.uuid();
            let name = match e {
                crate::domain::volume::Event::VolumeCreationRequested { volume } => {
                    volume.name.clone()
                }
                _ => state
                    .volumes
                    .get(uuid)
                    .map(|v| v.name.clone())
                    .unwrap_or_default(),
            };
            let list = json!({"VolumeComponentInfoList": [id_name(&uuid.to_string(), &name)]});
            let map = json!({"ProjectVolumesMap": {env.project.clone(): list}});
            let phrase = format!("volume {name} ({uuid}) in project {}", env.project);
            (VOLUME, ("ComponentVolumesInfo", map), phrase)
        }
        Event::Inventory(inventory::Event::ServerRegistered { uuid, name, .. }) => {
            let c = ("ComponentServerInfo", id_name(&uuid.to_string(), name));
            (SERVER, c, format!("server {name} ({uuid})"))
        }
        Event::Inventory(
            inventory::Event::ServerFailed { uuid, .. }
            | inventory::Event::ServerRecovered { uuid, .. }
            | inventory::Event::ServerDisabled { uuid }
            | inventory::Event::ServerEnabled { uuid }
            | inventory::Event::ServerDeleted { uuid }
            | inventory::Event::ServerEvictionStarted { uuid, .. }
            | inventory::Event::ServerEvictionCompleted { uuid }
            | inventory::Event::ServerEvictionAborted { uuid }
            | inventory::Event::ServerEvictionFailed { uuid }
            | inventory::Event::ServerCreated { uuid, .. }
            | inventory::Event::CreatedServerJoined { uuid }
            | inventory::Event::FailureDomainSet {
                server_uuid: uuid, ..
            },
        ) => {
            let name = state
                .inventory
                .servers
                .get(uuid)
                .map(|s| s.name.clone())
                .unwrap_or_default();
            let c = ("ComponentServerInfo", id_name(&uuid.to_string(), &name));
            (SERVER, c, format!("server {name} ({uuid})"))
        }
        Event::Inventory(inventory::Event::NodeRegistered { uuid, name, .. }) => {
            let c = ("ComponentNodeInfo", id_name(&uuid.to_string(), name));
            (NODE, c, format!("node {name} ({uuid})"))
        }
        Event::Inventory(
            inventory::Event::NodeReplacementStarted { src: uuid, .. }
            | inventory::Event::NodeReplacementCompleted { src: uuid },
        ) => {
            let name = state
                .inventory
                .nodes
                .get(uuid)
                .map(|n| n.name.clone())
                .unwrap_or_default();
            let c = ("ComponentNodeInfo", id_name(&uuid.to_string(), &name));
            (NODE, c, format!("node {name} ({uuid})"))
        }
        Event::Inventory(inventory::Event::DeviceLedPatternSet { serial, .. }) => {
            let path = state
                .inventory
                .devices
                .get(serial)
                .map(|d| d.path.clone())
                .unwrap_or_default();
            let c = ("ComponentNVMeSSDInfo", id_name(serial, &path));
            (NVME_SSD, c, format!("NVMe device {serial} ({path})"))
        }
        Event::Inventory(inventory::Event::DeviceAdded { device }) => {
            let c = (
                "ComponentNVMeSSDInfo",
                id_name(&device.serial, &device.path),
            );
            (
                NVME_SSD,
                c,
                format!("NVMe device {} ({})", device.serial, device.path),
            )
        }
        Event::Project(e) => (
            CLUSTER,
            cluster_component(state),
            format!("project {}", e.project()),
        ),
        Event::Credential(e) => {
            let id = match e {
                credential::Event::CredentialCreated { id, .. }
                | credential::Event::CredentialDeleted { id, .. } => id.as_str(),
                credential::Event::RootKeyRotated { .. } => "root",
            };
            let phrase = format!("credential {}", credential::kid(e.project(), id));
            (CLUSTER, cluster_component(state), phrase)
        }
        Event::Config(crate::domain::config::Event::ClusterConfigParamUpdated { name, value }) => {
            let phrase = format!("cluster configuration parameter {name} = {value:?}");
            (CLUSTER, cluster_component(state), phrase)
        }
        Event::Flag(e) => {
            let name = match e {
                crate::domain::flag::Event::FeatureFlagEnabled { name }
                | crate::domain::flag::Event::FeatureFlagDisabled { name } => name,
            };
            (
                CLUSTER,
                cluster_component(state),
                format!("feature flag {name}"),
            )
        }
        Event::Federation(e) => (CLUSTER, cluster_component(state), e.subject()),
        Event::Endpoint(e) => (CLUSTER, cluster_component(state), e.subject()),
        _ => {
            let c = cluster_component(state);
            let phrase = format!("cluster {}", state.cluster.name);
            (CLUSTER, c, phrase)
        }
    }
}

/// Maps one journal envelope and its decoded event to the API's terms.
pub fn describe(state: &DomainState, env: &Envelope, event: &Event) -> Described {
    let (kind, component, subject) = component(state, env, event);
    let (severity, status) = severity_of(&env.event_type);
    Described {
        kind,
        severity,
        status,
        description: format!("{}: {subject}, by {}", env.event_type, env.actor),
        component,
    }
}

/// `100 × (family + 1) + variant`, read from the bincode tags at the start of the payload
/// (bincode writes each enum's variant index as a little-endian u32).
pub fn event_code(env: &Envelope) -> u64 {
    let tag = |at: usize| {
        env.payload
            .get(at..at + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(|b| u64::from(u32::from_le_bytes(b)))
            .unwrap_or(0)
    };
    100 * (tag(0) + 1) + tag(4)
}

fn event_json(env: &Envelope, d: &Described) -> Value {
    let service = if env.actor == "system" { "CM" } else { "API" };
    Obj::new()
        .str("ID", &env.seq.to_string())
        .time("Time", env.time_unix_ns)
        .str("Type", EVENT_TYPES[d.kind])
        .str("Severity", SEVERITIES[d.severity])
        .str("EventName", &env.event_type)
        .num("EventCode", event_code(env))
        .str("ReportingService", service)
        .str("Status", d.status)
        .str("Description", &d.description)
        .val(d.component.0, d.component.1.clone())
        .build()
}

/// The smallest seq in `[from, last]` whose time is at or after `since` (`last + 1` if none).
/// Times never decrease along the log, so this is a binary search of single reads.
fn first_at_or_after(journal: &RocksJournal, since: u64, from: u64, last: u64) -> ApiResult<u64> {
    let (mut lo, mut hi) = (from, last + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let env = journal.read(mid, 1).map_err(internal)?;
        match env.first() {
            Some(e) if e.time_unix_ns >= since => hi = mid,
            Some(_) => lo = mid + 1,
            None => hi = mid,
        }
    }
    Ok(lo)
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(format!("reading the journal: {e}"))
}

/// One page of matching events and the token of the next.
pub fn page(
    journal: &RocksJournal,
    state: &DomainState,
    f: &Filter,
) -> ApiResult<(Vec<Value>, Option<u64>)> {
    page_bounded(journal, state, f, EVENTS_SCAN_MAX)
}

/// [`page`], examining at most `scan_max` envelopes.
fn page_bounded(
    journal: &RocksJournal,
    state: &DomainState,
    f: &Filter,
    scan_max: usize,
) -> ApiResult<(Vec<Value>, Option<u64>)> {
    let last = journal.head().last_seq();
    let mut next = f.from_seq;
    if let Some(since) = f.since_unix_ns {
        next = first_at_or_after(journal, since, next, last)?;
    }
    let mut events = Vec::new();
    let mut scanned = 0;
    while next <= last {
        let chunk = journal.read(next, EVENTS_READ_CHUNK).map_err(internal)?;
        let Some(tail) = chunk.last() else { break };
        next = tail.seq + 1;
        for env in &chunk {
            if env.seq > last || f.until_unix_ns.is_some_and(|u| env.time_unix_ns > u) {
                return Ok((events, None));
            }
            if scanned == scan_max {
                return Ok((events, Some(env.seq)));
            }
            scanned += 1;
            if f.project.as_ref().is_some_and(|p| *p != env.project) {
                continue;
            }
            let event = codec::decode(env).map_err(internal)?;
            let d = describe(state, env, &event);
            if !f.severities.is_empty() && !f.severities.contains(&d.severity) {
                continue;
            }
            if f.component.is_some_and(|c| c != d.kind) {
                continue;
            }
            if events.len() == f.limit {
                return Ok((events, Some(env.seq)));
            }
            events.push(event_json(env, &d));
        }
    }
    Ok((events, None))
}

async fn list(app: App, f: Filter) -> ApiResult<Json<Value>> {
    let (events, next) = tokio::task::spawn_blocking(move || {
        let state = app.bus.state().clone();
        page(app.bus.journal(), &state, &f)
    })
    .await
    .map_err(|e| ApiError::internal(format!("events reader: {e}")))??;
    let mut body = json!({ "events": events });
    if let Some(n) = next {
        body["nextToken"] = Value::String(n.to_string());
    }
    Ok(Json(body))
}

fn check_project(app: &App, who: &Principal, project: &str) -> ApiResult<()> {
    who.require_project(project, super::auth::Access::Read)?;
    app.bus.state().projects.require(project)?;
    Ok(())
}

async fn list_unscoped(State(app): State<App>, who: Principal, q: Query) -> ApiResult<Json<Value>> {
    let project = q.get("projectName").map(str::to_string);
    match &project {
        Some(p) => check_project(&app, &who, p)?,
        None => who.require_cluster_admin()?,
    }
    let f = Filter::parse(&q, project)?;
    list(app, f).await
}

async fn list_scoped(
    State(app): State<App>,
    who: Principal,
    Path(project): Path<String>,
    q: Query,
) -> ApiResult<Json<Value>> {
    check_project(&app, &who, &project)?;
    let f = Filter::parse(&q, Some(project))?;
    list(app, f).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(text: &str) -> Query {
        Query::parse(Some(text))
    }

    #[test]
    fn filters_parse_and_combinations_are_501() {
        let f = Filter::parse(&q("limit=5&nextToken=7&severity=high&severity=2"), None).unwrap();
        assert_eq!(
            (f.limit, f.from_seq, f.severities.clone()),
            (5, 7, vec![4, 2])
        );
        let f = Filter::parse(&q("limit=0&since=2000-01-01T12:00:00.000Z"), None).unwrap();
        assert_eq!(f.limit, LIST_PAGE_MAX);
        assert_eq!(f.since_unix_ns, Some(946_728_000_000_000_000));
        assert_eq!(
            Filter::parse(&q("componentType=NVMeSSD"), None)
                .unwrap()
                .component,
            Some(4)
        );
        for bad in [
            "limit=-1",
            "nextToken=x",
            "severity=Loud",
            "componentType=Disk",
            "until=yesterday",
        ] {
            assert_eq!(
                Filter::parse(&q(bad), None).unwrap_err().status,
                400,
                "{bad}"
            );
        }
        let combo = Filter::parse(&q("severity=Info&componentType=Volume"), None);
        assert_eq!(combo.unwrap_err().status, 501);
        let scoped = Filter::parse(&q("severity=Info"), Some("p".into()));
        assert_eq!(scoped.unwrap_err().status, 501);
    }

    /// A journal of `n` flag toggles; odd seqs enable (Low), even seqs disable (Low), every
    /// fifth is a credential deletion (Medium) instead.
    fn journal_with(n: u64) -> (tempfile::TempDir, RocksJournal) {
        use evstor_journal::{AppendBatch, OpenMode};
        let dir = tempfile::tempdir().unwrap();
        let j = RocksJournal::open(dir.path(), OpenMode::ReadWrite).unwrap();
        let events = (1..=n)
            .map(|seq| {
                let e = if seq % 5 == 0 {
                    Event::Credential(credential::Event::CredentialDeleted {
                        project: "p".into(),
                        id: format!("k{seq}"),
                    })
                } else {
                    Event::Flag(crate::domain::flag::Event::FeatureFlagEnabled {
                        name: "evict-data".into(),
                    })
                };
                let project = e.project(&DomainState::default()).to_string();
                codec::encode(&e, &project, "t", "r", 1_000 * seq)
            })
            .collect();
        let batch = AppendBatch {
            first_seq: 1,
            events,
            projections: vec![],
        };
        j.append(batch).unwrap();
        (dir, j)
    }

    fn walk(j: &RocksJournal, mut f: Filter, scan_max: usize) -> (Vec<u64>, usize) {
        let (mut seen, mut pages) = (Vec::new(), 0);
        loop {
            let (events, next) = page_bounded(j, &DomainState::default(), &f, scan_max).unwrap();
            pages += 1;
            seen.extend(
                events
                    .iter()
                    .map(|e| e["ID"].as_str().unwrap().parse::<u64>().unwrap()),
            );
            match next {
                Some(n) => f.from_seq = n,
                None => return (seen, pages),
            }
        }
    }

    #[test]
    fn paging_visits_each_matching_event_once_even_when_the_scan_bound_cuts_pages() {
        let (_dir, j) = journal_with(23);
        let all = Filter {
            from_seq: 1,
            limit: 4,
            ..Filter::default()
        };
        assert_eq!(walk(&j, all.clone(), 1000), ((1..=23).collect(), 6));
        // A rare match under a tiny scan bound: short (even empty) pages, still exactly once.
        let medium = Filter {
            severities: vec![MEDIUM],
            limit: 2,
            ..all.clone()
        };
        let (seen, pages) = walk(&j, medium, 3);
        assert_eq!(seen, [5, 10, 15, 20]);
        assert!(pages >= 8, "{pages}");
        let project = Filter {
            project: Some("p".into()),
            ..all.clone()
        };
        assert_eq!(walk(&j, project, 7).0, [5, 10, 15, 20]);
        // Time bounds: `since` binary-searches the start, `until` stops the scan.
        let window = Filter {
            since_unix_ns: Some(7_000),
            until_unix_ns: Some(12_000),
            ..all
        };
        assert_eq!(walk(&j, window, 1000).0, (7..=12).collect::<Vec<_>>());
    }

    #[test]
    fn event_code_reads_the_variant_tags() {
        let event = Event::Flag(crate::domain::flag::Event::FeatureFlagDisabled {
            name: "evict-data".into(),
        });
        let env = Envelope {
            seq: 1,
            time_unix_ns: 0,
            actor: "a".into(),
            project: String::new(),
            request_id: String::new(),
            event_type: event.type_name().into(),
            schema_version: 1,
            payload: bincode::serialize(&event).unwrap(),
            prev_hash: [0; 32],
        };
        // Flag is the 8th family (index 7), FeatureFlagDisabled its 2nd variant (index 1).
        assert_eq!(event_code(&env), 801);
        let d = describe(&DomainState::default(), &env, &event);
        assert_eq!((d.kind, d.severity), (CLUSTER, LOW));
        assert!(
            d.description.contains("feature flag evict-data"),
            "{}",
            d.description
        );
    }
}
