//! `/api/v2/featureFlags…`: list, get, enable and disable the documented feature flags.
//! Everything here needs the cluster-admin role.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::auth::Principal;
use super::error::{ApiError, ApiResult};
use super::json::{Body, Obj};
use super::App;
use crate::domain::flag::{Command as FlagCommand, FLAGS};
use crate::domain::{Command, State as DomainState};

pub fn routes() -> Router<App> {
    Router::new()
        .route("/api/v2/featureFlags", get(list))
        .route("/api/v2/featureFlags/{name}", get(get_one))
        .route("/api/v2/featureFlags/{name}/enable", post(enable))
        .route("/api/v2/featureFlags/{name}/disable", post(disable))
}

/// The `FeatureFlagStatus` message (`enabled: false` is omitted as a zero value).
fn flag_json(state: &DomainState, name: &str) -> ApiResult<Value> {
    let enabled = state
        .flags
        .enabled(name)
        .ok_or_else(|| ApiError::bad_request(format!("unknown feature flag {name:?}")))?;
    Ok(Obj::new()
        .str("name", name)
        .bool("enabled", enabled)
        .build())
}

async fn list(State(app): State<App>, who: Principal) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let state = app.bus.state();
    let mut flags = Map::new();
    for (name, _) in FLAGS {
        flags.insert(name.to_string(), flag_json(&state, name)?);
    }
    Ok(Json(json!({ "featureFlags": flags })))
}

async fn get_one(
    State(app): State<App>,
    who: Principal,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let state = app.bus.state();
    Ok(Json(flag_json(&state, &name)?))
}

async fn set(
    app: App,
    who: Principal,
    headers: HeaderMap,
    cmd: FlagCommand,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    app.submit(&who, &headers, Command::Flag(cmd)).await?;
    Ok(Json(json!({})))
}

// The body may repeat `name`; the path wins (body: "*" routes), so the body is only parsed.
async fn enable(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path(name): Path<String>,
    _b: Body,
) -> ApiResult<Json<Value>> {
    set(app, who, headers, FlagCommand::EnableFeatureFlag { name }).await
}

async fn disable(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path(name): Path<String>,
    _b: Body,
) -> ApiResult<Json<Value>> {
    set(app, who, headers, FlagCommand::DisableFeatureFlag { name }).await
}
