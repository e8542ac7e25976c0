//! The upstream Azure DevOps PAT Lifecycle Management API
//! (docs/upstream-api.md, PAT Lifecycle Management API), behind the
//! [`PatClient`] trait.
//!
//! The real implementation is [`azure_devops::AzureDevOpsClient`] (reqwest);
//! its bearer token comes from an [`entra`] token source. Tests and `dev`
//! point it at the emulator over HTTP.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use secrecy::SecretString;
use uuid::Uuid;

use crate::domain::{AuthorizationId, Organization};
use crate::error::{ErrorCode, ServiceError};

pub mod azure_devops;
pub mod credential;
pub mod device_code;
pub mod entra;
pub mod metrics;
pub mod pages;
pub mod wire;

pub use pages::{ListCursor, PatPages};

/// A PAT as upstream describes it (`PatToken`).
#[derive(Clone, Debug)]
pub struct PatToken {
    /// `authorizationId`.
    pub authorization_id: AuthorizationId,
    /// `displayName`.
    pub display_name: String,
    /// `scope`: space-separated scopes, as upstream returned it.
    pub scope: String,
    /// `targetAccounts`: organization GUIDs; None for a global PAT.
    pub target_accounts: Option<Vec<Uuid>>,
    /// `token`: the secret, present only in a create response.
    pub token: Option<SecretString>,
    /// `validFrom` (UTC).
    pub valid_from: DateTime<Utc>,
    /// `validTo` (UTC), as upstream stored it (rounded, maybe clamped).
    pub valid_to: DateTime<Utc>,
}

/// `PatTokenCreateRequest`. `allOrgs` is always sent as false.
#[derive(Clone, Debug)]
pub struct CreatePat {
    /// `displayName`.
    pub display_name: String,
    /// `scope`: space-separated.
    pub scope: String,
    /// `validTo` (UTC).
    pub valid_to: DateTime<Utc>,
}

/// `PatTokenUpdateRequest`; None fields are omitted (upstream keeps them).
#[derive(Clone, Debug)]
pub struct UpdatePat {
    /// `authorizationId`, sent in the body.
    pub authorization_id: AuthorizationId,
    /// `displayName`.
    pub display_name: Option<String>,
    /// `scope`.
    pub scope: Option<String>,
    /// `validTo` (UTC).
    pub valid_to: Option<DateTime<Utc>>,
}

/// What a list found. `complete` is false when paging stopped before the
/// last page (an empty page with a continuation token, a page without new
/// PATs, or a repeated token): `pats` then holds what was read, and a PAT
/// not in it may still exist upstream. Act on the PATs found; never
/// conclude from an incomplete list that a PAT is absent.
#[derive(Clone, Debug, Default)]
pub struct PatList {
    /// PATs read, each authorizationId once, in upstream's order.
    pub pats: Vec<PatToken>,
    /// True when every page was read (the last carried no continuation
    /// token).
    pub complete: bool,
}

/// `displayFilterOption` of the list operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DisplayFilter {
    /// Not revoked and not expired.
    Active,
    /// Revoked.
    Revoked,
    /// Expired.
    Expired,
    /// Everything.
    All,
}

/// Query of the list operation; None fields are not sent.
#[derive(Clone, Debug, Default)]
pub struct ListPats {
    /// `displayFilterOption`.
    pub display_filter: Option<DisplayFilter>,
    /// `$top`, at most 100.
    pub top: Option<u32>,
}

/// `patTokenError` (`SessionTokenError`), every value of SPEC-7.2 at HEAD,
/// with a fallback for values added later.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PatTokenError {
    /// A known value, in the spec's camelCase spelling.
    Known(&'static str),
    /// A value this build does not know.
    Unknown(String),
}

/// Every `SessionTokenError` value of SPEC-7.2 at commit `8a1dfde`, in spec
/// order (docs/upstream-api.md, Refusals: patTokenError).
pub const PAT_TOKEN_ERRORS: [&str; 37] = [
    "none",
    "displayNameRequired",
    "invalidDisplayName",
    "invalidValidTo",
    "invalidScope",
    "userIdRequired",
    "invalidUserId",
    "invalidUserType",
    "accessDenied",
    "failedToIssueAccessToken",
    "invalidClient",
    "invalidClientType",
    "invalidClientId",
    "invalidTargetAccounts",
    "hostAuthorizationNotFound",
    "authorizationNotFound",
    "failedToUpdateAccessToken",
    "sourceNotSupported",
    "invalidSourceIP",
    "invalidSource",
    "duplicateHash",
    "sshPolicyDisabled",
    "invalidToken",
    "tokenNotFound",
    "invalidAuthorizationId",
    "failedToReadTenantPolicy",
    "globalPatPolicyViolation",
    "fullScopePatPolicyViolation",
    "patLifespanPolicyViolation",
    "invalidTokenType",
    "invalidAudience",
    "invalidSubject",
    "deploymentHostNotSupported",
    "disablePatCreationPolicyViolation",
    "failedToReadOrgPolicy",
    "globalPATCreationBlocked",
    "expiredPatCannotBeExtended",
];

impl PatTokenError {
    /// Parses a `patTokenError` value. Known values match case-insensitively
    /// (the service is .NET; `globalPATCreationBlocked` breaks the camelCase
    /// pattern) and keep the spec's spelling; anything else is `Unknown`.
    pub fn parse(value: &str) -> Self {
        PAT_TOKEN_ERRORS
            .iter()
            .find(|known| known.eq_ignore_ascii_case(value))
            .map(|known| PatTokenError::Known(known))
            .unwrap_or_else(|| PatTokenError::Unknown(value.to_owned()))
    }

    /// The value as upstream spells it.
    pub fn as_str(&self) -> &str {
        match self {
            PatTokenError::Known(value) => value,
            PatTokenError::Unknown(value) => value,
        }
    }

    /// True for `none`: no error.
    pub fn is_none(&self) -> bool {
        matches!(self, PatTokenError::Known("none"))
    }
}

impl std::fmt::Display for PatTokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PatTokenError::Known(value) => f.write_str(value),
            PatTokenError::Unknown(value) => write!(f, "{value} (unknown value)"),
        }
    }
}

/// Why an upstream call failed. Never carries a token or bearer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// HTTP 200 with `patToken: null` and `patTokenError` != none.
    #[error("upstream refused the request: {error}{}", message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Refused {
        /// The `patTokenError` value.
        error: PatTokenError,
        /// `patTokenErrorMessage`, if sent.
        message: Option<String>,
    },
    /// 203/302/HTML sign-in page, 401, or the token endpoint refusing.
    #[error("upstream authentication failed: {0}")]
    Authentication(String),
    /// 429 (after the client's own waiting), with the advised wait.
    #[error("upstream is throttling requests")]
    RateLimited {
        /// `Retry-After`, if sent.
        retry_after: Option<Duration>,
    },
    /// 5xx, timeouts, connection failures (after retries, where allowed).
    #[error("upstream unavailable: {0}")]
    Unavailable(String),
    /// 400: upstream could not read the request (a client bug, or a value
    /// upstream reads differently). Carries upstream's `typeKey: message`,
    /// at most 300 characters, control characters replaced; the requests
    /// the broker sends carry no secret in their body, so none is echoed.
    #[error("upstream rejected the request as malformed: {0}")]
    BadRequest(String),
    /// An answer that does not fit the documented API.
    #[error("unexpected upstream answer: {0}")]
    Protocol(String),
}

impl UpstreamError {
    /// True when upstream says the PAT does not exist (`authorizationNotFound`
    /// or `tokenNotFound`): for revoke, the PAT is gone, which is the goal.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            UpstreamError::Refused { error: PatTokenError::Known(e), .. }
                if *e == "authorizationNotFound" || *e == "tokenNotFound"
        )
    }
}

impl ServiceError for UpstreamError {
    fn code(&self) -> ErrorCode {
        match self {
            UpstreamError::Refused { .. } => ErrorCode::FailedPrecondition,
            // Authentication: the broker's own upstream credential was
            // refused; nothing the caller can fix, but an operator can
            // (re-seed it), so unavailable rather than internal.
            UpstreamError::RateLimited { .. }
            | UpstreamError::Unavailable(_)
            | UpstreamError::Authentication(_) => ErrorCode::Unavailable,
            // The request as asked cannot be served upstream: retrying the
            // same request will not help, and upstream's message says why.
            UpstreamError::BadRequest(_) => ErrorCode::FailedPrecondition,
            UpstreamError::Protocol(_) => ErrorCode::Internal,
        }
    }
    fn reason(&self) -> &'static str {
        match self {
            UpstreamError::Refused { .. } => "UPSTREAM_POLICY_VIOLATION",
            UpstreamError::RateLimited { .. } | UpstreamError::Unavailable(_) => {
                "UPSTREAM_UNAVAILABLE"
            }
            UpstreamError::Authentication(_) => "UPSTREAM_AUTHENTICATION_FAILED",
            UpstreamError::BadRequest(_) => "UPSTREAM_BAD_REQUEST",
            UpstreamError::Protocol(_) => "UPSTREAM_PROTOCOL_ERROR",
        }
    }
    fn retry_after(&self) -> Option<Duration> {
        match self {
            UpstreamError::RateLimited { retry_after } => *retry_after,
            UpstreamError::Unavailable(_) => Some(Duration::from_secs(1)),
            _ => None,
        }
    }
}

/// The five PAT Lifecycle operations, each against one organization.
#[async_trait]
pub trait PatClient: Send + Sync + 'static {
    /// `POST /{org}/_apis/tokens/pats`. Never retried blindly after a
    /// timeout or 5xx: the caller looks for the display name first.
    async fn create(&self, org: &Organization, req: &CreatePat) -> Result<PatToken, UpstreamError>;
    /// `GET /{org}/_apis/tokens/pats?authorizationId=`.
    async fn get(&self, org: &Organization, id: AuthorizationId)
        -> Result<PatToken, UpstreamError>;
    /// `GET /{org}/_apis/tokens/pats` following every page; deduplicated by
    /// authorizationId; stops on an empty, repeated or fruitless token and
    /// then answers `complete: false` with what it read.
    async fn list(&self, org: &Organization, query: &ListPats) -> Result<PatList, UpstreamError>;
    /// One page of that list: the one `cursor` stands at (the first, for a
    /// new cursor), with the same options as every page before; returns
    /// its PATs as [`ListCursor::accept`] hands them out (maybe none) and
    /// moves `cursor` on. Nothing is sent once `cursor` has ended (empty
    /// answer); an error, with nothing sent, once it has read the client's
    /// most pages. Memory does not grow with the listing: see [`pages`].
    async fn list_page(
        &self,
        org: &Organization,
        query: &ListPats,
        cursor: &mut ListCursor,
    ) -> Result<Vec<PatToken>, UpstreamError>;
    /// `PUT /{org}/_apis/tokens/pats`.
    async fn update(&self, org: &Organization, req: &UpdatePat) -> Result<PatToken, UpstreamError>;
    /// `DELETE /{org}/_apis/tokens/pats?authorizationId=`.
    async fn revoke(&self, org: &Organization, id: AuthorizationId) -> Result<(), UpstreamError>;
}
