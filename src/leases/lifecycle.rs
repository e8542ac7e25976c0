//! GetLease, ListLeases, RenewLease, RevokeLease. Every call sees the
//! caller's own leases only.

use std::time::Duration;

use super::auditing::{audit_best_effort, audit_grant, Actor};
use super::revocation::{begin_revocation, finish_revocation};
use super::sealing::lease_token_fingerprint;
use super::time::{chrono_duration, now};
use super::{page_token, LeaseDeps, LeaseError, LeasePage, ListQuery};
use crate::audit::{AuditEvent, Outcome};
use crate::auth::Caller;
use crate::domain::{LeaseId, LeaseState};
use crate::policy::Decision;
use crate::store::{LeaseFilter, LeaseRecord, PageCursor};
use crate::upstream::UpdatePat;

/// Page size when the query gives none (the api layer normally does).
const DEFAULT_PAGE_SIZE: u32 = 50;
/// Largest page.
const MAX_PAGE_SIZE: u32 = 1000;

/// The lease if it exists and `caller` holds it; else `NotFound` (another
/// holder's lease is indistinguishable from a missing one).
pub(super) async fn get_owned(
    deps: &LeaseDeps,
    caller: &Caller,
    id: LeaseId,
) -> Result<LeaseRecord, LeaseError> {
    match deps.store.get_lease(id).await? {
        Some(lease) if lease.holder == caller.identity => Ok(lease),
        _ => Err(LeaseError::NotFound),
    }
}

/// See [`super::Leases::list`].
pub(super) async fn list(
    deps: &LeaseDeps,
    caller: &Caller,
    query: ListQuery,
) -> Result<LeasePage, LeaseError> {
    let filter = LeaseFilter {
        holder: Some(caller.identity.clone()),
        states: query.states,
        organization: query.organization,
    };
    page(deps, &filter, &query.page_token, query.page_size).await
}

/// One page of the leases matching `filter`, newest first, after the
/// position `page_token` names (a token bound to this filter; empty: the
/// first page). `page_size` 0 means [`DEFAULT_PAGE_SIZE`]; it is capped at
/// [`MAX_PAGE_SIZE`]. Shared by the holder's and the admin's listings.
pub(super) async fn page(
    deps: &LeaseDeps,
    filter: &LeaseFilter,
    page_token: &str,
    page_size: u32,
) -> Result<LeasePage, LeaseError> {
    let after = if page_token.is_empty() {
        None
    } else {
        Some(page_token::decode(&deps.fingerprinter, filter, page_token)?)
    };
    let limit = match page_size {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    };
    // One extra row tells whether another page exists.
    let mut leases = deps
        .store
        .list_leases(filter, after.as_ref(), limit + 1)
        .await?;
    let next_page_token = if leases.len() > limit as usize {
        leases.truncate(limit as usize);
        let last = leases.last().expect("limit is at least 1");
        page_token::encode(
            &deps.fingerprinter,
            filter,
            &PageCursor {
                create_time: last.create_time,
                id: last.id,
            },
        )
    } else {
        String::new()
    };
    Ok(LeasePage {
        leases,
        next_page_token,
    })
}

/// See [`super::Leases::renew`].
pub(super) async fn renew(
    deps: &LeaseDeps,
    caller: &Caller,
    id: LeaseId,
    increment: Option<Duration>,
) -> Result<LeaseRecord, LeaseError> {
    const ACTION: &str = crate::audit::LEASE_RENEW;
    let lease = get_owned(deps, caller, id).await?;
    let actor = Actor::caller(caller);
    let now = now();
    if lease.state != LeaseState::Active {
        return Err(LeaseError::NotRenewable(lease.state));
    }
    if lease.expire_time <= now {
        // Past its end, waiting for the reaper: it is over.
        return Err(LeaseError::NotRenewable(LeaseState::Expired));
    }
    if lease.expire_time >= lease.max_expire_time {
        return Err(LeaseError::AtMaxExpireTime(lease.max_expire_time));
    }
    // Renewal is a decision too: the policy must still grant this lease
    // (its default TTL is the increment when none is given). An increment
    // past the rule's max TTL is not refused: max_expire_time caps it.
    let increment = match deps.policy.current().decide(
        &caller.identity,
        &lease.organization,
        &lease.scopes,
        None,
    ) {
        Decision::Allow { ttl, .. } => increment.unwrap_or(ttl),
        Decision::Deny { denial, rule } => {
            let event = AuditEvent {
                reason: Some(denial.reason().to_owned()),
                policy_rule: rule.clone(),
                ..actor.lease_event(ACTION, Outcome::Denied, &lease, now)
            };
            audit_best_effort(deps, event).await;
            return Err(LeaseError::Denied { denial, rule });
        }
    };
    let Some(authorization_id) = lease.authorization_id else {
        return Err(LeaseError::Internal(format!(
            "ACTIVE lease {id} has no authorizationId"
        )));
    };

    let mut next = lease.clone();
    next.expire_time = (now + chrono_duration(increment)).min(lease.max_expire_time);
    // Fail closed: the grant is audited before it takes effect (with the
    // asked-for expiry; upstream may shorten it), or it does not happen.
    let event = AuditEvent {
        token_fingerprint: lease_token_fingerprint(deps, &next),
        ..actor.lease_event(ACTION, Outcome::Allowed, &next, now)
    };
    audit_grant(deps, &event).await?;
    let skew = chrono_duration(deps.settings.valid_to_skew);
    let wanted_valid_to = next.expire_time + skew;
    let update = UpdatePat {
        authorization_id,
        display_name: None,
        scope: None,
        valid_to: Some(wanted_valid_to.into()),
    };
    let pat = match deps.upstream.update(&lease.organization, &update).await {
        Ok(pat) => pat,
        Err(e) => {
            let event = AuditEvent {
                reason: Some(crate::error::ServiceError::reason(&e).to_owned()),
                ..actor.lease_event(ACTION, Outcome::Error, &lease, now)
            };
            audit_best_effort(deps, event).await;
            tracing::warn!(lease_id = %id, error = %e, "upstream renew failed");
            return Err(e.into());
        }
    };
    // Upstream clamps an update to creation + its maximum PAT lifespan
    // (docs/upstream-api.md, "validTo clamping"): the lease must never
    // outlive its PAT.
    next.fit_to_valid_to(pat.valid_to, wanted_valid_to);
    next.update_time = super::time::now();
    if !deps
        .store
        .update_lease_unchanged(&next, LeaseState::Active, lease.update_time)
        .await?
    {
        let current = get_owned(deps, caller, id).await?;
        if current.state != LeaseState::Active {
            // Revoked or expired meanwhile; the revocation removes the PAT.
            return Err(LeaseError::NotRenewable(current.state));
        }
        // A concurrent renewal committed first. Upstream may now hold this
        // call's validTo (the PUTs can land in either order): put back the
        // stored lease's, so the PAT never ends before its lease.
        let realign = UpdatePat {
            authorization_id,
            display_name: None,
            scope: None,
            valid_to: Some((current.expire_time + skew).into()),
        };
        if let Err(e) = deps.upstream.update(&current.organization, &realign).await {
            tracing::warn!(lease_id = %id, error = %e, "could not realign the PAT's validTo after a concurrent renewal");
        }
        return Err(LeaseError::RenewConflict);
    }
    tracing::info!(lease_id = %id, expire_time = %next.expire_time, "lease renewed");
    Ok(next)
}

/// See [`super::Leases::revoke`].
pub(super) async fn revoke(
    deps: &LeaseDeps,
    caller: &Caller,
    id: LeaseId,
) -> Result<LeaseRecord, LeaseError> {
    const ACTION: &str = crate::audit::LEASE_REVOKE;
    let actor = Actor::caller(caller);
    // A bounded number of rounds: each lost race means another actor moved
    // the lease forward, so this settles quickly.
    for _ in 0..5 {
        let lease = get_owned(deps, caller, id).await?;
        let revoking = match lease.state {
            LeaseState::Revoked | LeaseState::Expired | LeaseState::Failed => return Ok(lease),
            LeaseState::Pending => return Err(LeaseError::StillPending),
            // Already being revoked: try again now, on the caller's behalf.
            LeaseState::Revoking | LeaseState::RevokeFailed => lease,
            LeaseState::Active => match begin_revocation(deps, &lease, now()).await? {
                Some(revoking) => revoking,
                None => continue,
            },
        };
        if let Some(done) = finish_revocation(deps, &revoking, &actor, ACTION).await? {
            return Ok(done);
        }
    }
    // Still racing: answer what is stored.
    get_owned(deps, caller, id).await
}
