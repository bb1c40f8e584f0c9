//! One error vocabulary for both transports: an [`ErrorCode`] names what went wrong and gives
//! both the HTTP status and the gRPC code; every HTTP error has the body
//! `{"error": {"code", "message"}}`. Internal errors are logged in full where they are handled
//! and answered with a generic message and a request id, never with their own text.

use std::sync::atomic::{AtomicU64, Ordering};

use http::StatusCode;
use tonic::Code;

/// What went wrong, as clients see it. Each code's text is stable (clients match on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The request could not be read (malformed JSON, wrong types).
    BadRequest,
    /// No token, or one that does not verify.
    Unauthenticated,
    /// The token verifies but does not give access to what was asked (a presence room).
    Forbidden,
    /// No such path.
    NotFound,
    /// The path exists, not with this method.
    MethodNotAllowed,
    /// The body exceeds the configured limit.
    PayloadTooLarge,
    /// The body did not arrive within the configured time.
    RequestTimeout,
    /// Admission refused the stream: the server holds as many as it is configured for.
    TooManyConnections,
    /// Admission refused the stream: this user holds as many as one user may.
    TooManyStreams,
    /// Admission refused the request: this user asked for more than its rate.
    TooManyRequests,
    /// The client did not read its stream for the stall timeout.
    TooSlow,
    /// PostgreSQL is not reachable; retry.
    DatabaseUnavailable,
    /// The initial snapshot is still running, or the store cannot be read.
    NotReady,
    /// The server is stopping; retry elsewhere or later.
    ShuttingDown,
    /// A fault of the server's own; its details are in the server's log under the request id.
    Internal,
}

impl ErrorCode {
    /// The code's text, HTTP status and gRPC code: one table, so that the transports agree.
    fn parts(self) -> (&'static str, StatusCode, Code) {
        match self {
            ErrorCode::BadRequest => (
                "bad_request",
                StatusCode::BAD_REQUEST,
                Code::InvalidArgument,
            ),
            ErrorCode::Unauthenticated => (
                "unauthenticated",
                StatusCode::UNAUTHORIZED,
                Code::Unauthenticated,
            ),
            ErrorCode::Forbidden => ("forbidden", StatusCode::FORBIDDEN, Code::PermissionDenied),
            ErrorCode::NotFound => ("not_found", StatusCode::NOT_FOUND, Code::NotFound),
            ErrorCode::MethodNotAllowed => (
                "method_not_allowed",
                StatusCode::METHOD_NOT_ALLOWED,
                Code::Unimplemented,
            ),
            ErrorCode::PayloadTooLarge => (
                "payload_too_large",
                StatusCode::PAYLOAD_TOO_LARGE,
                Code::InvalidArgument,
            ),
            ErrorCode::RequestTimeout => (
                "request_timeout",
                StatusCode::REQUEST_TIMEOUT,
                Code::DeadlineExceeded,
            ),
            ErrorCode::TooManyConnections => (
                "too_many_connections",
                StatusCode::TOO_MANY_REQUESTS,
                Code::ResourceExhausted,
            ),
            ErrorCode::TooManyStreams => (
                "too_many_streams",
                StatusCode::TOO_MANY_REQUESTS,
                Code::ResourceExhausted,
            ),
            ErrorCode::TooManyRequests => (
                "too_many_requests",
                StatusCode::TOO_MANY_REQUESTS,
                Code::ResourceExhausted,
            ),
            ErrorCode::TooSlow => (
                "too_slow",
                StatusCode::TOO_MANY_REQUESTS,
                Code::ResourceExhausted,
            ),
            ErrorCode::DatabaseUnavailable => (
                "database_unavailable",
                StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable,
            ),
            ErrorCode::NotReady => (
                "not_ready",
                StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable,
            ),
            ErrorCode::ShuttingDown => (
                "shutting_down",
                StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable,
            ),
            ErrorCode::Internal => (
                "internal",
                StatusCode::INTERNAL_SERVER_ERROR,
                Code::Internal,
            ),
        }
    }

    pub fn as_str(self) -> &'static str {
        self.parts().0
    }

    pub fn http_status(self) -> StatusCode {
        self.parts().1
    }

    pub fn grpc_code(self) -> Code {
        self.parts().2
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An API error: a code and a message fit for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
        }
    }

    pub fn unauthenticated(e: crate::AuthError) -> ApiError {
        ApiError::new(ErrorCode::Unauthenticated, e.to_string())
    }

    /// A fault of the server's own: logged here in full with a new request id; the client gets
    /// the id and nothing of the error's text.
    pub fn internal(what: &str, error: &dyn std::fmt::Display) -> ApiError {
        let id = request_id();
        tracing::error!(request_id = %id, error = %error, "{what}");
        ApiError::new(
            ErrorCode::Internal,
            format!("internal error; the server's log has it under request id {id}"),
        )
    }

    /// The same error as a gRPC status.
    pub fn to_status(&self) -> tonic::Status {
        tonic::Status::new(self.code.grpc_code(), self.message.clone())
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> tonic::Status {
        e.to_status()
    }
}

/// A process-unique id for one failed request: the process start time and a counter, in hex.
fn request_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    });
    format!("{start:x}-{:x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_maps_to_one_http_status_and_one_grpc_code() {
        let all = [
            (ErrorCode::BadRequest, 400, Code::InvalidArgument),
            (ErrorCode::Unauthenticated, 401, Code::Unauthenticated),
            (ErrorCode::Forbidden, 403, Code::PermissionDenied),
            (ErrorCode::NotFound, 404, Code::NotFound),
            (ErrorCode::MethodNotAllowed, 405, Code::Unimplemented),
            (ErrorCode::PayloadTooLarge, 413, Code::InvalidArgument),
            (ErrorCode::TooManyConnections, 429, Code::ResourceExhausted),
            (ErrorCode::RequestTimeout, 408, Code::DeadlineExceeded),
            (ErrorCode::TooManyStreams, 429, Code::ResourceExhausted),
            (ErrorCode::TooSlow, 429, Code::ResourceExhausted),
            (ErrorCode::DatabaseUnavailable, 503, Code::Unavailable),
            (ErrorCode::NotReady, 503, Code::Unavailable),
            (ErrorCode::ShuttingDown, 503, Code::Unavailable),
            (ErrorCode::Internal, 500, Code::Internal),
        ];
        for (code, status, grpc) in all {
            assert_eq!(code.http_status().as_u16(), status, "{code}");
            assert_eq!(code.grpc_code(), grpc, "{code}");
        }
    }

    #[test]
    fn internal_errors_tell_the_client_nothing_but_a_request_id() {
        let e = ApiError::internal("reading the store", &"disk says: /secret/path is gone");
        assert_eq!(e.code, ErrorCode::Internal);
        assert!(!e.message.contains("secret"), "{}", e.message);
        assert!(e.message.contains("request id"), "{}", e.message);
        let other = ApiError::internal("again", &"x");
        assert_ne!(e.message, other.message, "ids differ");
    }
}
