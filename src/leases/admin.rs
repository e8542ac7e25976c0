//! Admin operations (AdminService): bulk revoke for incident response,
//! listing every holder's leases, and reading the audit trail. Only
//! identities the policy names as admins may call them; every call is
//! audited, allowed or refused (`admin.revoke_leases`, `admin.list_leases`,
//! `admin.list_audit_events`, `lease.force_revoke`, `admin.lookup_token`).
//!
//! Choices worth knowing:
//! - A force-revoke closes only a REVOKE_FAILED lease: the broker has spent
//!   its retry budget on it, so forcing is the operator's considered
//!   exception. A REVOKING lease is still inside that budget, often with an
//!   upstream call in flight; it is refused (FAILED_PRECONDITION) and
//!   either succeeds or reaches REVOKE_FAILED on its own.
//! - A bulk revoke needs at least one criterion (holder, organization,
//!   scope, or lease ids); given several, a lease must match all. Scope
//!   matches a lease whose scopes grant it (with inclusion; `app_token`
//!   grants every scope), so "everything that can write code" is one call.
//! - Matching leases are revoked through the normal path (REVOKING, upstream
//!   DELETE, REVOKED), up to [`REVOKE_CONCURRENCY`] at once. An upstream
//!   failure leaves the lease REVOKING for the background retries, counted
//!   as `revoking`. A PENDING lease (create in flight) cannot be revoked
//!   yet: it is counted as `pending`, and the caller runs the call again.
//! - Audit events are listed oldest first (id order, the chain's order),
//!   filtered in one indexed query and paged by id (keyset), so a page costs
//!   the same on a long trail as on a short one.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use futures::stream::{self, StreamExt as _};
use secrecy::{ExposeSecret as _, SecretString};

use super::auditing::{audit_best_effort, Actor};
use super::revocation::{begin_revocation, finish_revocation};
use super::sealing::{lease_token_fingerprint, open_token};
use super::time::now;
use super::{LeaseDeps, LeaseError, LeasePage, ListQuery};
use crate::audit::{AuditEvent, Outcome};
use crate::auth::Caller;
use crate::domain::{Identity, LeaseId, LeaseState, Organization, Scope, Timestamp};
use crate::store::{AuditFilter, LeaseFilter, LeaseRecord, PageCursor};

/// Upstream revocations a bulk revoke runs at once.
pub const REVOKE_CONCURRENCY: usize = 8;

/// Leases read per store call while selecting.
const SELECT_BATCH: u32 = 500;

/// States a bulk revoke acts on (or reports as pending).
const LIVE: [LeaseState; 4] = [
    LeaseState::Active,
    LeaseState::Pending,
    LeaseState::Revoking,
    LeaseState::RevokeFailed,
];

/// Which leases a bulk revoke picks. At least one criterion must be set;
/// a lease must match every one that is.
#[derive(Clone, Debug, Default)]
pub struct LeaseSelector {
    /// Only this holder's.
    pub holder: Option<Identity>,
    /// Only leases in this organization.
    pub organization: Option<Organization>,
    /// Only leases whose scopes grant this one (with inclusion).
    pub scope: Option<Scope>,
    /// Only these leases (empty: no restriction by id).
    pub leases: Vec<LeaseId>,
}

impl LeaseSelector {
    /// True when no criterion is set (refused: never "everything").
    pub fn is_empty(&self) -> bool {
        self.holder.is_none()
            && self.organization.is_none()
            && self.scope.is_none()
            && self.leases.is_empty()
    }

    fn matches(&self, lease: &LeaseRecord) -> bool {
        self.holder.as_ref().is_none_or(|h| *h == lease.holder)
            && self
                .organization
                .as_ref()
                .is_none_or(|o| *o == lease.organization)
            && self
                .scope
                .as_ref()
                .is_none_or(|s| lease.scopes.covers_scope(s))
    }

    /// One line for the audit row and the log.
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(h) = &self.holder {
            parts.push(format!("holder={h}"));
        }
        if let Some(o) = &self.organization {
            parts.push(format!("organization={o}"));
        }
        if let Some(s) = &self.scope {
            parts.push(format!("scope={}", s.as_str()));
        }
        if !self.leases.is_empty() {
            parts.push(format!("leases={}", self.leases.len()));
        }
        parts.join(" ")
    }
}

/// What a bulk revoke did. `matched` = `revoked` + `revoking` + `pending` +
/// `failed`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BulkRevoke {
    /// Live leases (ACTIVE, PENDING, REVOKING, REVOKE_FAILED) selected.
    pub matched: u64,
    /// Now REVOKED or EXPIRED: their PATs are revoked upstream.
    pub revoked: u64,
    /// Upstream revocation failed for now; REVOKING or REVOKE_FAILED, retried
    /// in the background.
    pub revoking: u64,
    /// PENDING (create in flight): not revoked; call again.
    pub pending: u64,
    /// The store failed for these; their state is unchanged or unknown.
    pub failed: u64,
    /// Ids asked for by name that do not exist.
    pub not_found: Vec<LeaseId>,
}

/// A validated ListAuditEvents request. Unset filters match all.
#[derive(Clone, Debug, Default)]
pub struct AuditQuery {
    /// 1..=1000 (the api layer applies the default and the cap).
    pub page_size: u32,
    /// Opaque token from a previous page with the same filter; empty first.
    pub page_token: String,
    /// Only events at or after this time (UTC).
    pub start_time: Option<DateTime<Utc>>,
    /// Only events before this time (UTC).
    pub end_time: Option<DateTime<Utc>>,
    /// Only events by this identity, exactly as recorded (e.g.
    /// `apikey:ci`, or `-` for unauthenticated callers).
    pub identity: Option<String>,
    /// Only this action, e.g. `lease.create`.
    pub action: Option<String>,
    /// Only events about this lease.
    pub lease_id: Option<LeaseId>,
}

impl AuditQuery {
    /// The store's form of this query's filter. Bounds round up to the
    /// microsecond, so `time >= t` and `time < t` select exactly the stored
    /// (microsecond) events a full-precision comparison would.
    fn filter(&self) -> AuditFilter {
        AuditFilter {
            start_time: self.start_time.map(Timestamp::at_or_after),
            end_time: self.end_time.map(Timestamp::at_or_after),
            identity: self.identity.clone(),
            action: self.action.clone(),
            lease_id: self.lease_id,
        }
    }

    /// What a page token is bound to.
    fn binding(&self) -> String {
        let t = |t: Option<DateTime<Utc>>| t.map(|t| t.timestamp_micros().to_string());
        format!(
            "start={}\nend={}\nidentity={}\naction={}\nlease={}",
            t(self.start_time).unwrap_or_default(),
            t(self.end_time).unwrap_or_default(),
            self.identity.as_deref().unwrap_or_default(),
            self.action.as_deref().unwrap_or_default(),
            self.lease_id.map(|l| l.to_string()).unwrap_or_default(),
        )
    }
}

/// One page of audit events.
#[derive(Clone, Debug)]
pub struct AuditPage {
    /// Oldest first.
    pub events: Vec<AuditEvent>,
    /// Empty when no matching event follows this page.
    pub next_page_token: String,
}

/// Refuses (and audits, against `lease` when the call names one) a caller
/// the policy does not name as an admin.
async fn require_admin(
    deps: &LeaseDeps,
    caller: &Caller,
    action: &str,
    lease: Option<LeaseId>,
) -> Result<(), LeaseError> {
    if deps.policy.current().is_admin(&caller.identity) {
        return Ok(());
    }
    audit_best_effort(deps, denied_event(caller, action, "ADMIN_REQUIRED", lease)).await;
    tracing::info!(identity = %caller.identity, action, "admin call refused");
    Err(LeaseError::AdminRequired)
}

/// An admin call refused for `reason`, against `lease` when it names one.
fn denied_event(caller: &Caller, action: &str, reason: &str, lease: Option<LeaseId>) -> AuditEvent {
    AuditEvent {
        reason: Some(reason.to_owned()),
        lease_id: lease,
        ..admin_event(caller, action, Outcome::Denied)
    }
}

/// Admits an admin's read (audited as allowed), or refuses as
/// [`require_admin`] does.
async fn admit_read(deps: &LeaseDeps, caller: &Caller, action: &str) -> Result<(), LeaseError> {
    require_admin(deps, caller, action, None).await?;
    audit_best_effort(deps, admin_event(caller, action, Outcome::Allowed)).await;
    Ok(())
}

fn admin_event(caller: &Caller, action: &str, outcome: Outcome) -> AuditEvent {
    Actor::caller(caller).event(action, outcome, now())
}

/// See [`super::Leases::admin_revoke`].
pub(super) async fn revoke_leases(
    deps: &LeaseDeps,
    caller: &Caller,
    selector: LeaseSelector,
) -> Result<BulkRevoke, LeaseError> {
    const ACTION: &str = "admin.revoke_leases";
    require_admin(deps, caller, ACTION, None).await?;
    if selector.is_empty() {
        return Err(LeaseError::EmptySelector);
    }
    let (selected, not_found) = select(deps, &selector).await?;
    let mut outcome = BulkRevoke {
        matched: selected.len() as u64,
        not_found,
        ..BulkRevoke::default()
    };
    let actor = Actor::caller(caller);
    let mut results = stream::iter(
        selected
            .into_iter()
            .map(|lease| revoke_one(deps, &actor, lease)),
    )
    .buffer_unordered(REVOKE_CONCURRENCY);
    while let Some(state) = results.next().await {
        match state {
            Some(s) if s.is_terminal() => outcome.revoked += 1,
            Some(LeaseState::Pending) => outcome.pending += 1,
            Some(_) => outcome.revoking += 1,
            None => outcome.failed += 1,
        }
    }
    let event = AuditEvent {
        reason: Some(format!(
            "{}; matched={} revoked={} revoking={} pending={} failed={}",
            selector.describe(),
            outcome.matched,
            outcome.revoked,
            outcome.revoking,
            outcome.pending,
            outcome.failed
        )),
        organization: selector.organization.as_ref().map(ToString::to_string),
        scopes: selector.scope.as_ref().map(|s| s.as_str().to_owned()),
        ..admin_event(caller, ACTION, Outcome::Allowed)
    };
    audit_best_effort(deps, event).await;
    tracing::info!(
        identity = %caller.identity,
        selector = %selector.describe(),
        matched = outcome.matched,
        revoked = outcome.revoked,
        revoking = outcome.revoking,
        pending = outcome.pending,
        failed = outcome.failed,
        "bulk revoke done"
    );
    Ok(outcome)
}

/// The live leases `selector` picks, and the named ids that do not exist.
async fn select(
    deps: &LeaseDeps,
    selector: &LeaseSelector,
) -> Result<(Vec<LeaseRecord>, Vec<LeaseId>), LeaseError> {
    let mut selected = Vec::new();
    let mut not_found = Vec::new();
    if !selector.leases.is_empty() {
        let mut seen = HashSet::new();
        for &id in &selector.leases {
            if !seen.insert(id) {
                continue;
            }
            match deps.store.get_lease(id).await? {
                Some(lease) if LIVE.contains(&lease.state) && selector.matches(&lease) => {
                    selected.push(lease)
                }
                Some(_) => {}
                None => not_found.push(id),
            }
        }
        return Ok((selected, not_found));
    }
    let filter = LeaseFilter {
        holder: selector.holder.clone(),
        states: LIVE.to_vec(),
        organization: selector.organization.clone(),
    };
    let mut after: Option<PageCursor> = None;
    loop {
        let page = deps
            .store
            .list_leases(&filter, after.as_ref(), SELECT_BATCH)
            .await?;
        let full = page.len() == SELECT_BATCH as usize;
        after = page.last().map(|l| PageCursor {
            create_time: l.create_time,
            id: l.id,
        });
        selected.extend(page.into_iter().filter(|l| selector.matches(l)));
        if !full {
            break;
        }
    }
    Ok((selected, not_found))
}

/// Revokes one lease through the normal path; its state afterwards (None:
/// the store failed).
async fn revoke_one(deps: &LeaseDeps, actor: &Actor, mut lease: LeaseRecord) -> Option<LeaseState> {
    let id = lease.id;
    // Bounded rounds: each lost race means another actor moved the lease on.
    for _ in 0..5 {
        let result = match lease.state {
            LeaseState::Pending => return Some(LeaseState::Pending),
            s if s.is_terminal() => return Some(s),
            LeaseState::Active => match begin_revocation(deps, &lease, now()).await {
                Ok(Some(revoking)) => {
                    finish_revocation(deps, &revoking, actor, crate::audit::LEASE_REVOKE).await
                }
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            },
            // REVOKING or REVOKE_FAILED: try again now.
            _ => finish_revocation(deps, &lease, actor, crate::audit::LEASE_REVOKE).await,
        };
        match result {
            Ok(Some(done)) => return Some(done.state),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(lease_id = %id, error = %e, "bulk revoke of a lease failed");
                return None;
            }
        }
        match deps.store.get_lease(id).await {
            Ok(Some(current)) => lease = current,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(lease_id = %id, error = %e, "bulk revoke of a lease failed");
                return None;
            }
        }
    }
    Some(lease.state)
}

/// See [`super::Leases::admin_list`].
pub(super) async fn list_leases(
    deps: &LeaseDeps,
    caller: &Caller,
    holder: Option<Identity>,
    query: ListQuery,
) -> Result<LeasePage, LeaseError> {
    admit_read(deps, caller, "admin.list_leases").await?;
    let filter = LeaseFilter {
        holder,
        states: query.states,
        organization: query.organization,
    };
    super::lifecycle::page(deps, &filter, &query.page_token, query.page_size).await
}

/// Longest operator reason a force-revoke records, in characters (the api
/// layer refuses longer ones).
pub const MAX_FORCE_REASON_CHARS: usize = 512;

/// How often, and how many times, a force-revoke re-reads a lease that
/// background work holds before answering LEASE_BUSY (about 10 s).
const FORCE_BUSY_POLL: std::time::Duration = std::time::Duration::from_millis(250);
const FORCE_BUSY_POLLS: u32 = 40;

/// See [`super::Leases::admin_force_revoke`].
pub(super) async fn force_revoke(
    deps: &LeaseDeps,
    caller: &Caller,
    id: LeaseId,
    reason: Option<String>,
) -> Result<LeaseRecord, LeaseError> {
    const ACTION: &str = crate::audit::LEASE_FORCE_REVOKE;
    // Refusals are audited against the lease asked for, so an audit query
    // by lease shows every attempt to force it.
    require_admin(deps, caller, ACTION, Some(id)).await?;
    let refuse =
        |reason: &str| audit_best_effort(deps, denied_event(caller, ACTION, reason, Some(id)));
    // A background retry holding the lease may be revoking upstream right
    // now: its outcome decides first. Such a retry is one upstream call, so
    // wait a little for it before answering LEASE_BUSY.
    let mut waited = 0;
    let lease = loop {
        let Some(lease) = deps.store.get_lease(id).await? else {
            refuse("LEASE_NOT_FOUND").await;
            return Err(LeaseError::NotFound);
        };
        let held = lease.claimed_until.is_some_and(|until| until > now());
        if !held || lease.state != LeaseState::RevokeFailed {
            break lease;
        }
        if waited == FORCE_BUSY_POLLS {
            refuse("LEASE_BUSY").await;
            let left = lease
                .claimed_until
                .map(|until| (until - now()).to_std().unwrap_or_default())
                .unwrap_or_default();
            return Err(LeaseError::Busy {
                retry_after: left.max(std::time::Duration::from_secs(1)),
            });
        }
        waited += 1;
        tokio::time::sleep(FORCE_BUSY_POLL).await;
    };
    if lease.state != LeaseState::RevokeFailed {
        let err = LeaseError::NotForceable(lease.state);
        refuse(&format!(
            "LEASE_NOT_REVOKE_FAILED: lease is {}",
            lease.state
        ))
        .await;
        return Err(err);
    }
    let now = now();
    let left_live = left_live(&lease);
    let (closed, expected) = lease.force_closed(
        now,
        match &lease.last_error {
            Some(previous) => format!(
                "force-closed by {}: {left_live}; last upstream error: {previous}",
                caller.identity
            ),
            None => format!("force-closed by {}: {left_live}", caller.identity),
        },
    );
    // CAS on REVOKE_FAILED: a background retry that reached upstream and
    // recorded REVOKED first wins, and this call then reports that state.
    if !deps.store.update_lease(&closed, expected).await? {
        let state = deps
            .store
            .get_lease(id)
            .await?
            .map(|l| l.state)
            .ok_or(LeaseError::NotFound)?;
        refuse(&format!("LEASE_NOT_REVOKE_FAILED: lease is {state}")).await;
        return Err(LeaseError::NotForceable(state));
    }
    let event = AuditEvent {
        reason: Some(format!(
            "closed as {} without an upstream revoke; {left_live}; operator reason: {}",
            closed.state,
            reason.as_deref().unwrap_or("(none given)")
        )),
        token_fingerprint: lease_token_fingerprint(deps, &closed),
        ..Actor::caller(caller).lease_event(ACTION, Outcome::Allowed, &closed, now)
    };
    audit_best_effort(deps, event).await;
    tracing::warn!(
        lease_id = %id,
        identity = %caller.identity,
        state = %closed.state,
        authorization_id = %lease.authorization_id.map(|a| a.to_string()).unwrap_or_default(),
        valid_to = %lease.upstream_valid_to.map(|t| t.to_rfc3339()).unwrap_or_default(),
        "lease force-revoked: its PAT is left live upstream until its validTo unless the orphan sweep revokes it"
    );
    Ok(closed)
}

/// What a force-revoke leaves behind, for the lease's last_error and the
/// audit row: `upstream PAT <authorizationId> left live until its validTo
/// <RFC 3339> unless the orphan sweep revokes it`.
fn left_live(lease: &LeaseRecord) -> String {
    let valid_to = match lease.upstream_valid_to {
        Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        None => "(unknown)".to_owned(),
    };
    match lease.authorization_id {
        Some(a) => format!(
            "upstream PAT {a} left live until its validTo {valid_to} unless the orphan sweep revokes it"
        ),
        None => "no upstream PAT was recorded".to_owned(),
    }
}

/// See [`super::Leases::admin_lookup_token`].
pub(super) async fn lookup_token(
    deps: &LeaseDeps,
    caller: &Caller,
    token: &SecretString,
) -> Result<LeaseRecord, LeaseError> {
    const ACTION: &str = crate::audit::ADMIN_LOOKUP_TOKEN;
    // Every row of this call carries the token's fingerprint (under the
    // active key, as the row's fingerprint_key_id says), never the token:
    // so the trail shows who looked up which token, allowed or not.
    let fingerprint = deps.fingerprinter.fingerprint(token);
    let refuse = |reason: &str| {
        audit_best_effort(
            deps,
            AuditEvent {
                token_fingerprint: Some(fingerprint.clone()),
                ..denied_event(caller, ACTION, reason, None)
            },
        )
    };
    if !deps.policy.current().is_admin(&caller.identity) {
        refuse("ADMIN_REQUIRED").await;
        tracing::info!(identity = %caller.identity, action = ACTION, "admin call refused");
        return Err(LeaseError::AdminRequired);
    }
    let candidates = deps.fingerprinter.fingerprints(token);
    let found = match deps
        .store
        .find_lease_by_token_fingerprint(&candidates)
        .await?
    {
        Some(id) => deps.store.get_lease(id).await?,
        None => None,
    };
    // A lease that still holds its sealed token must hold this one: an
    // audit row pointing a token at another lease is not believed.
    let lease = found.filter(|lease| match lease.sealed_token {
        None => true,
        Some(_) => match open_token(deps, lease) {
            Ok(held) => held.expose_secret() == token.expose_secret(),
            Err(e) => {
                tracing::warn!(lease_id = %lease.id, error = %e, "sealed token does not open; trusting the audit trail");
                true
            }
        },
    });
    let Some(lease) = lease else {
        refuse("LEASE_NOT_FOUND").await;
        tracing::info!(identity = %caller.identity, "token look-up matched no lease");
        return Err(LeaseError::NotFound);
    };
    let event = AuditEvent {
        token_fingerprint: Some(fingerprint),
        reason: Some(format!("lease is {}", lease.state)),
        ..Actor::caller(caller).lease_event(ACTION, Outcome::Allowed, &lease, now())
    };
    audit_best_effort(deps, event).await;
    tracing::info!(identity = %caller.identity, lease_id = %lease.id, state = %lease.state, "token looked up");
    Ok(lease)
}

/// See [`super::Leases::audit_events`].
pub(super) async fn audit_events(
    deps: &LeaseDeps,
    caller: &Caller,
    query: AuditQuery,
) -> Result<AuditPage, LeaseError> {
    admit_read(deps, caller, "admin.list_audit_events").await?;
    let limit = query.page_size.clamp(1, 1000);
    let after = if query.page_token.is_empty() {
        0
    } else {
        decode_audit_token(deps, &query, &query.page_token)?
    };
    // One row past the page says whether another page exists.
    let mut events = deps
        .store
        .list_audit_matching(&query.filter(), after, limit + 1)
        .await?;
    let more = events.len() > limit as usize;
    events.truncate(limit as usize);
    let after = events.last().map_or(after, |e| e.id);
    let next_page_token = if more {
        encode_audit_token(deps, &query, after)
    } else {
        String::new()
    };
    Ok(AuditPage {
        events,
        next_page_token,
    })
}

const AUDIT_TOKEN_DOMAIN: &str = "tokenbroker.audit_page_token.v1";

fn encode_audit_token(deps: &LeaseDeps, query: &AuditQuery, after_id: i64) -> String {
    let payload = format!("a1|{after_id}");
    super::page_token::seal(
        &deps.fingerprinter,
        AUDIT_TOKEN_DOMAIN,
        &query.binding(),
        &payload,
    )
}

fn decode_audit_token(
    deps: &LeaseDeps,
    query: &AuditQuery,
    token: &str,
) -> Result<i64, LeaseError> {
    let payload = super::page_token::open(
        &deps.fingerprinter,
        AUDIT_TOKEN_DOMAIN,
        &query.binding(),
        token,
    )?;
    payload
        .strip_prefix("a1|")
        .and_then(|id| id.parse::<i64>().ok())
        .ok_or(LeaseError::InvalidPageToken)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_selector_without_criteria_is_empty_and_any_criterion_is_not() {
        assert!(LeaseSelector::default().is_empty());
        let by_org = LeaseSelector {
            organization: Some(Organization::parse("fabrikam").unwrap()),
            ..Default::default()
        };
        assert!(!by_org.is_empty());
        let by_id = LeaseSelector {
            leases: vec![LeaseId::new()],
            ..Default::default()
        };
        assert!(!by_id.is_empty());
    }
}
