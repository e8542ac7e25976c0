//! The lease state machine. Every change of a lease's state is one method
//! on [`LeaseRecord`] here, and nothing else writes `state`. Each returns
//! the next record and the state it expects to replace: the
//! compare-and-set the store needs, as in
//! `let (next, expected) = lease.fail(now, error); store.update_lease(&next, expected)`.
//!
//! ```text
//! method                 from            to
//! pending                (new)           PENDING
//! activate               PENDING         ACTIVE
//! fail                   PENDING         FAILED
//! begin_revoking         ACTIVE          REVOKING
//! revoked                REVOKING        REVOKED or EXPIRED (final_state)
//!                        REVOKE_FAILED   REVOKED or EXPIRED (final_state)
//! revoke_attempt_failed  REVOKING        REVOKING, or REVOKE_FAILED once the budget is spent
//!                        REVOKE_FAILED   REVOKE_FAILED
//! force_closed           REVOKE_FAILED   REVOKED or EXPIRED (final_state)
//! ```
//!
//! - PENDING: the intent is stored; the upstream PAT may or may not exist.
//!   It becomes ACTIVE once the PAT is minted and recorded, or FAILED when
//!   no token was handed out (refused, abandoned, or reconciled).
//! - ACTIVE: renewal moves its expire_time and leaves it ACTIVE; revocation
//!   (on request, by an admin, or by the reaper at expiry) begins REVOKING.
//! - REVOKING and REVOKE_FAILED: an upstream revoke is due; success ends in
//!   REVOKED, or EXPIRED when revocation began at or after expire_time.
//!   Failures back off; past the retry budget the lease is REVOKE_FAILED
//!   (retried slowly), which only an operator may close without upstream.
//! - REVOKED, EXPIRED and FAILED are terminal. A FAILED lease under a
//!   request_id is replaced by a fresh PENDING row (a new lease), never
//!   moved.
//!
//! Writes that leave the state alone (renewal, claims) are not here. The
//! diagram in docs/architecture.md ("The lease state machine") follows
//! this module.

use super::time::{chrono_duration, upstream_time};
use super::RetrySchedule;
use crate::crypto::Sealed;
use crate::domain::Timestamp;
use crate::domain::{AuthorizationId, Identity, LeaseId, LeaseState, Organization, ScopeSet};
use crate::store::LeaseRecord;

/// How long a caller-driven revocation owns a REVOKING row before the
/// background loop may take it over (it only does if the caller's task died).
pub(super) const REVOKE_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

impl LeaseRecord {
    /// A new PENDING lease with a fresh id (nothing minted or written yet):
    /// created at `now`, ending at `expire_time` unless renewed, and at
    /// `max_expire_time` at the latest. `display_name` names its upstream
    /// PAT from the id.
    pub(super) fn pending(
        holder: Identity,
        organization: Organization,
        scopes: ScopeSet,
        display_name: impl FnOnce(LeaseId) -> String,
        now: Timestamp,
        expire_time: Timestamp,
        max_expire_time: Timestamp,
    ) -> LeaseRecord {
        let id = LeaseId::new();
        LeaseRecord {
            id,
            holder,
            organization,
            scopes,
            display_name: display_name(id),
            authorization_id: None,
            sealed_token: None,
            state: LeaseState::Pending,
            create_time: now,
            update_time: now,
            expire_time,
            max_expire_time,
            revoke_time: None,
            upstream_valid_to: None,
            attempts: 0,
            next_attempt_time: None,
            last_error: None,
            claimed_by: None,
            claimed_until: None,
        }
    }

    /// PENDING → ACTIVE: the PAT `authorization_id` was minted with
    /// `valid_to` (upstream's answer; the broker asked for `wanted`) and
    /// its secret is `sealed_token`. The lease is fitted to the PAT
    /// ([`LeaseRecord::fit_to_valid_to`]).
    pub(super) fn activate(
        &self,
        now: Timestamp,
        authorization_id: AuthorizationId,
        sealed_token: Sealed,
        valid_to: chrono::DateTime<chrono::Utc>,
        wanted: Timestamp,
    ) -> (LeaseRecord, LeaseState) {
        let mut next = self.clone();
        next.fit_to_valid_to(valid_to, wanted);
        next.authorization_id = Some(authorization_id);
        next.sealed_token = Some(sealed_token);
        next.state = LeaseState::Active;
        next.update_time = now;
        (next, LeaseState::Pending)
    }

    /// PENDING → FAILED: no token was handed out; `error` says why. Any
    /// sealed token goes (it must never be opened again); a claim is kept.
    /// The stored row is PENDING even when this record was already made
    /// ACTIVE in memory (a minted PAT whose activation did not commit).
    pub(super) fn fail(&self, now: Timestamp, error: String) -> (LeaseRecord, LeaseState) {
        let mut next = self.clone();
        next.state = LeaseState::Failed;
        next.sealed_token = None;
        next.update_time = now;
        next.last_error = Some(error);
        (next, LeaseState::Pending)
    }

    /// ACTIVE → REVOKING, with `now` as its revoke_time, a fresh attempt
    /// count, and [`REVOKE_GRACE`] before background work may take it over.
    /// Write it with `update_lease_unchanged` on this record's update_time,
    /// so a renewal committed since it was read is never overwritten.
    pub(super) fn begin_revoking(&self, now: Timestamp) -> (LeaseRecord, LeaseState) {
        let mut next = self.rewritten(now);
        next.state = LeaseState::Revoking;
        next.revoke_time = Some(now);
        next.attempts = 0;
        next.next_attempt_time = Some(now + chrono_duration(REVOKE_GRACE));
        (next, LeaseState::Active)
    }

    /// REVOKING or REVOKE_FAILED → [`LeaseRecord::final_state`]: the PAT is
    /// revoked upstream (or gone).
    pub(super) fn revoked(&self, now: Timestamp) -> (LeaseRecord, LeaseState) {
        let mut next = self.rewritten(now);
        next.state = self.final_state();
        next.revoke_time = Some(self.revoke_time.unwrap_or(now));
        next.next_attempt_time = None;
        next.last_error = None;
        (next, self.state)
    }

    /// REVOKING or REVOKE_FAILED, one more failed upstream revoke (`error`):
    /// the next attempt is backed off by `schedule`, and past its budget
    /// the lease is REVOKE_FAILED.
    pub(super) fn revoke_attempt_failed(
        &self,
        now: Timestamp,
        schedule: &RetrySchedule,
        error: String,
    ) -> (LeaseRecord, LeaseState) {
        let mut next = self.rewritten(now);
        next.attempts = self.attempts.saturating_add(1);
        if schedule.budget_spent(next.attempts) {
            next.state = LeaseState::RevokeFailed;
        }
        next.next_attempt_time = Some(now + chrono_duration(schedule.backoff(next.attempts)));
        next.last_error = Some(error);
        (next, self.state)
    }

    /// REVOKE_FAILED → REVOKED or EXPIRED without an upstream revoke (an
    /// operator's decision); `last_error` records what was left behind.
    pub(super) fn force_closed(
        &self,
        now: Timestamp,
        last_error: String,
    ) -> (LeaseRecord, LeaseState) {
        let mut next = self.rewritten(now);
        next.revoke_time = Some(self.revoke_time.unwrap_or(now));
        next.state = next.final_state();
        next.next_attempt_time = None;
        next.last_error = Some(last_error);
        (next, LeaseState::RevokeFailed)
    }

    /// The state a finished revocation ends in: EXPIRED when the lease had
    /// reached its expire_time by the time revocation began (`revoke_time`),
    /// REVOKED otherwise.
    pub(super) fn final_state(&self) -> LeaseState {
        match self.revoke_time {
            Some(t) if t >= self.expire_time => LeaseState::Expired,
            _ => LeaseState::Revoked,
        }
    }

    /// Fits the lease to the PAT's `valid_to` as upstream answered it (it
    /// may round, or clamp to its maximum lifespan; docs/upstream-api.md,
    /// "validTo rounding" and "validTo clamping"): the lease never outlives
    /// its PAT. `wanted` is
    /// the validTo the broker asked for.
    pub(super) fn fit_to_valid_to(
        &mut self,
        valid_to: chrono::DateTime<chrono::Utc>,
        wanted: Timestamp,
    ) {
        let valid_to = upstream_time(valid_to);
        if valid_to < self.expire_time {
            self.expire_time = valid_to;
        }
        if valid_to + chrono::Duration::seconds(1) < wanted {
            self.max_expire_time = self.max_expire_time.min(valid_to);
            tracing::info!(lease_id = %self.id, valid_to = %valid_to, "upstream clamped validTo; lease shortened");
        }
        self.max_expire_time = self.max_expire_time.max(self.expire_time);
        self.upstream_valid_to = Some(valid_to);
    }

    /// A copy written at `now`, with any background claim cleared.
    fn rewritten(&self, now: Timestamp) -> LeaseRecord {
        let mut next = self.clone();
        next.update_time = now;
        next.claimed_by = None;
        next.claimed_until = None;
        next
    }
}
