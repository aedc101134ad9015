//! `/api/v2/cluster/authMaps…`: the only source of a federated caller's roles. An entry maps
//! an identifier (a client id, subject, group or configured claim value of a token of its
//! IdP) to `scope:role`. Cluster-admin only. A change applies to the next request.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::auth::Principal;
use super::error::{ApiError, ApiResult};
use super::json::{Body, Obj};
use super::App;
use crate::domain::federation::{AuthMapEntry, Command as FederationCommand};
use crate::domain::Command;

pub fn routes() -> Router<App> {
    Router::new()
        .route("/api/v2/cluster/authMaps", get(list).post(create))
        .route(
            "/api/v2/cluster/authMaps/{name}",
            get(get_one).put(update).delete(delete),
        )
}

/// The `AuthMapEntry` message.
pub fn map_json(m: &AuthMapEntry) -> Value {
    Obj::new()
        .str("UUID", &m.uuid.to_string())
        .str("name", &m.name)
        .str("identifier", &m.identifier)
        .str("scope", &m.scope)
        .str("role", &m.role)
        .str("idpConfigurationName", &m.idp)
        .build()
}

async fn list(State(app): State<App>, who: Principal) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let state = app.bus.state();
    let all: Vec<Value> = state.federation.maps.values().map(map_json).collect();
    Ok(Json(json!({ "authMapEntries": all })))
}

fn one(app: &App, name: &str) -> ApiResult<Value> {
    let state = app.bus.state();
    let m = state
        .federation
        .maps
        .get(name)
        .ok_or_else(|| ApiError::not_found(format!("auth map entry {name} not found")))?;
    Ok(map_json(m))
}

async fn get_one(
    State(app): State<App>,
    who: Principal,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    Ok(Json(one(&app, &name)?))
}

/// Create (POST, name in the body) and replace (PUT, name in the path, which wins).
async fn put(
    app: App,
    who: Principal,
    headers: HeaderMap,
    name: String,
    b: Body,
    update: bool,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let cmd = FederationCommand::PutAuthMapEntry {
        name: name.clone(),
        identifier: b.required_str("identifier")?,
        scope: b.required_str("scope")?,
        role: b.required_str("role")?,
        idp: b.required_str("idpConfigurationName")?,
        update,
    };
    app.submit(&who, &headers, Command::Federation(cmd)).await?;
    Ok(Json(one(&app, &name)?))
}

async fn create(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    b: Body,
) -> ApiResult<Json<Value>> {
    let name = b.required_str("name")?;
    put(app, who, headers, name, b, false).await
}

async fn update(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path(name): Path<String>,
    b: Body,
) -> ApiResult<Json<Value>> {
    put(app, who, headers, name, b, true).await
}

async fn delete(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let cmd = FederationCommand::DeleteAuthMapEntry { name };
    app.submit(&who, &headers, Command::Federation(cmd)).await?;
    Ok(Json(json!({})))
}
