//! Background work: the reaper (ACTIVE leases past expire_time → REVOKING →
//! upstream revoke → EXPIRED), the revocation queue (REVOKING and
//! REVOKE_FAILED rows whose next_attempt_time is due), the reconciler
//! (PENDING rows older than `settings.reconcile_after` → FAILED → their
//! PAT, if any, revoked) and, on a loop of its own beside them, the orphan
//! sweep ([`super::sweep`]). Work is taken by committed claims
//! (`Store::claim_due`, `Store::claim_job`), so several replicas share it
//! without doing anything twice; no transaction spans an upstream call.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::FutureExt as _;

use super::auditing::{audit_best_effort, Actor};
use super::revocation::{begin_revocation, finish_revocation, revoke_by_display_names};
use super::time::now;
use super::{LeaseDeps, LeaseError};
use crate::audit::{AuditEvent, Outcome};
use crate::domain::{LeaseId, LeaseState, Organization};
use crate::store::{LeaseRecord, Work};

/// Leases taken per claim.
const BATCH: u32 = 100;

/// Expiry claims per pass (the rest waits for the next tick).
const MAX_EXPIRY_ROUNDS: usize = 10;

/// How long a claim lasts: long enough for a batch of upstream calls, short
/// enough that a dead replica's work moves on soon.
pub(super) fn claim_for(deps: &LeaseDeps) -> Duration {
    (deps.settings.reaper_interval * 4).max(Duration::from_secs(60))
}

/// Until when a batch's claims are safe to start work under: half their
/// length. Past it the rest of the batch is released untouched, so a slow
/// upstream never lets a claim lapse while its lease is still to be
/// started, which would let another replica send the same revoke.
struct Fresh(tokio::time::Instant);

impl Fresh {
    fn holds(&self) -> bool {
        tokio::time::Instant::now() < self.0
    }
}

/// Claims a batch of `work` for this replica (see [`Fresh`]).
async fn claim(deps: &LeaseDeps, work: Work) -> Result<(Vec<LeaseRecord>, Fresh), LeaseError> {
    let claim = claim_for(deps);
    let fresh = Fresh(tokio::time::Instant::now() + claim / 2);
    let due = deps
        .store
        .claim_due(work, now(), &deps.settings.replica_id, claim, BATCH)
        .await?;
    Ok((due, fresh))
}

/// Runs, until `shutdown` resolves, a [`pass`] every `reaper_interval` and,
/// beside it, the orphan sweep's turn check at the same rate
/// (`sweep::sweep_if_due`; it runs when its deployment-wide claim is due),
/// so a long sweep never holds up expiry, and, the same way, retention's
/// turn check (`retention::retain_if_due`, at most hourly per deployment;
/// dropped at shutdown like the sweep: each batch is a transaction). A pass
/// under way when shutdown comes stops taking new leases, releases the
/// claims it has not started on, and finishes the ones in hand (up to `background_workers`, within
/// `serve`'s shutdown grace); a sweep under way is dropped (it only lists
/// and revokes, both safe to cut; its claim lapses), so its upstream
/// retries never hold up the exit. Errors, and panics, are logged; the next tick tries again.
pub(super) async fn run(deps: &LeaseDeps, shutdown: impl std::future::Future<Output = ()> + Send) {
    let stop = AtomicBool::new(false);
    let shutdown = shutdown.shared();
    let period = deps.settings.reaper_interval;
    tokio::join!(
        every(
            period,
            &stop,
            shutdown.clone(),
            OnShutdown::Finish,
            || async {
                if let Err(e) = pass(deps, &stop).await {
                    tracing::warn!(error = %e, "background pass failed");
                }
            }
        ),
        every(
            period,
            &stop,
            shutdown.clone(),
            OnShutdown::Drop,
            || async {
                if let Err(e) = super::sweep::sweep_if_due(deps, &stop).await {
                    tracing::warn!(error = %e, "orphan sweep failed");
                }
            }
        ),
        every(period, &stop, shutdown, OnShutdown::Drop, || async {
            if let Err(e) = super::retention::retain_if_due(deps, &stop).await {
                tracing::warn!(error = %e, "lease retention failed");
            }
        }),
    );
    tracing::info!("background work stopped");
}

/// What [`every`] does with a call under way when shutdown comes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OnShutdown {
    /// Set `stop` and await the call to its end.
    Finish,
    /// Drop it where it stands.
    Drop,
}

/// Calls `work` every `period` until `shutdown` resolves. A call that
/// panics is logged and the loop goes on: one bad row or bug must not end
/// background work for the life of the process while health stays green.
async fn every<F, Fut>(
    period: Duration,
    stop: &AtomicBool,
    shutdown: impl std::future::Future<Output = ()>,
    on_shutdown: OnShutdown,
    work: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(period.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {}
        }
        let call = std::panic::AssertUnwindSafe(work()).catch_unwind();
        tokio::pin!(call);
        let outcome = tokio::select! {
            outcome = &mut call => outcome,
            _ = &mut shutdown => {
                stop.store(true, Ordering::Relaxed);
                if on_shutdown == OnShutdown::Finish {
                    report_panic(call.await);
                }
                break;
            }
        };
        report_panic(outcome);
    }
}

fn report_panic(outcome: std::thread::Result<()>) {
    if let Err(panic) = outcome {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(panic = %what, "background work panicked; it goes on at the next tick");
    }
}

/// One pass to the end (see [`pass`]); the sweep is not part of it.
pub(super) async fn run_once(deps: &LeaseDeps) -> Result<usize, LeaseError> {
    pass(deps, &AtomicBool::new(false)).await
}

/// One pass: expire every due ACTIVE lease, retry due revocations, then
/// reconcile stale PENDING leases; once `stop` is set, claimed leases are released untouched.
/// Returns how many leases reached REVOKED or EXPIRED.
async fn pass(deps: &LeaseDeps, stop: &AtomicBool) -> Result<usize, LeaseError> {
    let mut finished = 0;
    // Bounded rounds, so rows that keep failing cannot spin a pass forever.
    for _ in 0..MAX_EXPIRY_ROUNDS {
        if stop.load(Ordering::Relaxed) {
            return Ok(finished);
        }
        let (due, fresh) = claim(deps, Work::Expiry).await?;
        let claimed = due.len();
        finished += work_batch(deps, due, &fresh, stop, |lease| expire(deps, lease)).await;
        if claimed < BATCH as usize {
            break;
        }
    }
    if stop.load(Ordering::Relaxed) {
        return Ok(finished);
    }
    // One batch of retries per pass: failures are rescheduled into the
    // future, so looping here would only hammer a failing upstream.
    let (due, fresh) = claim(deps, Work::Revocation).await?;
    finished += work_batch(deps, due, &fresh, stop, |lease| {
        retry_revocation(deps, lease)
    })
    .await;
    if stop.load(Ordering::Relaxed) {
        return Ok(finished);
    }
    let (due, fresh) = claim(
        deps,
        Work::Reconcile {
            older_than: deps.settings.reconcile_after,
        },
    )
    .await?;
    reconcile_batch(deps, due, &fresh, stop).await;
    Ok(finished)
}

/// Works a claimed batch, `settings.background_workers` leases at a time
/// (so a mass expiry is not a queue of one upstream call after another),
/// with `work`
/// (returning how many leases it finished); once `stop` is set or the
/// claims are no longer fresh, the leases not yet started are released.
async fn work_batch<F, Fut>(
    deps: &LeaseDeps,
    due: Vec<LeaseRecord>,
    fresh: &Fresh,
    stop: &AtomicBool,
    work: F,
) -> usize
where
    F: Fn(LeaseRecord) -> Fut,
    Fut: std::future::Future<Output = usize>,
{
    use futures::stream::{self, StreamExt as _};
    stream::iter(due)
        .map(|lease| {
            let id = lease.id;
            let started = !stop.load(Ordering::Relaxed) && fresh.holds();
            let work = started.then(|| work(lease));
            async move {
                match work {
                    Some(work) => work.await,
                    None => {
                        release(deps, id).await;
                        0
                    }
                }
            }
        })
        .buffer_unordered(deps.settings.background_workers.max(1))
        .fold(0, |total, n| async move { total + n })
        .await
}

/// Resolves a claimed batch of PENDING leases whose create is long over
/// (a crash, or an ambiguous create whose look-up failed), grouped by
/// organization, `settings.background_workers` organizations at a time:
/// each group shares one upstream listing ([`reconcile_organization`]).
async fn reconcile_batch(
    deps: &LeaseDeps,
    due: Vec<LeaseRecord>,
    fresh: &Fresh,
    stop: &AtomicBool,
) {
    use futures::stream::{self, StreamExt as _};
    let mut groups: BTreeMap<Organization, Vec<LeaseRecord>> = BTreeMap::new();
    for lease in due {
        groups
            .entry(lease.organization.clone())
            .or_default()
            .push(lease);
    }
    stream::iter(groups)
        .map(|(organization, leases)| {
            reconcile_organization(deps, organization, leases, fresh, stop)
        })
        .buffer_unordered(deps.settings.background_workers.max(1))
        .collect::<()>()
        .await;
}

/// Resolves claimed stale PENDING leases of one organization. It settles
/// each lease first, PENDING → FAILED by compare-and-set, so a create
/// still in flight can no longer make it ACTIVE (its activation fails and
/// revokes its own PAT), and audits it; then it lists the organization's
/// PATs once, page by page, and revokes every PAT carrying the display
/// name of a lease it settled. No token was handed out, so a retry with
/// its request_id mints afresh. A PAT this pass cannot revoke (upstream
/// failing, or a listing that stopped early) is left under a FAILED lease,
/// which the orphan sweep revokes. Leases not yet settled once `stop` is
/// set or the claims are no longer fresh are released untouched.
async fn reconcile_organization(
    deps: &LeaseDeps,
    organization: Organization,
    leases: Vec<LeaseRecord>,
    fresh: &Fresh,
    stop: &AtomicBool,
) {
    // Claims are kept while the PATs are revoked (so the sweep, which
    // claims rows before revoking, does not revoke them at the same time),
    // then released.
    let mut settled = Vec::with_capacity(leases.len());
    for lease in leases {
        if stop.load(Ordering::Relaxed) || !fresh.holds() {
            release(deps, lease.id).await;
        } else if let Some(failed) = settle_stale(deps, lease).await {
            settled.push(failed);
        }
    }
    if settled.is_empty() {
        return;
    }
    let names: Vec<(LeaseId, &str)> = settled
        .iter()
        .map(|lease| (lease.id, lease.display_name.as_str()))
        .collect();
    let search = revoke_by_display_names(deps, &organization, &names).await;
    for (lease, found) in settled.iter().zip(search.names) {
        let error = found.failed.as_ref().or(search.listing.as_ref().err());
        match (error, &search.listing) {
            (Some(e), _) => {
                tracing::warn!(lease_id = %lease.id, revoked = found.revoked, error = %e, "pending lease reconciled to FAILED; its PAT could not be revoked now, the orphan sweep finishes it");
            }
            (None, Ok(true)) => {
                tracing::info!(lease_id = %lease.id, revoked = found.revoked, "pending lease reconciled to FAILED");
            }
            (None, _) => {
                tracing::warn!(lease_id = %lease.id, revoked = found.revoked, "pending lease reconciled to FAILED; the upstream list was incomplete, the orphan sweep finishes it");
            }
        }
        release(deps, lease.id).await;
    }
}

/// Settles one claimed stale PENDING lease: FAILED by compare-and-set,
/// audited. Returns the FAILED lease, or None (claim released) if the row
/// had moved (the create finished, or another actor settled it) or could
/// not be written.
async fn settle_stale(deps: &LeaseDeps, lease: LeaseRecord) -> Option<LeaseRecord> {
    let now = now();
    let (failed, expected) = lease.fail(
        now,
        format!(
            "reconciled: left PENDING past {} s; any PAT with its display name is revoked",
            deps.settings.reconcile_after.as_secs()
        ),
    );
    match deps.store.update_lease(&failed, expected).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::info!(lease_id = %lease.id, "pending lease settled before the reconciler; left as is");
            release(deps, lease.id).await;
            return None;
        }
        Err(e) => {
            tracing::warn!(lease_id = %lease.id, error = %e, "could not mark a stale pending lease FAILED; will retry");
            release(deps, lease.id).await;
            return None;
        }
    }
    let event = AuditEvent {
        reason: Some("PENDING_RECONCILED".to_owned()),
        ..Actor::background().lease_event(
            crate::audit::LEASE_RECONCILE,
            Outcome::Allowed,
            &failed,
            now,
        )
    };
    audit_best_effort(deps, event).await;
    Some(failed)
}

/// Gives a claimed lease back, best effort (an unreleased claim lapses).
async fn release(deps: &LeaseDeps, id: LeaseId) {
    if let Err(e) = deps
        .store
        .release_claim(id, &deps.settings.replica_id)
        .await
    {
        tracing::warn!(lease_id = %id, error = %e, "could not release claim");
    }
}

/// Expires one claimed ACTIVE lease; 1 if it reached EXPIRED.
async fn expire(deps: &LeaseDeps, claimed: LeaseRecord) -> usize {
    let id = claimed.id;
    let result = async {
        let now = now();
        // The claimed copy is usually current, so it is tried first. A
        // renewal committed since the claim moved `update_time`, which
        // fails the compare-and-set in `begin_revocation`; then the row is
        // read again, so the revocation never writes an old expire_time
        // back over a renewal the caller was promised.
        let mut lease = claimed;
        for reread in [false, true] {
            if reread {
                match deps.store.get_lease(id).await? {
                    Some(current) => lease = current,
                    None => return Ok(None),
                }
            }
            if lease.state != LeaseState::Active || lease.expire_time > now {
                return Ok(None);
            }
            if let Some(revoking) = begin_revocation(deps, &lease, now).await? {
                return finish_revocation(
                    deps,
                    &revoking,
                    &Actor::background(),
                    crate::audit::LEASE_EXPIRE,
                )
                .await;
            }
        }
        Ok(None)
    }
    .await;
    settle(deps, id, result).await
}

/// Retries one claimed revocation; 1 if it reached REVOKED or EXPIRED.
async fn retry_revocation(deps: &LeaseDeps, lease: LeaseRecord) -> usize {
    let result = super::revocation::retry_revocation(deps, &lease).await;
    settle(deps, lease.id, result).await
}

/// Logs the outcome and releases the claim where the lease row was not
/// rewritten (a rewrite clears it).
async fn settle(
    deps: &LeaseDeps,
    id: LeaseId,
    result: Result<Option<LeaseRecord>, LeaseError>,
) -> usize {
    match result {
        Ok(Some(lease)) if lease.state.is_terminal() => 1,
        Ok(Some(_)) => 0,
        Ok(None) | Err(_) => {
            if let Err(e) = &result {
                tracing::warn!(lease_id = %id, error = %e, "background revocation failed");
            }
            release(deps, id).await;
            0
        }
    }
}
