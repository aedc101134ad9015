//! `/api/v2/clusterConfig…`: list, get and update the documented cluster parameters.
//! Reading and changing them needs the cluster-admin role.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::auth::Principal;
use super::error::{ApiError, ApiResult};
use super::json::{Body, Obj};
use super::App;
use crate::domain::config::{Command as ConfigCommand, PARAMS};
use crate::domain::{Command, State as DomainState};

pub fn routes() -> Router<App> {
    Router::new()
        .route("/api/v2/clusterConfig", get(list))
        .route("/api/v2/clusterConfig/{name}", get(get_one).put(update))
}

fn param_json(state: &DomainState, name: &str) -> ApiResult<Value> {
    let value = state.config.value(state, name).ok_or_else(|| {
        ApiError::not_found(format!(
            "cluster configuration parameter {name:?} not found"
        ))
    })?;
    Ok(Obj::new().str("name", name).str("value", &value).build())
}

async fn list(State(app): State<App>, who: Principal) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let state = app.bus.state();
    let values = PARAMS
        .iter()
        .map(|p| param_json(&state, p.name))
        .collect::<ApiResult<Vec<_>>>()?;
    Ok(Json(json!({ "values": values })))
}

async fn get_one(
    State(app): State<App>,
    who: Principal,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let state = app.bus.state();
    Ok(Json(param_json(&state, &name)?))
}

/// Body `{"configParam": {"name": …, "value": "…"}}`; the path fills `configParam.name` and
/// wins over the body's.
async fn update(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path(name): Path<String>,
    b: Body,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let param = b
        .object("configParam")?
        .ok_or_else(|| ApiError::bad_request("field configParam is required"))?;
    let value = param
        .str("value")?
        .ok_or_else(|| ApiError::bad_request("field configParam.value is required"))?;
    let cmd = ConfigCommand::UpdateClusterConfigParam { name, value };
    app.submit(&who, &headers, Command::Config(cmd)).await?;
    Ok(Json(json!({})))
}
