//! Retention of closed leases (`leases.retention`): at most once per
//! [`RETENTION_INTERVAL`], one replica of the deployment (a committed claim
//! on the `lease_retention` row of `background_jobs`, as the orphan sweep
//! takes) deletes, in batches, the REVOKED, EXPIRED and FAILED leases that
//! closed more than `leases.retention` ago and whose PAT is past its
//! validTo, with their idempotency keys
//! ([`crate::store::Store::delete_closed_leases`]).
//!
//! - The validTo bound keeps every lease whose PAT may still be live, so
//!   the orphan sweep still lists every organization such a PAT may be in.
//!   When no validTo was recorded (a lease that failed before upstream
//!   answered), `max_expire_time` plus [`UNRECORDED_VALID_TO_SLACK`] stands
//!   for it: beyond any validTo the broker asked for
//!   (`max_expire_time + leases.valid_to_skew`, at most 1 h) and upstream's
//!   rounding of it.
//! - REVOKE_FAILED leases are never deleted (their PAT may be live), nor
//!   any live one (PENDING, ACTIVE, REVOKING).
//! - A CreateLease retried with the `request_id` of a deleted lease is a
//!   new request: its key went with the lease.
//! - Audit rows are never deleted (see docs/durability.md, "Retention").
//!
//! The same run, under the same claim and setting, deletes closed managed
//! credential versions the same way
//! ([`crate::store::Store::delete_closed_credential_versions`]): REVOKED and
//! FAILED ones closed more than `leases.retention` ago whose PAT is past
//! its validTo (a FAILED mint upstream never answered for: its asked-for
//! validTo plus [`UNRECORDED_VALID_TO_SLACK`]), never a live one and never
//! a credential's newest version (the next version number is derived from
//! it, and watchers resume after it). One job rather than two: the rules,
//! the interval and the setting are the leases', and a second claim would
//! only add a row to `background_jobs`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::time::now;
use super::{LeaseDeps, LeaseError};

/// The job's row in `background_jobs`.
const RETENTION_JOB: &str = "lease_retention";

/// How often the deployment runs retention (one replica per interval).
const RETENTION_INTERVAL: Duration = Duration::from_secs(3600);

/// Leases (or credential versions) deleted per transaction.
const BATCH: u32 = 500;

/// Added to `max_expire_time` for the validTo of a lease that recorded
/// none, and to the asked-for validTo of a credential version upstream
/// never answered for: 1 day.
const UNRECORDED_VALID_TO_SLACK: Duration = Duration::from_secs(24 * 3600);

/// What one call of [`retain_if_due`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// False when it was not this replica's turn (another replica holds the
    /// job's claim, or the last run is younger than the interval).
    pub ran: bool,
    /// Closed leases deleted (with their idempotency keys).
    pub deleted: u64,
    /// Closed managed credential versions deleted.
    pub credential_versions_deleted: u64,
}

/// The replica's name as the job's claimer.
fn claimer(deps: &LeaseDeps) -> String {
    format!("{}/retention", deps.settings.replica_id)
}

/// Deletes the closed leases `leases.retention` allows, if the job is due
/// and no other replica holds it; stops between batches once `stop` is
/// set or half its claim is spent (the rest waits for the next run).
/// Errors: `Store`.
pub(super) async fn retain_if_due(
    deps: &LeaseDeps,
    stop: &AtomicBool,
) -> Result<RetentionReport, LeaseError> {
    let settings = &deps.settings;
    let claim = super::background::claim_for(deps);
    let t0 = now();
    if !deps
        .store
        .claim_job(
            RETENTION_JOB,
            t0,
            &claimer(deps),
            claim,
            RETENTION_INTERVAL.saturating_sub(settings.reaper_interval / 2),
        )
        .await?
    {
        return Ok(RetentionReport::default());
    }
    let deadline = tokio::time::Instant::now() + claim / 2;
    let closed_before = t0.saturating_sub(settings.retention);
    let unrecorded_before = t0.saturating_sub(UNRECORDED_VALID_TO_SLACK);
    let mut report = RetentionReport {
        ran: true,
        ..RetentionReport::default()
    };
    let out_of_time = || stop.load(Ordering::Relaxed) || tokio::time::Instant::now() >= deadline;
    loop {
        let deleted = deps
            .store
            .delete_closed_leases(closed_before, t0, unrecorded_before, BATCH)
            .await?;
        report.deleted += deleted;
        if deleted < u64::from(BATCH) || out_of_time() {
            break;
        }
    }
    while !out_of_time() {
        let deleted = deps
            .store
            .delete_closed_credential_versions(closed_before, t0, unrecorded_before, BATCH)
            .await?;
        report.credential_versions_deleted += deleted;
        if deleted < u64::from(BATCH) {
            break;
        }
    }
    deps.store
        .finish_job(RETENTION_JOB, &claimer(deps), t0)
        .await?;
    if report.deleted > 0 || report.credential_versions_deleted > 0 {
        tracing::info!(
            deleted = report.deleted,
            credential_versions_deleted = report.credential_versions_deleted,
            "closed leases and credential versions past retention deleted"
        );
    }
    Ok(report)
}
