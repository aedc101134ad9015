//! `/api/v2/nvmeDevices…`: the devices of the node's storage pool (`evstor serve --device`, or
//! the sparse file made at bootstrap), with the integrity errors seen on each.
//!
//! `POST /nvmeDevices/{serialNumber}` (`UpdateNvmeDevice`) sets the device's `ledPattern`
//! ("locate", "rebuild" or "locate-off"; 400 otherwise): it is recorded
//! (`DeviceLedPatternSet`), changes the device's ETag and shows as `ledPattern` in GET (an
//! evstor addition: `UserNvmeDevicesResponse` has no such field). Nothing lights up:
//! pool devices are files or devices behind the kernel's block layer, which expose no
//! LED. 404 for an unknown serial or `serverUUID`, 400 for a `serverUUID` the device is
//! not in or a body `serialNumber` other than the path's, 412 for a stale `If-Match`.
//!
//! Adding devices through the API (`POST /nvmeDevices`) answers 501: devices join the
//! pool at server start (`--device`), because the block store maps its devices once, when
//! it opens (`datapath::blockstore::pool`).

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::auth::Principal;
use super::error::{ApiError, ApiResult};
use axum::http::HeaderMap;

use super::json::{parse_uuid, Body, Obj};
use super::{if_match, App, Query};
use crate::domain::inventory::{Command as InventoryCommand, Device};
use crate::domain::led::LedPattern;
use crate::domain::{Command, State as DomainState};

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
pub fn device_json(app: &App, state: &DomainState, d: &Device) -> Value {
    let led = state.inventory.leds.get(&d.serial).map_or("", |p| p.name());
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
        .str("ledPattern", led)
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
        .map(|d| device_json(&app, &state, d))
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
    Ok(Json(device_json(&app, &state, find(&state, &serial)?)))
}

async fn add(State(_): State<App>, who: Principal, b: Body) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let serial = b.required_str("serialNumber")?;
    b.required_str("nodeUUID")?;
    Err(ApiError::unimplemented(format!(
        "adding NVMe device {serial} is not implemented: a server's devices join its pool \
         when it starts (`evstor serve --device <path>`)"
    )))
}

/// `UpdateNvmeDevice`: answers the device as it is then (`UpdateNvmeDeviceResponse` is
/// empty).
async fn update(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path(serial): Path<String>,
    b: Body,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    find(&app.bus.state(), &serial)?;
    if let Some(named) = b.str("serialNumber")?.filter(|s| !s.is_empty()) {
        if named != serial {
            return Err(ApiError::bad_request(format!(
                "serialNumber {named} is not the device of the path ({serial})"
            )));
        }
    }
    let text = b.required_str("ledPattern")?;
    let pattern = LedPattern::parse(&text).ok_or_else(|| {
        ApiError::bad_request(format!(
            "unknown ledPattern {text:?}: give \"locate\", \"rebuild\" or \"locate-off\""
        ))
    })?;
    let server = match b.str("serverUUID")?.filter(|s| !s.is_empty()) {
        Some(text) => Some(parse_uuid(&text)?),
        None => None,
    };
    let cmd = InventoryCommand::SetDeviceLedPattern {
        serial: serial.clone(),
        server,
        pattern,
        if_match: if_match(&headers)?,
    };
    app.submit(&who, &headers, Command::Inventory(cmd)).await?;
    let state = app.bus.state();
    Ok(Json(device_json(&app, &state, find(&state, &serial)?)))
}
