//! The one place errors become HTTP: gRPC code, HTTP status and the gateway's JSON error body
//! `{"error": msg, "code": <grpc code>, "message": msg}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::domain::DomainError;
use crate::error::ControlError;

/// An error answered to an API client.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    /// The gRPC status code LightOS clients see in `code`.
    pub grpc_code: u32,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, grpc_code: u32, message: impl Into<String>) -> Self {
        ApiError {
            status,
            grpc_code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, 3, message)
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, 16, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, 7, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, 5, message)
    }

    pub fn unimplemented(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_IMPLEMENTED, 12, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, 13, message)
    }
}

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> Self {
        let (status, code) = match &e {
            DomainError::InvalidArgument(_) => (StatusCode::BAD_REQUEST, 3),
            DomainError::NotFound(_) => (StatusCode::NOT_FOUND, 5),
            DomainError::AlreadyExists(_) => (StatusCode::CONFLICT, 6),
            DomainError::PermissionDenied(_) => (StatusCode::FORBIDDEN, 7),
            DomainError::ResourceExhausted(_) => (StatusCode::TOO_MANY_REQUESTS, 8),
            DomainError::EtagMismatch(_) => (StatusCode::PRECONDITION_FAILED, 9),
            DomainError::FailedPrecondition(_) => (StatusCode::BAD_REQUEST, 9),
            DomainError::Unimplemented(_) => (StatusCode::NOT_IMPLEMENTED, 12),
            DomainError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, 14),
            DomainError::Conflict(_) | DomainError::StaleEpoch(_) => (StatusCode::CONFLICT, 10),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Domain(d) => d.into(),
            ControlError::ShuttingDown
            | ControlError::ClusterUnavailable(_)
            | ControlError::Fenced(_)
            | ControlError::Etcd(crate::cluster::etcd::EtcdError::Unavailable(_)) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, 14, e.to_string())
            }
            other => {
                tracing::error!("internal error: {other}");
                ApiError::internal(other.to_string())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": self.message,
            "code": self.grpc_code,
            "message": self.message,
        });
        (self.status, Json(body)).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
