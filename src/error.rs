//! The closed set of error codes every module's error maps to.
//!
//! Each module keeps its own `thiserror` enum and implements [`ServiceError`]
//! for it; `api::status` turns any of them into a `tonic::Status` once, at the
//! edge. Nothing below `api` knows tonic.

use std::time::Duration;

/// What kind of failure an error is, independent of transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// The request is malformed; [`ServiceError::field`] names the field.
    InvalidArgument,
    /// No valid caller credential.
    Unauthenticated,
    /// The caller is known but not allowed.
    PermissionDenied,
    /// The named resource does not exist (or is not the caller's).
    NotFound,
    /// Something with that key exists already with other parameters.
    AlreadyExists,
    /// The resource is not in a state that allows the call.
    FailedPrecondition,
    /// A quota or rate limit was hit.
    ResourceExhausted,
    /// A concurrent change to the same resource won; read it again and
    /// retry.
    Aborted,
    /// A dependency (database, upstream) cannot serve now; retry later.
    Unavailable,
    /// The call took too long.
    DeadlineExceeded,
    /// A bug or an unexpected state; details are logged, never returned.
    Internal,
}

/// Implemented by every module's error type so the edge can map it once.
pub trait ServiceError: std::error::Error {
    /// The error's code.
    fn code(&self) -> ErrorCode;
    /// Stable, machine-readable reason, UPPER_SNAKE_CASE (google.rpc.ErrorInfo.reason).
    fn reason(&self) -> &'static str;
    /// The request field at fault, for INVALID_ARGUMENT (google.rpc.BadRequest).
    fn field(&self) -> Option<&str> {
        None
    }
    /// How long the caller should wait before retrying (google.rpc.RetryInfo).
    fn retry_after(&self) -> Option<Duration> {
        None
    }
}
