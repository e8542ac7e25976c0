use std::fmt;
use std::ops::{Add, AddAssign, Deref, Sub};

use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};
use serde::{Deserialize, Serialize};

/// An instant in UTC kept to the microsecond: what both stores hold, so a
/// value in memory equals its stored copy. Finer parts are cut off (rounded
/// down) when one is made, so a lease never outlives an upstream time it
/// was fitted to.
///
/// Text form ([`Timestamp::to_text`], `Display`): RFC 3339 with exactly six
/// fractional digits and `Z`, e.g. `2026-01-02T03:04:05.123456Z`, so text
/// order is time order.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(from = "DateTime<Utc>", into = "DateTime<Utc>")]
pub struct Timestamp(DateTime<Utc>);

impl Timestamp {
    /// The earliest representable instant.
    pub const MIN: Timestamp = Timestamp(DateTime::<Utc>::MIN_UTC);

    /// The current time, truncated to microseconds.
    pub fn now() -> Self {
        Utc::now().into()
    }

    /// The earliest `Timestamp` at or after `t` (rounds a sub-microsecond
    /// part up): a bound that keeps `stored >= t` and `stored < t` exact
    /// when compared against stored microsecond times.
    pub fn at_or_after(t: DateTime<Utc>) -> Self {
        let down = Timestamp::from(t);
        if down < t {
            down + chrono::Duration::microseconds(1)
        } else {
            down
        }
    }

    /// The instant `micros` microseconds after the Unix epoch, if in range.
    pub fn from_micros(micros: i64) -> Option<Self> {
        DateTime::from_timestamp_micros(micros).map(Timestamp)
    }

    /// Microseconds since the Unix epoch.
    pub fn as_micros(&self) -> i64 {
        self.0.timestamp_micros()
    }

    /// The instant as a chrono time.
    pub fn as_datetime(&self) -> DateTime<Utc> {
        self.0
    }

    /// The text form: RFC 3339, UTC, six fractional digits, `Z`.
    pub fn to_text(&self) -> String {
        self.0.to_rfc3339_opts(SecondsFormat::Micros, true)
    }

    /// Parses any RFC 3339 time (the text form included), truncating to
    /// microseconds.
    pub fn parse_text(s: &str) -> Result<Self, chrono::ParseError> {
        DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc).into())
    }

    /// `self + d`, or `None` past the representable range.
    pub fn checked_add(self, d: std::time::Duration) -> Option<Self> {
        chrono::Duration::from_std(d)
            .ok()
            .and_then(|d| self.0.checked_add_signed(d))
            .map(Into::into)
    }

    /// `self - d`, saturating at [`Timestamp::MIN`].
    pub fn saturating_sub(self, d: std::time::Duration) -> Self {
        chrono::Duration::from_std(d)
            .ok()
            .and_then(|d| self.0.checked_sub_signed(d))
            .map_or(Timestamp::MIN, Into::into)
    }
}

impl From<DateTime<Utc>> for Timestamp {
    /// Truncates to microseconds.
    fn from(t: DateTime<Utc>) -> Self {
        Timestamp(t.trunc_subsecs(6))
    }
}

impl From<Timestamp> for DateTime<Utc> {
    fn from(t: Timestamp) -> Self {
        t.0
    }
}

// Read-only access to chrono's accessors (`timestamp_micros`, `to_rfc3339`,
// ...): nothing reached through it can break the microsecond invariant.
impl Deref for Timestamp {
    type Target = DateTime<Utc>;
    fn deref(&self) -> &DateTime<Utc> {
        &self.0
    }
}

impl PartialEq<DateTime<Utc>> for Timestamp {
    fn eq(&self, other: &DateTime<Utc>) -> bool {
        self.0 == *other
    }
}

impl PartialEq<Timestamp> for DateTime<Utc> {
    fn eq(&self, other: &Timestamp) -> bool {
        *self == other.0
    }
}

impl PartialOrd<DateTime<Utc>> for Timestamp {
    fn partial_cmp(&self, other: &DateTime<Utc>) -> Option<std::cmp::Ordering> {
        self.0.partial_cmp(other)
    }
}

impl PartialOrd<Timestamp> for DateTime<Utc> {
    fn partial_cmp(&self, other: &Timestamp) -> Option<std::cmp::Ordering> {
        self.partial_cmp(&other.0)
    }
}

impl Add<chrono::Duration> for Timestamp {
    type Output = Timestamp;
    /// Panics past the representable range, like chrono's.
    fn add(self, d: chrono::Duration) -> Timestamp {
        (self.0 + d).into()
    }
}

impl AddAssign<chrono::Duration> for Timestamp {
    fn add_assign(&mut self, d: chrono::Duration) {
        *self = *self + d;
    }
}

impl Sub<chrono::Duration> for Timestamp {
    type Output = Timestamp;
    /// Panics past the representable range, like chrono's.
    fn sub(self, d: chrono::Duration) -> Timestamp {
        (self.0 - d).into()
    }
}

impl Sub for Timestamp {
    type Output = chrono::Duration;
    fn sub(self, other: Timestamp) -> chrono::Duration {
        self.0 - other.0
    }
}

impl fmt::Display for Timestamp {
    /// The text form ([`Timestamp::to_text`]).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn a_bound_rounds_up_only_a_sub_microsecond_part() {
        let t = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        assert_eq!(Timestamp::at_or_after(t), t);
        let later = t + chrono::Duration::nanoseconds(1);
        assert_eq!(
            Timestamp::at_or_after(later),
            t + chrono::Duration::microseconds(1)
        );
    }

    #[test]
    fn truncates_to_microseconds_and_text_sorts_like_time() {
        let t = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        let a = Timestamp::from(t + chrono::Duration::nanoseconds(1_999));
        assert_eq!(a, t + chrono::Duration::microseconds(1));
        assert_eq!(a.to_text(), "2026-01-02T03:04:05.000001Z");
        let b = a + chrono::Duration::microseconds(1);
        assert!(a.to_text() < b.to_text());
        assert_eq!(Timestamp::parse_text(&b.to_text()).unwrap(), b);
        assert_eq!(Timestamp::from_micros(b.as_micros()), Some(b));
    }

    #[test]
    fn saturates_and_checks_range() {
        assert_eq!(
            Timestamp::now().saturating_sub(std::time::Duration::MAX),
            Timestamp::MIN
        );
        assert_eq!(Timestamp::now().checked_add(std::time::Duration::MAX), None);
    }
}
