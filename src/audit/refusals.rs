//! Refused authentications in the chained audit trail, aggregated.
//!
//! A refusal must cost the broker nothing it could be flooded with: the
//! request path only increments a counter in memory ([`RefusalCounter`],
//! the [`RefusalAudit`] the authenticator reports to), keyed by reason,
//! outcome and client IP address (not port). Every
//! `audit.auth_failure_interval`, and once more at shutdown, the counts are
//! written as one audit row per key ([`RefusalCounter::flush`]): identity
//! `-`, action `authenticate`, outcome `denied` (UNAVAILABLE refusals such
//! as `JWKS_UNAVAILABLE`: `error`), the reason, `peer` the address, and
//! `caller_detail` `count=N interval_start=RFC3339 interval_end=RFC3339`
//! (the row's `time` is the interval's end). Memory is bounded: at most
//! [`MAX_REFUSAL_ADDRESSES`] distinct addresses per interval, the rest
//! counted under `peer` [`OTHER_ADDRESSES`]. A crash loses at most the
//! counts of the interval in progress.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{AuditEvent, AuditLog, Outcome, AUTHENTICATE};
use crate::auth::{Refusal, RefusalAudit};
use crate::domain::Timestamp;
use crate::error::{ErrorCode, ServiceError as _};

/// Most distinct client addresses counted on their own per interval;
/// refusals from further addresses are counted under [`OTHER_ADDRESSES`].
/// Bounds memory (and the rows one flush writes) whatever a flood's
/// addresses: about 1,000 × the dozen reasons at most.
pub const MAX_REFUSAL_ADDRESSES: usize = 1000;

/// `peer` of the row counting refusals beyond [`MAX_REFUSAL_ADDRESSES`].
pub const OTHER_ADDRESSES: &str = "other";

/// Called for every refusal, with its reason (e.g. to count it in a
/// metric). Must be quick; it must not block.
pub type RefusalObserver = Box<dyn Fn(&'static str) + Send + Sync>;

/// Where refusals came from, as a row's `peer` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Source {
    /// The client's IP address.
    Address(IpAddr),
    /// No peer address was known (`peer` absent).
    Unknown,
    /// Beyond [`MAX_REFUSAL_ADDRESSES`] this interval.
    Other,
}

/// What one aggregated row counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    source: Source,
    reason: &'static str,
    outcome: Outcome,
}

/// The counts of the interval in progress.
#[derive(Debug)]
struct Window {
    start: Timestamp,
    counts: HashMap<Key, u64>,
    addresses: HashSet<IpAddr>,
}

impl Window {
    fn new(start: Timestamp) -> Self {
        Window {
            start,
            counts: HashMap::new(),
            addresses: HashSet::new(),
        }
    }

    /// Adds `n` under `key`, moving an address beyond the cap to `Other`.
    fn add(&mut self, mut key: Key, n: u64) {
        if let Source::Address(ip) = key.source {
            if !self.addresses.contains(&ip) {
                if self.addresses.len() < MAX_REFUSAL_ADDRESSES {
                    self.addresses.insert(ip);
                } else {
                    key.source = Source::Other;
                }
            }
        }
        *self.counts.entry(key).or_default() += n;
    }
}

/// Counts refused authentications in memory and writes them as aggregated
/// `authenticate` audit rows (see the module doc). One per broker, shared
/// by the authenticator (which calls [`RefusalAudit::refused`]) and the
/// flushing task ([`RefusalCounter::run`]).
pub struct RefusalCounter {
    audit: Arc<AuditLog>,
    window: Mutex<Window>,
    observer: Option<RefusalObserver>,
}

impl std::fmt::Debug for RefusalCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefusalCounter").finish_non_exhaustive()
    }
}

impl RefusalAudit for RefusalCounter {
    fn refused(&self, refusal: Refusal<'_>) {
        let outcome = match refusal.error.code() {
            ErrorCode::Unauthenticated => Outcome::Denied,
            _ => Outcome::Error,
        };
        let reason = refusal.error.reason();
        let source = match refusal.peer {
            // An IPv4 client on a dual-stack socket counts as its IPv4 address.
            Some(peer) => Source::Address(peer.ip().to_canonical()),
            None => Source::Unknown,
        };
        self.lock().add(
            Key {
                source,
                reason,
                outcome,
            },
            1,
        );
        if let Some(observe) = &self.observer {
            observe(reason);
        }
    }
}

impl RefusalCounter {
    /// A counter whose rows go to `audit`; its first interval starts now.
    pub fn new(audit: Arc<AuditLog>) -> Self {
        RefusalCounter {
            audit,
            window: Mutex::new(Window::new(Timestamp::now())),
            observer: None,
        }
    }

    /// Also calls `observer` for every refusal, as it is counted.
    pub fn with_observer(mut self, observer: RefusalObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends the interval in progress (a new one starts now) and returns
    /// its start and its rows, not yet written, with what each counts:
    /// identity `-`, action `authenticate`, time the interval's end,
    /// ordered by address and reason. No rows when nothing was refused.
    fn take(&self) -> (Timestamp, Vec<(Key, u64, AuditEvent)>) {
        let end = Timestamp::now();
        let window = std::mem::replace(&mut *self.lock(), Window::new(end));
        let mut counts: Vec<(Key, u64)> = window.counts.into_iter().collect();
        counts.sort_unstable_by_key(|(key, _)| *key);
        let rows = counts
            .into_iter()
            .map(|(key, count)| {
                let event = AuditEvent {
                    peer: match key.source {
                        Source::Address(ip) => Some(ip.to_string()),
                        Source::Unknown => None,
                        Source::Other => Some(OTHER_ADDRESSES.to_owned()),
                    },
                    reason: Some(key.reason.to_owned()),
                    caller_detail: Some(format!(
                        "count={count} interval_start={} interval_end={}",
                        window.start.to_text(),
                        end.to_text()
                    )),
                    ..AuditEvent::new(end, "-", AUTHENTICATE, key.outcome)
                };
                (key, count, event)
            })
            .collect();
        (window.start, rows)
    }

    /// Puts counts whose rows could not be written back into the interval
    /// in progress, which then starts at `start` (so the next row covers
    /// both intervals and its counts stay true).
    fn restore(&self, start: Timestamp, rows: Vec<(Key, u64)>) {
        let mut window = self.lock();
        window.start = window.start.min(start);
        for (key, count) in rows {
            window.add(key, count);
        }
    }

    /// Writes the counts of the interval in progress as audit rows (all at
    /// once, so they share commits) and starts a new interval. Rows that
    /// cannot be written are logged and their counts kept for the next
    /// flush. Returns the refusals written.
    pub async fn flush(&self) -> u64 {
        let (start, rows) = self.take();
        if rows.is_empty() {
            return 0;
        }
        let appends = rows.iter().map(|(_, _, event)| self.audit.append(event));
        let results = futures::future::join_all(appends).await;
        let mut written = 0;
        let mut failed = Vec::new();
        let mut error = None;
        for ((key, count, _), result) in rows.into_iter().zip(results) {
            match result {
                Ok(_) => written += count,
                Err(e) => {
                    failed.push((key, count));
                    error = Some(e);
                }
            }
        }
        if let Some(e) = error {
            let kept: u64 = failed.iter().map(|(_, n)| n).sum();
            tracing::error!(
                action = AUTHENTICATE,
                refusals = kept,
                error = %e,
                "refused authentications not written to the audit trail; kept for the next interval"
            );
            self.restore(start, failed);
        }
        written
    }

    /// Flushes every `interval` until `stop` resolves. A flush under way
    /// when `stop` resolves finishes first. The last interval is written
    /// by a final [`RefusalCounter::flush`] after the server has stopped
    /// taking calls (the broker's shutdown does it), not here.
    pub async fn run(&self, interval: Duration, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = &mut stop => return,
            }
            self.flush().await;
        }
    }

    /// Refusals counted and not yet written.
    pub fn pending(&self) -> u64 {
        self.lock().counts.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthError;
    use crate::auth::KubernetesAuthError;
    use crate::store;

    async fn counter() -> RefusalCounter {
        let store = store::open("sqlite::memory:").await.unwrap();
        store.migrate().await.unwrap();
        let key = super::super::ChainKey::new(&crate::crypto::Keyring::generate_key()).unwrap();
        RefusalCounter::new(Arc::new(AuditLog::new(store, key)))
    }

    fn refuse(counter: &RefusalCounter, error: &AuthError, peer: &str) {
        counter.refused(Refusal {
            error,
            peer: Some(peer.parse().unwrap()),
        });
    }

    fn count_of(event: &AuditEvent) -> u64 {
        let detail = event.caller_detail.as_deref().unwrap();
        detail
            .strip_prefix("count=")
            .and_then(|d| d.split(' ').next())
            .unwrap()
            .parse()
            .unwrap()
    }

    #[tokio::test]
    async fn refusals_are_counted_per_reason_and_address_not_port() {
        let counter = counter().await;
        for port in 1000..1100 {
            refuse(&counter, &AuthError::Invalid, &format!("10.0.0.1:{port}"));
        }
        refuse(&counter, &AuthError::TooLong, "10.0.0.1:1");
        refuse(&counter, &AuthError::Invalid, "[::ffff:10.0.0.1]:2");
        refuse(&counter, &AuthError::Missing, "[2001:db8::1]:3");
        let unavailable =
            AuthError::ServiceAccount(KubernetesAuthError::JwksUnavailable("down".into()));
        refuse(&counter, &unavailable, "10.0.0.2:4");
        counter.refused(Refusal {
            error: &AuthError::Invalid,
            peer: None,
        });
        assert_eq!(counter.pending(), 105);

        let rows: Vec<AuditEvent> = counter.take().1.into_iter().map(|(_, _, e)| e).collect();
        let summary: Vec<(Option<&str>, &str, Outcome, u64)> = rows
            .iter()
            .map(|e| {
                (
                    e.peer.as_deref(),
                    e.reason.as_deref().unwrap(),
                    e.outcome,
                    count_of(e),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (Some("10.0.0.1"), "TOKEN_MALFORMED", Outcome::Denied, 1),
                (Some("10.0.0.1"), "UNAUTHENTICATED", Outcome::Denied, 101),
                (Some("10.0.0.2"), "JWKS_UNAVAILABLE", Outcome::Error, 1),
                (Some("2001:db8::1"), "UNAUTHENTICATED", Outcome::Denied, 1),
                (None, "UNAUTHENTICATED", Outcome::Denied, 1),
            ]
        );
        for row in &rows {
            assert_eq!(row.identity, "-");
            assert_eq!(row.action, AUTHENTICATE);
            let detail = row.caller_detail.as_deref().unwrap();
            let end = format!("interval_end={}", row.time.to_text());
            assert!(detail.ends_with(&end), "{detail}");
            assert!(detail.contains(" interval_start="), "{detail}");
        }
        assert_eq!(counter.pending(), 0, "a new interval starts empty");
    }

    #[tokio::test]
    async fn addresses_beyond_the_cap_are_counted_under_other() {
        let counter = counter().await;
        let extra = 250;
        for i in 0..(MAX_REFUSAL_ADDRESSES + extra) {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i as u32);
            // Two refusals each, so a capped address is never counted alone.
            refuse(&counter, &AuthError::Invalid, &format!("{ip}:1"));
            refuse(&counter, &AuthError::Invalid, &format!("{ip}:2"));
        }
        // An address counted before the cap was reached keeps its own row.
        refuse(&counter, &AuthError::Invalid, "10.0.0.0:3");
        let rows: Vec<AuditEvent> = counter.take().1.into_iter().map(|(_, _, e)| e).collect();
        assert_eq!(rows.len(), MAX_REFUSAL_ADDRESSES + 1);
        let other: Vec<&AuditEvent> = rows
            .iter()
            .filter(|e| e.peer.as_deref() == Some(OTHER_ADDRESSES))
            .collect();
        assert_eq!(other.len(), 1);
        assert_eq!(count_of(other[0]), 2 * extra as u64);
        let first = rows
            .iter()
            .find(|e| e.peer.as_deref() == Some("10.0.0.0"))
            .unwrap();
        assert_eq!(count_of(first), 3);
        let total: u64 = rows.iter().map(count_of).sum();
        assert_eq!(total, 2 * (MAX_REFUSAL_ADDRESSES + extra) as u64 + 1);
    }

    #[tokio::test]
    async fn a_flush_writes_one_chained_row_per_key_and_starts_a_new_interval() {
        let counter = counter().await;
        for port in 0..500 {
            refuse(&counter, &AuthError::Invalid, &format!("127.0.0.1:{port}"));
        }
        refuse(&counter, &AuthError::Missing, "127.0.0.2:1");
        assert_eq!(counter.flush().await, 501);
        assert_eq!(counter.flush().await, 0, "nothing new, nothing written");
        let rows = counter.audit.shared.store.list_audit(0, 100).await.unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows.iter().map(count_of).sum::<u64>(), 501);
        assert!(rows.iter().all(|r| r.outcome == Outcome::Denied));
    }
}
