//! `GET /api/v2/version`, `GET /api/v2/cluster` and `GET /api/v2/clusterinfo`.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use evstor_datapath::blockstore::PoolStats;
use serde_json::{json, Value};

use super::auth::Principal;
use super::error::ApiResult;
use super::json::Obj;
use super::volumes::live_protection;
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

/// Capacity counters (`ClusterStatisticsApi`, and `NodeStatisticsApi` on one node): the
/// pool's devices are the physical storage, provisioned volumes the logical; estimates scale
/// physical space by the compression ratio achieved so far.
pub fn capacity_statistics(pool: &PoolStats, provisioned: u64, installed: bool) -> Value {
    let free = pool.capacity_bytes.saturating_sub(pool.used_bytes);
    let ratio = pool.compression_ratio();
    let mut o = Obj::new();
    if installed {
        o = o.u64s("installedPhysicalStorage", pool.capacity_bytes);
    }
    o.u64s("managedPhysicalStorage", pool.capacity_bytes)
        .u64s("effectivePhysicalStorage", pool.capacity_bytes)
        .u64s("logicalStorage", provisioned)
        .u64s("logicalUsedStorage", pool.logical_bytes)
        .u64s("physicalUsedStorage", pool.used_bytes)
        .u64s("physicalUsedStorageIncludingParity", pool.used_bytes)
        .u64s("freePhysicalStorage", free)
        .u64s("estimatedFreeLogicalStorage", (free as f64 * ratio) as u64)
        .u64s(
            "estimatedLogicalStorage",
            (pool.capacity_bytes as f64 * ratio) as u64,
        )
        .float("compressionRatio", ratio)
        .build()
}

/// The cluster's counters.
pub fn cluster_statistics(app: &App, state: &DomainState) -> Value {
    let provisioned: u64 = state.volumes.by_uuid.values().map(|v| v.size_bytes).sum();
    capacity_statistics(&app.datapath.pool(), provisioned, true)
}

/// Volumes by live protection; the cluster is `Error` while one is not available,
/// `Warning` while one is degraded or read-only.
fn health(state: &DomainState) -> Value {
    let count = |p: ProtectionState| {
        state
            .volumes
            .by_uuid
            .values()
            .filter(|v| v.state == VolumeState::Available && live_protection(state, v) == p)
            .count() as u64
    };
    let summary = if count(ProtectionState::NotAvailable) > 0 {
        "Error"
    } else if count(ProtectionState::Degraded) + count(ProtectionState::ReadOnly) > 0 {
        "Warning"
    } else {
        "OK"
    };
    Obj::new()
        .str("state", summary)
        .num("numDegradedVolumes", count(ProtectionState::Degraded))
        .num("numReadOnlyVolumes", count(ProtectionState::ReadOnly))
        .num(
            "numNotAvailableVolumes",
            count(ProtectionState::NotAvailable),
        )
        .num("numHealthyVolumes", count(ProtectionState::FullyProtected))
        .build()
}

/// Where every server serves the API: its admin endpoints, or the address it registered with
/// (this server: its `--api-addr`) while none is recorded.
fn api_endpoints(app: &App, state: &DomainState) -> Vec<String> {
    let this = app.server_uuid(state);
    let mut out = Vec::new();
    for (uuid, server) in &state.inventory.servers {
        match state.endpoints.by_server.get(uuid) {
            Some(ports) if !ports.is_empty() => out.extend(
                ports
                    .values()
                    .flat_map(|e| e.addrs())
                    .map(|a| a.to_string()),
            ),
            _ if Some(*uuid) == this => out.push(app.info.api_endpoint.clone()),
            _ => out.push(server.api_endpoint.clone()),
        }
    }
    out
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
            .val("statistics", cluster_statistics(&app, &s))
            .str("ETag", &c.etag.to_string())
            .val("health", health(&s))
            .str("MinVersionInCluster", &app.info.version)
            .str("MaxAllowedVersion", &app.info.version)
            .strs("apiEndpoints", &api_endpoints(&app, &s))
            .strs(
                "discoveryEndpoints",
                std::slice::from_ref(&app.info.discovery_endpoint),
            )
            .str("clusterName", &c.name)
            .str("inBandAuthMode", "Disabled")
            .val("encryptionStatus", json!({"encryptionState": "Disabled"}))
            .val(
                "federatedAuthenticationStatus",
                super::idp_configurations::status_json(&app, &s),
            )
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
            .strs("apiEndpoints", &api_endpoints(&app, &s))
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
