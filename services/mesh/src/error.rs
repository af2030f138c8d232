use std::fmt;

/// The one error code shared by every edge: protocol `ERROR` frames, gRPC
/// status codes and HTTP statuses all derive from it here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidJson,
    UnknownType,
    InvalidFrame,
    NotAuthenticated,
    Forbidden,
    InvalidRecipient,
    NotAMember,
    PayloadTooLarge,
    RateLimited,
    Unavailable,
    Internal,
    /// The recipient's inbox holds its quota of messages or bytes.
    InboxFull,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::InvalidJson,
        ErrorCode::UnknownType,
        ErrorCode::InvalidFrame,
        ErrorCode::NotAuthenticated,
        ErrorCode::Forbidden,
        ErrorCode::InvalidRecipient,
        ErrorCode::NotAMember,
        ErrorCode::PayloadTooLarge,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::InboxFull,
    ];

    /// The code as it appears in a protocol `ERROR` frame.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "INVALID_JSON",
            ErrorCode::UnknownType => "UNKNOWN_TYPE",
            ErrorCode::InvalidFrame => "INVALID_FRAME",
            ErrorCode::NotAuthenticated => "NOT_AUTHENTICATED",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::InvalidRecipient => "INVALID_RECIPIENT",
            ErrorCode::NotAMember => "NOT_A_MEMBER",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::InboxFull => "INBOX_FULL",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Internal => "INTERNAL",
        }
    }

    pub fn parse(s: &str) -> Option<ErrorCode> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    pub fn grpc_code(self) -> tonic::Code {
        match self {
            ErrorCode::InvalidJson | ErrorCode::UnknownType | ErrorCode::InvalidFrame => {
                tonic::Code::InvalidArgument
            }
            ErrorCode::NotAuthenticated => tonic::Code::Unauthenticated,
            ErrorCode::Forbidden => tonic::Code::PermissionDenied,
            ErrorCode::InvalidRecipient => tonic::Code::NotFound,
            ErrorCode::NotAMember => tonic::Code::FailedPrecondition,
            ErrorCode::PayloadTooLarge => tonic::Code::OutOfRange,
            ErrorCode::RateLimited | ErrorCode::InboxFull => tonic::Code::ResourceExhausted,
            ErrorCode::Unavailable => tonic::Code::Unavailable,
            ErrorCode::Internal => tonic::Code::Internal,
        }
    }

    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidJson
            | ErrorCode::UnknownType
            | ErrorCode::InvalidFrame
            | ErrorCode::InvalidRecipient => 400,
            ErrorCode::NotAuthenticated => 401,
            ErrorCode::Forbidden | ErrorCode::NotAMember => 403,
            ErrorCode::PayloadTooLarge => 413,
            // A full inbox is the senders' doing, not a server fault (a
            // 5xx invites blind retries): 429, as gRPC's RESOURCE_EXHAUSTED.
            ErrorCode::RateLimited | ErrorCode::InboxFull => 429,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }

    fn from_grpc(code: tonic::Code) -> ErrorCode {
        match code {
            tonic::Code::InvalidArgument => ErrorCode::InvalidFrame,
            tonic::Code::Unauthenticated => ErrorCode::NotAuthenticated,
            tonic::Code::PermissionDenied => ErrorCode::Forbidden,
            tonic::Code::NotFound => ErrorCode::InvalidRecipient,
            tonic::Code::FailedPrecondition => ErrorCode::NotAMember,
            tonic::Code::OutOfRange => ErrorCode::PayloadTooLarge,
            tonic::Code::ResourceExhausted => ErrorCode::RateLimited,
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                ErrorCode::Unavailable
            }
            _ => ErrorCode::Internal,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error crossing a service boundary: a code every edge understands and a
/// message safe to show to the caller.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ServiceError {
    pub code: ErrorCode,
    pub message: String,
}

impl ServiceError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ServiceError {
            code,
            message: message.into(),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidFrame, message)
    }

    /// The called instance does not serve this key now (sharded delivery:
    /// the inbox is another instance's, or is moving to this one): the
    /// caller's pool tries again, at the owner of its next member list.
    pub fn moved(message: impl std::fmt::Display) -> Self {
        Self::unavailable(format!("{MOVED_PREFIX}{message}"))
    }

    /// Whether this is a [`ServiceError::moved`] answer.
    pub fn is_moved(&self) -> bool {
        self.code == ErrorCode::Unavailable && self.message.starts_with(MOVED_PREFIX)
    }
}

/// How a [`ServiceError::moved`] message starts (an UNAVAILABLE like any
/// other to callers that do not retry).
const MOVED_PREFIX: &str = "not served here now: ";

/// A short label for a gRPC status code (metrics).
pub(crate) fn status_label(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "ok",
        tonic::Code::InvalidArgument => "invalid_argument",
        tonic::Code::NotFound => "not_found",
        tonic::Code::Unauthenticated => "unauthenticated",
        tonic::Code::PermissionDenied => "permission_denied",
        tonic::Code::FailedPrecondition => "failed_precondition",
        tonic::Code::OutOfRange => "out_of_range",
        tonic::Code::ResourceExhausted => "resource_exhausted",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::DeadlineExceeded => "deadline_exceeded",
        tonic::Code::Cancelled => "cancelled",
        tonic::Code::Internal => "internal",
        _ => "other",
    }
}

/// Metadata key that carries the exact [`ErrorCode`] across gRPC, since several
/// codes share one `tonic::Code`.
pub(crate) const CODE_KEY: &str = "x-switchboard-error";

impl From<ServiceError> for tonic::Status {
    fn from(err: ServiceError) -> Self {
        let mut status = tonic::Status::new(err.code.grpc_code(), err.message);
        if let Ok(v) = err.code.as_str().parse() {
            status.metadata_mut().insert(CODE_KEY, v);
        }
        status
    }
}

impl From<tonic::Status> for ServiceError {
    fn from(status: tonic::Status) -> Self {
        let code = status
            .metadata()
            .get(CODE_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(ErrorCode::parse)
            .unwrap_or_else(|| ErrorCode::from_grpc(status.code()));
        ServiceError::new(code, status.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_survives_a_grpc_round_trip() {
        for code in ErrorCode::ALL {
            let status: tonic::Status = ServiceError::new(code, "m").into();
            let back = ServiceError::from(status);
            assert_eq!(back.code, code);
            assert_eq!(back.message, "m");
        }
    }

    #[test]
    fn a_foreign_status_maps_by_grpc_code() {
        let back = ServiceError::from(tonic::Status::unavailable("down"));
        assert_eq!(back.code, ErrorCode::Unavailable);
    }
}
