//! Why a command was refused. The API maps these to gRPC codes and HTTP statuses in one place.

/// A refused command, with what a user needs to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The If-Match ETag did not match the current one.
    #[error("ETag mismatch: {0}")]
    EtagMismatch(String),
    /// The resource is in a state that forbids the operation for good (e.g. in use).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The resource is in a transient state (Creating, Deleting); retry later.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// The request conflicts with what the resource holds or does now (409).
    #[error("{0}")]
    Conflict(String),
    /// An orchestrator step from a leader epoch that is not (or no longer) the recorded one.
    #[error("{0}")]
    StaleEpoch(String),
}

impl DomainError {
    pub fn not_found(kind: &str, id: impl std::fmt::Display) -> Self {
        DomainError::NotFound(format!("{kind} {id} not found"))
    }

    pub fn exists(kind: &str, id: impl std::fmt::Display) -> Self {
        DomainError::AlreadyExists(format!("{kind} {id} already exists"))
    }
}
