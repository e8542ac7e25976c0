//! Text forms shared by both stores: how domain values are written to and
//! read from columns. Every parse failure is [`StoreError::Corrupt`] naming
//! the column, never its value when the value could be secret.

use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};

use std::time::Duration;

use super::{LeaseRecord, StoreError, Work};
use crate::crypto::Sealed;
use crate::domain::{Identity, LeaseState, Organization, ScopeSet};

/// Truncates to the microseconds both databases keep, so a value reads
/// back exactly as written on either store.
pub(crate) fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(6)
}

/// SQLite's time form: RFC 3339, UTC, exactly six fractional digits and a
/// `Z` (`2026-01-02T03:04:05.123456Z`), so text order is time order.
pub(crate) fn time_text(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Parses [`time_text`]'s form.
pub(crate) fn parse_time(column: &str, s: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Corrupt(format!("{column} {s:?}: {e}")))
}

/// [`time_text`] for an optional time.
pub(crate) fn opt_time_text(t: Option<DateTime<Utc>>) -> Option<String> {
    t.map(time_text)
}

/// [`parse_time`] for an optional column.
pub(crate) fn parse_opt_time(
    column: &str,
    s: Option<String>,
) -> Result<Option<DateTime<Utc>>, StoreError> {
    s.map(|s| parse_time(column, &s)).transpose()
}

/// The sealed column text ([`Sealed::encode`]).
pub(crate) fn encode_sealed(sealed: &Sealed) -> String {
    sealed.encode()
}

/// Parses a sealed column ([`Sealed::decode`]). The error names the column
/// and the defect, never the value.
pub(crate) fn decode_sealed(column: &str, s: &str) -> Result<Sealed, StoreError> {
    Sealed::decode(s).map_err(|e| StoreError::Corrupt(format!("{column}: {e}")))
}

pub(crate) fn parse_holder(column: &str, s: &str) -> Result<Identity, StoreError> {
    s.parse()
        .map_err(|e| StoreError::Corrupt(format!("{column}: {e}")))
}

pub(crate) fn parse_organization(s: &str) -> Result<Organization, StoreError> {
    Organization::parse(s).map_err(|e| StoreError::Corrupt(format!("organization: {e}")))
}

pub(crate) fn parse_scopes(s: &str) -> Result<ScopeSet, StoreError> {
    ScopeSet::parse_upstream(s).map_err(|e| StoreError::Corrupt(format!("scopes: {e}")))
}

pub(crate) fn parse_state(s: &str) -> Result<LeaseState, StoreError> {
    s.parse()
        .map_err(|e| StoreError::Corrupt(format!("state: {e}")))
}

pub(crate) fn parse_outcome(s: &str) -> Result<crate::domain::Outcome, StoreError> {
    crate::domain::Outcome::parse(s)
        .ok_or_else(|| StoreError::Corrupt(format!("outcome: unknown value {s:?}")))
}

/// States that count against a holder's quota ([`super::Store::count_live_leases`]).
pub(crate) const LIVE_STATES: [LeaseState; 3] = [
    LeaseState::Active,
    LeaseState::Pending,
    LeaseState::Revoking,
];

/// `now - older_than` (the reconciler's age bound, a job's interval),
/// saturating at the earliest time.
pub(crate) fn cutoff_before(now: DateTime<Utc>, older_than: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(older_than)
        .ok()
        .and_then(|d| now.checked_sub_signed(d))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// A claim's length as a chrono duration; an error if out of range.
pub(crate) fn claim_duration(d: Duration) -> Result<chrono::Duration, StoreError> {
    chrono::Duration::from_std(d)
        .map_err(|_| StoreError::Database("claim duration is out of range".into()))
}

/// Orders claimed leases by when they fell due, then id (RETURNING has no order).
pub(crate) fn sort_due(leases: &mut [LeaseRecord], work: Work) {
    match work {
        Work::Expiry => leases.sort_by_key(|l| (l.expire_time, l.id)),
        Work::Revocation => leases.sort_by_key(|l| (l.next_attempt_time, l.id)),
        Work::Reconcile { .. } => leases.sort_by_key(|l| (l.create_time, l.id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn time_text_sorts_like_time_and_round_trips() {
        let a = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        let b = a + chrono::Duration::microseconds(1);
        assert_eq!(time_text(a), "2026-01-02T03:04:05.000000Z");
        assert!(time_text(a) < time_text(b));
        assert_eq!(parse_time("t", &time_text(b)).unwrap(), b);
    }

    #[test]
    fn sealed_text_round_trips() {
        let sealed = Sealed {
            key_id: "k1".into(),
            nonce: [7; 12],
            ciphertext: vec![1; 20],
        };
        let text = encode_sealed(&sealed);
        assert!(text.starts_with("v1:k1:"));
        assert_eq!(decode_sealed("c", &text).unwrap(), sealed);
        let err = decode_sealed("c", "v1:k1:!!secret!!").unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }
}
