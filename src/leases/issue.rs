//! CreateLease: policy, request_id replay, the PENDING intent row, the
//! upstream create, and ACTIVE (docs/architecture.md, "How a CreateLease
//! request flows").

use std::time::Duration;

use super::auditing::{audit_best_effort, audit_grant, audit_grant_with, Actor};
use super::revocation::{revoke_by_display_name, revoke_upstream};
use super::sealing::{open_token, seal_token};
use super::time::{chrono_duration, now};
use super::{CreateLease, IssuedLease, LeaseDeps, LeaseError};
use crate::audit::{AuditEvent, Outcome};
use crate::auth::Caller;
use crate::domain::Timestamp;
use crate::domain::{LeaseId, LeaseState};
use crate::error::ServiceError as _;
use crate::policy::Decision;
use crate::store::{CreateOutcome, IdempotencyRecord, LeaseRecord, LeaseWrite, ReplaceOutcome};
use crate::upstream::{CreatePat, UpstreamError};

/// How long a retry waits for an earlier attempt with the same request_id
/// to leave PENDING before answering `InProgress` (UNAVAILABLE + RetryInfo).
const PENDING_WAIT: Duration = Duration::from_secs(30);

/// How often that wait looks at the store again.
const PENDING_POLL: Duration = Duration::from_millis(100);

const ACTION: &str = crate::audit::LEASE_CREATE;

/// See [`super::Leases::create`].
pub(super) async fn create(
    deps: &LeaseDeps,
    caller: &Caller,
    req: CreateLease,
) -> Result<IssuedLease, LeaseError> {
    let now = now();
    // One policy for the whole call, even if a reload lands meanwhile.
    let policy = deps.policy.current();
    let grant = match policy.decide(&caller.identity, &req.organization, &req.scopes, req.ttl) {
        Decision::Allow { rule, ttl, max_ttl } => Grant {
            max_active_leases: policy.rule(&rule).and_then(|r| r.max_active_leases()),
            rule,
            ttl,
            max_ttl,
        },
        Decision::Deny { denial, rule } => {
            let event = denied_event(caller, &req, denial.reason(), rule.clone(), None);
            audit_best_effort(deps, event).await;
            tracing::info!(identity = %caller.identity, reason = denial.reason(), "lease create denied by policy");
            return Err(LeaseError::Denied { denial, rule });
        }
    };

    let fingerprint = req.fingerprint();
    if let Some(request_id) = req.request_id {
        if let Some(existing) = deps
            .store
            .get_idempotency(&caller.identity, request_id)
            .await?
        {
            return replay(deps, caller, &req, &grant, existing, &fingerprint).await;
        }
    }

    let lease = new_pending(deps, caller, &req, &grant, now);
    let key = req.request_id.map(|request_id| IdempotencyRecord {
        holder: caller.identity.clone(),
        request_id,
        fingerprint: fingerprint.clone(),
        lease_id: lease.id,
        create_time: now,
    });
    // The quota is checked where the row is inserted, under the holder's
    // lock: concurrent creates admit exactly up to the cap, and a refused
    // one writes nothing. A replay (same key) is the same lease, so only a
    // new one counts.
    match deps
        .store
        .create_lease(&lease, key.as_ref(), grant.max_active_leases)
        .await?
    {
        CreateOutcome::Created => mint(deps, caller, lease, &grant.rule).await,
        // A concurrent request with the same key won the insert.
        CreateOutcome::Existing(existing) => {
            replay(deps, caller, &req, &grant, existing, &fingerprint).await
        }
        CreateOutcome::OverQuota { live } => {
            Err(refuse_over_quota(deps, caller, &req, &grant, live).await)
        }
    }
}

/// Audits and logs a create refused because the caller already holds the
/// deciding rule's `max_active_leases` live leases (`live` of them);
/// nothing was written for it.
async fn refuse_over_quota(
    deps: &LeaseDeps,
    caller: &Caller,
    req: &CreateLease,
    grant: &Grant,
    live: u64,
) -> LeaseError {
    let reason = LeaseError::QuotaExceeded.reason();
    let event = denied_event(caller, req, reason, Some(grant.rule.clone()), None);
    audit_best_effort(deps, event).await;
    let cap = grant.max_active_leases.unwrap_or_default();
    tracing::info!(identity = %caller.identity, rule = %grant.rule, live, cap, "lease create refused: active lease quota");
    LeaseError::QuotaExceeded
}

/// The audit event of a refused CreateLease (no lease was made for it).
fn denied_event(
    caller: &Caller,
    req: &CreateLease,
    reason: &str,
    rule: Option<String>,
    lease_id: Option<LeaseId>,
) -> AuditEvent {
    AuditEvent {
        reason: Some(reason.to_owned()),
        policy_rule: rule,
        lease_id,
        organization: Some(req.organization.to_string()),
        scopes: Some(req.scopes.to_upstream()),
        ..Actor::caller(caller).event(ACTION, Outcome::Denied, now())
    }
}

/// What policy allowed for a request.
struct Grant {
    /// The deciding rule's name.
    rule: String,
    /// The lease's TTL (asked for, or the rule's default).
    ttl: Duration,
    /// The rule's max TTL: create_time + max_ttl is max_expire_time.
    max_ttl: Duration,
    /// The rule's cap on the caller's live leases, if any.
    max_active_leases: Option<u32>,
}

/// A fresh PENDING lease row (nothing written yet).
fn new_pending(
    deps: &LeaseDeps,
    caller: &Caller,
    req: &CreateLease,
    grant: &Grant,
    now: Timestamp,
) -> LeaseRecord {
    let settings = &deps.settings;
    LeaseRecord::pending(
        caller.identity.clone(),
        req.organization.clone(),
        req.scopes.clone(),
        |id| super::sweep::display_name(&settings.display_name_prefix, &settings.deployment_id, id),
        now,
        now + chrono_duration(grant.ttl),
        now + chrono_duration(grant.max_ttl.max(grant.ttl)),
    )
}

/// Answers a request whose (holder, request_id) key exists: same
/// parameters → that lease, with its token while it is ACTIVE and without
/// one once it left ACTIVE (waiting while it is PENDING; minting afresh if
/// it FAILED); other parameters → `RequestIdReused`.
async fn replay(
    deps: &LeaseDeps,
    caller: &Caller,
    req: &CreateLease,
    grant: &Grant,
    mut key: IdempotencyRecord,
    fingerprint: &str,
) -> Result<IssuedLease, LeaseError> {
    if key.fingerprint != fingerprint {
        let event = denied_event(
            caller,
            req,
            "REQUEST_ID_REUSED",
            Some(grant.rule.clone()),
            Some(key.lease_id),
        );
        audit_best_effort(deps, event).await;
        return Err(LeaseError::RequestIdReused);
    }
    let deadline = tokio::time::Instant::now() + PENDING_WAIT;
    loop {
        let lease = deps.store.get_lease(key.lease_id).await?.ok_or_else(|| {
            LeaseError::Internal(format!(
                "idempotency key points at missing lease {}",
                key.lease_id
            ))
        })?;
        match lease.state {
            LeaseState::Pending => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(LeaseError::InProgress);
                }
                tokio::time::sleep(PENDING_POLL).await;
            }
            LeaseState::Failed => {
                // No token was ever handed out for it: mint afresh under the
                // key, a new lease within the quota.
                let now = now();
                let fresh = new_pending(deps, caller, req, grant, now);
                let new_key = IdempotencyRecord {
                    lease_id: fresh.id,
                    ..key.clone()
                };
                match deps
                    .store
                    .replace_failed_lease(&fresh, &new_key, lease.id, grant.max_active_leases)
                    .await?
                {
                    ReplaceOutcome::Replaced => {
                        return mint(deps, caller, fresh, &grant.rule).await;
                    }
                    ReplaceOutcome::OverQuota { live } => {
                        return Err(refuse_over_quota(deps, caller, req, grant, live).await);
                    }
                    ReplaceOutcome::KeyMoved => {}
                }
                // Another retry replaced it first: follow the key again.
                key = deps
                    .store
                    .get_idempotency(&caller.identity, key.request_id)
                    .await?
                    .ok_or_else(|| LeaseError::Internal("idempotency key vanished".to_owned()))?;
            }
            _ => {
                // Only an ACTIVE lease keeps its token: one that left ACTIVE
                // (REVOKING, REVOKED, EXPIRED, REVOKE_FAILED) is answered
                // without it.
                let token = match lease.state {
                    LeaseState::Active => Some(open_token(deps, &lease)?),
                    _ => None,
                };
                let event = AuditEvent {
                    reason: Some("REQUEST_ID_REPLAYED".to_owned()),
                    policy_rule: Some(grant.rule.clone()),
                    token_fingerprint: token.as_ref().map(|t| deps.fingerprinter.fingerprint(t)),
                    ..Actor::caller(caller).lease_event(ACTION, Outcome::Allowed, &lease, now())
                };
                audit_grant(deps, &event).await?;
                // Into the call's span, as `mint` does for a new lease.
                tracing::Span::current().record("lease.id", tracing::field::display(lease.id));
                return Ok(IssuedLease { lease, token });
            }
        }
    }
}

/// Mints the PAT of a stored PENDING lease and makes it ACTIVE.
async fn mint(
    deps: &LeaseDeps,
    caller: &Caller,
    mut lease: LeaseRecord,
    rule: &str,
) -> Result<IssuedLease, LeaseError> {
    // Into the call's span (api::rpc_span), before the upstream call, so a
    // failed mint is traced with its lease too.
    tracing::Span::current().record("lease.id", tracing::field::display(lease.id));
    let skew = chrono_duration(deps.settings.valid_to_skew);
    let wanted_valid_to = lease.expire_time + skew;
    let request = CreatePat {
        display_name: lease.display_name.clone(),
        scope: lease.scopes.to_upstream(),
        valid_to: wanted_valid_to.into(),
    };
    let pat = match deps.upstream.create(&lease.organization, &request).await {
        Ok(pat) => pat,
        Err(e) => {
            if !no_pat_left(deps, &lease, &e).await {
                // A PAT may exist: the lease stays PENDING for the reconciler.
                return Err(e.into());
            }
            return Err(fail(deps, caller, lease, rule, e).await);
        }
    };
    let Some(token) = pat.token.clone() else {
        // Upstream made a PAT but did not hand us its secret: useless. Only a
        // revoked PAT may sit under a FAILED lease; if the revoke fails the
        // row stays PENDING and the reconciler finds the PAT by its name.
        let e = UpstreamError::Protocol("create answer carries no token".to_owned());
        lease.authorization_id = Some(pat.authorization_id);
        if let Err(r) = revoke_upstream(deps, &lease.organization, pat.authorization_id).await {
            tracing::error!(lease_id = %lease.id, error = %r, "could not revoke a PAT minted without its token; left PENDING for the reconciler");
            return Err(e.into());
        }
        return Err(fail(deps, caller, lease, rule, e).await);
    };

    // Upstream may clamp validTo and rounds it (docs/upstream-api.md,
    // "validTo clamping" and "validTo rounding"): the lease must never
    // outlive its PAT.
    let now = now();
    let (lease, expected) = lease.activate(
        now,
        pat.authorization_id,
        seal_token(deps, lease.id, &token),
        pat.valid_to,
        wanted_valid_to,
    );

    // Fail closed: ACTIVE and its audit row are one transaction, so a
    // grant that is not audited does not happen.
    let event = AuditEvent {
        policy_rule: Some(rule.to_owned()),
        token_fingerprint: Some(deps.fingerprinter.fingerprint(&token)),
        ..Actor::caller(caller).lease_event(ACTION, Outcome::Allowed, &lease, now)
    };
    let write = LeaseWrite {
        lease: lease.clone(),
        expected,
    };
    let stored = match audit_grant_with(deps, &event, write).await {
        Ok(true) => Ok(()),
        // The reconciler (or an admin) settled the lease while the create
        // was in flight: this attempt is abandoned, a retry mints afresh.
        Ok(false) => Err(LeaseError::Abandoned),
        Err(e) => Err(e),
    };
    if let Err(e) = stored {
        // Never leave a PAT live without an ACTIVE, audited lease row.
        tracing::error!(lease_id = %lease.id, error = %e, "could not record the grant; revoking its PAT");
        abandon_minted(deps, &lease).await;
        return Err(e);
    }
    tracing::info!(lease_id = %lease.id, holder = %lease.holder, organization = %lease.organization, "lease issued");
    Ok(IssuedLease {
        lease,
        token: Some(token),
    })
}

/// A minted PAT whose lease could not be made ACTIVE: revoke it upstream and
/// mark the lease FAILED, best effort (the reconciler in `background` covers
/// a crash here: the row stays PENDING and the display name finds the PAT).
async fn abandon_minted(deps: &LeaseDeps, lease: &LeaseRecord) {
    if let Some(id) = lease.authorization_id {
        if let Err(e) = revoke_upstream(deps, &lease.organization, id).await {
            tracing::error!(lease_id = %lease.id, error = %e, "could not revoke an unrecorded PAT");
            return;
        }
    }
    let (failed, expected) = lease.fail(
        now(),
        "lease could not be recorded as ACTIVE; PAT revoked".to_owned(),
    );
    if let Err(e) = deps.store.update_lease(&failed, expected).await {
        tracing::error!(lease_id = %lease.id, error = %e, "could not mark lease FAILED");
    }
}

/// Whether the failed upstream create (`error`) left no PAT behind, so the
/// lease may be marked FAILED. A definite refusal (policy, auth, 400, 429)
/// means no PAT exists. A timeout, 5xx or unreadable answer may hide a PAT
/// that was made: the create is never retried blindly (it is not
/// idempotent: docs/upstream-api.md, "Create is not idempotent"); instead the broker lists upstream for the lease's display
/// name. It cannot adopt a PAT found that way (the secret is only in the
/// create answer), so it revokes it; the caller gets the error
/// (UNAVAILABLE + RetryInfo for 5xx/timeouts) and may retry with the same
/// request_id, which mints afresh. If the look-up itself fails, or cannot
/// read the whole list, this is false and the lease stays PENDING for the
/// reconciler (`background`).
async fn no_pat_left(deps: &LeaseDeps, lease: &LeaseRecord, error: &UpstreamError) -> bool {
    let ambiguous = matches!(
        error,
        UpstreamError::Unavailable(_) | UpstreamError::Protocol(_)
    );
    if !ambiguous {
        return true;
    }
    tracing::warn!(lease_id = %lease.id, error = %error, "upstream create failed ambiguously; looking for the PAT");
    match revoke_by_display_name(deps, lease).await {
        Ok(search) if search.complete => true,
        Ok(search) => {
            tracing::warn!(lease_id = %lease.id, revoked = search.revoked, "upstream list incomplete after a failed create; lease left PENDING for the reconciler");
            false
        }
        Err(e) => {
            tracing::warn!(lease_id = %lease.id, error = %e, "could not clear upstream after a failed create; lease left PENDING for the reconciler");
            false
        }
    }
}

/// Marks a PENDING lease FAILED (no token was handed out), audits the
/// error, and returns it for the caller.
async fn fail(
    deps: &LeaseDeps,
    caller: &Caller,
    lease: LeaseRecord,
    rule: &str,
    error: UpstreamError,
) -> LeaseError {
    let now = now();
    let (lease, expected) = lease.fail(now, error.to_string());
    if let Err(e) = deps.store.update_lease(&lease, expected).await {
        tracing::error!(lease_id = %lease.id, error = %e, "could not mark lease FAILED");
    }
    let event = AuditEvent {
        policy_rule: Some(rule.to_owned()),
        reason: Some(crate::error::ServiceError::reason(&error).to_owned()),
        ..Actor::caller(caller).lease_event(ACTION, Outcome::Error, &lease, now)
    };
    audit_best_effort(deps, event).await;
    tracing::warn!(lease_id = %lease.id, error = %error, "upstream create failed; lease FAILED");
    error.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Organization, ScopeSet};

    fn req(org: &str, scopes: &[&str], ttl: Option<u64>) -> CreateLease {
        CreateLease {
            organization: Organization::parse(org).unwrap(),
            scopes: ScopeSet::parse(scopes).unwrap(),
            ttl: ttl.map(Duration::from_secs),
            request_id: None,
        }
    }

    #[test]
    fn a_retry_with_the_same_parameters_in_another_order_has_the_same_fingerprint() {
        let a = req("Fabrikam", &["vso.code", "vso.packaging"], Some(60)).fingerprint();
        let b = req("fabrikam", &["vso.packaging", "vso.code"], Some(60)).fingerprint();
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn other_parameters_give_another_fingerprint() {
        let base = req("fabrikam", &["vso.code"], Some(60)).fingerprint();
        for other in [
            req("contoso", &["vso.code"], Some(60)),
            req("fabrikam", &["vso.code_write"], Some(60)),
            req("fabrikam", &["vso.code"], Some(61)),
            req("fabrikam", &["vso.code"], None),
        ] {
            assert_ne!(base, other.fingerprint());
        }
    }
}
