//! `/api/v2/servers…`: the servers of the cluster (one, on a single machine). Listing and
//! getting are real; creating, deleting, enabling, disabling and upgrading servers need a
//! multi-server cluster and answer 501 after the usual authorization and existence checks.

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use uuid::Uuid;

use super::auth::Principal;
use super::error::{ApiError, ApiResult};
use super::json::{Body, Obj};
use super::{App, Query};
use crate::domain::inventory::{Server, ServerState};
use crate::domain::volume::VolumeState;
use crate::domain::State as DomainState;

pub fn routes() -> Router<App> {
    Router::new()
        .route("/api/v2/servers", get(list).post(create))
        .route("/api/v2/servers/{UUID}", get(get_one).delete(delete))
        .route("/api/v2/servers/{UUID}/enable", post(enable))
        .route("/api/v2/servers/{UUID}/disable", post(disable))
        .route("/api/v2/servers/{UUID}/upgrade", post(upgrade))
}

fn state_name(s: ServerState) -> &'static str {
    match s {
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

/// Every volume has its only replica on this machine's one server: while any volume exists,
/// taking the server down loses service.
fn risk(state: &DomainState) -> &'static str {
    let holds_volumes = state
        .volumes
        .by_uuid
        .values()
        .any(|v| v.state != VolumeState::Deleted);
    if holds_volumes {
        RISKS[3]
    } else {
        RISKS[1]
    }
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
        .str("RiskOfServiceLossState", risk(state))
        .strs("NodesUUIDs", &nodes)
        .str("state", state_name(s.state))
        .strs("ServerEndpoints", api)
        .str("ETag", &s.etag.to_string())
        .str("LightOSVersion", &app.info.version)
        .strs("ApiEndpoints", api)
        .str("health", "OK")
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
        .filter(|_| wanted_risk.is_none_or(|r| risk(&state) == r))
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

/// The answer to server changes a one-server cluster cannot make.
fn unimplemented(what: &str) -> ApiError {
    ApiError::unimplemented(format!(
        "{what} is not implemented: evstor runs a single-server cluster"
    ))
}

async fn create(State(_): State<App>, who: Principal, _b: Body) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    Err(unimplemented("adding a server"))
}

async fn existing_then_unimplemented(
    app: &App,
    who: &Principal,
    uuid: &str,
    what: &str,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    find(&app.bus.state(), uuid)?;
    Err(unimplemented(what))
}

async fn delete(
    State(app): State<App>,
    who: Principal,
    Path(uuid): Path<String>,
) -> ApiResult<Json<Value>> {
    existing_then_unimplemented(&app, &who, &uuid, "deleting a server").await
}

async fn enable(
    State(app): State<App>,
    who: Principal,
    Path(uuid): Path<String>,
    _b: Body,
) -> ApiResult<Json<Value>> {
    existing_then_unimplemented(&app, &who, &uuid, "enabling a server").await
}

async fn disable(
    State(app): State<App>,
    who: Principal,
    Path(uuid): Path<String>,
    _b: Body,
) -> ApiResult<Json<Value>> {
    existing_then_unimplemented(&app, &who, &uuid, "disabling a server").await
}

async fn upgrade(
    State(app): State<App>,
    who: Principal,
    Path(uuid): Path<String>,
    _b: Body,
) -> ApiResult<Json<Value>> {
    existing_then_unimplemented(&app, &who, &uuid, "upgrading a server").await
}
