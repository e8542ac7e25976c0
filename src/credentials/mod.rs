//! Managed credentials (issue 17): long-lived PATs declared in the policy's
//! `credentials:` section that rotate themselves every `rotation_period`
//! with an `overlap` during which the previous version stays valid.
//!
//! Knows no SQL and no HTTP: it speaks to [`crate::store::Store`] and
//! [`crate::upstream::PatClient`], like `leases`. [`Credentials`] is the
//! handle the API layer holds; the engine (rotation, revocation, retirement)
//! runs as background work started by `server`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use secrecy::SecretString;

use crate::domain::{Identity, Timestamp};
use crate::error::{ErrorCode, ServiceError};
use crate::store::StoreError;
use crate::upstream::UpstreamError;

pub use crate::domain::VersionState;

/// When the previous version is revoked after a manual rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RevokePrevious {
    /// Routine: the previous version stays valid for the overlap.
    #[default]
    AfterOverlap,
    /// A leak: the previous version goes on the revocation queue at once.
    Now,
}

/// One version of a managed credential, without its token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialVersion {
    /// The credential's name in the policy.
    pub credential: String,
    /// 1, 2, ... per credential, in minting order.
    pub version: i64,
    /// Where it is in its life.
    pub state: VersionState,
    /// Its organization.
    pub organization: String,
    /// Its scopes, as upstream spells them.
    pub scopes: Vec<String>,
    /// Upstream's authorizationId, once minted.
    pub authorization_id: Option<uuid::Uuid>,
    /// When it was (or is to be) minted, i.e. became CURRENT.
    pub valid_from: Timestamp,
    /// When the next version is minted (this one turns PREVIOUS).
    pub rotate_time: Timestamp,
    /// The PAT's validTo upstream.
    pub expire_time: Timestamp,
    /// When revocation began, if it did.
    pub revoke_time: Option<Timestamp>,
}

/// A version with its token. Debug redacts the token.
#[derive(Clone, Debug)]
pub struct CredentialToken {
    /// The version.
    pub version: CredentialVersion,
    /// The PAT.
    pub token: SecretString,
}

/// Why a managed-credential operation failed. `reason()` values are stable
/// API.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// No credential of that name in the policy (nor a stored one).
    #[error("credential {name:?} not found")]
    NotFound {
        /// The name asked for.
        name: String,
    },
    /// The credential was removed from the policy and retired.
    #[error("credential {name:?} is retired")]
    Retired {
        /// The name asked for.
        name: String,
    },
    /// The credential has no CURRENT version yet (or its rotation keeps
    /// failing); retry shortly.
    #[error("credential {name:?} has no valid version yet")]
    NoValidVersion {
        /// The name asked for.
        name: String,
    },
    /// Another replica is minting the next version right now; retry shortly.
    #[error("credential {name:?} is being rotated; retry shortly")]
    Busy {
        /// The name asked for.
        name: String,
    },
    /// Upstream failed.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A sealed token could not be opened, or a state the rules do not
    /// expect; the text is for logs and carries no secret.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServiceError for CredentialError {
    fn code(&self) -> ErrorCode {
        match self {
            CredentialError::NotFound { .. } => ErrorCode::NotFound,
            CredentialError::Retired { .. } => ErrorCode::FailedPrecondition,
            CredentialError::NoValidVersion { .. } | CredentialError::Busy { .. } => {
                ErrorCode::Unavailable
            }
            CredentialError::Upstream(e) => e.code(),
            CredentialError::Store(e) => e.code(),
            CredentialError::Internal(_) => ErrorCode::Internal,
        }
    }
    fn reason(&self) -> &'static str {
        match self {
            CredentialError::NotFound { .. } => "CREDENTIAL_NOT_FOUND",
            CredentialError::Retired { .. } => "CREDENTIAL_RETIRED",
            CredentialError::NoValidVersion { .. } => "CREDENTIAL_NO_VALID_VERSION",
            CredentialError::Busy { .. } => "CREDENTIAL_BUSY",
            CredentialError::Upstream(e) => e.reason(),
            CredentialError::Store(e) => e.reason(),
            CredentialError::Internal(_) => "INTERNAL",
        }
    }
    fn retry_after(&self) -> Option<Duration> {
        match self {
            CredentialError::NoValidVersion { .. } | CredentialError::Busy { .. } => {
                Some(Duration::from_secs(1))
            }
            CredentialError::Upstream(e) => e.retry_after(),
            CredentialError::Store(e) => e.retry_after(),
            _ => None,
        }
    }
}

/// A stream of versions ([`Credentials::watch`]).
pub type VersionStream =
    Pin<Box<dyn Stream<Item = Result<CredentialToken, CredentialError>> + Send + 'static>>;

/// The managed-credential service: a cheap `Clone` handle built at server
/// start and held by the API layer.
#[derive(Clone)]
pub struct Credentials {
    inner: Arc<Inner>,
}

struct Inner {}

impl Credentials {
    /// A handle with no engine behind it (placeholder until the engine is
    /// wired): every call answers `NotFound`.
    pub fn unavailable() -> Self {
        Credentials {
            inner: Arc::new(Inner {}),
        }
    }

    /// The CURRENT version of credential `name` with its token.
    ///
    /// Errors: `NotFound` (not in the policy and never stored), `Retired`,
    /// `NoValidVersion` (not minted yet), `Store`, `Internal`.
    pub async fn current(&self, name: &str) -> Result<CredentialToken, CredentialError> {
        let _ = &self.inner;
        Err(CredentialError::NotFound {
            name: name.to_owned(),
        })
    }

    /// The versions of `name` as they become CURRENT: the current one at
    /// once (unless `after_version` is it or newer), then every newer version
    /// in order without gaps (versions that never became CURRENT, i.e.
    /// FAILED ones, are skipped), learnt across replicas. The stream ends
    /// after an error item.
    pub fn watch(&self, name: &str, after_version: Option<i64>) -> VersionStream {
        let _ = after_version;
        let name = name.to_owned();
        Box::pin(futures::stream::once(async move {
            Err(CredentialError::NotFound { name })
        }))
    }

    /// Mints the next version of `name` now; with [`RevokePrevious::Now`]
    /// the previous version goes on the revocation queue at once, else it
    /// stays valid for the overlap. Returns the new CURRENT version.
    ///
    /// Errors: `NotFound`, `Retired`, `Busy` (another replica is minting),
    /// `Upstream` (the version is FAILED; the engine retries), `Store`.
    pub async fn rotate(
        &self,
        name: &str,
        revoke_previous: RevokePrevious,
    ) -> Result<CredentialVersion, CredentialError> {
        let _ = revoke_previous;
        Err(CredentialError::NotFound {
            name: name.to_owned(),
        })
    }

    /// Every version of every credential, grouped by credential (by name),
    /// newest version first within each; no tokens.
    pub async fn list(&self) -> Result<Vec<CredentialVersion>, CredentialError> {
        Ok(Vec::new())
    }

    /// Whether `identity` is a reader of credential `name` in the policy in
    /// force (reloaded live): listed in `readers` (exact or glob) or matched
    /// by `reader_regexes`, as a rule's identities. False for an unknown
    /// name.
    pub fn reader_allowed(&self, name: &str, identity: &Identity) -> bool {
        let _ = (name, identity);
        false
    }
}
