//! Revoking a lease's PAT upstream: the steps both an explicit revoke and
//! background work go through (begin, then finish or back off), the retry
//! schedule between attempts, and the search by display name for a PAT
//! whose create answer was lost.

use std::collections::HashMap;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use super::auditing::{write_audited, Actor};
use super::sealing::lease_token_fingerprint;
use super::time::now;
use super::{LeaseDeps, LeaseError, RetrySchedule};
use crate::audit::{AuditEvent, Outcome};
use crate::domain::Timestamp;
use crate::domain::{AuthorizationId, LeaseId, LeaseState, Organization};
use crate::store::{LeaseRecord, LeaseWrite};
use crate::upstream::{DisplayFilter, ListPats, PatPages, UpstreamError};

impl RetrySchedule {
    /// True once `attempts` failures have spent the budget.
    pub(crate) fn budget_spent(&self, attempts: i32) -> bool {
        i64::from(attempts) >= i64::from(self.max_attempts)
    }

    /// Backoff before revocation attempt number `attempts + 1`: jittered
    /// exponential from `min_delay` up to `max_delay` (backon's schedule,
    /// kept in rows), then `failed_interval` once the budget is spent.
    pub(crate) fn backoff(&self, attempts: i32) -> Duration {
        if self.budget_spent(attempts) {
            return self.failed_interval;
        }
        let step = usize::try_from(attempts.max(1) - 1).unwrap_or(0);
        ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_jitter()
            .without_max_times()
            .build()
            .nth(step)
            .unwrap_or(self.max_delay)
    }
}

/// Moves an ACTIVE lease to REVOKING ([`LeaseRecord::begin_revoking`];
/// compare-and-set on its state and on `update_time`, so a renewal
/// committed since `lease` was read is never overwritten with its old
/// expire_time). Returns None if the row had moved: the caller reads it
/// again.
pub(super) async fn begin_revocation(
    deps: &LeaseDeps,
    lease: &LeaseRecord,
    now: Timestamp,
) -> Result<Option<LeaseRecord>, LeaseError> {
    let (next, expected) = lease.begin_revoking(now);
    let moved = deps
        .store
        .update_lease_unchanged(&next, expected, lease.update_time)
        .await?;
    Ok(moved.then_some(next))
}

/// Revokes PAT `id` in `organization` upstream; upstream "not found" counts
/// as revoked (the PAT is gone, which is the goal).
pub(super) async fn revoke_upstream(
    deps: &LeaseDeps,
    organization: &Organization,
    id: AuthorizationId,
) -> Result<(), UpstreamError> {
    match deps.upstream.revoke(organization, id).await {
        Err(e) if e.is_not_found() => Ok(()),
        other => other,
    }
}

/// Revokes the PAT of a REVOKING or REVOKE_FAILED lease upstream and records
/// the outcome ([`LeaseRecord::revoked`] or
/// [`LeaseRecord::revoke_attempt_failed`]), audited as `action` by `actor`.
/// Returns the lease as stored, or None if another actor moved it
/// meanwhile. Never holds a transaction across the upstream call; clears
/// any claim it writes over.
pub(super) async fn finish_revocation(
    deps: &LeaseDeps,
    lease: &LeaseRecord,
    actor: &Actor,
    action: &str,
) -> Result<Option<LeaseRecord>, LeaseError> {
    let result = match lease.authorization_id {
        Some(authorization_id) => {
            revoke_upstream(deps, &lease.organization, authorization_id).await
        }
        // No PAT was ever recorded: nothing to revoke upstream.
        None => Ok(()),
    };
    let now = now();
    let (next, expected) = match &result {
        Ok(()) => lease.revoked(now),
        Err(e) => lease.revoke_attempt_failed(
            now,
            &deps.settings.revocation_retry,
            format!("upstream revoke failed: {e}"),
        ),
    };
    let (outcome, reason) = match &result {
        Ok(()) => {
            tracing::info!(lease_id = %lease.id, state = %next.state, "lease revoked upstream");
            (Outcome::Allowed, None)
        }
        Err(e) => {
            tracing::warn!(lease_id = %lease.id, attempt = next.attempts, error = %e, "upstream revoke failed");
            (Outcome::Error, Some("UPSTREAM_REVOKE_FAILED".to_owned()))
        }
    };
    let event = AuditEvent {
        reason,
        token_fingerprint: lease_token_fingerprint(deps, &next),
        ..actor.lease_event(action, outcome, &next, now)
    };
    let write = LeaseWrite {
        lease: next.clone(),
        expected,
    };
    if !write_audited(deps, event, write).await? {
        return Ok(None);
    }
    // As stored: a lease out of ACTIVE keeps no token (the store writes
    // none); the audit row's fingerprint was taken before.
    Ok(Some(LeaseRecord {
        sealed_token: None,
        ..next
    }))
}

/// Retries, as background work, the revocation of a REVOKING or
/// REVOKE_FAILED lease ([`finish_revocation`]), audited as `lease.expire`
/// if it ends EXPIRED, else `lease.revoke`.
pub(super) async fn retry_revocation(
    deps: &LeaseDeps,
    lease: &LeaseRecord,
) -> Result<Option<LeaseRecord>, LeaseError> {
    let action = match lease.final_state() {
        LeaseState::Expired => crate::audit::LEASE_EXPIRE,
        _ => crate::audit::LEASE_REVOKE,
    };
    finish_revocation(deps, lease, &Actor::background(), action).await
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
/// displayName is the lease's (the display name embeds the lease id, so
/// only this lease's PATs match): [`revoke_by_display_names`] for one
/// name. PATs found are revoked even when the listing is incomplete;
/// [`NameSearch::complete`] says whether the search was exhaustive. An
/// error if the list or a revoke failed (some may be left).
pub(super) async fn revoke_by_display_name(
    deps: &LeaseDeps,
    lease: &LeaseRecord,
) -> Result<NameSearch, UpstreamError> {
    let search = revoke_by_display_names(
        deps,
        &lease.organization,
        &[(lease.id, lease.display_name.as_str())],
    )
    .await;
    let NameRevocations { revoked, failed } = search.names.into_iter().next().unwrap_or_default();
    if let Some(e) = failed {
        return Err(e);
    }
    Ok(NameSearch {
        revoked,
        complete: search.listing?,
    })
}

/// What [`revoke_by_display_names`] did for one display name.
#[derive(Debug, Default)]
pub(super) struct NameRevocations {
    /// PATs with the name revoked (not-found counts), each once.
    pub revoked: usize,
    /// The first revoke of a PAT with the name that failed.
    pub failed: Option<UpstreamError>,
}

/// What [`revoke_by_display_names`] did.
#[derive(Debug)]
pub(super) struct SharedSearch {
    /// Per display name, in the order asked.
    pub names: Vec<NameRevocations>,
    /// Ok(complete) when the listing ended: complete when every page was
    /// read, false when paging stopped early (a PAT with one of the names
    /// may still exist). The error when it failed part way: the PATs of
    /// the pages read before were still revoked.
    pub listing: Result<bool, UpstreamError>,
}

/// Revokes every live upstream PAT in `organization` whose displayName is
/// one of `names` (each a lease's, with its id for the logs), over one
/// listing read page by page (memory bounded by a page, not by the
/// organization's PAT count), `background_workers` revokes at a time.
/// PATs found are revoked even when the listing stops early or fails.
pub(super) async fn revoke_by_display_names(
    deps: &LeaseDeps,
    organization: &Organization,
    names: &[(LeaseId, &str)],
) -> SharedSearch {
    use futures::stream::{self, StreamExt as _};
    let query = ListPats {
        display_filter: Some(DisplayFilter::Active),
        top: None,
    };
    let index: HashMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, (_, name))| (*name, i))
        .collect();
    let mut found: Vec<NameRevocations> =
        names.iter().map(|_| NameRevocations::default()).collect();
    // Ids revoked per name: a streamed listing may repeat a PAT (see
    // `upstream::pages`); holds only the PATs matched.
    let mut done: Vec<Vec<AuthorizationId>> = vec![Vec::new(); names.len()];
    let mut pages = PatPages::new(&*deps.upstream, organization, query);
    let listing = loop {
        let page = match pages.next_page().await {
            Ok(Some(page)) => page,
            Ok(None) => break Ok(pages.complete()),
            Err(e) => break Err(e),
        };
        let matched: Vec<(usize, AuthorizationId)> = page
            .iter()
            .filter_map(|pat| {
                let i = *index.get(pat.display_name.as_str())?;
                let id = pat.authorization_id;
                (!done[i].contains(&id)).then_some((i, id))
            })
            .collect();
        let results: Vec<_> = stream::iter(matched)
            .map(|(i, id)| async move {
                let result = revoke_upstream(deps, organization, id).await;
                (i, id, result)
            })
            .buffer_unordered(deps.settings.background_workers.max(1))
            .collect()
            .await;
        for (i, id, result) in results {
            let lease_id = names[i].0;
            match result {
                Ok(()) => {
                    done[i].push(id);
                    found[i].revoked += 1;
                    tracing::info!(lease_id = %lease_id, authorization_id = %id, "revoked a PAT found by the lease's display name");
                }
                Err(e) => {
                    tracing::warn!(lease_id = %lease_id, authorization_id = %id, error = %e, "could not revoke a PAT found by the lease's display name");
                    found[i].failed.get_or_insert(e);
                }
            }
        }
    };
    SharedSearch {
        names: found,
        listing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocation_retries_back_off_from_seconds_to_minutes_then_hourly() {
        let schedule = RetrySchedule::default();
        for attempts in 1..10 {
            let delay = schedule.backoff(attempts);
            assert!(delay >= Duration::from_secs(5), "{attempts}: {delay:?}");
            assert!(delay <= Duration::from_secs(1200), "{attempts}: {delay:?}");
        }
        assert!(schedule.backoff(8) > schedule.backoff(1));
        assert_eq!(schedule.backoff(10), Duration::from_secs(3600));
        assert!(!schedule.budget_spent(9));
        assert!(schedule.budget_spent(10));
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
            let delay = schedule.backoff(attempts);
            assert!(delay >= Duration::from_millis(100), "{attempts}: {delay:?}");
            assert!(delay <= Duration::from_millis(800), "{attempts}: {delay:?}");
        }
        assert_eq!(schedule.backoff(3), Duration::from_secs(2));
    }
}
