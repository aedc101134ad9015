//! The evstor control plane.
//!
//! - [`domain`]: pure commands, events, `decide`/`evolve` per resource, and the aggregate state.
//! - [`store`]: the edge to the journal: event codec, projection rows, the single writer with
//!   group commit ([`store::Bus`]), replay and projection verification.
//! - [`api`]: the LightOS REST API v2 over axum, one file per resource, plus authentication.
//! - [`reconcile`]: followers of the journal that drive long operations (volume and snapshot
//!   creation and deletion, clones, rollback, retention expiry) to completion and resume after
//!   a crash.
//! - [`dataplane`]: volumes and snapshots in the node's block store, and the NVMe/TCP target,
//!   behind the reconciler.
//! - [`edge`]: the API's network edge: the listener set (admin endpoints, changed live),
//!   accept loops, connection caps, TLS and HTTP deadlines, the descriptor budget.
//! - [`idp`]: federated authentication: fetching IdP discovery documents and keys (JWKS
//!   cache), and how a verified IdP token's claims become roles.
//! - [`keys`]: the root key (where its private half lives, rotation) and the `admin.jwt`
//!   the server keeps fresh.
//! - [`server`]: wiring for `evstor serve`: data directory, bootstrap, TLS, listeners.

pub mod api;
pub mod cluster;
pub mod dataplane;
pub mod domain;
pub mod edge;
pub mod error;
pub mod idp;
pub mod keys;
pub mod limits;
pub mod logs;
pub mod metrics;
pub mod reconcile;
pub mod server;
pub mod store;

pub use error::ControlError;
