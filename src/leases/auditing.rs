//! How the lease rules write audit rows: who acted ([`Actor`]), the event
//! about a lease, and the two ways of appending (a grant fails closed,
//! everything else is best effort with background retries).

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable as _};

use super::{LeaseDeps, LeaseError};
use crate::audit::{AuditEvent, AuditLog, Outcome};
use crate::auth::Caller;
use crate::domain::Timestamp;
use crate::store::{LeaseRecord, LeaseWrite};

/// The actor recorded in audit events written by background work. Not a
/// typed identity kind, so no caller can ever pose as it.
pub(super) const BACKGROUND_ACTOR: &str = "system:token-broker";

/// Who an audit row names as acting: a caller, or background work.
#[derive(Clone, Debug)]
pub(super) struct Actor {
    identity: String,
    peer: Option<String>,
    detail: Option<String>,
}

impl Actor {
    /// Background work ([`BACKGROUND_ACTOR`], no peer).
    pub(super) fn background() -> Self {
        Actor {
            identity: BACKGROUND_ACTOR.to_owned(),
            peer: None,
            detail: None,
        }
    }

    /// An authenticated caller: its identity, peer and audit detail.
    pub(super) fn caller(caller: &Caller) -> Self {
        Actor {
            identity: caller.identity.to_string(),
            peer: caller.peer.clone(),
            detail: caller.audit_detail(),
        }
    }

    /// An event by this actor about nothing in particular.
    pub(super) fn event(&self, action: &str, outcome: Outcome, now: Timestamp) -> AuditEvent {
        AuditEvent {
            peer: self.peer.clone(),
            caller_detail: self.detail.clone(),
            ..AuditEvent::new(now, self.identity.as_str(), action, outcome)
        }
    }

    /// An event by this actor about `lease` (its id, organization and scopes).
    pub(super) fn lease_event(
        &self,
        action: &str,
        outcome: Outcome,
        lease: &LeaseRecord,
        now: Timestamp,
    ) -> AuditEvent {
        AuditEvent {
            lease_id: Some(lease.id),
            organization: Some(lease.organization.to_string()),
            scopes: Some(lease.scopes.to_upstream()),
            ..self.event(action, outcome, now)
        }
    }
}

/// Appends the audit event of a grant (create, replay, renew) to the
/// chained audit trail. Fails closed: the caller must not grant when this
/// errs. The one place, with [`audit_best_effort`], where lease rules write
/// audit rows.
pub(super) async fn audit_grant(deps: &LeaseDeps, event: &AuditEvent) -> Result<(), LeaseError> {
    deps.audit.append(event).await?;
    Ok(())
}

/// [`audit_grant`] of a grant that is a lease write (ACTIVE after the
/// upstream create): the write and its audit row are one transaction
/// ([`AuditLog::append_with`]). False when the lease had moved (nothing
/// written). Fails closed like [`audit_grant`]: on error neither is written.
pub(super) async fn audit_grant_with(
    deps: &LeaseDeps,
    event: &AuditEvent,
    write: LeaseWrite,
) -> Result<bool, LeaseError> {
    Ok(deps.audit.append_with(event, write).await?.is_some())
}

/// A lease write that goes ahead whether or not it is audited (a
/// revocation's outcome), with its audit row in the same transaction when
/// it can be: if that transaction fails, the write is tried alone and the
/// row goes to [`audit_best_effort`]. Returns whether the write applied;
/// errors only when the write alone fails.
pub(super) async fn write_audited(
    deps: &LeaseDeps,
    event: AuditEvent,
    write: LeaseWrite,
) -> Result<bool, LeaseError> {
    match deps.audit.append_with(&event, write.clone()).await {
        Ok(appended) => Ok(appended.is_some()),
        Err(e) => {
            tracing::warn!(action = %event.action, error = %e, "lease write and its audit row failed together; writing the lease alone");
            let applied = deps
                .store
                .update_lease(&write.lease, write.expected)
                .await?;
            if applied {
                audit_best_effort(deps, event).await;
            }
            Ok(applied)
        }
    }
}

/// How long a background retry of an audit row keeps trying: about an hour
/// (jittered backoff from 1 s to 1 min, 70 attempts).
const AUDIT_RETRY_ATTEMPTS: usize = 70;

/// Appends an audit event for something that goes ahead whether or not it
/// is audited (denials, errors, revocations). When the row cannot be
/// written now, a background task retries it with backoff (the event keeps
/// its original time); if it never lands, the whole event (no secrets in
/// it) is logged at ERROR.
pub(super) async fn audit_best_effort(deps: &LeaseDeps, event: AuditEvent) {
    append_best_effort(&deps.audit, event).await
}

/// [`audit_best_effort`] on `audit` itself, for the rules outside `leases`
/// that audit the same way (the managed-credential surface).
pub(crate) async fn append_best_effort(audit: &Arc<AuditLog>, event: AuditEvent) {
    if let Err(e) = audit.append(&event).await {
        tracing::error!(action = %event.action, error = %e, "audit event not written; retrying in the background");
        tokio::spawn(retry_audit(audit.clone(), event));
    }
}

async fn retry_audit(audit: Arc<AuditLog>, event: AuditEvent) {
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(Duration::from_secs(60))
        .with_jitter()
        .with_max_times(AUDIT_RETRY_ATTEMPTS);
    match (|| audit.append(&event)).retry(backoff).await {
        Ok(appended) => {
            tracing::info!(action = %event.action, audit_id = appended.id, "audit event written after retrying")
        }
        Err(e) => tracing::error!(
            error = %e,
            time = %event.time,
            identity = %event.identity,
            action = %event.action,
            outcome = event.outcome.as_str(),
            reason = event.reason.as_deref().unwrap_or("-"),
            lease_id = ?event.lease_id,
            token_fingerprint = event.token_fingerprint.as_deref().unwrap_or("-"),
            "audit event lost after retries"
        ),
    }
}
