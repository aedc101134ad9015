//! `POST /evstor/v1/rootKey/rotate`: replaces the root key (credential `system:root`, which
//! signs `admin.jwt` and `evstor token create`'s tokens). Every token the old key signed
//! stops verifying at once, on every server; each server rewrites its `admin.jwt`, and the
//! answer carries a fresh admin token for the caller. Cluster-admin only.
//!
//! An evstor route, not a LightOS one: the reference's `clusterRootKey/rotate` rotates the
//! encryption-at-rest key, a different key. It is an endpoint rather than a CLI verb because
//! a rotation is a change (an event only the running server's writer may append) and, in a
//! cluster, the new private key must reach etcd for every member.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::auth::Principal;
use super::error::{ApiError, ApiResult};
use super::App;
use crate::domain::credential::Command as CredentialCommand;
use crate::domain::Command;

pub const ROUTE: &str = "/evstor/v1/rootKey/rotate";

pub fn routes() -> Router<App> {
    Router::new().route(ROUTE, post(rotate))
}

/// Runs blocking key work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("key task: {e}")))?
        .map_err(|e| ApiError::internal(format!("{e:#}")))
}

async fn rotate(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let (private, public) = blocking(crate::server::generate_root_key).await?;
    // Stored before the journal names it: a crash after the commit leaves a usable key.
    let (keys, p) = (app.root_keys.clone(), private.clone());
    blocking(move || keys.store(&p)).await?;
    let cmd = CredentialCommand::RotateRootKey {
        payload_pem: public,
    };
    if let Err(e) = app.submit(&who, &headers, Command::Credential(cmd)).await {
        let (keys, p) = (app.root_keys.clone(), private.clone());
        if let Err(forget) = blocking(move || keys.forget(&p)).await {
            tracing::warn!("forgetting the refused root key: {}", forget.message);
        }
        return Err(e);
    }
    let keys = app.root_keys.clone();
    let token = blocking(move || keys.mint_admin(&private)).await?;
    Ok(Json(json!({ "adminToken": token })))
}
