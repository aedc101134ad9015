//! `GET /api/v2/version`, `GET /api/v2/cluster` and `GET /api/v2/clusterinfo`.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::auth::Principal;
use super::error::ApiResult;
use super::json::Obj;
use super::App;
use crate::domain::volume::{ProtectionState, VolumeState};
use crate::domain::State as DomainState;

/// The LightOS API version evstor implements.
pub const API_VERSION: &str = "v2";

pub fn routes() -> Router<App> {
    Router::new()
        .route("/api/v2/version", get(version))
        .route("/api/v2/cluster", get(cluster))
        .route("/api/v2/clusterinfo", get(cluster_info))
}

async fn version() -> Json<Value> {
    Json(json!({ "apiVersion": API_VERSION }))
}

fn max_replicas(state: &DomainState) -> u64 {
    (state.inventory.servers.len() as u64).clamp(1, 3)
}

/// Capacity counters: devices are the physical storage, volumes the logical.
pub fn cluster_statistics(state: &DomainState) -> Value {
    let physical = state.inventory.capacity_bytes();
    let logical: u64 = state.volumes.by_uuid.values().map(|v| v.size_bytes).sum();
    Obj::new()
        .u64s("installedPhysicalStorage", physical)
        .u64s("managedPhysicalStorage", physical)
        .u64s("effectivePhysicalStorage", physical)
        .u64s("logicalStorage", logical)
        .u64s("freePhysicalStorage", physical)
        .u64s(
            "estimatedFreeLogicalStorage",
            physical.saturating_sub(logical),
        )
        .u64s("estimatedLogicalStorage", physical)
        .float("compressionRatio", 1.0)
        .build()
}

fn health(state: &DomainState) -> Value {
    let count = |p: ProtectionState| {
        state
            .volumes
            .by_uuid
            .values()
            .filter(|v| v.state == VolumeState::Available && v.protection == p)
            .count() as u64
    };
    Obj::new()
        .str("state", "OK")
        .num("numDegradedVolumes", count(ProtectionState::Degraded))
        .num("numReadOnlyVolumes", count(ProtectionState::ReadOnly))
        .num(
            "numNotAvailableVolumes",
            count(ProtectionState::NotAvailable),
        )
        .num("numHealthyVolumes", count(ProtectionState::FullyProtected))
        .build()
}

async fn cluster(State(app): State<App>, _who: Principal) -> ApiResult<Json<Value>> {
    let s = app.bus.state();
    let c = &s.cluster;
    Ok(Json(
        Obj::new()
            .str("UUID", &c.uuid.to_string())
            .str("subsystemNQN", &c.subsystem_nqn)
            .num("currentMaxReplicas", max_replicas(&s))
            .num("supportedMaxReplicas", 3)
            .val("statistics", cluster_statistics(&s))
            .str("ETag", &c.etag.to_string())
            .val("health", health(&s))
            .str("MinVersionInCluster", &app.info.version)
            .str("MaxAllowedVersion", &app.info.version)
            .strs("apiEndpoints", std::slice::from_ref(&app.info.api_endpoint))
            .strs(
                "discoveryEndpoints",
                std::slice::from_ref(&app.info.discovery_endpoint),
            )
            .str("clusterName", &c.name)
            .str("inBandAuthMode", "Disabled")
            .val("encryptionStatus", json!({"encryptionState": "Disabled"}))
            .build(),
    ))
}

async fn cluster_info(State(app): State<App>, _who: Principal) -> ApiResult<Json<Value>> {
    let s = app.bus.state();
    let c = &s.cluster;
    Ok(Json(
        Obj::new()
            .str("UUID", &c.uuid.to_string())
            .str("subsystemNQN", &c.subsystem_nqn)
            .num("currentMaxReplicas", max_replicas(&s))
            .num("supportedMaxReplicas", 3)
            .str("ETag", &c.etag.to_string())
            .strs("apiEndpoints", std::slice::from_ref(&app.info.api_endpoint))
            .strs(
                "discoveryEndpoints",
                std::slice::from_ref(&app.info.discovery_endpoint),
            )
            .strs(
                "nvmeEndpoints",
                std::slice::from_ref(&app.info.nvme_endpoint),
            )
            .str("clusterName", &c.name)
            .val("encryptionStatus", json!({"encryptionState": "Disabled"}))
            .str("inBandAuthMode", "Disabled")
            .build(),
    ))
}
