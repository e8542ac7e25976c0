//! Time as the lease rules keep it: microseconds (what both stores hold),
//! and std durations turned into chrono ones without overflow.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::domain::Timestamp;

/// The current time in UTC, truncated to microseconds: what both stores
/// keep, so a record in memory equals its stored copy.
pub(super) fn now() -> Timestamp {
    Timestamp::now()
}

/// An upstream time cut down to microseconds, rounding down: upstream
/// answers with up to 7 fractional digits (docs/upstream-api.md, "validTo
/// rounding"), the stores keep 6, and rounding down keeps "the
/// lease never outlives its PAT".
pub(super) fn upstream_time(t: DateTime<Utc>) -> Timestamp {
    Timestamp::from(t)
}

/// `Std` duration to chrono, capped at 100 years: TTLs are at most a year
/// and configured intervals are bounded, so the cap only keeps `now + d`
/// from overflowing and within what both stores hold.
pub(super) fn chrono_duration(d: Duration) -> chrono::Duration {
    const CAP: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    chrono::Duration::from_std(d.min(CAP)).expect("100 years fit")
}
