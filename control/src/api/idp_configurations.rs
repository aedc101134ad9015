//! `/api/v2/cluster/IdpConfiguration…` (the OpenID Connect IdPs whose tokens the API may
//! accept) and `/api/v2/cluster/federatedAuthentication/{enable|disable}`. Cluster-admin
//! only. A proxy is given by URL; proxy credentials are refused, since they would have to
//! be kept in the journal.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::auth::Principal;
use super::error::{ApiError, ApiResult};
use super::json::{Body, Obj};
use super::App;
use crate::domain::federation::{Command as FederationCommand, IdpConfig, IdpType};
use crate::domain::Command;

pub fn routes() -> Router<App> {
    Router::new()
        .route(
            "/api/v2/cluster/IdpConfiguration",
            get(list).post(create).put(update),
        )
        .route(
            "/api/v2/cluster/IdpConfiguration/{name}",
            get(get_one).delete(delete),
        )
        .route(
            "/api/v2/cluster/federatedAuthentication/enable",
            post(enable),
        )
        .route(
            "/api/v2/cluster/federatedAuthentication/disable",
            post(disable),
        )
}

/// The `IDPConfiguration` message (`type` `unknownIdp` is the zero value, so omitted).
pub fn idp_json(c: &IdpConfig) -> Value {
    let mut o = Obj::new()
        .str("name", &c.name)
        .str("idpIssuerURL", &c.issuer_url)
        .str("state", "Active");
    if c.kind == IdpType::Adfs {
        o = o.str("type", "ADFS");
    }
    o = o.str("UUID", &c.uuid.to_string());
    if !c.proxy_url.is_empty() {
        o = o.val("proxyInfo", json!({ "URL": c.proxy_url }));
    }
    o.build()
}

/// `type`: `IDPType` by name or number.
fn idp_type(b: &Body) -> ApiResult<Option<IdpType>> {
    match b.get("type") {
        None => Ok(None),
        Some(Value::String(s)) if s == "ADFS" => Ok(Some(IdpType::Adfs)),
        Some(Value::String(s)) if s == "unknownIdp" => Ok(Some(IdpType::Unknown)),
        Some(Value::Number(n)) if n.as_u64() == Some(1) => Ok(Some(IdpType::Adfs)),
        Some(Value::Number(n)) if n.as_u64() == Some(0) => Ok(Some(IdpType::Unknown)),
        Some(other) => Err(ApiError::bad_request(format!(
            "unknown IdP type {other}; use ADFS (any OpenID Connect IdP is spoken to alike)"
        ))),
    }
}

/// `proxyInfo`: its URL (`Some("")` clears it); credentials are refused.
fn proxy_url(b: &Body) -> ApiResult<Option<String>> {
    let Some(p) = b.object("proxyInfo")? else {
        return Ok(None);
    };
    for secret in ["Username", "Password"] {
        if p.str(secret)?.is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::bad_request(
                "proxyInfo.Username/Password are not supported: evstor would have to keep them \
                 in its journal; use a proxy that admits this server by address",
            ));
        }
    }
    Ok(Some(p.str("URL")?.unwrap_or_default()))
}

async fn list(State(app): State<App>, who: Principal) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let state = app.bus.state();
    let all: Vec<Value> = state.federation.idps.values().map(idp_json).collect();
    Ok(Json(json!({ "idpConfigurations": all })))
}

fn one(app: &App, name: &str) -> ApiResult<Value> {
    let state = app.bus.state();
    let c = state
        .federation
        .idps
        .get(name)
        .ok_or_else(|| ApiError::not_found(format!("IdP configuration {name} not found")))?;
    Ok(idp_json(c))
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
    let cmd = FederationCommand::CreateIdpConfiguration {
        name: name.clone(),
        issuer_url: b.required_str("idpIssuerURL")?,
        kind: idp_type(&b)?.unwrap_or(IdpType::Unknown),
        proxy_url: proxy_url(&b)?.unwrap_or_default(),
    };
    app.submit(&who, &headers, Command::Federation(cmd)).await?;
    Ok(Json(one(&app, &name)?))
}

/// `PUT /api/v2/cluster/IdpConfiguration`: the configuration is named in the body.
async fn update(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    b: Body,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let name = b.required_str("name")?;
    let cmd = FederationCommand::UpdateIdpConfiguration {
        name: name.clone(),
        issuer_url: b.str("idpIssuerURL")?.filter(|u| !u.is_empty()),
        kind: idp_type(&b)?,
        proxy_url: proxy_url(&b)?,
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
    let cmd = FederationCommand::DeleteIdpConfiguration { name };
    app.submit(&who, &headers, Command::Federation(cmd)).await?;
    Ok(Json(json!({})))
}

async fn enable(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    _b: Body,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let cmd = FederationCommand::EnableFederatedAuthentication;
    app.submit(&who, &headers, Command::Federation(cmd)).await?;
    Ok(Json(json!({})))
}

async fn disable(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    _b: Body,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let cmd = FederationCommand::DisableFederatedAuthentication;
    app.submit(&who, &headers, Command::Federation(cmd)).await?;
    Ok(Json(json!({})))
}

/// `ClusterInfo.federatedAuthenticationStatus`: the switch, and this server's view of each
/// IdP (whether its keys could be fetched when last tried).
pub fn status_json(app: &App, state: &crate::domain::State) -> Value {
    let server = app
        .server_uuid(state)
        .and_then(|u| state.inventory.servers.get(&u))
        .map(|s| s.name.clone())
        .unwrap_or_default();
    let infos: Vec<Value> = app
        .idp
        .health()
        .into_iter()
        .filter(|h| state.federation.idps.contains_key(&h.idp))
        .map(|h| {
            let status = match (&h.error, h.checked_unix) {
                (_, 0) => "IdpHealthStatus_Unknown",
                (None, _) => "IdpHealthStatus_Healthy",
                (Some(_), _) => "IdpHealthStatus_UnHealthy",
            };
            let mut o = Obj::new()
                .str("serverName", &server)
                .str("idpHealthStatus", status);
            if h.checked_unix > 0 {
                o = o.time("timestamp", h.checked_unix * 1_000_000_000);
            }
            o.str("healthErrorMessage", h.error.as_deref().unwrap_or_default())
                .build()
        })
        .collect();
    Obj::new()
        .bool("federatedAuthenticationEnabled", state.federation.enabled)
        .val("idpHealthInfos", Value::Array(infos))
        .build()
}
