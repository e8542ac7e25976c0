//! The orphan sweep: every `leases.sweep_interval`, one
//! replica of the deployment lists the ACTIVE upstream PATs of every
//! organization the deployment has leased in and revokes each PAT named
//! `<prefix>:<deployment id>:<lease id>` that no live lease owns. Any other
//! name (another deployment's, a longer prefix, a human's) is never touched.
//!
//! It scales with a page, not with an organization: PATs are read as
//! upstream pages them ([`PatPages`]: a page is worked once the next one is
//! fetched, so revoking never moves the continuation token under the
//! listing) and the lease rows of a page's candidates are read in one
//! store query ([`crate::store::Store::get_leases`], by primary key).
//! Nothing is kept across pages or organizations: a PAT listed twice (a
//! listing that repeats it, or one PAT in two organizations, which the
//! broker never makes) is judged afresh each time, and revoked again at
//! most (not-found counts as revoked).
//!
//! Safe on any replica at any time:
//! - the run is a committed claim on the `background_jobs` row (one
//!   replica per interval; no transaction spans an upstream call), and it
//!   starts no revoke once three quarters of that claim are spent, so two
//!   sweeps overlap only if a call begun before then outlives the claim
//!   (a repeated revoke is harmless: not-found counts as revoked);
//! - the sweep's start `t0` is taken before any listing: a lease row
//!   written at or after `t0` moved during the sweep and is left to the
//!   next one;
//! - before revoking the PAT of a lease row the sweep claims that row
//!   (only if unclaimed and unchanged since `t0`), so the reaper, the
//!   revocation queue and the reconciler, which all work by claims, never
//!   revoke it at the same time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::auditing::{audit_best_effort, Actor};
use super::revocation::{retry_revocation, revoke_upstream};
use super::time::{chrono_duration, now};
use super::{LeaseDeps, LeaseError};
use crate::audit::{AuditEvent, Outcome};
use crate::domain::Timestamp;
use crate::domain::{AuthorizationId, LeaseId, LeaseState, Organization};
use crate::store::LeaseRecord;
use crate::upstream::{DisplayFilter, ListPats, PatPages, PatToken};

/// The sweep's row in `background_jobs`.
const SWEEP_JOB: &str = "orphan_sweep";

/// What one call of [`sweep_if_due`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// False when it was not this replica's turn (another replica holds the
    /// sweep's claim, or the last sweep is younger than `sweep_interval`);
    /// every count is then zero.
    pub ran: bool,
    /// Organizations whose PATs were listed (to the end, or up to where
    /// the listing stopped early or the sweep was cut short).
    pub organizations: usize,
    /// Organizations whose listing failed (upstream error); the PATs of
    /// the pages read before the failure were swept, and the other
    /// organizations still were.
    pub failed_organizations: usize,
    /// Organizations whose listing stopped early: the PATs read were
    /// swept, others may remain for the next sweep.
    pub incomplete_organizations: usize,
    /// PATs named with this deployment's prefix and a lease id.
    pub candidates: usize,
    /// Candidates owned by a live lease (left alone).
    pub live: usize,
    /// Candidates whose lease moved during the sweep or is claimed by other
    /// background work (left to the next sweep).
    pub busy: usize,
    /// Orphans revoked upstream (not-found counts as revoked).
    pub revoked: usize,
    /// Orphans whose upstream revoke failed (retried by the next sweep).
    pub revoke_failures: usize,
    /// True when the sweep stopped before the end (shutdown, or its claim
    /// about to lapse); the rest waits for the next sweep.
    pub cut_short: bool,
}

/// The upstream display name of lease `id`: `<prefix>:<deployment_id>:<id>`
/// (see "display name" in docs/architecture.md), what
/// [`lease_of_display_name`] reads back.
pub(super) fn display_name(prefix: &str, deployment_id: &str, id: LeaseId) -> String {
    format!("{prefix}:{deployment_id}:{id}")
}

/// The lease id in `display_name` if the name is exactly
/// `<prefix>:<deployment_id>:<lease id>` with the id in its canonical
/// (hyphenated lower-case) form, as the broker writes it; None for any
/// other name, which the sweep must never touch.
pub(super) fn lease_of_display_name(
    display_name: &str,
    prefix: &str,
    deployment_id: &str,
) -> Option<LeaseId> {
    let rest = display_name
        .strip_prefix(prefix)?
        .strip_prefix(':')?
        .strip_prefix(deployment_id)?
        .strip_prefix(':')?;
    let id = LeaseId::from_uuid(uuid::Uuid::parse_str(rest).ok()?);
    (id.to_string() == rest).then_some(id)
}

/// Why a PAT is an orphan (the audit event's `reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Orphan {
    /// No lease row carries the id.
    NoLease,
    /// The lease is finished (FAILED, REVOKED, EXPIRED, REVOKE_FAILED).
    Finished(LeaseState),
    /// The lease is live but records another PAT.
    NotTheLeasesPat,
}

impl Orphan {
    fn reason(self) -> &'static str {
        match self {
            Orphan::NoLease => "ORPHAN_NO_LEASE",
            Orphan::Finished(LeaseState::Failed) => "ORPHAN_LEASE_FAILED",
            Orphan::Finished(LeaseState::Revoked) => "ORPHAN_LEASE_REVOKED",
            Orphan::Finished(LeaseState::Expired) => "ORPHAN_LEASE_EXPIRED",
            Orphan::Finished(_) => "ORPHAN_LEASE_REVOKE_FAILED",
            Orphan::NotTheLeasesPat => "ORPHAN_NOT_THE_LEASES_PAT",
        }
    }
}

/// What the sweep makes of one candidate PAT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// A live lease owns it: ACTIVE or REVOKING (its recorded PAT), or
    /// PENDING younger than `reconcile_after`.
    Live,
    /// The lease row was written at or after `t0`, other background work
    /// holds a live claim on it, or it is a stale PENDING lease (the
    /// reconciler's): the next sweep decides.
    Busy,
    /// Nobody owns it: revoke.
    Orphan(Orphan),
}

/// Decides about the PAT `pat` named after `lease` (None: no such row),
/// as read at `now` during a sweep that began at `t0`.
fn verdict(
    lease: Option<&LeaseRecord>,
    pat: AuthorizationId,
    t0: Timestamp,
    now: Timestamp,
    reconcile_after: Duration,
) -> Verdict {
    let Some(lease) = lease else {
        // The row is committed before the upstream create, so a PAT
        // without one was never the broker's to keep.
        return Verdict::Orphan(Orphan::NoLease);
    };
    if lease.update_time >= t0 || lease.claimed_until.is_some_and(|until| until > now) {
        return Verdict::Busy;
    }
    match lease.state {
        LeaseState::Active | LeaseState::Revoking => match lease.authorization_id {
            Some(owned) if owned != pat => Verdict::Orphan(Orphan::NotTheLeasesPat),
            _ => Verdict::Live,
        },
        // Young as long as the reconciler would not take it
        // (`Work::Reconcile` takes create_time < now - reconcile_after).
        LeaseState::Pending if lease.create_time + chrono_duration(reconcile_after) >= now => {
            Verdict::Live
        }
        // A stale PENDING lease is the reconciler's: it settles the row
        // (FAILED) before revoking, so a create still in flight cannot turn
        // it ACTIVE under a revoked PAT; once FAILED, its PAT is an orphan.
        LeaseState::Pending => Verdict::Busy,
        state => Verdict::Orphan(Orphan::Finished(state)),
    }
}

/// The sweep's name in `claimed_by`: the replica's, marked, so the
/// replica's own passes (which run beside it and release claims under the
/// replica's name) can never release a claim the sweep holds.
fn claimer(deps: &LeaseDeps) -> String {
    format!("{}/sweep", deps.settings.replica_id)
}

/// How long the sweep's claim lasts: at least one interval, so a replica
/// that dies mid-sweep delays the next one by about an interval at most.
fn sweep_claim(deps: &LeaseDeps) -> Duration {
    deps.settings
        .sweep_interval
        .max(super::background::claim_for(deps))
}

/// Runs a sweep if it is due and no other replica holds it (see the
/// module doc); once `stop` is set, it ends after the call in hand and
/// leaves its claim to lapse. Store errors end the sweep; upstream errors
/// are counted and the sweep goes on with the next PAT or organization.
pub(super) async fn sweep_if_due(
    deps: &LeaseDeps,
    stop: &AtomicBool,
) -> Result<SweepReport, LeaseError> {
    let settings = &deps.settings;
    let claim = sweep_claim(deps);
    // t0: taken before the claim and before any listing.
    let t0 = now();
    if !deps
        .store
        .claim_job(
            SWEEP_JOB,
            t0,
            &claimer(deps),
            claim,
            // Turns are checked every reaper_interval, and a run's recorded
            // start falls just after its tick: half a tick of slack keeps
            // the cadence at sweep_interval, not sweep_interval + a tick.
            settings
                .sweep_interval
                .saturating_sub(settings.reaper_interval / 2),
        )
        .await?
    {
        return Ok(SweepReport::default());
    }
    // Stop revoking while a quarter of the claim is left, so no other
    // replica's sweep can start while this one still acts.
    let deadline = tokio::time::Instant::now() + claim - claim / 4;
    let mut report = SweepReport {
        ran: true,
        ..SweepReport::default()
    };
    sweep(deps, t0, stop, deadline, &mut report).await?;
    if report.cut_short && stop.load(Ordering::Relaxed) {
        tracing::info!(
            ?report,
            "orphan sweep stopped by shutdown; the claim lapses"
        );
        return Ok(report);
    }
    deps.store.finish_job(SWEEP_JOB, &claimer(deps), t0).await?;
    tracing::info!(
        organizations = report.organizations,
        failed_organizations = report.failed_organizations,
        incomplete_organizations = report.incomplete_organizations,
        candidates = report.candidates,
        revoked = report.revoked,
        revoke_failures = report.revoke_failures,
        cut_short = report.cut_short,
        "orphan sweep done"
    );
    Ok(report)
}

async fn sweep(
    deps: &LeaseDeps,
    t0: Timestamp,
    stop: &AtomicBool,
    deadline: tokio::time::Instant,
    report: &mut SweepReport,
) -> Result<(), LeaseError> {
    let must_end = || stop.load(Ordering::Relaxed) || tokio::time::Instant::now() >= deadline;
    // In a random order, so a sweep cut short by its deadline does not
    // leave the same organizations unswept every time.
    let mut organizations = deps.store.lease_organizations().await?;
    {
        use rand::seq::SliceRandom as _;
        organizations.shuffle(&mut rand::thread_rng());
    }
    for org in organizations {
        if must_end() {
            report.cut_short = true;
            return Ok(());
        }
        sweep_organization(deps, &org, t0, &must_end, report).await?;
        if report.cut_short {
            return Ok(());
        }
    }
    Ok(())
}

/// Sweeps one organization's active PATs as upstream pages them, each
/// page's candidates looked up in the store at once; sets
/// `report.cut_short` if `must_end` stopped it.
async fn sweep_organization(
    deps: &LeaseDeps,
    org: &Organization,
    t0: Timestamp,
    must_end: &(dyn Fn() -> bool + Sync),
    report: &mut SweepReport,
) -> Result<(), LeaseError> {
    let query = ListPats {
        display_filter: Some(DisplayFilter::Active),
        top: None,
    };
    let mut pages = PatPages::new(&*deps.upstream, org, query);
    let mut listed = 0usize;
    loop {
        if must_end() {
            report.cut_short = true;
            if listed > 0 {
                report.organizations += 1;
            }
            return Ok(());
        }
        let page = match pages.next_page().await {
            Ok(Some(page)) => page,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(organization = %org, listed, error = %e, "orphan sweep could not list PATs; swept those read, other organizations go on");
                report.failed_organizations += 1;
                return Ok(());
            }
        };
        listed += page.len();
        sweep_page(deps, org, &page, t0, must_end, report).await?;
        if report.cut_short {
            report.organizations += 1;
            return Ok(());
        }
    }
    report.organizations += 1;
    if !pages.complete() {
        tracing::warn!(organization = %org, listed, "orphan sweep read an incomplete listing; swept what it found");
        report.incomplete_organizations += 1;
    }
    Ok(())
}

/// Sweeps the candidates on one page of `org`'s listing: their lease rows
/// are read in one store query, then each is judged and, if an orphan,
/// revoked. Sets `report.cut_short` if `must_end` stopped it.
async fn sweep_page(
    deps: &LeaseDeps,
    org: &Organization,
    page: &[PatToken],
    t0: Timestamp,
    must_end: &(dyn Fn() -> bool + Sync),
    report: &mut SweepReport,
) -> Result<(), LeaseError> {
    let settings = &deps.settings;
    let candidates: Vec<(&PatToken, LeaseId)> = page
        .iter()
        .filter_map(|pat| {
            let id = lease_of_display_name(
                &pat.display_name,
                &settings.display_name_prefix,
                &settings.deployment_id,
            )?;
            Some((pat, id))
        })
        .collect();
    if candidates.is_empty() {
        return Ok(());
    }
    let ids: Vec<LeaseId> = candidates.iter().map(|(_, id)| *id).collect();
    let rows: HashMap<LeaseId, LeaseRecord> = deps
        .store
        .get_leases(&ids)
        .await?
        .into_iter()
        .map(|lease| (lease.id, lease))
        .collect();
    // Judged as read now, even when several PATs carry one lease's name:
    // before anything is revoked, a claim re-checks in its own statement
    // that the row is unclaimed and unchanged since t0.
    let read_at = now();
    for (pat, lease_id) in candidates {
        report.candidates += 1;
        if must_end() {
            report.cut_short = true;
            return Ok(());
        }
        let lease = rows.get(&lease_id);
        sweep_pat(deps, org, pat, lease_id, lease, t0, read_at, report).await?;
    }
    Ok(())
}

/// Decides about one candidate PAT, given its lease row as read at
/// `read_at` (None: no such row), and revokes it if it is an orphan.
#[allow(clippy::too_many_arguments)]
async fn sweep_pat(
    deps: &LeaseDeps,
    org: &Organization,
    pat: &PatToken,
    lease_id: LeaseId,
    lease: Option<&LeaseRecord>,
    t0: Timestamp,
    read_at: Timestamp,
    report: &mut SweepReport,
) -> Result<(), LeaseError> {
    let settings = &deps.settings;
    let orphan = match verdict(
        lease,
        pat.authorization_id,
        t0,
        read_at,
        settings.reconcile_after,
    ) {
        Verdict::Live => {
            report.live += 1;
            return Ok(());
        }
        Verdict::Busy => {
            report.busy += 1;
            return Ok(());
        }
        Verdict::Orphan(orphan) => orphan,
    };
    // Own the row while revoking, so no claim-taking worker acts on it too;
    // the claim re-checks, in the same statement, that the row is still in
    // the state judged and unchanged since t0.
    if let Some(lease) = lease {
        if !deps
            .store
            .claim_lease(
                lease_id,
                lease.state,
                // The claim's own time: a page's revokes may have taken
                // a while since the row was read.
                now(),
                &claimer(deps),
                super::background::claim_for(deps),
                t0,
            )
            .await?
        {
            report.busy += 1;
            return Ok(());
        }
        if lease.state == LeaseState::RevokeFailed
            && lease.authorization_id == Some(pat.authorization_id)
        {
            // Its own PAT: finish the revocation the normal way, so the
            // lease leaves REVOKE_FAILED (and the failed list) with its own
            // audit row.
            finish_revoke_failed(deps, lease, report).await;
            return Ok(());
        }
    }
    let result = revoke_upstream(deps, org, pat.authorization_id).await;
    if lease.is_some() {
        release(deps, lease_id).await;
    }
    let outcome = match &result {
        Ok(()) => {
            report.revoked += 1;
            tracing::info!(organization = %org, lease_id = %lease_id, authorization_id = %pat.authorization_id, reason = orphan.reason(), "orphan PAT revoked");
            Outcome::Allowed
        }
        Err(e) => {
            report.revoke_failures += 1;
            tracing::warn!(organization = %org, lease_id = %lease_id, authorization_id = %pat.authorization_id, reason = orphan.reason(), error = %e, "orphan PAT revoke failed; the next sweep retries");
            Outcome::Error
        }
    };
    let event = AuditEvent {
        reason: Some(orphan.reason().to_owned()),
        lease_id: Some(lease_id),
        organization: Some(org.to_string()),
        scopes: Some(pat.scope.clone()),
        ..Actor::background().event(crate::audit::PAT_REVOKE_ORPHAN, outcome, super::time::now())
    };
    audit_best_effort(deps, event).await;
    Ok(())
}

/// Retries the revocation of a REVOKE_FAILED lease the sweep has claimed
/// (`revocation::retry_revocation`: REVOKED or EXPIRED on success, else
/// one more failed attempt), and gives the claim back if the row was not
/// rewritten.
async fn finish_revoke_failed(deps: &LeaseDeps, lease: &LeaseRecord, report: &mut SweepReport) {
    match retry_revocation(deps, lease).await {
        Ok(Some(done)) if done.state.is_terminal() => report.revoked += 1,
        Ok(Some(_)) => report.revoke_failures += 1,
        Ok(None) => release(deps, lease.id).await,
        Err(e) => {
            tracing::warn!(lease_id = %lease.id, error = %e, "orphan sweep could not finish a REVOKE_FAILED lease");
            report.revoke_failures += 1;
            release(deps, lease.id).await;
        }
    }
}

/// Gives the sweep's claim on a lease row back, best effort (an unreleased
/// claim lapses).
async fn release(deps: &LeaseDeps, id: LeaseId) {
    if let Err(e) = deps.store.release_claim(id, &claimer(deps)).await {
        tracing::warn!(lease_id = %id, error = %e, "could not release claim");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Identity, ScopeSet};
    use chrono::{TimeZone, Utc};

    const ID: &str = "0b6f6a0e-8a51-4a4e-9d0b-2f9a2b6c1d11";

    #[test]
    fn only_this_deployments_exact_names_with_a_lease_id_are_candidates() {
        let id = lease_of_display_name(&format!("token-broker:prod:{ID}"), "token-broker", "prod");
        assert_eq!(id.map(|i| i.to_string()).as_deref(), Some(ID));
        let fresh = LeaseId::new();
        assert_eq!(
            lease_of_display_name(
                &display_name("token-broker", "prod", fresh),
                "token-broker",
                "prod"
            ),
            Some(fresh)
        );
        for name in [
            // A longer prefix is another broker, not this one.
            format!("token-broker-staging:prod:{ID}"),
            format!("token-brokers:prod:{ID}"),
            // Another deployment, or one whose id merely starts like ours.
            format!("token-broker:staging:{ID}"),
            format!("token-broker:prod2:{ID}"),
            format!("token-broker:pro:{ID}"),
            // Not a lease id, or not in the form the broker writes.
            "token-broker:prod:".to_owned(),
            "token-broker:prod:ci".to_owned(),
            format!("token-broker:prod:{ID}:x"),
            format!("token-broker:prod:{}", ID.to_uppercase()),
            format!("token-broker:prod:{}", ID.replace('-', "")),
            format!("token-broker:prod:{{{ID}}}"),
            format!(" token-broker:prod:{ID}"),
            // A human's PAT.
            "my laptop".to_owned(),
            String::new(),
        ] {
            assert_eq!(
                lease_of_display_name(&name, "token-broker", "prod"),
                None,
                "{name:?}"
            );
        }
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from(Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap())
            + chrono::Duration::seconds(secs)
    }

    fn lease(state: LeaseState, pat: Option<AuthorizationId>) -> LeaseRecord {
        LeaseRecord {
            authorization_id: pat,
            state,
            ..LeaseRecord::pending(
                "apikey:ci".parse::<Identity>().unwrap(),
                Organization::parse("fabrikam").unwrap(),
                ScopeSet::parse(["vso.code"]).unwrap(),
                |id| format!("token-broker:prod:{id}"),
                at(-600),
                at(3000),
                at(3000),
            )
        }
    }

    #[test]
    fn live_leases_keep_their_pat_and_everything_else_is_an_orphan() {
        let pat = AuthorizationId::from_uuid(uuid::Uuid::new_v4());
        let other = AuthorizationId::from_uuid(uuid::Uuid::new_v4());
        let (t0, now) = (at(0), at(1));
        let bound = Duration::from_secs(120);
        let judge = |l: &LeaseRecord| verdict(Some(l), pat, t0, now, bound);

        assert_eq!(
            verdict(None, pat, t0, now, bound),
            Verdict::Orphan(Orphan::NoLease)
        );
        for state in [LeaseState::Active, LeaseState::Revoking] {
            assert_eq!(judge(&lease(state, Some(pat))), Verdict::Live);
            assert_eq!(judge(&lease(state, None)), Verdict::Live);
            assert_eq!(
                judge(&lease(state, Some(other))),
                Verdict::Orphan(Orphan::NotTheLeasesPat)
            );
        }
        let young = LeaseRecord {
            create_time: at(-119),
            update_time: at(-119),
            ..lease(LeaseState::Pending, None)
        };
        assert_eq!(judge(&young), Verdict::Live);
        assert_eq!(
            judge(&lease(LeaseState::Pending, None)),
            Verdict::Busy,
            "a stale PENDING lease is left to the reconciler"
        );
        for state in [
            LeaseState::Failed,
            LeaseState::Revoked,
            LeaseState::Expired,
            LeaseState::RevokeFailed,
        ] {
            assert_eq!(
                judge(&lease(state, Some(pat))),
                Verdict::Orphan(Orphan::Finished(state))
            );
        }
    }

    #[test]
    fn a_lease_that_moved_during_the_sweep_or_is_claimed_waits_for_the_next() {
        let pat = AuthorizationId::from_uuid(uuid::Uuid::new_v4());
        let (t0, now) = (at(0), at(5));
        let bound = Duration::from_secs(120);
        let moved = LeaseRecord {
            update_time: t0,
            ..lease(LeaseState::Failed, Some(pat))
        };
        assert_eq!(verdict(Some(&moved), pat, t0, now, bound), Verdict::Busy);
        let claimed = LeaseRecord {
            claimed_by: Some("replica-b".into()),
            claimed_until: Some(at(6)),
            ..lease(LeaseState::RevokeFailed, Some(pat))
        };
        assert_eq!(verdict(Some(&claimed), pat, t0, now, bound), Verdict::Busy);
        let lapsed = LeaseRecord {
            claimed_until: Some(at(5)),
            ..claimed
        };
        assert_eq!(
            verdict(Some(&lapsed), pat, t0, now, bound),
            Verdict::Orphan(Orphan::Finished(LeaseState::RevokeFailed))
        );
    }
}
