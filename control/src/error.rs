//! The control plane's error type: domain refusals plus everything the edges can hit.

use crate::domain::DomainError;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error("journal: {0}")]
    Journal(#[from] evstor_journal::JournalError),
    #[error("event {seq} cannot be decoded: {reason}")]
    Codec { seq: u64, reason: String },
    #[error("projection row {key} cannot be decoded: {reason}")]
    Projection { key: String, reason: String },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Internal(String),
    #[error("request body not received within its deadline")]
    RequestBodyDeadline,
    /// The cluster log could not order the change (etcd unreachable or without quorum):
    /// not acknowledged; whether it will still apply is unknown until etcd answers again.
    #[error(
        "the cluster cannot order changes now (etcd: {0}); the change was not acknowledged, \
         retry when etcd has quorum"
    )]
    ClusterUnavailable(String),
    /// An orchestrator append from an epoch that no longer leads.
    #[error("refused: this server no longer leads the cluster ({0})")]
    Fenced(String),
    #[error(transparent)]
    Etcd(#[from] crate::cluster::etcd::EtcdError),
}
