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
//! `POST /nvmeDevices` (`AddNvmeDevice`) adds a spare device (`evstor serve
//! --spare-device`, listed with `deviceUsage` `UnManaged`) to its node's pool: recorded
//! (`DeviceAdded`), and appended to the node's block store while it serves. 400 for an
//! empty serial or node, a device already in a pool, one of another server, a node whose
//! server failed or is disabled, or a pool that is full; 404 for an unknown serial or node.

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

/// The `UserNvmeDevicesResponse` message of a pool device.
pub fn device_json(app: &App, state: &DomainState, d: &Device) -> Value {
    usage_json(app, state, d, DATA)
}

/// Outside the pool until added (`AddNvmeDevice`).
const UNMANAGED: &str = "UnManaged";

/// The `UserNvmeDevicesResponse` message of a device with `usage`.
fn usage_json(app: &App, state: &DomainState, d: &Device, usage: &str) -> Value {
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
        .str("deviceUsage", usage)
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

/// Every device of the inventory with its usage: the pools', then the spares.
fn all_devices(state: &DomainState) -> impl Iterator<Item = (&Device, &'static str)> {
    let inv = &state.inventory;
    let pool = inv.devices.values().map(|d| (d, DATA));
    pool.chain(inv.spares.values().map(|d| (d, UNMANAGED)))
}

async fn list(State(app): State<App>, who: Principal, q: Query) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let wanted = usages(&q)?;
    let state = app.bus.state();
    let devices: Vec<Value> = all_devices(&state)
        .filter(|(d, _)| {
            q.get("nodeUUID")
                .is_none_or(|n| d.node_uuid.to_string() == n)
        })
        .filter(|(d, _)| {
            q.get("serverUUID")
                .is_none_or(|s| d.server_uuid.to_string() == s)
        })
        .filter(|(_, usage)| wanted.is_empty() || wanted.contains(usage))
        .map(|(d, usage)| usage_json(&app, &state, d, usage))
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
    let (d, usage) = all_devices(&state)
        .find(|(d, _)| d.serial == serial)
        .ok_or_else(|| ApiError::not_found(format!("NVMe device {serial} not found")))?;
    Ok(Json(usage_json(&app, &state, d, usage)))
}

/// `AddNvmeDevice`: a spare device joins its node's pool; the node's data path takes its
/// space at once (the answer is empty, as the reference's).
async fn add(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    b: Body,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let serial = b.required_str("serialNumber")?;
    let node = parse_uuid(&b.required_str("nodeUUID")?)?;
    let cmd = InventoryCommand::AddNvmeDevice { serial, node };
    app.submit(&who, &headers, Command::Inventory(cmd)).await?;
    Ok(Json(json!({})))
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
