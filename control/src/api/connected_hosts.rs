//! `/api/v2/connectedHosts…`: hosts with live NVMe/TCP sessions, as the target reports them.
//! Host NQNs contain colons (`nqn.2014-08.org.nvmexpress:uuid:…`); unlike the stock gateway
//! (SCHEMAS.md 4.12) such a last path segment is accepted, raw or percent-encoded.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use evstor_datapath::ConnectedHost;
use serde_json::{json, Value};
use uuid::Uuid;

use super::auth::Principal;
use super::error::{ApiError, ApiResult};
use super::json::Obj;
use super::{App, Query};
use crate::domain::volume::VolumeState;
use crate::domain::State as DomainState;

pub fn routes() -> Router<App> {
    Router::new()
        .route("/api/v2/connectedHosts", get(list))
        .route("/api/v2/connectedHosts/{hostNQN}", get(get_one))
}

/// One host, merged over all its controllers.
#[derive(Debug, Default)]
struct Host {
    ips: Vec<String>,
    volumes: Vec<Uuid>,
}

/// Groups the target's sessions by host NQN and maps namespace ids to volume UUIDs.
fn hosts(state: &DomainState, sessions: Vec<ConnectedHost>) -> BTreeMap<String, Host> {
    let by_nsid: BTreeMap<u32, Uuid> = state
        .volumes
        .by_uuid
        .values()
        .filter(|v| v.state != VolumeState::Deleted && v.nsid != 0)
        .map(|v| (v.nsid, v.uuid))
        .collect();
    let mut out: BTreeMap<String, Host> = BTreeMap::new();
    for s in sessions {
        let h = out.entry(s.host_nqn).or_default();
        let ip = s.remote_addr.ip().to_string();
        if !h.ips.contains(&ip) {
            h.ips.push(ip);
        }
        for nsid in s.nsids {
            if let Some(u) = by_nsid.get(&nsid) {
                if !h.volumes.contains(u) {
                    h.volumes.push(*u);
                }
            }
        }
    }
    out
}

/// The `ConnectedHost` message; `iPAddress` is one string, several addresses comma-separated.
/// The host name is not known to an NVMe/TCP target and is omitted.
fn host_json(nqn: &str, h: &Host) -> Value {
    let volumes: Vec<String> = h.volumes.iter().map(Uuid::to_string).collect();
    Obj::new()
        .str("hostNQN", nqn)
        .str("iPAddress", &h.ips.join(","))
        .strs("volumeUUIDs", &volumes)
        .build()
}

/// `hostNQN` in the query is documented as ignored; `volumeUUID` must name a volume.
async fn list(State(app): State<App>, who: Principal, q: Query) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let volume = match q.get("volumeUUID") {
        None => None,
        Some(text) => {
            let u = Uuid::parse_str(text)
                .map_err(|_| ApiError::bad_request(format!("volumeUUID {text:?} is not a UUID")))?;
            if app.bus.state().volumes.get(u).is_none() {
                return Err(ApiError::not_found(format!("volume {u} not found")));
            }
            Some(u)
        }
    };
    let sessions = app.datapath.connected_hosts();
    let state = app.bus.state();
    let hosts: Vec<Value> = hosts(&state, sessions)
        .iter()
        .filter(|(_, h)| volume.is_none_or(|u| h.volumes.contains(&u)))
        .map(|(nqn, h)| host_json(nqn, h))
        .collect();
    Ok(Json(json!({ "connectedHosts": hosts })))
}

async fn get_one(
    State(app): State<App>,
    who: Principal,
    Path(nqn): Path<String>,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let sessions = app.datapath.connected_hosts();
    let state = app.bus.state();
    let all = hosts(&state, sessions);
    let h = all
        .get(&nqn)
        .ok_or_else(|| ApiError::not_found(format!("host {nqn} is not connected")))?;
    Ok(Json(host_json(&nqn, h)))
}
