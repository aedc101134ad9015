//! `/api/v2/projects/{projectName}/snapshots…` and the volume rollback route
//! (`PUT …/volumes/{UUID}/rollback`), which lives here because it is the other use of a
//! snapshot. An empty `{UUID}` segment looks a snapshot up by name: `?Name=` (capital N) for
//! GetSnapshot, `?name=` for DeleteSnapshot (SCHEMAS.md 4.1, 4.2).

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::{get, put};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::auth::{Access, Principal};
use super::error::{ApiError, ApiResult};
use super::json::{labels_json, parse_duration_secs, parse_uuid, Body, Obj};
use super::{if_match, App, Query};
use crate::domain::snapshot::{
    Command as SnapshotCommand, NewSnapshot, Snapshot, SnapshotRef, SnapshotState,
};
use crate::domain::volume::{Command as VolumeCommand, VolumeRef};
use crate::domain::{Command, Event};
use crate::limits::LIST_PAGE_MAX;

pub fn routes() -> Router<App> {
    Router::new()
        .route(
            "/api/v2/projects/{projectName}/snapshots",
            get(list).post(create),
        )
        .route(
            "/api/v2/projects/{projectName}/snapshots/",
            get(get_by_name).delete(delete_by_name),
        )
        .route(
            "/api/v2/projects/{projectName}/snapshots/{UUID}",
            get(get_one).delete(delete),
        )
        .route(
            "/api/v2/projects/{projectName}/volumes/{UUID}/rollback",
            put(rollback),
        )
        .route(
            "/api/v2/projects/{projectName}/volumes//rollback",
            put(rollback_by_name),
        )
}

fn state_name(s: SnapshotState) -> &'static str {
    match s {
        SnapshotState::Unknown => "Unknown",
        SnapshotState::Creating => "Creating",
        SnapshotState::Available => "Available",
        SnapshotState::Deleting => "Deleting",
        SnapshotState::Deleted => "Deleted",
        SnapshotState::Failed => "Failed",
    }
}

/// The `Snapshot` message, keys in declaration order.
pub fn snapshot_json(app: &App, s: &Snapshot) -> Value {
    let node = s.node_uuid.to_string();
    let holders: Vec<String> = s.holders.iter().map(|n| n.to_string()).collect();
    let retention = if s.retention_secs == 0 {
        String::new()
    } else {
        format!("{}s", s.retention_secs)
    };
    Obj::new()
        .str("state", state_name(s.state))
        .str("UUID", &s.uuid.to_string())
        .str("name", &s.name)
        .str("description", &s.description)
        .time("creationTime", s.creation_unix_ns)
        .str("retentionTime", &retention)
        .str("sourceVolumeUUID", &s.source_volume.to_string())
        .str("sourceVolumeName", &s.source_volume_name)
        .num("replicaCount", u64::from(s.replica_count))
        .strs("nodeList", &holders)
        .list("acl", &s.acl)
        .bool("compression", s.compression)
        .u64s("size", s.size_bytes)
        .list("IPAcl", &s.ip_acl)
        .num("sectorSize", u64::from(s.sector_size))
        .str("ETag", &s.etag.to_string())
        .str("projectName", &s.project)
        .str("primaryNodeUUID", &node)
        .val("labels", labels_json(&s.labels))
        .val("statistics", snapshot_statistics(app, s))
        .build()
}

/// `SnapshotStatisticsApi`: the blocks its frozen layer holds, and all it reads through.
fn snapshot_statistics(app: &App, s: &Snapshot) -> Value {
    match app.datapath.usage(s.uuid) {
        Some(u) => Obj::new()
            .u64s("physicalCapacity", u.referenced_bytes)
            .u64s("physicalOwnedCapacity", u.owned_bytes)
            .build(),
        None => Obj::new().build(),
    }
}

/// `{UUID}` if given, else the name.
fn target(uuid: &str, name: Option<&str>) -> ApiResult<SnapshotRef> {
    if !uuid.is_empty() {
        return Ok(SnapshotRef::Uuid(parse_uuid(uuid)?));
    }
    match name {
        Some(n) if !n.is_empty() => Ok(SnapshotRef::Name(n.to_string())),
        _ => Err(ApiError::bad_request(
            "either UUID or Name must identify the snapshot",
        )),
    }
}

fn show(app: &App, who: &Principal, project: &str, r: SnapshotRef) -> ApiResult<Json<Value>> {
    who.require_project(project, Access::Read)?;
    let state = app.bus.state();
    state.projects.require(project)?;
    Ok(Json(snapshot_json(
        app,
        state.snapshots.resolve(project, &r)?,
    )))
}

async fn get_one(
    State(app): State<App>,
    who: Principal,
    Path((p, u)): Path<(String, String)>,
    q: Query,
) -> ApiResult<Json<Value>> {
    show(&app, &who, &p, target(&u, q.get("Name"))?)
}

async fn get_by_name(
    State(app): State<App>,
    who: Principal,
    Path(p): Path<String>,
    q: Query,
) -> ApiResult<Json<Value>> {
    show(&app, &who, &p, target("", q.get("Name"))?)
}

async fn list(
    State(app): State<App>,
    who: Principal,
    Path(project): Path<String>,
    q: Query,
) -> ApiResult<Json<Value>> {
    who.require_project(&project, Access::Read)?;
    let limit = match q.u64("limit")? {
        None | Some(0) => LIST_PAGE_MAX,
        Some(n) => (n as usize).min(LIST_PAGE_MAX),
    };
    let lower = match q.get("offsetUUID").map(parse_uuid).transpose()? {
        Some(o) => std::ops::Bound::Excluded(o),
        None => std::ops::Bound::Unbounded,
    };
    let uuid = q.get("UUID").map(parse_uuid).transpose()?;
    let show_all = q.flag("showAll")?;
    let state = app.bus.state();
    state.projects.require(&project)?;
    let snapshots: Vec<Value> = state
        .snapshots
        .by_uuid
        .range((lower, std::ops::Bound::Unbounded))
        .map(|(_, s)| s)
        .filter(|s| s.project == project)
        .filter(|s| uuid.is_none_or(|u| s.uuid == u))
        .filter(|s| q.get("Name").is_none_or(|n| s.name == n))
        .filter(|s| show_all || s.state != SnapshotState::Deleting)
        .take(limit)
        .map(|s| snapshot_json(&app, s))
        .collect();
    Ok(Json(json!({ "snapshots": snapshots })))
}

fn new_snapshot(project: String, b: &Body) -> ApiResult<NewSnapshot> {
    // The UUID wins when both are given (reference: CreateSnapshot).
    let source = match (b.str("sourceVolumeUUID")?, b.str("sourceVolumeName")?) {
        (Some(u), _) if !u.is_empty() => VolumeRef::Uuid(parse_uuid(&u)?),
        (_, Some(n)) if !n.is_empty() => VolumeRef::Name(n),
        _ => {
            return Err(ApiError::bad_request(
                "sourceVolumeUUID or sourceVolumeName is required",
            ))
        }
    };
    let retention_secs = match b.str("retentionTime")? {
        Some(t) if !t.trim().is_empty() => parse_duration_secs(&t)
            .map_err(|why| ApiError::bad_request(format!("field retentionTime: {why}")))?,
        _ => 0,
    };
    Ok(NewSnapshot {
        project,
        name: b.required_str("name")?,
        source,
        description: b.str("description")?.unwrap_or_default(),
        retention_secs,
    })
}

async fn create(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path(project): Path<String>,
    b: Body,
) -> ApiResult<Json<Value>> {
    who.require_project(&project, Access::Write)?;
    let n = new_snapshot(project, &b)?;
    let committed = app
        .submit(
            &who,
            &headers,
            Command::Snapshot(SnapshotCommand::CreateSnapshot(n)),
        )
        .await?;
    let uuid = committed
        .events
        .iter()
        .find_map(|(_, e)| match e {
            Event::Snapshot(s) => Some(s.uuid()),
            _ => None,
        })
        .ok_or_else(|| ApiError::internal("snapshot creation produced no event"))?;
    let state = app.bus.state();
    let s = state
        .snapshots
        .get(uuid)
        .ok_or_else(|| ApiError::internal("created snapshot is not in the projection"))?;
    Ok(Json(snapshot_json(&app, s)))
}

async fn remove(
    app: App,
    who: Principal,
    headers: HeaderMap,
    project: String,
    r: SnapshotRef,
) -> ApiResult<Json<Value>> {
    who.require_project(&project, Access::Write)?;
    let cmd = SnapshotCommand::DeleteSnapshot {
        project,
        target: r,
        if_match: if_match(&headers)?,
    };
    app.submit(&who, &headers, Command::Snapshot(cmd)).await?;
    Ok(Json(json!({})))
}

async fn delete(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path((p, u)): Path<(String, String)>,
    q: Query,
) -> ApiResult<Json<Value>> {
    let r = target(&u, q.get("name"))?;
    remove(app, who, headers, p, r).await
}

async fn delete_by_name(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path(p): Path<String>,
    q: Query,
) -> ApiResult<Json<Value>> {
    let r = target("", q.get("name"))?;
    remove(app, who, headers, p, r).await
}

/// `RollbackVolumeRequest`: the volume by `{UUID}` or body `Name`, the snapshot by
/// `srcSnapshotUUID` or `srcSnapshotName`.
async fn roll_back(
    app: App,
    who: Principal,
    headers: HeaderMap,
    project: String,
    uuid: &str,
    b: Body,
) -> ApiResult<Json<Value>> {
    who.require_project(&project, Access::Write)?;
    let uuid = if uuid.is_empty() {
        b.str("UUID")?.unwrap_or_default()
    } else {
        uuid.to_string()
    };
    let volume = if !uuid.is_empty() {
        VolumeRef::Uuid(parse_uuid(&uuid)?)
    } else {
        match b.str("Name")? {
            Some(n) if !n.is_empty() => VolumeRef::Name(n),
            _ => {
                return Err(ApiError::bad_request(
                    "either UUID or Name must identify the volume",
                ))
            }
        }
    };
    let snapshot = match (b.str("srcSnapshotUUID")?, b.str("srcSnapshotName")?) {
        (Some(u), _) if !u.is_empty() => SnapshotRef::Uuid(parse_uuid(&u)?),
        (_, Some(n)) if !n.is_empty() => SnapshotRef::Name(n),
        _ => {
            return Err(ApiError::bad_request(
                "srcSnapshotUUID or srcSnapshotName is required",
            ))
        }
    };
    let cmd = VolumeCommand::RollbackVolume {
        project,
        target: volume,
        snapshot,
    };
    app.submit(&who, &headers, Command::Volume(cmd)).await?;
    Ok(Json(json!({})))
}

async fn rollback(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path((p, u)): Path<(String, String)>,
    b: Body,
) -> ApiResult<Json<Value>> {
    roll_back(app, who, headers, p, &u, b).await
}

async fn rollback_by_name(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path(p): Path<String>,
    b: Body,
) -> ApiResult<Json<Value>> {
    roll_back(app, who, headers, p, "", b).await
}
