//! The LightOS REST API v2 over axum. One file per resource; each exposes `routes()`. Routes
//! outside the LightOS API: `/internal/v1/…` (between cluster members) and `/evstor/v1/…`
//! (root key rotation).
//! Handlers parse JSON into domain commands, submit them through the [`Bus`], and answer from
//! the projections. Every route but `version` needs a bearer token ([`auth::Principal`]),
//! verified by [`admission`] before the request takes any capacity or its body is read.

pub mod admin_endpoints;
pub mod admission;
pub mod auth;
pub mod auth_maps;
pub mod cluster;
pub mod cluster_config;
pub mod connected_hosts;
pub mod credentials;
pub mod error;
pub mod events;
pub mod feature_flags;
pub mod idp_client_confs;
pub mod idp_configurations;
pub mod internal;
pub mod json;
pub mod logs;
pub mod metrics;
pub mod nodes;
pub mod nvme_devices;
pub mod policies;
pub mod projects;
pub mod resource_policies;
pub mod roles;
pub mod root_key;
pub mod servers;
pub mod snapshot_diff;
pub mod snapshots;
pub mod volumes;

use std::sync::Arc;

use axum::http::HeaderMap;
use axum::Router;

use crate::limits::{REQUEST_ID_BYTES_MAX, SUBJECT_BYTES_MAX};
use crate::store::{Bus, RequestMeta};
use auth::{KeyCache, Principal};
use error::ApiError;

/// What the data path reports to the API (live sessions); implemented by the server wiring.
pub trait DataPathView: Send + Sync {
    /// Host NQNs connected to the namespace `nsid`.
    fn hosts_of(&self, nsid: u32) -> Vec<String>;
    /// Every live host session (I/O controllers).
    fn connected_hosts(&self) -> Vec<evstor_datapath::ConnectedHost>;
    /// Space accounting of a volume or snapshot; None if the block store has no such image
    /// (not created yet, or already gone).
    fn usage(&self, image: uuid::Uuid) -> Option<evstor_datapath::blockstore::Usage>;
    /// The block store's state for a support bundle: pool, map memory, RocksDB statistics.
    fn store_report(&self) -> String;
    /// Read and write commands the volume received since it was published.
    fn io_totals(&self, image: uuid::Uuid) -> Option<evstor_datapath::blockstore::IoTotals>;
    /// Checksum mismatches seen reading the image since the server started.
    fn integrity_errors(&self, image: uuid::Uuid) -> u32;
    /// Checksum mismatches seen on a pool device (by path) since the server started.
    fn device_integrity_errors(&self, path: &std::path::Path) -> u32;
    /// Pool-wide accounting.
    fn pool(&self) -> evstor_datapath::blockstore::PoolStats;
    /// Blocks of `target` in `[from, to)` that differ from `base` (or hold data), ascending,
    /// at most `max`.
    fn changed_blocks(
        &self,
        target: uuid::Uuid,
        base: Option<uuid::Uuid>,
        from: u64,
        to: u64,
        max: usize,
    ) -> Result<Vec<u64>, evstor_datapath::blockstore::StoreError>;
}

/// Facts about this server the API reports.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub version: String,
    pub api_endpoint: String,
    pub nvme_endpoint: String,
    pub discovery_endpoint: String,
    /// This server's node in cluster mode (`None`: the single-server cluster's only node).
    pub node_uuid: Option<uuid::Uuid>,
    /// The data directory (scratch space for journal checkpoints served to peers).
    pub data_dir: std::path::PathBuf,
    /// This server (cluster mode; `None`: the single-server cluster's only server).
    pub server_uuid: Option<uuid::Uuid>,
    /// `--api-addr`: the admin endpoint while none is recorded.
    pub api_default: std::net::SocketAddr,
}

/// Shared state of every handler.
#[derive(Clone)]
pub struct App {
    pub bus: Bus,
    pub keys: Arc<KeyCache>,
    pub info: Arc<ServerInfo>,
    pub datapath: Arc<dyn DataPathView>,
    /// Keys of the federated IdPs.
    pub idp: Arc<crate::idp::jwks::JwksCache>,
    /// The API's listening sockets (admin endpoints bind through it before committing).
    pub listeners: Arc<crate::edge::listeners::ListenerControl>,
    /// Where the root key's private half lives (rotation).
    pub root_keys: Arc<crate::keys::RootKeys>,
}

impl App {
    /// The server this API runs on.
    pub fn server_uuid(&self, state: &crate::domain::State) -> Option<uuid::Uuid> {
        self.info
            .server_uuid
            .or_else(|| state.inventory.servers.keys().next().copied())
    }

    /// Submits a command on behalf of `who`, tagging it with the request id.
    pub async fn submit(
        &self,
        who: &Principal,
        headers: &HeaderMap,
        command: crate::domain::Command,
    ) -> Result<crate::store::Committed, ApiError> {
        let request_id = request_id(headers)?;
        if who.subject.len() > SUBJECT_BYTES_MAX {
            return Err(ApiError::bad_request(format!(
                "the token's subject is {} bytes long; at most {SUBJECT_BYTES_MAX} are recorded",
                who.subject.len()
            )));
        }
        let meta = RequestMeta {
            actor: who.subject.clone(),
            request_id,
        };
        Ok(self.bus.submit(meta, command).await?)
    }
}

/// The `x-request-id` header, recorded in every event the request causes: bounded, and a
/// fresh id when absent, empty or not text.
fn request_id(headers: &HeaderMap) -> Result<String, ApiError> {
    let Some(value) = headers.get("x-request-id") else {
        return Ok(uuid::Uuid::new_v4().to_string());
    };
    if value.len() > REQUEST_ID_BYTES_MAX {
        return Err(ApiError::bad_request(format!(
            "x-request-id is {} bytes long; at most {REQUEST_ID_BYTES_MAX} are allowed",
            value.len()
        )));
    }
    Ok(value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_string))
}

/// The `If-Match` header: `None` when absent, empty or `*`; otherwise one of the ETags this
/// server hands out (a number, quoted or not), in canonical form. Anything else is a 400:
/// a condition the server cannot read must not be ignored and the change applied anyway.
pub fn if_match(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all(axum::http::header::IF_MATCH).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::bad_request(
            "give one If-Match header, not several",
        ));
    }
    let text = value
        .to_str()
        .map_err(|_| ApiError::bad_request("If-Match is not visible ASCII"))?
        .trim();
    let tag = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    if tag.is_empty() || tag == "*" {
        return Ok(None);
    }
    match tag.parse::<u64>() {
        Ok(n) if tag.bytes().all(|b| b.is_ascii_digit()) => Ok(Some(n.to_string())),
        _ => Err(ApiError::bad_request(format!(
            "If-Match {text:?} is not an ETag of this server (a number)"
        ))),
    }
}

/// Query parameters in order, repeated keys kept (`?severity=High&severity=Critical`).
#[derive(Debug, Clone, Default)]
pub struct Query(pub Vec<(String, String)>);

impl Query {
    pub fn parse(raw: Option<&str>) -> Query {
        let pairs = raw
            .map(|q| {
                q.split('&')
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                        (percent_decode(k), percent_decode(v))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Query(pairs)
    }

    /// The first value of `key` (exact case), empty values treated as absent.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, v)| k == key && !v.is_empty())
            .map(|(_, v)| v.as_str())
    }

    pub fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// A Go `strconv.ParseBool` flag.
    pub fn flag(&self, key: &str) -> Result<bool, ApiError> {
        match self.get(key) {
            None => Ok(false),
            Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(true),
            Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(false),
            Some(other) => Err(ApiError::bad_request(format!(
                "query {key}={other} is not a boolean"
            ))),
        }
    }

    pub fn u64(&self, key: &str) -> Result<Option<u64>, ApiError> {
        self.get(key)
            .map(|v| {
                v.parse()
                    .map_err(|_| ApiError::bad_request(format!("query {key}={v} is not a number")))
            })
            .transpose()
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Query {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Query::parse(parts.uri.query()))
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every route of the API, behind [`admission::admit`] with the given caps.
pub fn router(app: App, caps: admission::RequestCaps) -> Router {
    let gate = Arc::new(admission::Admission::new(app.clone(), caps));
    Router::new()
        .merge(cluster::routes())
        .merge(projects::routes())
        .merge(volumes::routes())
        .merge(credentials::routes())
        .merge(roles::routes())
        .merge(cluster_config::routes())
        .merge(feature_flags::routes())
        .merge(events::routes())
        .merge(servers::routes())
        .merge(nodes::routes())
        .merge(nvme_devices::routes())
        .merge(connected_hosts::routes())
        .merge(snapshots::routes())
        .merge(snapshot_diff::routes())
        .merge(policies::routes())
        .merge(resource_policies::routes())
        .merge(internal::routes())
        .merge(idp_configurations::routes())
        .merge(idp_client_confs::routes())
        .merge(auth_maps::routes())
        .merge(admin_endpoints::routes())
        .merge(root_key::routes())
        .merge(metrics::routes())
        .merge(logs::routes())
        .route_layer(axum::middleware::from_fn(metrics::mark_route))
        .fallback(|| async { ApiError::not_found("no such API route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                12,
                "method not allowed on this route",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(
            crate::limits::REQUEST_BODY_BYTES_MAX,
        ))
        .layer(axum::middleware::from_fn_with_state(gate, admission::admit))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            metrics::observe,
        ))
        .with_state(app)
}
