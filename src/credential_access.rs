//! Who may read and operate managed credentials, and the audit trail of
//! every read and operation: the rules behind `CredentialService` and the
//! credential calls of `AdminService` (issue 17). The credentials
//! themselves (versions, rotation, the tokens) are [`crate::credentials`];
//! this module knows no tonic, like `leases`.
//!
//! - A read (GetCredential, each version a WatchCredential stream sends)
//!   needs a caller the credential's policy entry names as a reader
//!   ([`Credentials::reader_allowed`], the policy in force at that moment).
//!   A refusal is `CREDENTIAL_READER_REQUIRED`, also for a name the policy
//!   does not declare, so a non-reader learns no names.
//! - Every version handed out is audited first and only then handed out
//!   (fail closed, as a lease grant): `credential.get` / `credential.watch`
//!   with the credential (`policy_rule` `credential:NAME`) and the version
//!   number (`caller_detail` `version=N`), never the token.
//! - RotateCredential and ListCredentials need an admin (the policy's
//!   `admins`), as every AdminService call; audited (`credential.rotate`,
//!   `admin.list_credentials`), refusals too.

use std::sync::Arc;

use crate::audit::{
    AuditError, AuditEvent, AuditLog, Outcome, ADMIN_LIST_CREDENTIALS, CREDENTIAL_GET,
    CREDENTIAL_ROTATE, CREDENTIAL_WATCH,
};
use crate::auth::Caller;
use crate::credentials::{
    CredentialError, CredentialToken, CredentialVersion, Credentials, RevokePrevious, VersionStream,
};
use crate::domain::Timestamp;
use crate::error::{ErrorCode, ServiceError};
use crate::leases::append_best_effort;
use crate::policy::{PolicyHandle, ReloadOutcome};

/// Why a managed-credential call was refused or failed. `reason()` values
/// are stable API.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The caller is not a reader of the credential (or the policy declares
    /// no credential of that name): PERMISSION_DENIED,
    /// `CREDENTIAL_READER_REQUIRED`.
    #[error("the caller is not a reader of credentials/{name} (the policy entry's readers)")]
    NotReader {
        /// The credential asked for.
        name: String,
    },
    /// An admin call by a caller the policy does not name in `admins`:
    /// PERMISSION_DENIED, `ADMIN_REQUIRED`.
    #[error("this call needs an identity the policy names in `admins`")]
    AdminRequired,
    /// The credential service failed or refused (its own code and reason).
    #[error(transparent)]
    Credential(#[from] CredentialError),
    /// The read could not be audited, so it was not handed out
    /// (`AUDIT_UNAVAILABLE`).
    #[error(transparent)]
    Audit(#[from] AuditError),
}

impl ServiceError for AccessError {
    fn code(&self) -> ErrorCode {
        match self {
            AccessError::NotReader { .. } | AccessError::AdminRequired => {
                ErrorCode::PermissionDenied
            }
            AccessError::Credential(e) => e.code(),
            AccessError::Audit(e) => e.code(),
        }
    }
    fn reason(&self) -> &'static str {
        match self {
            AccessError::NotReader { .. } => "CREDENTIAL_READER_REQUIRED",
            AccessError::AdminRequired => "ADMIN_REQUIRED",
            AccessError::Credential(e) => e.reason(),
            AccessError::Audit(e) => e.reason(),
        }
    }
    fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            AccessError::Credential(e) => e.retry_after(),
            AccessError::Audit(e) => e.retry_after(),
            _ => None,
        }
    }
}

/// The managed-credential surface's rules (see the module doc). Cheap to
/// clone; one per server.
#[derive(Clone)]
pub struct CredentialAccess {
    inner: Arc<Inner>,
}

struct Inner {
    credentials: Credentials,
    policy: PolicyHandle,
    audit: Arc<AuditLog>,
}

impl CredentialAccess {
    /// Reads `credentials` for readers and admins of `policy` (the policy
    /// in force, reloaded live), auditing into `audit`.
    pub fn new(credentials: Credentials, policy: PolicyHandle, audit: Arc<AuditLog>) -> Self {
        CredentialAccess {
            inner: Arc::new(Inner {
                credentials,
                policy,
                audit,
            }),
        }
    }

    /// The CURRENT version of credential `name` with its token, for a
    /// reader; audited (`credential.get`) before it is returned.
    ///
    /// Errors: `NotReader` (audited), the credential service's
    /// (`NoValidVersion` before the first version is minted, `Store`, ...),
    /// `Audit` (the token is not handed out).
    pub async fn get(&self, caller: &Caller, name: &str) -> Result<CredentialToken, AccessError> {
        self.require_reader(caller, name, CREDENTIAL_GET).await?;
        let token = self.inner.credentials.current(name).await?;
        self.audit_read(caller, CREDENTIAL_GET, &token.version)
            .await?;
        Ok(token)
    }

    /// The versions of `name` from `after_version` on, for a reader (see
    /// [`Credentials::watch`]). Each item must pass [`Self::admit_watched`]
    /// before it is sent.
    ///
    /// Errors: `NotReader` (audited).
    pub async fn watch(
        &self,
        caller: &Caller,
        name: &str,
        after_version: Option<i64>,
    ) -> Result<VersionStream, AccessError> {
        self.require_reader(caller, name, CREDENTIAL_WATCH).await?;
        Ok(self.inner.credentials.watch(name, after_version))
    }

    /// Admits one version a watch stream is about to send to `caller`: the
    /// caller must still be a reader (the policy in force now), and the
    /// read is audited (`credential.watch`) before it is sent.
    ///
    /// Errors: `NotReader` (audited; the stream ends), `Audit` (not sent).
    pub async fn admit_watched(
        &self,
        caller: &Caller,
        token: &CredentialToken,
    ) -> Result<(), AccessError> {
        let name = &token.version.credential;
        self.require_reader(caller, name, CREDENTIAL_WATCH).await?;
        self.audit_read(caller, CREDENTIAL_WATCH, &token.version)
            .await?;
        Ok(())
    }

    /// Whether `caller` is still a reader of `name` (a watch stream asks at
    /// each policy reload).
    ///
    /// Errors: `NotReader` (audited as `credential.watch`, denied).
    pub async fn still_reader(&self, caller: &Caller, name: &str) -> Result<(), AccessError> {
        self.require_reader(caller, name, CREDENTIAL_WATCH).await
    }

    /// Every policy reload attempt from now on (a watch stream re-checks
    /// its caller at each one applied).
    pub fn policy_reloads(&self) -> tokio::sync::broadcast::Receiver<ReloadOutcome> {
        self.inner.policy.subscribe()
    }

    /// Mints the next version of `name` now, as admin `caller` (see
    /// [`Credentials::rotate`]); audited (`credential.rotate`) with the new
    /// version, or with the error.
    ///
    /// Errors: `AdminRequired` (audited), the credential service's
    /// (`NotFound`, `Busy`, `Upstream`, `Store`; audited).
    pub async fn rotate(
        &self,
        caller: &Caller,
        name: &str,
        revoke_previous: RevokePrevious,
    ) -> Result<CredentialVersion, AccessError> {
        self.require_admin(caller, CREDENTIAL_ROTATE).await?;
        let mode = match revoke_previous {
            RevokePrevious::AfterOverlap => "AFTER_OVERLAP",
            RevokePrevious::Now => "NOW",
        };
        match self.inner.credentials.rotate(name, revoke_previous).await {
            Ok(version) => {
                let event = AuditEvent {
                    reason: Some(format!("revoke_previous={mode}")),
                    ..version_event(caller, CREDENTIAL_ROTATE, Outcome::Allowed, &version)
                };
                append_best_effort(&self.inner.audit, event).await;
                tracing::info!(
                    identity = %caller.identity,
                    credential = name,
                    version = version.version,
                    revoke_previous = mode,
                    "credential rotated on request"
                );
                Ok(version)
            }
            Err(e) => {
                let event = AuditEvent {
                    reason: Some(format!("{} revoke_previous={mode}", e.reason())),
                    policy_rule: Some(format!("credential:{name}")),
                    ..caller_event(caller, CREDENTIAL_ROTATE, Outcome::Error)
                };
                append_best_effort(&self.inner.audit, event).await;
                Err(e.into())
            }
        }
    }

    /// Every version of every credential (no tokens), for admin `caller`;
    /// audited (`admin.list_credentials`).
    ///
    /// Errors: `AdminRequired` (audited), `Credential` (`Store`).
    pub async fn list(&self, caller: &Caller) -> Result<Vec<CredentialVersion>, AccessError> {
        self.require_admin(caller, ADMIN_LIST_CREDENTIALS).await?;
        let versions = self.inner.credentials.list().await?;
        append_best_effort(
            &self.inner.audit,
            caller_event(caller, ADMIN_LIST_CREDENTIALS, Outcome::Allowed),
        )
        .await;
        Ok(versions)
    }

    async fn require_reader(
        &self,
        caller: &Caller,
        name: &str,
        action: &str,
    ) -> Result<(), AccessError> {
        if self
            .inner
            .credentials
            .reader_allowed(name, &caller.identity)
        {
            return Ok(());
        }
        let event = AuditEvent {
            reason: Some("CREDENTIAL_READER_REQUIRED".to_owned()),
            policy_rule: Some(format!("credential:{name}")),
            ..caller_event(caller, action, Outcome::Denied)
        };
        append_best_effort(&self.inner.audit, event).await;
        tracing::info!(identity = %caller.identity, credential = name, action, "credential read refused: not a reader");
        Err(AccessError::NotReader {
            name: name.to_owned(),
        })
    }

    async fn require_admin(&self, caller: &Caller, action: &str) -> Result<(), AccessError> {
        if self.inner.policy.current().is_admin(&caller.identity) {
            return Ok(());
        }
        let event = AuditEvent {
            reason: Some("ADMIN_REQUIRED".to_owned()),
            ..caller_event(caller, action, Outcome::Denied)
        };
        append_best_effort(&self.inner.audit, event).await;
        tracing::info!(identity = %caller.identity, action, "admin call refused");
        Err(AccessError::AdminRequired)
    }

    /// Appends the audit row of a read; fails closed.
    async fn audit_read(
        &self,
        caller: &Caller,
        action: &str,
        version: &CredentialVersion,
    ) -> Result<(), AccessError> {
        let event = version_event(caller, action, Outcome::Allowed, version);
        self.inner.audit.append(&event).await?;
        Ok(())
    }
}

/// An event by `caller` about nothing in particular.
fn caller_event(caller: &Caller, action: &str, outcome: Outcome) -> AuditEvent {
    AuditEvent {
        peer: caller.peer.clone(),
        caller_detail: caller.audit_detail(),
        ..AuditEvent::new(
            Timestamp::now(),
            caller.identity.to_string(),
            action,
            outcome,
        )
    }
}

/// An event by `caller` about `version`, shaped as the engine's own rows
/// (`credential.mint`, `credential.revoke`): `policy_rule`
/// `credential:NAME`, `version=N` in `caller_detail` (after a service
/// account's claims), its organization and scopes.
fn version_event(
    caller: &Caller,
    action: &str,
    outcome: Outcome,
    version: &CredentialVersion,
) -> AuditEvent {
    let detail = [
        caller.audit_detail(),
        Some(format!("version={}", version.version)),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join(" ");
    AuditEvent {
        caller_detail: Some(detail),
        policy_rule: Some(format!("credential:{}", version.credential)),
        organization: Some(version.organization.clone()),
        scopes: Some(version.scopes.join(" ")),
        ..caller_event(caller, action, outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_permission_denied_with_their_own_reasons() {
        let e = AccessError::NotReader {
            name: "mirror-feed".into(),
        };
        assert_eq!(
            (e.code(), e.reason()),
            (ErrorCode::PermissionDenied, "CREDENTIAL_READER_REQUIRED")
        );
        assert!(e.to_string().contains("credentials/mirror-feed"));
        let e = AccessError::AdminRequired;
        assert_eq!(
            (e.code(), e.reason()),
            (ErrorCode::PermissionDenied, "ADMIN_REQUIRED")
        );
        let e = AccessError::from(CredentialError::NoValidVersion {
            name: "mirror-feed".into(),
        });
        assert_eq!(
            (e.code(), e.reason()),
            (ErrorCode::Unavailable, "CREDENTIAL_NO_VALID_VERSION")
        );
        assert!(e.retry_after().is_some());
    }
}
