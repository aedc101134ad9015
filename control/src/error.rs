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
}
