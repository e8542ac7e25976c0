//! Helpers shared by the lease rules: time arithmetic, sealing associated
//! data, audit events, and the upstream revocation step that both an
//! explicit revoke and the background loop finish with.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, Utc};
use secrecy::SecretString;

use super::{LeaseDeps, LeaseError, RetrySchedule};
use crate::audit::{AuditEvent, Outcome};
use crate::auth::Caller;
use crate::domain::{LeaseId, LeaseState};
use crate::store::LeaseRecord;

/// The actor recorded in audit events written by background work. Not a
/// typed identity kind, so no caller can ever pose as it.
pub(super) const BACKGROUND_ACTOR: &str = "system:token-broker";

/// How long a caller-driven revocation owns a REVOKING row before the
/// background loop may take it over (it only does if the caller's task died).
pub(super) const REVOKE_GRACE: Duration = Duration::from_secs(60);

/// The current time in UTC, truncated to microseconds: what both stores
/// keep, so a record in memory equals its stored copy.
pub(super) fn now() -> DateTime<Utc> {
    use chrono::SubsecRound;
    Utc::now().trunc_subsecs(6)
}

/// An upstream time cut down to microseconds, rounding down: upstream
/// answers with up to 7 fractional digits (ado-pat-api.md 1.6), the stores
/// keep 6, and rounding down keeps "the lease never outlives its PAT".
pub(super) fn upstream_time(t: DateTime<Utc>) -> DateTime<Utc> {
    use chrono::SubsecRound;
    t.trunc_subsecs(6)
}

/// Fits `lease` to the PAT's `validTo` as upstream answered it (it may round
/// or clamp, ado-pat-api.md 1.3 and 4.1): the lease never outlives its PAT.
/// `wanted` is the validTo the broker asked for. Returns the stored form.
pub(super) fn fit_to_upstream(
    lease: &mut crate::store::LeaseRecord,
    valid_to: DateTime<Utc>,
    wanted: DateTime<Utc>,
) -> DateTime<Utc> {
    let valid_to = upstream_time(valid_to);
    if valid_to < lease.expire_time {
        lease.expire_time = valid_to;
    }
    if valid_to + chrono::Duration::seconds(1) < wanted {
        lease.max_expire_time = lease.max_expire_time.min(valid_to);
        tracing::info!(lease_id = %lease.id, valid_to = %valid_to, "upstream clamped validTo; lease shortened");
    }
    lease.max_expire_time = lease.max_expire_time.max(lease.expire_time);
    lease.upstream_valid_to = Some(valid_to);
    valid_to
}

/// `Std` duration to chrono, capped at 100 years: TTLs are at most a year
/// and configured intervals are bounded, so the cap only keeps `now + d`
/// from overflowing and within what both stores hold.
pub(super) fn chrono_duration(d: Duration) -> chrono::Duration {
    const CAP: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    chrono::Duration::from_std(d.min(CAP)).expect("100 years fit")
}

/// Associated data binding a sealed token to its lease row: the lease id in
/// its hyphenated text form (DESIGN.md section 8: "associated data = the
/// row's id").
pub(super) fn token_aad(id: LeaseId) -> Vec<u8> {
    id.to_string().into_bytes()
}

/// The PAT of `lease`, opened from its sealed copy.
pub(super) fn open_token(
    deps: &LeaseDeps,
    lease: &LeaseRecord,
) -> Result<SecretString, LeaseError> {
    let sealed = lease.sealed_token.as_ref().ok_or_else(|| {
        LeaseError::Internal(format!(
            "lease {} in state {} holds no token",
            lease.id, lease.state
        ))
    })?;
    Ok(deps.keyring.open(sealed, &token_aad(lease.id))?)
}

/// Keyed fingerprint of the lease's token for the audit trail, if it has one
/// that opens (an unopenable token is logged, never fatal for the audit).
pub(super) fn lease_token_fingerprint(deps: &LeaseDeps, lease: &LeaseRecord) -> Option<String> {
    lease.sealed_token.as_ref()?;
    match open_token(deps, lease) {
        Ok(token) => Some(deps.fingerprinter.fingerprint(&token)),
        Err(e) => {
            tracing::warn!(lease_id = %lease.id, error = %e, "sealed token does not open");
            None
        }
    }
}

/// True once `attempts` failures have spent the schedule's budget.
pub(super) fn budget_spent(schedule: &RetrySchedule, attempts: i32) -> bool {
    i64::from(attempts) >= i64::from(schedule.max_attempts)
}

/// Backoff before revocation attempt number `attempts + 1`: jittered
/// exponential from `min_delay` up to `max_delay` (backon's schedule, kept
/// in rows), then `failed_interval` once the budget is spent.
pub(super) fn revocation_backoff(schedule: &RetrySchedule, attempts: i32) -> Duration {
    if budget_spent(schedule, attempts) {
        return schedule.failed_interval;
    }
    let step = usize::try_from(attempts.max(1) - 1).unwrap_or(0);
    ExponentialBuilder::default()
        .with_min_delay(schedule.min_delay)
        .with_max_delay(schedule.max_delay)
        .with_jitter()
        .without_max_times()
        .build()
        .nth(step)
        .unwrap_or(schedule.max_delay)
}

/// An audit event about `lease` by `actor` (a typed identity's text or
/// [`BACKGROUND_ACTOR`]).
pub(super) fn lease_event(
    actor: &str,
    peer: Option<&str>,
    action: &str,
    outcome: Outcome,
    lease: &LeaseRecord,
    now: DateTime<Utc>,
) -> AuditEvent {
    AuditEvent {
        id: 0,
        time: now,
        identity: actor.to_owned(),
        peer: peer.map(str::to_owned),
        action: action.to_owned(),
        outcome,
        reason: None,
        policy_rule: None,
        lease_id: Some(lease.id),
        organization: Some(lease.organization.to_string()),
        scopes: Some(lease.scopes.to_upstream()),
        token_fingerprint: None,
        caller_detail: None,
    }
}

/// An audit event about `lease` by the caller.
pub(super) fn caller_event(
    caller: &Caller,
    action: &str,
    outcome: Outcome,
    lease: &LeaseRecord,
    now: DateTime<Utc>,
) -> AuditEvent {
    AuditEvent {
        caller_detail: caller.audit_detail(),
        ..lease_event(
            &caller.identity.to_string(),
            caller.peer.as_deref(),
            action,
            outcome,
            lease,
            now,
        )
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

/// How long a background retry of an audit row keeps trying: about an hour
/// (jittered backoff from 1 s to 1 min, 70 attempts).
const AUDIT_RETRY_ATTEMPTS: usize = 70;

/// Appends an audit event for something that goes ahead whether or not it
/// is audited (denials, errors, revocations). When the row cannot be
/// written now, a background task retries it with backoff (the event keeps
/// its original time); if it never lands, the whole event (no secrets in
/// it) is logged at ERROR.
pub(super) async fn audit_best_effort(deps: &LeaseDeps, event: AuditEvent) {
    if let Err(e) = deps.audit.append(&event).await {
        tracing::error!(action = %event.action, error = %e, "audit event not written; retrying in the background");
        tokio::spawn(retry_audit(deps.audit.clone(), event));
    }
}

async fn retry_audit(audit: std::sync::Arc<crate::audit::AuditLog>, event: AuditEvent) {
    use backon::Retryable as _;
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

/// The state a finished revocation ends in: EXPIRED when the lease had
/// reached its expire_time by the time revocation began (`revoke_time`),
/// REVOKED otherwise.
pub(super) fn final_state(lease: &LeaseRecord) -> LeaseState {
    match lease.revoke_time {
        Some(t) if t >= lease.expire_time => LeaseState::Expired,
        _ => LeaseState::Revoked,
    }
}

/// Moves an ACTIVE lease to REVOKING (compare-and-set on its state and on
/// `update_time`, so a renewal committed since `lease` was read is never
/// overwritten with its old expire_time), recording `now` as its
/// revoke_time and giving the current task `REVOKE_GRACE` before background
/// work may take it over. Returns None if the row had moved: the caller
/// reads it again.
pub(super) async fn begin_revocation(
    deps: &LeaseDeps,
    lease: &LeaseRecord,
    now: DateTime<Utc>,
) -> Result<Option<LeaseRecord>, LeaseError> {
    let mut next = lease.clone();
    next.state = LeaseState::Revoking;
    next.update_time = now;
    next.revoke_time = Some(now);
    next.attempts = 0;
    next.next_attempt_time = Some(now + chrono_duration(REVOKE_GRACE));
    next.claimed_by = None;
    next.claimed_until = None;
    if deps
        .store
        .update_lease_unchanged(&next, LeaseState::Active, lease.update_time)
        .await?
    {
        Ok(Some(next))
    } else {
        Ok(None)
    }
}

/// Revokes PAT `id` in `organization` upstream; upstream "not found" counts
/// as revoked (DESIGN.md 5.3: the PAT is gone, which is the goal).
pub(super) async fn revoke_upstream(
    deps: &LeaseDeps,
    organization: &crate::domain::Organization,
    id: crate::domain::AuthorizationId,
) -> Result<(), crate::upstream::UpstreamError> {
    match deps.upstream.revoke(organization, id).await {
        Err(e) if e.is_not_found() => Ok(()),
        other => other,
    }
}

/// Revokes the PAT of a REVOKING or REVOKE_FAILED lease upstream and records
/// the outcome: REVOKED/EXPIRED on success or upstream not-found; else the
/// same state (REVOKE_FAILED past the budget) with `attempts`, `last_error`
/// and a backed-off `next_attempt_time`. Returns the lease as stored, or
/// None if another actor moved it meanwhile. Never holds a transaction
/// across the upstream call; clears any claim it writes over.
pub(super) async fn finish_revocation(
    deps: &LeaseDeps,
    lease: &LeaseRecord,
    actor: &str,
    peer: Option<&str>,
    caller_detail: Option<&str>,
    action: &str,
) -> Result<Option<LeaseRecord>, LeaseError> {
    let expected = lease.state;
    let result = match lease.authorization_id {
        Some(authorization_id) => {
            revoke_upstream(deps, &lease.organization, authorization_id).await
        }
        // No PAT was ever recorded: nothing to revoke upstream.
        None => Ok(()),
    };
    let now = now();
    let mut next = lease.clone();
    next.update_time = now;
    next.claimed_by = None;
    next.claimed_until = None;
    let outcome = match &result {
        Ok(()) => {
            next.state = final_state(lease);
            next.revoke_time = Some(lease.revoke_time.unwrap_or(now));
            next.next_attempt_time = None;
            next.last_error = None;
            tracing::info!(lease_id = %lease.id, state = %next.state, "lease revoked upstream");
            Outcome::Allowed
        }
        Err(e) => {
            next.attempts = lease.attempts.saturating_add(1);
            let schedule = &deps.settings.revocation_retry;
            if budget_spent(schedule, next.attempts) {
                next.state = LeaseState::RevokeFailed;
            }
            next.next_attempt_time =
                Some(now + chrono_duration(revocation_backoff(schedule, next.attempts)));
            next.last_error = Some(format!("upstream revoke failed: {e}"));
            tracing::warn!(lease_id = %lease.id, attempt = next.attempts, error = %e, "upstream revoke failed");
            Outcome::Error
        }
    };
    if !deps.store.update_lease(&next, expected).await? {
        return Ok(None);
    }
    let mut event = lease_event(actor, peer, action, outcome, &next, now);
    event.reason = match &result {
        Ok(()) => None,
        Err(_) => Some("UPSTREAM_REVOKE_FAILED".to_owned()),
    };
    event.token_fingerprint = lease_token_fingerprint(deps, &next);
    event.caller_detail = caller_detail.map(str::to_owned);
    audit_best_effort(deps, event).await;
    Ok(Some(next))
}

/// What [`revoke_by_display_name`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct NameSearch {
    /// PATs with the lease's display name revoked (not-found counts).
    pub revoked: usize,
    /// False when the upstream list stopped early: a PAT with the name may
    /// still exist, so the lease must not be concluded PAT-less.
    pub complete: bool,
}

/// Revokes every live upstream PAT in the lease's organization whose
/// displayName is the lease's (DESIGN.md 5.4: the display name embeds the
/// lease id, so only this lease's PATs match). PATs found are revoked even
/// when the listing is incomplete; [`NameSearch::complete`] says whether
/// the search was exhaustive. An error if the list or a revoke failed
/// (some may be left).
pub(super) async fn revoke_by_display_name(
    deps: &LeaseDeps,
    lease: &LeaseRecord,
) -> Result<NameSearch, crate::upstream::UpstreamError> {
    use crate::upstream::{DisplayFilter, ListPats};
    let query = ListPats {
        display_filter: Some(DisplayFilter::Active),
        top: None,
    };
    let found = deps.upstream.list(&lease.organization, &query).await?;
    let mut revoked = 0;
    for pat in found
        .pats
        .iter()
        .filter(|p| p.display_name == lease.display_name)
    {
        revoke_upstream(deps, &lease.organization, pat.authorization_id).await?;
        revoked += 1;
        tracing::info!(lease_id = %lease.id, authorization_id = %pat.authorization_id, "revoked a PAT found by the lease's display name");
    }
    Ok(NameSearch {
        revoked,
        complete: found.complete,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocation_retries_back_off_from_seconds_to_minutes_then_hourly() {
        let schedule = RetrySchedule::default();
        for attempts in 1..10 {
            let delay = revocation_backoff(&schedule, attempts);
            assert!(delay >= Duration::from_secs(5), "{attempts}: {delay:?}");
            assert!(delay <= Duration::from_secs(1200), "{attempts}: {delay:?}");
        }
        assert!(revocation_backoff(&schedule, 8) > revocation_backoff(&schedule, 1));
        assert_eq!(revocation_backoff(&schedule, 10), Duration::from_secs(3600));
        assert!(!budget_spent(&schedule, 9));
        assert!(budget_spent(&schedule, 10));
    }

    #[test]
    fn a_short_schedule_is_followed() {
        let schedule = RetrySchedule {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(400),
            max_attempts: 3,
            failed_interval: Duration::from_secs(2),
        };
        for attempts in 1..3 {
            let delay = revocation_backoff(&schedule, attempts);
            assert!(delay >= Duration::from_millis(100), "{attempts}: {delay:?}");
            assert!(delay <= Duration::from_millis(800), "{attempts}: {delay:?}");
        }
        assert_eq!(revocation_backoff(&schedule, 3), Duration::from_secs(2));
    }
}
