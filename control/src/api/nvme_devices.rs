//! `/api/v2/nvmeDevices…`: the devices of the node's storage pool (`evstor serve --device`, or
//! the sparse file made at bootstrap), with the integrity errors seen on each. Adding devices
//! through the API and setting LED patterns answer 501: devices join the pool at server start,
//! and neither files nor devices behind the block layer expose LEDs.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::auth::Principal;
use super::error::{ApiError, ApiResult};
use super::json::{Body, Obj};
use super::{App, Query};
use crate::domain::inventory::Device;
use crate::domain::State as DomainState;

pub fn routes() -> Router<App> {
    Router::new()
        .route("/api/v2/nvmeDevices", get(list).post(add))
        // GET names the segment {Serial}, POST {serialNumber}; the router needs one name.
        .route("/api/v2/nvmeDevices/{Serial}", get(get_one).post(update))
}

/// `UserNvmeDevicesResponse.DeviceUsageEnum`, by number.
const USAGES: [&str; 5] = ["Unknown", "Data", "Journal", "OS", "UnManaged"];
/// Every pool device holds data.
const DATA: &str = "Data";

/// The `UserNvmeDevicesResponse` message.
pub fn device_json(app: &App, d: &Device) -> Value {
    Obj::new()
        .u64s("size", d.size_bytes)
        .str("model", &d.model)
        .str("serial", &d.serial)
        .str("serverUUID", &d.server_uuid.to_string())
        .str("state", "Healthy")
        .str("name", &d.path)
        .str("nodeUUID", &d.node_uuid.to_string())
        .str("ETag", &d.etag.to_string())
        .str("deviceUsage", DATA)
        .val(
            "statistics",
            Obj::new()
                .num(
                    "UnrecoverableDataIntegrityErrors",
                    u64::from(
                        app.datapath
                            .device_integrity_errors(std::path::Path::new(&d.path)),
                    ),
                )
                .build(),
        )
        .build()
}

/// `deviceUsages` repeated: names or numbers; `Unknown` (0) matches nothing in particular.
fn usages(q: &Query) -> ApiResult<Vec<&'static str>> {
    q.all("deviceUsages")
        .into_iter()
        .filter(|v| !v.is_empty())
        .map(|v| {
            let by_number = v.parse::<usize>().ok().and_then(|n| USAGES.get(n));
            USAGES
                .iter()
                .find(|u| **u == v)
                .or(by_number)
                .copied()
                .ok_or_else(|| ApiError::bad_request(format!("unknown deviceUsages value {v:?}")))
        })
        .collect()
}

fn find<'a>(state: &'a DomainState, serial: &str) -> ApiResult<&'a Device> {
    state
        .inventory
        .devices
        .get(serial)
        .ok_or_else(|| ApiError::not_found(format!("NVMe device {serial} not found")))
}

async fn list(State(app): State<App>, who: Principal, q: Query) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let wanted = usages(&q)?;
    let state = app.bus.state();
    let devices: Vec<Value> = state
        .inventory
        .devices
        .values()
        .filter(|d| {
            q.get("nodeUUID")
                .is_none_or(|n| d.node_uuid.to_string() == n)
        })
        .filter(|d| {
            q.get("serverUUID")
                .is_none_or(|s| d.server_uuid.to_string() == s)
        })
        .filter(|_| wanted.is_empty() || wanted.contains(&DATA))
        .map(|d| device_json(&app, d))
        .collect();
    Ok(Json(json!({ "NvmeDevices": devices })))
}

async fn get_one(
    State(app): State<App>,
    who: Principal,
    Path(serial): Path<String>,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let state = app.bus.state();
    Ok(Json(device_json(&app, find(&state, &serial)?)))
}

async fn add(State(_): State<App>, who: Principal, b: Body) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let serial = b.required_str("serialNumber")?;
    b.required_str("nodeUUID")?;
    Err(ApiError::unimplemented(format!(
        "adding NVMe device {serial} is not implemented: devices are set up when the cluster starts"
    )))
}

async fn update(
    State(app): State<App>,
    who: Principal,
    Path(serial): Path<String>,
    _b: Body,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    find(&app.bus.state(), &serial)?;
    Err(ApiError::unimplemented(
        "LED patterns are not implemented for evstor pool devices",
    ))
}
