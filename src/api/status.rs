//! The one place any [`ServiceError`] becomes a `tonic::Status`.
//!
//! Every status carries `google.rpc.ErrorInfo` (domain `tokenbroker`, the
//! error's stable reason); INVALID_ARGUMENT adds `google.rpc.BadRequest`
//! naming the field; retryable errors add `google.rpc.RetryInfo`. Internal
//! and unavailable errors are logged with their detail here and answered
//! with a generic message, so nothing internal (SQL, hostnames, upstream
//! bodies) reaches a client.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt as _};

use crate::error::{ErrorCode, ServiceError};
use crate::leases::LeaseError;

/// `google.rpc.ErrorInfo.domain` of every error this service returns.
pub const ERROR_DOMAIN: &str = "tokenbroker";

/// Longest `BadRequest.FieldViolation.description`, in characters: errors
/// may echo request values, and gRPC carries both the message and the
/// details in response headers (grpc-message, grpc-status-details-bin),
/// which clients cap at a few KiB.
pub const MAX_DESCRIPTION_CHARS: usize = 200;
/// Longest status message, in characters (same reason).
pub const MAX_MESSAGE_CHARS: usize = 400;

/// `text` cut to at most `max` characters, ending in `…` when cut.
pub fn bounded(text: &str, max: usize) -> String {
    match text.char_indices().nth(max.saturating_sub(1)) {
        Some((end, _)) if text.chars().count() > max => format!("{}…", &text[..end]),
        _ => text.to_owned(),
    }
}

/// Reason of [`crate::upstream::UpstreamError::Authentication`].
const UPSTREAM_AUTHENTICATION_FAILED: &str = "UPSTREAM_AUTHENTICATION_FAILED";
/// What a caller is told when upstream refuses the broker's own credential
/// (its Entra refresh token): retrying will not help until it is re-seeded.
pub const UPSTREAM_CREDENTIAL_REFUSED: &str = "upstream refused the broker's credential \
     (UPSTREAM_AUTHENTICATION_FAILED); an operator must re-seed it: `token-broker upstream \
     login`, or `token-broker upstream set-refresh-token` with the token on stdin \
     (`token-broker upstream status` shows why)";

/// The gRPC code for an [`ErrorCode`].
pub fn grpc_code(code: ErrorCode) -> Code {
    match code {
        ErrorCode::InvalidArgument => Code::InvalidArgument,
        ErrorCode::Unauthenticated => Code::Unauthenticated,
        ErrorCode::PermissionDenied => Code::PermissionDenied,
        ErrorCode::NotFound => Code::NotFound,
        ErrorCode::AlreadyExists => Code::AlreadyExists,
        ErrorCode::FailedPrecondition => Code::FailedPrecondition,
        ErrorCode::ResourceExhausted => Code::ResourceExhausted,
        ErrorCode::Aborted => Code::Aborted,
        ErrorCode::Unavailable => Code::Unavailable,
        ErrorCode::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorCode::Internal => Code::Internal,
    }
}

/// Maps `err` to a status with rich error details (see the module doc).
pub fn to_status<E: ServiceError + ?Sized>(err: &E) -> Status {
    let code = err.code();
    let reason = err.reason();
    let message = match code {
        ErrorCode::Internal => {
            tracing::error!(reason, error = %err, "internal error");
            "internal error".to_owned()
        }
        ErrorCode::Unavailable if reason == UPSTREAM_AUTHENTICATION_FAILED => {
            tracing::error!(reason, error = %err, "upstream refused the broker's credential");
            UPSTREAM_CREDENTIAL_REFUSED.to_owned()
        }
        ErrorCode::Unavailable => {
            tracing::warn!(reason, error = %err, "dependency unavailable");
            format!("temporarily unavailable ({reason}); retry later")
        }
        _ => bounded(&err.to_string(), MAX_MESSAGE_CHARS),
    };
    let mut details = ErrorDetails::new();
    details.set_error_info(reason, ERROR_DOMAIN, HashMap::<String, String>::new());
    if let Some(field) = err.field() {
        details.set_bad_request(vec![FieldViolation {
            field: field.to_owned(),
            description: bounded(&message, MAX_DESCRIPTION_CHARS),
            reason: reason.to_owned(),
            localized_message: None,
        }]);
    }
    if let Some(delay) = err.retry_after() {
        details.set_retry_info(Some(delay));
    }
    Status::with_error_details(grpc_code(code), message, details)
}

/// A request field that failed validation at the edge. `field` is the proto
/// field name (`organization`, `scopes`, `ttl`, ...).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidField {
    /// Proto field name.
    pub field: &'static str,
    /// Stable reason, e.g. `SCOPE_UNKNOWN`.
    pub reason: &'static str,
    /// What is wrong, for a human. Never contains secrets.
    pub message: String,
}

impl InvalidField {
    /// A violation of `field` with a stable `reason`.
    pub fn new(field: &'static str, reason: &'static str, message: impl Into<String>) -> Self {
        InvalidField {
            field,
            reason,
            message: message.into(),
        }
    }
}

impl ServiceError for InvalidField {
    fn code(&self) -> ErrorCode {
        ErrorCode::InvalidArgument
    }
    fn reason(&self) -> &'static str {
        self.reason
    }
    fn field(&self) -> Option<&str> {
        Some(self.field)
    }
}

impl From<InvalidField> for Status {
    fn from(e: InvalidField) -> Status {
        to_status(&e)
    }
}

impl From<LeaseError> for Status {
    fn from(e: LeaseError) -> Status {
        to_status(&e)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::auth::AuthError;
    use crate::domain::LeaseState;
    use crate::policy::Denial;
    use crate::store::StoreError;
    use crate::upstream::{PatTokenError, UpstreamError};

    struct Seen {
        code: Code,
        reason: String,
        domain: String,
        field: Option<String>,
        retry: Option<Duration>,
        message: String,
    }

    fn seen<E: ServiceError>(e: E) -> Seen {
        let status = to_status(&e);
        let info = status.get_details_error_info().expect("ErrorInfo");
        Seen {
            code: status.code(),
            reason: info.reason,
            domain: info.domain,
            field: status
                .get_details_bad_request()
                .and_then(|b| b.field_violations.first().map(|v| v.field.clone())),
            retry: status.get_details_retry_info().and_then(|r| r.retry_delay),
            message: status.message().to_owned(),
        }
    }

    #[test]
    fn policy_denials_are_permission_denied_with_the_reason_saying_which_check() {
        for (denial, reason) in [
            (Denial::NoMatchingRule, "NO_MATCHING_RULE"),
            (Denial::OrganizationNotAllowed, "ORGANIZATION_NOT_ALLOWED"),
            (Denial::ScopeNotAllowed, "SCOPE_NOT_ALLOWED"),
            (Denial::TtlExceedsMax, "TTL_EXCEEDS_MAX"),
        ] {
            let s = seen(LeaseError::Denied { denial, rule: None });
            assert_eq!(s.code, Code::PermissionDenied);
            assert_eq!(s.reason, reason);
            assert_eq!(s.domain, "tokenbroker");
            assert_eq!(s.field, None);
        }
    }

    #[test]
    fn each_lease_error_maps_to_its_code_and_reason() {
        let cases: Vec<(LeaseError, Code, &str)> = vec![
            (LeaseError::NotFound, Code::NotFound, "LEASE_NOT_FOUND"),
            (
                LeaseError::RequestIdReused,
                Code::AlreadyExists,
                "REQUEST_ID_REUSED",
            ),
            (
                LeaseError::NotRenewable(LeaseState::Revoked),
                Code::FailedPrecondition,
                "LEASE_NOT_RENEWABLE",
            ),
            (
                LeaseError::AtMaxExpireTime(crate::domain::Timestamp::now()),
                Code::FailedPrecondition,
                "LEASE_NOT_RENEWABLE",
            ),
            (
                LeaseError::QuotaExceeded,
                Code::ResourceExhausted,
                "ACTIVE_LEASE_QUOTA_EXCEEDED",
            ),
            (
                LeaseError::InProgress,
                Code::Unavailable,
                "REQUEST_IN_PROGRESS",
            ),
            (LeaseError::StillPending, Code::Unavailable, "LEASE_PENDING"),
            (
                LeaseError::Crypto(crate::crypto::CryptoError::Unauthentic),
                Code::Internal,
                "INTERNAL",
            ),
        ];
        for (err, code, reason) in cases {
            let s = seen(err);
            assert_eq!((s.code, s.reason.as_str()), (code, reason));
        }
    }

    #[test]
    fn a_bad_page_token_names_the_field() {
        let s = seen(LeaseError::InvalidPageToken);
        assert_eq!(s.code, Code::InvalidArgument);
        assert_eq!(s.reason, "INVALID_PAGE_TOKEN");
        assert_eq!(s.field.as_deref(), Some("page_token"));
    }

    #[test]
    fn a_request_in_progress_tells_the_caller_when_to_retry() {
        let s = seen(LeaseError::InProgress);
        assert_eq!(s.retry, Some(Duration::from_secs(1)));
    }

    #[test]
    fn upstream_errors_map_to_codes_with_retry_info_when_retrying_helps() {
        let s = seen(UpstreamError::RateLimited {
            retry_after: Some(Duration::from_secs(7)),
        });
        assert_eq!(s.code, Code::Unavailable);
        assert_eq!(s.reason, "UPSTREAM_UNAVAILABLE");
        assert_eq!(s.retry, Some(Duration::from_secs(7)));

        let s = seen(UpstreamError::Unavailable(
            "connect to 10.0.0.7 refused".into(),
        ));
        assert_eq!(s.code, Code::Unavailable);
        assert!(!s.message.contains("10.0.0.7"), "{}", s.message);
        assert!(s.retry.is_some());

        let s = seen(LeaseError::Upstream(UpstreamError::Refused {
            error: PatTokenError::Known("fullScopePatPolicyViolation"),
            message: None,
        }));
        assert_eq!(s.code, Code::FailedPrecondition);
        assert_eq!(s.reason, "UPSTREAM_POLICY_VIOLATION");

        let s = seen(UpstreamError::Authentication("AADSTS700082 expired".into()));
        assert_eq!(s.code, Code::Unavailable);
        assert_eq!(s.reason, "UPSTREAM_AUTHENTICATION_FAILED");
        assert_eq!(s.message, UPSTREAM_CREDENTIAL_REFUSED);
        assert!(s.message.contains("re-seed"), "{}", s.message);
        assert!(!s.message.contains("AADSTS700082"), "{}", s.message);
        assert_eq!(s.retry, None);

        let s = seen(LeaseError::Upstream(UpstreamError::BadRequest(
            "JsonReaderException: TF400898: An Internal Error Occurred.".into(),
        )));
        assert_eq!(
            (s.code, s.reason.as_str()),
            (Code::FailedPrecondition, "UPSTREAM_BAD_REQUEST")
        );
        assert!(
            s.message
                .ends_with("JsonReaderException: TF400898: An Internal Error Occurred."),
            "{}",
            s.message
        );
        assert_eq!(s.retry, None);

        let s = seen(UpstreamError::Protocol("html".into()));
        assert_eq!(
            (s.code, s.reason.as_str()),
            (Code::Internal, "UPSTREAM_PROTOCOL_ERROR")
        );
    }

    #[test]
    fn store_errors_are_unavailable_or_a_generic_internal_error() {
        let s = seen(StoreError::Unavailable("pool timed out".into()));
        assert_eq!(
            (s.code, s.reason.as_str()),
            (Code::Unavailable, "STORE_UNAVAILABLE")
        );
        assert_eq!(s.retry, Some(Duration::from_secs(1)));
        assert!(!s.message.contains("pool timed out"), "{}", s.message);
        let s = seen(LeaseError::Store(StoreError::Database(
            "duplicate key value violates leases_pkey".into(),
        )));
        assert_eq!((s.code, s.reason.as_str()), (Code::Internal, "INTERNAL"));
        assert_eq!(s.message, "internal error");
    }

    #[test]
    fn authentication_failures_are_unauthenticated_with_their_reason() {
        for e in [AuthError::Missing, AuthError::Malformed, AuthError::Invalid] {
            let s = seen(e);
            assert_eq!(s.code, Code::Unauthenticated);
            assert_eq!(s.reason, "UNAUTHENTICATED");
        }
    }

    #[test]
    fn echoed_values_are_cut_short_so_the_status_fits_in_its_headers() {
        let huge = "x".repeat(9000);
        let status = to_status(&InvalidField::new(
            "request_id",
            "REQUEST_ID_INVALID",
            format!("{huge:?} is not a UUID"),
        ));
        assert_eq!(status.message().chars().count(), MAX_MESSAGE_CHARS);
        assert!(status.message().ends_with('…'));
        let bad = status.get_details_bad_request().unwrap();
        let description = &bad.field_violations[0].description;
        assert_eq!(description.chars().count(), MAX_DESCRIPTION_CHARS);
        assert!(description.starts_with("request_id: "));
        // Short messages, and multi-byte characters at the cut, are safe.
        assert_eq!(bounded("short", 200), "short");
        assert_eq!(bounded("ééé", 2), "é…");
        assert_eq!(bounded("éé", 2), "éé");
    }

    #[test]
    fn a_validation_error_is_invalid_argument_naming_the_field() {
        let s = seen(InvalidField::new(
            "ttl",
            "TTL_OUT_OF_RANGE",
            "must be positive",
        ));
        assert_eq!(s.code, Code::InvalidArgument);
        assert_eq!(s.reason, "TTL_OUT_OF_RANGE");
        assert_eq!(s.field.as_deref(), Some("ttl"));
        assert!(s.message.contains("ttl"));
    }
}
