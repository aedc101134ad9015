//! `/api/v2/cluster/idpClientConfs…`: which tokens of an IdP are meant for this cluster (their
//! `aud` names the `clientId`) and how their identifiers are read (`authzMode`, `claimName`).
//! Cluster-admin only; only `claimName` can change.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::auth::Principal;
use super::error::{ApiError, ApiResult};
use super::json::{Body, Obj};
use super::App;
use crate::domain::federation::{AuthzMode, Command as FederationCommand, IdpClientConf};
use crate::domain::Command;

pub fn routes() -> Router<App> {
    Router::new()
        .route("/api/v2/cluster/idpClientConfs", get(list).post(create))
        .route(
            "/api/v2/cluster/idpClientConfs/{name}",
            get(get_one).put(update).delete(delete),
        )
}

fn mode_name(m: AuthzMode) -> &'static str {
    match m {
        AuthzMode::App => "App",
        AuthzMode::User => "User",
        AuthzMode::Converge => "Converge",
    }
}

/// The `IdpClientConf` message.
pub fn client_json(c: &IdpClientConf) -> Value {
    Obj::new()
        .str("UUID", &c.uuid.to_string())
        .str("name", &c.name)
        .str("clientId", &c.client_id)
        .str("idpConfigurationName", &c.idp)
        .str("claimName", &c.claim_name)
        .str("authzMode", mode_name(c.mode))
        .build()
}

/// `authzMode`: `AuthorizationMode` by name or number; `UnknownAuthzMode` is refused.
fn authz_mode(b: &Body) -> ApiResult<AuthzMode> {
    let mode = match b.get("authzMode") {
        Some(Value::String(s)) => match s.as_str() {
            "App" => Some(AuthzMode::App),
            "User" => Some(AuthzMode::User),
            "Converge" => Some(AuthzMode::Converge),
            _ => None,
        },
        Some(Value::Number(n)) => match n.as_u64() {
            Some(1) => Some(AuthzMode::App),
            Some(2) => Some(AuthzMode::User),
            Some(3) => Some(AuthzMode::Converge),
            _ => None,
        },
        _ => None,
    };
    mode.ok_or_else(|| ApiError::bad_request("field authzMode must be App, User or Converge"))
}

async fn list(State(app): State<App>, who: Principal) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let state = app.bus.state();
    let all: Vec<Value> = state.federation.clients.values().map(client_json).collect();
    Ok(Json(json!({ "idpClientConfigurations": all })))
}

fn one(app: &App, name: &str) -> ApiResult<Value> {
    let state = app.bus.state();
    let c =
        state.federation.clients.get(name).ok_or_else(|| {
            ApiError::not_found(format!("IdP client configuration {name} not found"))
        })?;
    Ok(client_json(c))
}

async fn get_one(
    State(app): State<App>,
    who: Principal,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    Ok(Json(one(&app, &name)?))
}

async fn create(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    b: Body,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let name = b.required_str("name")?;
    let cmd = FederationCommand::CreateIdpClientConf {
        name: name.clone(),
        client_id: b.required_str("clientId")?,
        idp: b.required_str("idpConfigurationName")?,
        claim_name: b.str("claimName")?.unwrap_or_default(),
        mode: authz_mode(&b)?,
    };
    app.submit(&who, &headers, Command::Federation(cmd)).await?;
    Ok(Json(one(&app, &name)?))
}

async fn update(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path(name): Path<String>,
    b: Body,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let cmd = FederationCommand::UpdateIdpClientConf {
        name: name.clone(),
        claim_name: b.str("claimName")?.unwrap_or_default(),
    };
    app.submit(&who, &headers, Command::Federation(cmd)).await?;
    Ok(Json(one(&app, &name)?))
}

async fn delete(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let cmd = FederationCommand::DeleteIdpClientConf { name };
    app.submit(&who, &headers, Command::Federation(cmd)).await?;
    Ok(Json(json!({})))
}
