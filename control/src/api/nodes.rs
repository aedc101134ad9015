//! `/api/v2/nodes…`: the data-path instances (one per server). Any caller with a role may
//! read them, because clients find the NVMe/TCP endpoint (`nvmeEndpoint`) here. A node's
//! `state`: `Inactive` when its server failed (`ConnectivityProblem`) or is disabled,
//! `Detaching` while it is being replaced, `Attaching` while it takes a replaced node's
//! copies, `Unattached` once replaced (or when its server was created without
//! `extendCluster`), `Active` otherwise.
//!
//! `POST /nodes/{SrcNodeUUID}/replace` (`TargetNodeUUID`, `ReplaceWhileActive`) moves every
//! copy the node holds to the target node, make before break (`domain::replace`: the
//! leader orders the moves, like an eviction's). 404 for an unknown node, 400 for the same
//! node, a node of the same server, a target that cannot take the copies (its server is
//! not enabled and live, or holds a copy of one of the volumes), or a source that is
//! active (its server enabled and live) without `ReplaceWhileActive`; 409 when either
//! node is already part of a running replacement, 412 when `If-Match` is not the source
//! node's ETag. Progress shows on the source node as `replacement` (an evstor addition in
//! the shape of `ServerEvictionStatus`, plus `targetNodeUUID`). Starting, stopping and
//! restarting node instances answer 501 (a node is its `evstor serve` process).

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use uuid::Uuid;

use super::auth::Principal;
use super::error::{ApiError, ApiResult};
use super::json::{parse_uuid, Body, Obj};
use super::{if_match, App, Query};
use crate::domain::eviction::EvictionStatus;
use crate::domain::inventory::{Command as InventoryCommand, Node, ServerState};
use crate::domain::volume::VolumeState;
use crate::domain::{replace, Command, State as DomainState};

/// Most NVMe devices one node manages (reported as `maxNvmeDevices`).
pub const NODE_DEVICES_MAX: u64 = 32;

pub fn routes() -> Router<App> {
    Router::new()
        .route("/api/v2/nodes", get(list))
        .route("/api/v2/nodes/{UUID}", get(get_one))
        .route("/api/v2/nodes/{UUID}/replace", post(replace))
        .route("/api/v2/nodes/{UUID}/start", post(start))
        .route("/api/v2/nodes/{UUID}/stop", post(stop))
        .route("/api/v2/nodes/{UUID}/restart", post(restart))
}

/// Reading nodes needs any role at all: cluster admin, or admin/viewer of some project.
fn require_any_role(who: &Principal) -> ApiResult<()> {
    if who.roles.is_empty() {
        return Err(ApiError::forbidden(
            "permission denied: the token carries no role",
        ));
    }
    Ok(())
}

/// The endpoint hosts should dial. A target bound to the unspecified address (`0.0.0.0`,
/// `::`) is reachable at whatever host the client used for the API, so that host is used.
pub fn dialable_endpoint(endpoint: &str, headers: &HeaderMap) -> String {
    let Ok(addr) = endpoint.parse::<std::net::SocketAddr>() else {
        return endpoint.to_string();
    };
    if !addr.ip().is_unspecified() {
        return endpoint.to_string();
    }
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<axum::http::uri::Authority>().ok())
        .map(|a| a.host().to_string());
    match host {
        Some(h) => format!("{h}:{}", addr.port()),
        None => endpoint.to_string(),
    }
}

/// `NodeStatisticsApi`: the node's pool (one node per server here, so the cluster's pool),
/// with the volumes placed on it as its logical storage.
pub fn node_statistics(app: &App, state: &DomainState, node: Uuid) -> Value {
    let provisioned: u64 = state
        .volumes
        .by_uuid
        .values()
        .filter(|v| v.node_uuid == node && v.state != VolumeState::Deleted)
        .map(|v| v.size_bytes)
        .sum();
    let pool = app.datapath.pool();
    let mut stats = super::cluster::capacity_statistics(&pool, provisioned, false);
    if pool.media_errors > 0 {
        stats["UnrecoverableDataIntegrityErrors"] = pool.media_errors.into();
    }
    stats
}

/// Another server's node: its devices and the volumes it is primary of are in the journal;
/// its pool's usage is only known there (zeros here).
fn remote_node_statistics(state: &DomainState, node: Uuid) -> Value {
    let provisioned: u64 = state
        .volumes
        .by_uuid
        .values()
        .filter(|v| v.node_uuid == node && v.state != VolumeState::Deleted)
        .map(|v| v.size_bytes)
        .sum();
    let capacity: u64 = state
        .inventory
        .devices
        .values()
        .filter(|d| d.node_uuid == node)
        .map(|d| d.size_bytes)
        .sum();
    let pool = evstor_datapath::blockstore::PoolStats {
        capacity_bytes: capacity,
        ..Default::default()
    };
    super::cluster::capacity_statistics(&pool, provisioned, false)
}

/// The failure domain of a node: its server's (`--failure-domain`, or the server itself, as
/// LightOS does by default).
fn failure_domains(state: &DomainState, n: &Node) -> Vec<String> {
    state
        .inventory
        .servers
        .get(&n.server_uuid)
        .map(|s| vec![s.domain().to_string()])
        .unwrap_or_default()
}

/// The `DurosNodeInfo` message.
pub fn node_json(app: &App, state: &DomainState, n: &Node, headers: &HeaderMap) -> Value {
    let devices = state
        .inventory
        .devices
        .values()
        .filter(|d| d.node_uuid == n.uuid)
        .count() as u64;
    let hostname = state
        .inventory
        .servers
        .get(&n.server_uuid)
        .map(|s| s.name.clone())
        .unwrap_or_default();
    // This server's node: the live listener, not the address recorded at bootstrap (flags
    // may have moved it). Another server's: what it registered.
    let local = app.info.node_uuid.is_none_or(|me| me == n.uuid);
    let recorded = if local {
        &app.info.nvme_endpoint
    } else {
        &n.nvme_endpoint
    };
    let endpoint = dialable_endpoint(recorded, headers);
    let (node_state, status) = state_of(state, n);
    let statistics = if local {
        node_statistics(app, state, n.uuid)
    } else {
        remote_node_statistics(state, n.uuid)
    };
    Obj::new()
        .str("name", &n.name)
        .str("UUID", &n.uuid.to_string())
        .str("state", node_state)
        .str("status", status)
        .str("nvmeEndpoint", &endpoint)
        .strs("failureDomains", &failure_domains(state, n))
        .str("hostname", &hostname)
        .num("numManagedDevices", devices)
        .num("maxNvmeDevices", NODE_DEVICES_MAX)
        .val("statistics", statistics)
        .str("serverUUID", &n.server_uuid.to_string())
        .str("ETag", &n.etag.to_string())
        .val("replacement", replacement_json(state, n))
        .build()
}

/// `DurosNodeInfo.State` and `StatusEnum` of a node (see the module doc).
fn state_of(state: &DomainState, n: &Node) -> (&'static str, &'static str) {
    let server = state.inventory.servers.get(&n.server_uuid);
    if server.is_none_or(|s| s.failed) {
        return ("Inactive", "ConnectivityProblem");
    }
    let role = state.inventory.role(n.uuid);
    let node_state = if role.replacing() {
        "Detaching"
    } else if state.inventory.replaced_by(n.uuid).is_some() {
        "Attaching"
    } else if role.unattached {
        "Unattached"
    } else if server.is_some_and(|s| s.state != ServerState::Enabled) {
        "Inactive"
    } else {
        "Active"
    };
    (node_state, "ConnectivityOK")
}

/// The node's last (or running) replacement as the source, in the shape of
/// `ServerEvictionStatus` plus `targetNodeUUID` (absent if it never was replaced).
fn replacement_json(state: &DomainState, n: &Node) -> Value {
    let Some(r) = state.inventory.role(n.uuid).replacement else {
        return Value::Null;
    };
    let plan = replace::plan(state, n.uuid);
    let status = match r.progress.status {
        EvictionStatus::Completed => "Completed",
        _ => "Evicting",
    };
    Obj::new()
        .str("status", status)
        .str("targetNodeUUID", &r.target.to_string())
        .time("startTime", r.progress.start_unix_ns)
        .time("endTime", r.progress.end_unix_ns)
        .str("errorMessage", &plan.stalled.join("; "))
        .num("progress", r.progress.progress(plan.remaining).into())
        .build()
}

fn find<'a>(state: &'a DomainState, uuid: &str) -> ApiResult<&'a Node> {
    Uuid::parse_str(uuid)
        .ok()
        .and_then(|u| state.inventory.nodes.get(&u))
        .ok_or_else(|| ApiError::not_found(format!("node {uuid} not found")))
}

async fn list(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    q: Query,
) -> ApiResult<Json<Value>> {
    require_any_role(&who)?;
    let (name, uuid, domain) = (q.get("name"), q.get("UUID"), q.get("failureDomain"));
    if [name, uuid, domain].iter().filter(|f| f.is_some()).count() > 1 {
        return Err(ApiError::bad_request(
            "give at most one filter: name, UUID or failureDomain",
        ));
    }
    let state = app.bus.state();
    let nodes: Vec<Value> = state
        .inventory
        .nodes
        .values()
        .filter(|n| name.is_none_or(|x| n.name == x))
        .filter(|n| uuid.is_none_or(|x| n.uuid.to_string() == x))
        .filter(|n| domain.is_none_or(|x| failure_domains(&state, n).iter().any(|d| d == x)))
        .map(|n| node_json(&app, &state, n, &headers))
        .collect();
    Ok(Json(json!({ "nodes": nodes })))
}

async fn get_one(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path(uuid): Path<String>,
) -> ApiResult<Json<Value>> {
    require_any_role(&who)?;
    let state = app.bus.state();
    Ok(Json(node_json(
        &app,
        &state,
        find(&state, &uuid)?,
        &headers,
    )))
}

async fn unimplemented(
    app: &App,
    who: &Principal,
    uuid: &str,
    what: &str,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    find(&app.bus.state(), uuid)?;
    Err(ApiError::unimplemented(format!(
        "{what} is not implemented: a node is its server's `evstor serve` process"
    )))
}

/// `ReplaceNode`: answers the source node as it is then (`ReplaceNodeResponse` is empty;
/// the node shows the replacement started).
async fn replace(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path(uuid): Path<String>,
    b: Body,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let src = find(&app.bus.state(), &uuid)?.uuid;
    if let Some(named) = b.str("SrcNodeUUID")?.filter(|s| !s.is_empty()) {
        if parse_uuid(&named)? != src {
            return Err(ApiError::bad_request(format!(
                "SrcNodeUUID {named} is not the node of the path ({src})"
            )));
        }
    }
    let target = parse_uuid(&b.required_str("TargetNodeUUID")?)?;
    let cmd = InventoryCommand::ReplaceNode {
        src,
        target,
        if_match: if_match(&headers)?,
        while_active: b.bool("ReplaceWhileActive")?.unwrap_or(false),
    };
    app.submit(&who, &headers, Command::Inventory(cmd)).await?;
    let state = app.bus.state();
    let node = find(&state, &uuid)?;
    Ok(Json(node_json(&app, &state, node, &headers)))
}

async fn start(
    State(app): State<App>,
    who: Principal,
    Path(uuid): Path<String>,
    _b: Body,
) -> ApiResult<Json<Value>> {
    unimplemented(&app, &who, &uuid, "starting a node instance").await
}

async fn stop(
    State(app): State<App>,
    who: Principal,
    Path(uuid): Path<String>,
    _b: Body,
) -> ApiResult<Json<Value>> {
    unimplemented(&app, &who, &uuid, "stopping a node instance").await
}

async fn restart(
    State(app): State<App>,
    who: Principal,
    Path(uuid): Path<String>,
    _b: Body,
) -> ApiResult<Json<Value>> {
    unimplemented(&app, &who, &uuid, "restarting a node instance").await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_bind_addresses_become_the_host_the_client_used() {
        let mut h = HeaderMap::new();
        assert_eq!(dialable_endpoint("10.0.0.5:4420", &h), "10.0.0.5:4420");
        assert_eq!(dialable_endpoint("0.0.0.0:4420", &h), "0.0.0.0:4420");
        h.insert(
            axum::http::header::HOST,
            "storage.example:8443".parse().unwrap(),
        );
        assert_eq!(
            dialable_endpoint("0.0.0.0:4420", &h),
            "storage.example:4420"
        );
        h.insert(axum::http::header::HOST, "[fd00::1]:8443".parse().unwrap());
        assert_eq!(dialable_endpoint("[::]:4420", &h), "[fd00::1]:4420");
    }
}
