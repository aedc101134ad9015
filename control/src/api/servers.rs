//! `/api/v2/servers…`: the servers of the cluster. Listing and getting show live health (a
//! server whose liveness lease expired is `Failed`, recorded by the leader), the risk of
//! service loss taking the server down carries (`RiskOfServiceLossState`, the rules are in
//! `domain::eviction`) and its last data eviction (`LastEviction`, with live progress: the
//! percent of the copies it held at the start that have left, and why copies cannot move
//! now, if so).
//!
//! Disabling marks a server so no new volume is placed on it and hands its primaries over
//! to in-sync replicas; it answers 400 when the server is the `SourceOfRiskOfServiceLoss`
//! (the only in-sync copy of a volume, named in the error) unless `ForceDisable` or
//! `evictData` is set. `evictData` also moves every copy it holds to other servers (make
//! before break, by the leader) until it holds none (`LastEviction.status` `Completed`);
//! a one-server cluster holding data cannot evict (400). Enabling undoes the placement rule
//! and aborts a running eviction. Deleting removes a server that is down, holds no only
//! in-sync copy (400 otherwise) and is no volume's primary (409) (`forceDelete`: also
//! otherwise, and its volumes fail). Upgrading answers 501 after the usual authorization
//! checks (replace the binary and restart).
//!
//! Creating (`POST /servers`: `serverEndpoints`, `serverUUID`, `reuseIP`, `extendCluster`)
//! pre-registers a server of a cluster (`evstor serve --etcd`; a server without etcd has
//! nobody to add: 400) by the address its process will publish, its `--api-addr` or
//! `--nvme-addr` (`host:port` or a URL; LightOS's etcd peer URL has no meaning here since
//! etcd is external). It is listed `Creating` with that endpoint until a process starting
//! for the first time with that address joins: it takes the created UUID and shows
//! `Enabled` once its join is applied (after it caught up). Without `extendCluster` its node
//! joins `Unattached`: no volume is placed there until it takes over a node by replace.
//! 400 for no, several or malformed endpoints or a malformed UUID, 409 for a UUID or an
//! endpoint in use (`reuseIP` allows an endpoint a registered server uses). The rules are
//! in `domain::creation`; a process started without `CreateServer` joins as before.

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use uuid::Uuid;

use axum::http::HeaderMap;

use super::auth::Principal;
use super::error::{ApiError, ApiResult};
use super::json::{parse_uuid, Body, Obj};
use super::{if_match, App, Query};
use crate::domain::creation::Create;
use crate::domain::eviction::{self, EvictionStatus, Risk};
use crate::domain::inventory::{
    Command as InventoryCommand, Event as InventoryEvent, Server, ServerState,
};
use crate::domain::{Command, DomainError, Event as DomainEvent, State as DomainState};

pub fn routes() -> Router<App> {
    Router::new()
        .route("/api/v2/servers", get(list).post(create))
        .route("/api/v2/servers/{UUID}", get(get_one).delete(delete))
        .route("/api/v2/servers/{UUID}/enable", post(enable))
        .route("/api/v2/servers/{UUID}/disable", post(disable))
        .route("/api/v2/servers/{UUID}/upgrade", post(upgrade))
}

fn state_name(server: &Server) -> &'static str {
    if server.failed {
        return "Failed";
    }
    match server.state {
        ServerState::Unknown => "UnknownState",
        ServerState::Creating => "Creating",
        ServerState::Enabled => "Enabled",
        ServerState::Disabled => "Disabled",
    }
}

/// `Server.RiskOfServiceLossEnum`, by number.
const RISKS: [&str; 4] = [
    "UnknownRiskOfServiceLoss",
    "NoRiskOfServiceLoss",
    "InRiskOfServiceLoss",
    "SourceOfRiskOfServiceLoss",
];

/// The risk of taking the server down, by `domain::eviction::risk`.
fn risk(state: &DomainState, server: &Server) -> &'static str {
    match eviction::risk(state, server.uuid).0 {
        Risk::No => RISKS[1],
        Risk::In => RISKS[2],
        Risk::Source => RISKS[3],
    }
}

/// `ServerEvictionStatus` of the server's last eviction (absent if it never had one).
fn eviction_json(state: &DomainState, server: &Server) -> Value {
    let Some(e) = &server.eviction else {
        return Value::Null;
    };
    let status = match e.status {
        EvictionStatus::None => "None",
        EvictionStatus::Failed => "Failed",
        EvictionStatus::Evicting => "Evicting",
        EvictionStatus::Aborting => "Aborting",
        EvictionStatus::Completed => "Completed",
        EvictionStatus::Aborted => "Aborted",
    };
    let plan = eviction::plan(state, server.uuid);
    let why = if e.running() {
        plan.stalled.join("; ")
    } else {
        String::new()
    };
    Obj::new()
        .str("status", status)
        .time("startTime", e.start_unix_ns)
        .time("endTime", e.end_unix_ns)
        .str("errorMessage", &why)
        .num("progress", e.progress(plan.remaining).into())
        .build()
}

/// The `Server` message.
pub fn server_json(app: &App, state: &DomainState, s: &Server) -> Value {
    let nodes: Vec<String> = state
        .inventory
        .nodes
        .values()
        .filter(|n| n.server_uuid == s.uuid)
        .map(|n| n.uuid.to_string())
        .collect();
    let api = std::slice::from_ref(&s.api_endpoint);
    Obj::new()
        .str("UUID", &s.uuid.to_string())
        .str("name", &s.name)
        .str("RiskOfServiceLossState", risk(state, s))
        .strs("NodesUUIDs", &nodes)
        .str("state", state_name(s))
        .strs("ServerEndpoints", api)
        .str("ETag", &s.etag.to_string())
        .str("LightOSVersion", &app.info.version)
        .strs("ApiEndpoints", api)
        .val("LastEviction", eviction_json(state, s))
        .str("health", if s.failed { "Error" } else { "OK" })
        .build()
}

/// Finds a server by its path UUID; a malformed UUID cannot name a server either (404).
fn find<'a>(state: &'a DomainState, uuid: &str) -> ApiResult<&'a Server> {
    Uuid::parse_str(uuid)
        .ok()
        .and_then(|u| state.inventory.servers.get(&u))
        .ok_or_else(|| ApiError::not_found(format!("server {uuid} not found")))
}

fn risk_filter(q: &Query) -> ApiResult<Option<&'static str>> {
    let Some(text) = q.get("RiskOfServiceLoss") else {
        return Ok(None);
    };
    let by_number = text.parse::<usize>().ok().and_then(|n| RISKS.get(n));
    let by_name = RISKS.iter().find(|r| **r == text);
    match by_name.or(by_number) {
        Some(r) if *r == RISKS[0] => Ok(None),
        Some(r) => Ok(Some(r)),
        None => Err(ApiError::bad_request(format!(
            "unknown RiskOfServiceLoss {text:?}"
        ))),
    }
}

async fn list(State(app): State<App>, who: Principal, q: Query) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let wanted_risk = risk_filter(&q)?;
    let state = app.bus.state();
    let servers: Vec<Value> = state
        .inventory
        .servers
        .values()
        .filter(|s| q.get("UUID").is_none_or(|u| s.uuid.to_string() == u))
        .filter(|s| q.get("Name").is_none_or(|n| s.name == n))
        .filter(|s| wanted_risk.is_none_or(|r| risk(&state, s) == r))
        .map(|s| server_json(&app, &state, s))
        .collect();
    Ok(Json(json!({ "servers": servers })))
}

async fn get_one(
    State(app): State<App>,
    who: Principal,
    Path(uuid): Path<String>,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let state = app.bus.state();
    Ok(Json(server_json(&app, &state, find(&state, &uuid)?)))
}

/// The answer to server changes evstor does not make yet.
fn unimplemented(what: &str, why: &str) -> ApiError {
    ApiError::unimplemented(format!("{what} is not implemented: {why}"))
}

async fn create(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    b: Body,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    // Only cluster members know their node (`ServerInfo::node_uuid`).
    if app.info.node_uuid.is_none() {
        return Err(ApiError::from(DomainError::FailedPrecondition(
            "this server runs without etcd: servers join a cluster of `evstor serve --etcd` \
             processes"
                .into(),
        )));
    }
    let uuid = match b.str("serverUUID")?.filter(|u| !u.is_empty()) {
        Some(text) => Some(parse_uuid(&text)?),
        None => None,
    };
    let c = Create {
        uuid,
        endpoints: b.strings("serverEndpoints")?,
        reuse_ip: b.bool("reuseIP")?.unwrap_or(false),
        extend_cluster: b.bool("extendCluster")?.unwrap_or(false),
    };
    let committed = app
        .submit(
            &who,
            &headers,
            Command::Inventory(InventoryCommand::CreateServer(c)),
        )
        .await?;
    let created = committed.events.iter().find_map(|(_, e)| match e {
        DomainEvent::Inventory(InventoryEvent::ServerCreated { uuid, .. }) => Some(*uuid),
        _ => None,
    });
    let state = app.bus.state();
    match created.and_then(|u| state.inventory.servers.get(&u)) {
        Some(s) => Ok(Json(server_json(&app, &state, s))),
        None => Ok(Json(json!({}))),
    }
}

/// Submits a change to a server and answers the server as it is then.
async fn change(
    app: &App,
    who: &Principal,
    headers: &HeaderMap,
    command: InventoryCommand,
    uuid: uuid::Uuid,
) -> ApiResult<Json<Value>> {
    app.submit(who, headers, Command::Inventory(command))
        .await?;
    let state = app.bus.state();
    match state.inventory.servers.get(&uuid) {
        Some(s) => Ok(Json(server_json(app, &state, s))),
        None => Ok(Json(json!({}))),
    }
}

fn flag(body: &serde_json::Map<String, Value>, key: &str) -> ApiResult<bool> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(ApiError::bad_request(format!(
            "{key} must be a boolean, not {other}"
        ))),
    }
}

async fn delete(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    q: Query,
    Path(uuid): Path<String>,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let server = find(&app.bus.state(), &uuid)?.uuid;
    let cmd = InventoryCommand::DeleteServer {
        uuid: server,
        if_match: if_match(&headers)?,
        force: q.flag("forceDelete")?,
    };
    change(&app, &who, &headers, cmd, server).await
}

async fn enable(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path(uuid): Path<String>,
    _b: Body,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let server = find(&app.bus.state(), &uuid)?.uuid;
    let cmd = InventoryCommand::EnableServer {
        uuid: server,
        if_match: if_match(&headers)?,
    };
    change(&app, &who, &headers, cmd, server).await
}

async fn disable(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path(uuid): Path<String>,
    b: Body,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let server = find(&app.bus.state(), &uuid)?.uuid;
    let body = b.0;
    let cmd = InventoryCommand::DisableServer {
        uuid: server,
        if_match: if_match(&headers)?,
        force: flag(&body, "ForceDisable")?,
        evict: flag(&body, "evictData")?,
    };
    change(&app, &who, &headers, cmd, server).await
}

async fn upgrade(
    State(app): State<App>,
    who: Principal,
    Path(uuid): Path<String>,
    _b: Body,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    find(&app.bus.state(), &uuid)?;
    Err(unimplemented(
        "upgrading a server",
        "replace the evstor binary and restart the server",
    ))
}
