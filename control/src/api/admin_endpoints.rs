//! `/api/v2/adminEndpoints…`: the ports and local addresses this server serves the API on
//! (`ips` are the addresses to listen on; `0.0.0.0` is every IPv4 address). Each server's
//! endpoints are its own: a request changes those of the server that receives it.
//! Cluster-admin only.
//!
//! A change binds its new sockets before it is submitted and is refused (400, nothing
//! changed) if one cannot be bound; the edge then serves the new ones and closes the old
//! ones. A change is refused (400, FailedPrecondition) if no endpoint would be left on the address the request
//! came to (the caller would be locked out), and so the last endpoint cannot be deleted.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::Extension;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::auth::Principal;
use super::error::{ApiError, ApiResult};
use super::json::{Body, Obj};
use super::{if_match, App, Query};
use crate::domain::endpoint::{AdminEndpoint, Command as EndpointCommand};
use crate::domain::Command;
use crate::edge::LocalAddr;

/// The address the caller's connection came to (absent only outside the edge).
type Caller = Option<Extension<LocalAddr>>;

fn caller_ip(c: &Caller) -> Option<IpAddr> {
    c.as_ref().map(|Extension(LocalAddr(a))| a.ip())
}

pub fn routes() -> Router<App> {
    Router::new()
        .route("/api/v2/adminEndpoints", get(list).post(create))
        .route(
            "/api/v2/adminEndpoints/{port}",
            get(get_one).put(update).delete(delete),
        )
}

/// The `AdminEndpoint` message.
pub fn endpoint_json(e: &AdminEndpoint) -> Value {
    Obj::new()
        .num("port", u64::from(e.port))
        .strs("ips", &e.ips)
        .str("ETag", &e.etag.to_string())
        .build()
}

/// This server's endpoints as the journal has them (`--api-addr` while none is recorded).
fn effective(app: &App) -> ApiResult<(uuid::Uuid, Vec<AdminEndpoint>)> {
    let state = app.bus.state();
    let server = app
        .server_uuid(&state)
        .ok_or_else(|| ApiError::internal("this server is not registered yet"))?;
    let all = state.endpoints.effective(server, app.info.api_default);
    Ok((server, all))
}

fn port_of(text: &str) -> ApiResult<u32> {
    text.parse()
        .map_err(|_| ApiError::bad_request(format!("type mismatch, parameter: port ({text:?})")))
}

async fn list(State(app): State<App>, who: Principal, q: Query) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let port = q.u64("port")?;
    let (_, all) = effective(&app)?;
    let listed: Vec<Value> = all
        .iter()
        .filter(|e| port.is_none_or(|p| u64::from(e.port) == p))
        .map(endpoint_json)
        .collect();
    Ok(Json(json!({ "adminEndpoints": listed })))
}

fn one(app: &App, port: u32) -> ApiResult<Value> {
    let (_, all) = effective(app)?;
    all.iter()
        .find(|e| u32::from(e.port) == port)
        .map(endpoint_json)
        .ok_or_else(|| ApiError::not_found(format!("no admin endpoint on port {port}")))
}

async fn get_one(
    State(app): State<App>,
    who: Principal,
    Path(port): Path<String>,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    Ok(Json(one(&app, port_of(&port)?)?))
}

/// The socket addresses of `ips` on `port` (the domain judges them again; this only binds).
fn addrs(port: u32, ips: &[String]) -> Vec<SocketAddr> {
    let Ok(port) = u16::try_from(port) else {
        return Vec::new();
    };
    ips.iter()
        .filter_map(|ip| ip.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, port))
        .collect()
}

/// Binds the new sockets, submits the change, and hands the sockets to the edge only if the
/// change was committed.
async fn bind_and_submit(
    app: &App,
    who: &Principal,
    headers: &HeaderMap,
    new: Vec<SocketAddr>,
    cmd: EndpointCommand,
) -> ApiResult<()> {
    let staged = app.listeners.stage(&new).map_err(|(addr, e)| {
        ApiError::bad_request(format!("cannot listen on {addr}: {e}; nothing was changed"))
    })?;
    app.submit(who, headers, Command::Endpoint(cmd)).await?;
    staged.commit();
    Ok(())
}

async fn create(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    b: Body,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let port = b
        .u32("port")?
        .ok_or_else(|| ApiError::bad_request("field port is required"))?;
    let ips = b.strings("ips")?;
    let (server, _) = effective(&app)?;
    let cmd = EndpointCommand::CreateAdminEndpoint {
        server,
        default: app.info.api_default,
        port,
        ips: ips.clone(),
    };
    bind_and_submit(&app, &who, &headers, addrs(port, &ips), cmd).await?;
    Ok(Json(one(&app, port)?))
}

async fn update(
    State(app): State<App>,
    who: Principal,
    caller: Caller,
    headers: HeaderMap,
    Path(port): Path<String>,
    b: Body,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let port = port_of(&port)?;
    let ips = b.strings("ips")?;
    let (server, _) = effective(&app)?;
    let cmd = EndpointCommand::UpdateAdminEndpoint {
        server,
        default: app.info.api_default,
        port,
        ips: ips.clone(),
        if_match: if_match(&headers)?,
        caller: caller_ip(&caller),
    };
    bind_and_submit(&app, &who, &headers, addrs(port, &ips), cmd).await?;
    Ok(Json(one(&app, port)?))
}

async fn delete(
    State(app): State<App>,
    who: Principal,
    caller: Caller,
    headers: HeaderMap,
    Path(port): Path<String>,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let port = port_of(&port)?;
    let (server, _) = effective(&app)?;
    let cmd = EndpointCommand::DeleteAdminEndpoint {
        server,
        default: app.info.api_default,
        port,
        if_match: if_match(&headers)?,
        caller: caller_ip(&caller),
    };
    app.submit(&who, &headers, Command::Endpoint(cmd)).await?;
    Ok(Json(json!({})))
}
