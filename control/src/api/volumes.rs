//! `/api/v2/projects/{projectName}/volumes…` and the unscoped `/api/v2/volumes…` twins.
//! An empty `{UUID}` segment (`…/volumes/?name=x`) looks a volume up by name (SCHEMAS.md 4.1).

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::Value;

use evstor_datapath::blockstore::ratio;
use evstor_datapath::limits::BLOCK_BYTES;

use super::auth::{Access, Principal};
use super::error::{ApiError, ApiResult};
use super::json::{labels_json, parse_uuid, Body, Obj};
use super::{if_match, App, Query};
use crate::domain::policy::PolicyRef;
use crate::domain::snapshot::SnapshotRef;
use crate::domain::volume::{
    failover_target, Command as VolumeCommand, NewVolume, ProtectionState, Volume, VolumeChange,
    VolumeRef, VolumeState,
};
use crate::domain::{Command, State as DomainState};
use crate::limits::LIST_PAGE_MAX;

pub fn routes() -> Router<App> {
    Router::new()
        .route(
            "/api/v2/projects/{projectName}/volumes",
            get(list_scoped).post(create_scoped),
        )
        .route(
            "/api/v2/projects/{projectName}/volumes/",
            get(get_scoped_by_name)
                .delete(delete_scoped_by_name)
                .put(update_scoped_by_name),
        )
        .route(
            "/api/v2/projects/{projectName}/volumes/{UUID}",
            get(get_scoped).delete(delete_scoped).put(update_scoped),
        )
        .route("/api/v2/volumes", get(list_unscoped).post(create_unscoped))
        .route(
            "/api/v2/volumes/",
            get(get_unscoped_by_name)
                .delete(delete_unscoped_by_name)
                .put(update_unscoped_by_name),
        )
        .route(
            "/api/v2/volumes/{UUID}",
            get(get_unscoped)
                .delete(delete_unscoped)
                .put(update_unscoped),
        )
}

fn state_name(s: VolumeState) -> &'static str {
    match s {
        VolumeState::Unknown => "Unknown",
        VolumeState::Creating => "Creating",
        VolumeState::Available => "Available",
        VolumeState::Deleting => "Deleting",
        VolumeState::Deleted => "Deleted",
        VolumeState::Failed => "Failed",
        VolumeState::Updating => "Updating",
        VolumeState::Rollback => "Rollback",
        VolumeState::Migrating => "Migrating",
    }
}

/// Protection as hosts find it now, with the servers' live health: a volume whose
/// primary's server failed is `NotAvailable` unless an in-sync replica can take over
/// (`Degraded` until the leader promoted it); one with fewer in-sync copies on live servers
/// than its `replicaCount` is `Degraded` even before its primary recorded the lost copy out
/// of sync.
pub fn live_protection(state: &DomainState, v: &Volume) -> ProtectionState {
    let failed = |n| state.inventory.server_of(n).is_some_and(|s| s.failed);
    if failed(v.node_uuid) {
        return match failover_target(state, v) {
            Some(_) => ProtectionState::Degraded,
            None => ProtectionState::NotAvailable,
        };
    }
    let live_copies = 1 + v.in_sync_replicas().filter(|n| !failed(*n)).count() as u32;
    if v.protection == ProtectionState::FullyProtected && live_copies < v.replica_count {
        return ProtectionState::Degraded;
    }
    v.protection
}

/// `rebuildProgress`: empty while every copy is in sync, else the percent of what the
/// replica being rebuilt missed that its primary reported copied.
fn rebuild_progress(v: &Volume) -> String {
    if v.out_of_sync.is_empty() {
        String::new()
    } else {
        v.rebuild_percent.to_string()
    }
}

/// The `Volume` message.
pub fn volume_json(app: &App, state: &DomainState, v: &Volume) -> Value {
    let protection = format!("{:?}", live_protection(state, v));
    let nodes: Vec<String> = v.nodes().map(|n| n.to_string()).collect();
    let qos_name = v
        .qos_policy
        .and_then(|u| state.policies.get(u))
        .map(|p| p.name.clone())
        .unwrap_or_default();
    let node = v.node_uuid.to_string();
    Obj::new()
        .str("state", state_name(v.state))
        .str("protectionState", &protection)
        .num("replicaCount", u64::from(v.replica_count))
        .strs("nodeList", &nodes)
        .str("UUID", &v.uuid.to_string())
        .num("nsid", u64::from(v.nsid))
        .list("acl", &v.acl)
        .str("compression", if v.compression { "true" } else { "false" })
        .u64s("size", v.size_bytes)
        .str("name", &v.name)
        .str("rebuildProgress", &rebuild_progress(v))
        .val("statistics", volume_statistics(app, v))
        .list("IPAcl", &v.ip_acl)
        .str("ETag", &v.etag.to_string())
        .strs("connectedHosts", &app.datapath.hosts_of(v.nsid))
        .num("sectorSize", u64::from(v.sector_size))
        .str("projectName", &v.project)
        .str(
            "sourceSnapshotUUID",
            &v.source_snapshot.map(|u| u.to_string()).unwrap_or_default(),
        )
        .str("sourceSnapshotName", &v.source_snapshot_name)
        .str(
            "qosPolicyUUID",
            &v.qos_policy.map(|u| u.to_string()).unwrap_or_default(),
        )
        .str("qosPolicyName", &qos_name)
        .str("primaryNodeUUID", &node)
        .time("creationTime", v.creation_unix_ns)
        .val("labels", labels_json(&v.labels))
        .build()
}

/// `VolumeStatisticsApi` from the block store: what the host wrote (logical), what its own
/// layer stores (owned), and what it reads through including its snapshots' blocks.
fn volume_statistics(app: &App, v: &Volume) -> Value {
    let Some(u) = app.datapath.usage(v.uuid) else {
        return serde_json::json!({ "compressionRatio": 1.0, "totalCompressionRatio": 1.0 });
    };
    Obj::new()
        .u64s("logicalUsedStorage", u.visible_blocks * BLOCK_BYTES)
        .u64s("physicalUsedStorage", u.owned_bytes)
        .float(
            "compressionRatio",
            ratio(u.owned_logical_bytes, u.owned_bytes),
        )
        .float(
            "totalCompressionRatio",
            ratio(u.referenced_logical_bytes, u.referenced_bytes),
        )
        .u64s("physicalCapacity", u.referenced_bytes)
        .u64s("physicalOwnedCapacity", u.owned_bytes)
        .num(
            "unrecoverableDataIntegrityErrors",
            u64::from(app.datapath.integrity_errors(v.uuid)),
        )
        .build()
}

/// `{UUID}` if given, else the `name` query/body field.
fn target(uuid: &str, name: Option<String>) -> ApiResult<VolumeRef> {
    if !uuid.is_empty() {
        return Ok(VolumeRef::Uuid(parse_uuid(uuid)?));
    }
    match name {
        Some(n) if !n.is_empty() => Ok(VolumeRef::Name(n)),
        _ => Err(ApiError::bad_request(
            "either UUID or name must identify the volume",
        )),
    }
}

/// Finds the project a request is about: the path's, else the given one, else (for a UUID)
/// the volume's own. Checks that the caller may access it.
fn project_of(
    app: &App,
    who: &Principal,
    given: Option<String>,
    r: Option<&VolumeRef>,
    access: Access,
) -> ApiResult<String> {
    let project = match (given, r) {
        (Some(p), _) => p,
        (None, Some(VolumeRef::Uuid(u))) => app
            .bus
            .state()
            .volumes
            .get(*u)
            .map(|v| v.project.clone())
            .ok_or_else(|| ApiError::not_found(format!("volume {u} not found")))?,
        (None, _) => "default".to_string(),
    };
    who.require_project(&project, access)?;
    Ok(project)
}

fn get_one(
    app: &App,
    who: &Principal,
    project: Option<String>,
    r: VolumeRef,
) -> ApiResult<Json<Value>> {
    let project = project_of(app, who, project, Some(&r), Access::Read)?;
    let state = app.bus.state();
    let v = state.volumes.resolve(&project, &r)?;
    Ok(Json(volume_json(app, &state, v)))
}

fn list(app: &App, who: &Principal, project: Option<String>, q: &Query) -> ApiResult<Json<Value>> {
    if let Some(p) = &project {
        who.require_project(p, Access::Read)?;
        app.bus.state().projects.require(p)?;
    } else if !who.is_cluster_admin() {
        return Err(ApiError::bad_request(
            "projectName is mandatory unless you are the cluster admin",
        ));
    }
    let limit = match q.u64("limit")? {
        None | Some(0) => LIST_PAGE_MAX,
        Some(n) => (n as usize).min(LIST_PAGE_MAX),
    };
    let offset = q.get("offsetUUID").map(parse_uuid).transpose()?;
    let uuid = q.get("UUID").map(parse_uuid).transpose()?;
    let snapshot = q.get("snapshotUUID").map(parse_uuid).transpose()?;
    let show_all = q.flag("showAll")?;
    let state = app.bus.state();
    let lower = match offset {
        Some(o) => std::ops::Bound::Excluded(o),
        None => std::ops::Bound::Unbounded,
    };
    let volumes: Vec<Value> = state
        .volumes
        .by_uuid
        .range((lower, std::ops::Bound::Unbounded))
        .map(|(_, v)| v)
        .filter(|v| project.as_deref().is_none_or(|p| v.project == p))
        .filter(|v| uuid.is_none_or(|u| v.uuid == u))
        .filter(|v| q.get("name").is_none_or(|n| v.name == n))
        .filter(|v| snapshot.is_none_or(|s| v.source_snapshot == Some(s)))
        .filter(|v| show_all || v.state != VolumeState::Deleting)
        .take(limit)
        .map(|v| volume_json(app, &state, v))
        .collect();
    Ok(Json(serde_json::json!({ "volumes": volumes })))
}

fn new_volume(project: String, b: &Body) -> ApiResult<NewVolume> {
    let compression = match b.str("compression")? {
        None => false,
        Some(text) => parse_compression(&text)?,
    };
    let source_snapshot = match (b.str("sourceSnapshotUUID")?, b.str("sourceSnapshotName")?) {
        (Some(u), _) if !u.is_empty() => Some(SnapshotRef::Uuid(parse_uuid(&u)?)),
        (_, Some(n)) if !n.is_empty() => Some(SnapshotRef::Name(n)),
        _ => None,
    };
    let size_bytes = match b.size("size")? {
        Some(s) => s,
        None if source_snapshot.is_some() => 0,
        None => return Err(ApiError::bad_request("field size is required")),
    };
    Ok(NewVolume {
        project,
        name: b.required_str("name")?,
        size_bytes,
        acl: b
            .string_list("acl")?
            .ok_or_else(|| ApiError::bad_request("field acl is required"))?,
        ip_acl: b.string_list("IPAcl")?,
        compression,
        replica_count: b.u32("replicaCount")?.unwrap_or(1),
        sector_size: sector_size(b)?,
        source_snapshot,
        qos: policy_ref(b)?,
        labels: b.labels("labels")?.unwrap_or_default(),
    })
}

/// `sectorSize` is an enum on input: its name or its number.
fn sector_size(b: &Body) -> ApiResult<u32> {
    match b.get("sectorSize") {
        None => Ok(0),
        Some(Value::String(s)) => match s.as_str() {
            "sectorSize_Default" => Ok(0),
            "sectorSize_512B" => Ok(512),
            "sectorSize_4K" => Ok(4096),
            other => other
                .parse()
                .map_err(|_| ApiError::bad_request(format!("unknown sectorSize {other:?}"))),
        },
        Some(_) => Ok(b.u32("sectorSize")?.unwrap_or(0)),
    }
}

pub fn parse_compression(text: &str) -> ApiResult<bool> {
    match text.to_ascii_lowercase().as_str() {
        "true" | "enable" | "enabled" => Ok(true),
        "false" | "disable" | "disabled" | "" => Ok(false),
        other => Err(ApiError::bad_request(format!(
            "compression {other:?} is not one of true/enable/enabled/false/disable/disabled"
        ))),
    }
}

fn policy_ref(b: &Body) -> ApiResult<Option<PolicyRef>> {
    match (b.str("qosPolicyUUID")?, b.str("qosPolicyName")?) {
        (Some(u), Some(n)) if !u.is_empty() && !n.is_empty() => Err(ApiError::bad_request(
            "give qosPolicyUUID or qosPolicyName, not both",
        )),
        (Some(u), _) if !u.is_empty() => Ok(Some(PolicyRef::Uuid(parse_uuid(&u)?))),
        (_, Some(n)) if !n.is_empty() => Ok(Some(PolicyRef::Name(n))),
        _ => Ok(None),
    }
}

async fn create(
    app: App,
    who: Principal,
    headers: HeaderMap,
    project: Option<String>,
    b: Body,
) -> ApiResult<Json<Value>> {
    let project = project_of(&app, &who, project, None, Access::Write)?;
    let n = new_volume(project, &b)?;
    let committed = app
        .submit(
            &who,
            &headers,
            Command::Volume(VolumeCommand::CreateVolume(n)),
        )
        .await?;
    let uuid = committed
        .events
        .iter()
        .find_map(|(_, e)| match e {
            crate::domain::Event::Volume(v) => Some(v.uuid()),
            _ => None,
        })
        .ok_or_else(|| ApiError::internal("volume creation produced no event"))?;
    let state = app.bus.state();
    let v = state
        .volumes
        .get(uuid)
        .ok_or_else(|| ApiError::internal("created volume is not in the projection"))?;
    Ok(Json(volume_json(&app, &state, v)))
}

fn change(b: &Body) -> ApiResult<VolumeChange> {
    Ok(VolumeChange {
        acl: b.string_list("acl")?,
        ip_acl: b.string_list("IPAcl")?,
        size_bytes: b.size("size")?,
        force: b.bool("Force")?.unwrap_or(false),
        compression: b
            .str("compression")?
            .map(|c| parse_compression(&c))
            .transpose()?,
        qos: policy_ref(b)?,
        labels: b.labels("labels")?,
        new_name: b.str("newName")?.filter(|n| !n.is_empty()),
    })
}

async fn update(
    app: App,
    who: Principal,
    headers: HeaderMap,
    project: Option<String>,
    uuid: String,
    b: Body,
) -> ApiResult<Json<Value>> {
    let r = target(&uuid, b.str("name")?)?;
    let project = project_of(&app, &who, project, Some(&r), Access::Write)?;
    let cmd = VolumeCommand::UpdateVolume {
        project,
        target: r,
        if_match: if_match(&headers)?,
        change: change(&b)?,
    };
    app.submit(&who, &headers, Command::Volume(cmd)).await?;
    Ok(Json(serde_json::json!({})))
}

async fn delete(
    app: App,
    who: Principal,
    headers: HeaderMap,
    project: Option<String>,
    uuid: String,
    q: Query,
) -> ApiResult<Json<Value>> {
    let r = target(&uuid, q.get("name").map(str::to_string))?;
    let project = project_of(&app, &who, project, Some(&r), Access::Write)?;
    let cmd = VolumeCommand::DeleteVolume {
        project,
        target: r,
        if_match: if_match(&headers)?,
    };
    app.submit(&who, &headers, Command::Volume(cmd)).await?;
    Ok(Json(serde_json::json!({})))
}

// Route adapters: path shapes differ, the work above does not.

async fn list_scoped(
    State(app): State<App>,
    who: Principal,
    Path(p): Path<String>,
    q: Query,
) -> ApiResult<Json<Value>> {
    list(&app, &who, Some(p), &q)
}

async fn list_unscoped(State(app): State<App>, who: Principal, q: Query) -> ApiResult<Json<Value>> {
    list(&app, &who, q.get("projectName").map(str::to_string), &q)
}

async fn create_scoped(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path(p): Path<String>,
    b: Body,
) -> ApiResult<Json<Value>> {
    create(app, who, headers, Some(p), b).await
}

async fn create_unscoped(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    b: Body,
) -> ApiResult<Json<Value>> {
    let project = b.str("projectName")?.filter(|p| !p.is_empty());
    create(app, who, headers, project, b).await
}

async fn get_scoped(
    State(app): State<App>,
    who: Principal,
    Path((p, u)): Path<(String, String)>,
    q: Query,
) -> ApiResult<Json<Value>> {
    get_one(
        &app,
        &who,
        Some(p),
        target(&u, q.get("name").map(str::to_string))?,
    )
}

async fn get_scoped_by_name(
    State(app): State<App>,
    who: Principal,
    Path(p): Path<String>,
    q: Query,
) -> ApiResult<Json<Value>> {
    get_one(
        &app,
        &who,
        Some(p),
        target("", q.get("name").map(str::to_string))?,
    )
}

async fn get_unscoped(
    State(app): State<App>,
    who: Principal,
    Path(u): Path<String>,
    q: Query,
) -> ApiResult<Json<Value>> {
    let r = target(&u, q.get("name").map(str::to_string))?;
    get_one(&app, &who, q.get("projectName").map(str::to_string), r)
}

async fn get_unscoped_by_name(
    State(app): State<App>,
    who: Principal,
    q: Query,
) -> ApiResult<Json<Value>> {
    let r = target("", q.get("name").map(str::to_string))?;
    get_one(&app, &who, q.get("projectName").map(str::to_string), r)
}

async fn delete_scoped(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path((p, u)): Path<(String, String)>,
    q: Query,
) -> ApiResult<Json<Value>> {
    delete(app, who, headers, Some(p), u, q).await
}

async fn delete_scoped_by_name(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path(p): Path<String>,
    q: Query,
) -> ApiResult<Json<Value>> {
    delete(app, who, headers, Some(p), String::new(), q).await
}

async fn delete_unscoped(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path(u): Path<String>,
    q: Query,
) -> ApiResult<Json<Value>> {
    let project = q.get("projectName").map(str::to_string);
    delete(app, who, headers, project, u, q).await
}

async fn delete_unscoped_by_name(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    q: Query,
) -> ApiResult<Json<Value>> {
    let project = q.get("projectName").map(str::to_string);
    delete(app, who, headers, project, String::new(), q).await
}

async fn update_scoped(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path((p, u)): Path<(String, String)>,
    b: Body,
) -> ApiResult<Json<Value>> {
    update(app, who, headers, Some(p), u, b).await
}

async fn update_scoped_by_name(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path(p): Path<String>,
    b: Body,
) -> ApiResult<Json<Value>> {
    update(app, who, headers, Some(p), String::new(), b).await
}

async fn update_unscoped(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path(u): Path<String>,
    b: Body,
) -> ApiResult<Json<Value>> {
    // On a body route the query is ignored: only the body's projectName counts (SCHEMAS.md 4.6).
    let project = b.str("projectName")?.filter(|p| !p.is_empty());
    update(app, who, headers, project, u, b).await
}

async fn update_unscoped_by_name(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    b: Body,
) -> ApiResult<Json<Value>> {
    let project = b.str("projectName")?.filter(|p| !p.is_empty());
    update(app, who, headers, project, String::new(), b).await
}
