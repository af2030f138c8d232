//! Errors of the REST API: the protocol's error codes as JSON
//! `{"code", "message"}`, with the HTTP status each code maps to
//! (`ErrorCode::http_status`, the one table shared by every edge).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use switchboard_mesh::{ErrorCode, ServiceError};

/// The body of every error answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// One of the protocol's error codes: `INVALID_JSON`, `INVALID_FRAME`,
    /// `NOT_AUTHENTICATED`, `FORBIDDEN`, `INVALID_RECIPIENT`,
    /// `NOT_A_MEMBER`, `PAYLOAD_TOO_LARGE`, `RATE_LIMITED`, `UNKNOWN_TYPE`,
    /// `UNAVAILABLE`, `INTERNAL`.
    #[schema(example = "INVALID_FRAME")]
    pub code: &'static str,
    /// What was wrong, for people.
    #[schema(example = "missing field `content`")]
    pub message: String,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            status: status_of(code),
            code,
            message: message.into(),
        }
    }

    /// The status is not the code's own: 404 for an unknown path, 415 for
    /// a body that is not JSON.
    pub fn with_status(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl ApiError {
    /// The answer's HTTP status (for the property checks).
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    pub(crate) fn code(&self) -> ErrorCode {
        self.code
    }
}

fn status_of(code: ErrorCode) -> StatusCode {
    StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        ApiError::new(e.code, e.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code.as_str(),
            message: self.message,
        };
        (self.status, axum::Json(body)).into_response()
    }
}
