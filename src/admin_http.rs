//! The admin HTTP port (`admin.listen`): `GET /metrics` (Prometheus text
//! exposition format 0.0.4), `GET /healthz` (200 while the process runs)
//! and `GET /readyz` (200 when the store answers, else 503; the body names
//! the upstream credential's state).
//!
//! The metrics are fed by the audit trail ([`Metrics::observe_append`] is
//! the [`AuditLog`](crate::audit::AuditLog) observer), so the chain head's
//! id is reported outside the database on every append (its MAC is in the
//! `audit chain head` log line and `token-broker audit head`: a label per
//! row would make a new series per row), and the counters count audited
//! decisions without touching the lease rules.
//! Gauges of stored state (leases by state, the revocation queue, the
//! upstream credential) are read from the store at scrape time, at most
//! once per [`STORE_GAUGE_MAX_AGE`] ([`Metrics::refresh_from_store`]); the
//! connection pools' gauges are read from memory at every scrape. The
//! gRPC server ([`crate::api::observe`]) and the upstream client
//! ([`crate::upstream::metrics`]) register their own metrics on
//! [`Metrics::registry`], and on Linux the process collector adds
//! `process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `process_open_fds`, `process_max_fds`, `process_virtual_memory_bytes`,
//! `process_start_time_seconds` and `process_threads`.

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{
    Encoder as _, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;

use crate::audit::{self, AppendedEvent, AuditEvent, Outcome};
use crate::domain::LeaseState;
use crate::store::{LeaseGauges, Store};
use crate::upstream::credential::CredentialStatus;

/// The broker's metrics, one registry per broker (two brokers in one
/// process never mix their numbers).
pub struct Metrics {
    registry: Registry,
    /// Mirrors [`crate::store::pool_acquire_timeouts`] at each scrape.
    pool_acquire_timeouts: IntCounter,
    head_id: IntGauge,
    /// The id of the head last exported (it never goes back).
    head: Mutex<Option<i64>>,
    tamper_detected: IntCounter,
    leases_created: IntCounter,
    revocations: IntCounter,
    expirations: IntCounter,
    auth_failures: IntCounter,
    leases_revoke_failed: IntGauge,
    credential_ok: IntGauge,
    refresh_token_age: IntGauge,
    last_refresh: IntGauge,
    leases: IntGaugeVec,
    revocation_queue: IntGauge,
    revocation_oldest_age: IntGauge,
    reconciled: IntCounterVec,
    sweep_revocations: IntCounterVec,
    pool_in_use: IntGaugeVec,
    pool_idle: IntGaugeVec,
    pool_max: IntGaugeVec,
    /// The connection pools reported, by `pool` label.
    pools: Mutex<Vec<(&'static str, Arc<dyn Store>)>>,
    /// When the store gauges were last read; held while reading, so
    /// concurrent scrapes share one read.
    refreshed: tokio::sync::Mutex<Option<std::time::Instant>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry holding every metric below at zero:
    /// - `token_broker_audit_chain_head_id` (gauge): id of the newest audit
    ///   row this process appended; 0 before its first append;
    ///   (its MAC: the `audit chain head` log line, `token-broker audit
    ///   head`; never a label, which would make a series per row);
    /// - `token_broker_audit_chain_tamper_detected_total`: times this
    ///   process found the row it appended last gone or changed and
    ///   appended an `audit.tamper_detected` row (alert on any increase);
    /// - `token_broker_leases_created_total`: `lease.create` audit rows
    ///   allowed (idempotent replays included);
    /// - `token_broker_lease_revocations_total`: `lease.revoke` audit rows
    ///   allowed (by holders and by admins; expiries are not counted);
    /// - `token_broker_lease_expirations_total`: `lease.expire` audit rows
    ///   allowed, i.e. leases this process revoked upstream at expiry (with
    ///   several replicas, each counts its own share of the reaper's work);
    /// - `token_broker_auth_failures_total`: refused authentications, as
    ///   they happen ([`Metrics::observe_refusal`]; their `authenticate`
    ///   audit rows are written later, aggregated);
    /// - `token_broker_leases_revoke_failed` (gauge): leases in the store,
    ///   of every holder, in state REVOKE_FAILED (their PAT may still be
    ///   live upstream: `token-broker admin list-failed`). Counted at each
    ///   scrape, so every replica reports the same deployment-wide number
    ///   (aggregate with `max`, not `sum`); if the count fails, the last
    ///   value stays.
    /// - `token_broker_upstream_credential_ok` (gauge): 1 while a
    ///   credential is stored and neither Entra refused it nor a replica
    ///   failed to use it, else 0 (also while the database cannot say);
    /// - `token_broker_upstream_refresh_token_age_seconds` (gauge): seconds
    ///   since the stored refresh token was stored (Entra ends one unused
    ///   for 90 days); 0 when none is stored;
    /// - `token_broker_upstream_last_refresh_timestamp_seconds` (gauge):
    ///   Unix time of the last successful refresh by any replica, 0 if none
    ///   (alert when it stops moving: `time() - … > 2 * keepalive`).
    ///
    /// The three upstream gauges are read from the store at each scrape,
    /// like `leases_revoke_failed`, so every replica reports the same.
    ///
    /// Also, read from the store like them (deployment-wide: aggregate with
    /// `max`):
    /// - `token_broker_leases{state}` (gauge): leases of every holder per
    ///   state (`PENDING`, `ACTIVE`, `REVOKING`, `REVOKED`, `EXPIRED`,
    ///   `FAILED`, `REVOKE_FAILED`);
    /// - `token_broker_revocation_queue_depth` (gauge): REVOKING and
    ///   REVOKE_FAILED leases whose next revocation attempt is due;
    /// - `token_broker_revocation_queue_oldest_age_seconds` (gauge): how
    ///   long the longest-waiting of them has been due; 0 when none is.
    ///
    /// Counted from the audit rows this process writes:
    /// - `token_broker_reconcile_total{outcome}`: `lease.reconcile` rows
    ///   (stale PENDING leases settled to FAILED), `outcome` the row's
    ///   (`allowed`, `denied`, `error`);
    /// - `token_broker_sweep_revocations_total{outcome}`:
    ///   `pat.revoke_orphan` rows (`allowed`: an orphan PAT revoked;
    ///   `error`: its revocation failed, the next sweep retries).
    ///
    /// Per connection pool ([`Metrics::watch_pools`]), label `pool`
    /// (`requests`, `background`, `audit`): `token_broker_db_pool_connections_in_use`,
    /// `token_broker_db_pool_connections_idle`, `token_broker_db_pool_max_connections`.
    pub fn new() -> Self {
        let registry = Registry::new();
        let head_id = IntGauge::new(
            "token_broker_audit_chain_head_id",
            "Id of the newest audit row this process appended (the audit chain head).",
        )
        .expect("valid metric");
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
        let tamper_detected = counter(
            "token_broker_audit_chain_tamper_detected_total",
            "Times this process found the audit row it appended last deleted or changed (the chain was truncated or rewritten) and recorded it as an audit.tamper_detected row.",
        );
        let leases_created = counter(
            "token_broker_leases_created_total",
            "Lease creations granted (lease.create audit rows allowed).",
        );
        let revocations = counter(
            "token_broker_lease_revocations_total",
            "Leases revoked by their holder or an admin (lease.revoke audit rows allowed).",
        );
        let expirations = counter(
            "token_broker_lease_expirations_total",
            "Leases this process revoked at expiry (lease.expire audit rows allowed).",
        );
        let auth_failures = counter(
            "token_broker_auth_failures_total",
            "Refused authentications, counted as they happen (written to the audit trail aggregated, as authenticate rows).",
        );
        let leases_revoke_failed = IntGauge::new(
            "token_broker_leases_revoke_failed",
            "Leases in state REVOKE_FAILED: upstream revocation failed past the retry budget; the PAT may be live (token-broker admin list-failed).",
        )
        .expect("valid metric");
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let credential_ok = gauge(
            "token_broker_upstream_credential_ok",
            "1 while the broker's upstream credential is stored and not refused by Entra, else 0 (token-broker upstream status).",
        );
        let refresh_token_age = gauge(
            "token_broker_upstream_refresh_token_age_seconds",
            "Seconds since the stored upstream refresh token was stored; Entra ends one unused for 90 days.",
        );
        let last_refresh = gauge(
            "token_broker_upstream_last_refresh_timestamp_seconds",
            "Unix time of the last successful upstream credential refresh by any replica; 0 if none.",
        );
        for m in [
            Box::new(credential_ok.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(refresh_token_age.clone()),
            Box::new(last_refresh.clone()),
            Box::new(head_id.clone()),
            Box::new(tamper_detected.clone()),
            Box::new(leases_created.clone()),
            Box::new(revocations.clone()),
            Box::new(expirations.clone()),
            Box::new(auth_failures.clone()),
            Box::new(leases_revoke_failed.clone()),
        ] {
            registry.register(m).expect("metric names are unique");
        }
        let gauge_vec = |name: &str, help: &str, label: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("metric names are unique");
            g
        };
        let counter_vec = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("metric names are unique");
            c
        };
        let leases = gauge_vec(
            "token_broker_leases",
            "Leases of every holder in the database, by state (read at scrape, at most every few seconds).",
            "state",
        );
        for state in LeaseState::ALL {
            leases.with_label_values(&[state.as_str()]).set(0);
        }
        let revocation_queue = gauge(
            "token_broker_revocation_queue_depth",
            "REVOKING and REVOKE_FAILED leases whose next revocation attempt is due.",
        );
        let revocation_oldest_age = gauge(
            "token_broker_revocation_queue_oldest_age_seconds",
            "Seconds the longest-waiting lease in the revocation queue has been due; 0 when the queue is empty.",
        );
        for m in [&revocation_queue, &revocation_oldest_age] {
            registry
                .register(Box::new(m.clone()))
                .expect("metric names are unique");
        }
        let reconciled = counter_vec(
            "token_broker_reconcile_total",
            "Stale PENDING leases the reconciler settled (lease.reconcile audit rows), by outcome.",
            "outcome",
        );
        let sweep_revocations = counter_vec(
            "token_broker_sweep_revocations_total",
            "Orphan PATs the sweep revoked (allowed) or failed to revoke (error) (pat.revoke_orphan audit rows).",
            "outcome",
        );
        for outcome in [Outcome::Allowed, Outcome::Error] {
            reconciled.with_label_values(&[outcome.as_str()]);
            sweep_revocations.with_label_values(&[outcome.as_str()]);
        }
        let pool_in_use = gauge_vec(
            "token_broker_db_pool_connections_in_use",
            "Database connections of the pool in use now.",
            "pool",
        );
        let pool_idle = gauge_vec(
            "token_broker_db_pool_connections_idle",
            "Database connections of the pool open and idle now.",
            "pool",
        );
        let pool_max = gauge_vec(
            "token_broker_db_pool_max_connections",
            "Most connections the pool opens (its share of database.max_connections).",
            "pool",
        );
        let pool_acquire_timeouts = IntCounter::new(
            "token_broker_db_pool_acquire_timeouts_total",
            "Calls that waited database.acquire_timeout for a pooled connection and gave up (every pool of the process).",
        )
        .expect("valid metric");
        registry
            .register(Box::new(pool_acquire_timeouts.clone()))
            .expect("metric names are unique");
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process metric names are unique");
        Metrics {
            pool_acquire_timeouts,
            registry,
            head_id,
            head: Mutex::new(None),
            tamper_detected,
            leases_created,
            revocations,
            expirations,
            auth_failures,
            leases_revoke_failed,
            credential_ok,
            refresh_token_age,
            last_refresh,
            leases,
            revocation_queue,
            revocation_oldest_age,
            reconciled,
            sweep_revocations,
            pool_in_use,
            pool_idle,
            pool_max,
            pools: Mutex::new(Vec::new()),
            refreshed: tokio::sync::Mutex::new(None),
        }
    }

    /// The registry every metric of this broker is on (for the gRPC
    /// server's and the upstream client's own).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Reports the connection pools of `pools` (label value, store) at
    /// every scrape.
    pub fn watch_pools(&self, pools: Vec<(&'static str, Arc<dyn Store>)>) {
        *self.pools.lock().unwrap_or_else(|p| p.into_inner()) = pools;
    }

    /// Sets the pool gauges from memory (no query).
    fn refresh_pools(&self) {
        // A counter only moves up: add what the process counted since.
        let timeouts = crate::store::pool_acquire_timeouts();
        self.pool_acquire_timeouts
            .inc_by(timeouts.saturating_sub(self.pool_acquire_timeouts.get()));
        let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        for (name, store) in pools.iter() {
            if let Some(status) = store.pool_status() {
                let in_use = status.size.saturating_sub(status.idle);
                self.pool_in_use
                    .with_label_values(&[name])
                    .set(i64::from(in_use));
                self.pool_idle
                    .with_label_values(&[name])
                    .set(i64::from(status.idle));
                self.pool_max
                    .with_label_values(&[name])
                    .set(i64::from(status.max));
            }
        }
    }

    /// Sets the lease gauges from `gauges`, read at `now`.
    fn observe_leases(&self, gauges: &LeaseGauges, now: chrono::DateTime<chrono::Utc>) {
        for state in LeaseState::ALL {
            let n = gauges
                .by_state
                .iter()
                .find(|(s, _)| *s == state)
                .map_or(0, |(_, n)| *n);
            self.leases
                .with_label_values(&[state.as_str()])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.revocation_queue
            .set(i64::try_from(gauges.revocation_queue).unwrap_or(i64::MAX));
        self.revocation_oldest_age.set(
            gauges
                .revocation_oldest_due
                .map_or(0, |due| (now - due.as_datetime()).num_seconds().max(0)),
        );
    }

    /// Sets the gauges of stored state from `store`, each read within
    /// [`STORE_GAUGE_TIMEOUT`]; on failure or timeout a gauge keeps its
    /// last value and a warning is logged. The REVOKE_FAILED count and the
    /// credential (one indexed COUNT, one row) are read at every scrape;
    /// the lease gauges (a GROUP BY over every lease and two queries over
    /// the revocation queue) at most once per [`STORE_GAUGE_MAX_AGE`],
    /// however often `/metrics` is scraped.
    pub async fn refresh_from_store(&self, store: &dyn Store) {
        self.refresh_pools();
        {
            // Held while reading, so concurrent scrapes share one read.
            let mut refreshed = self.refreshed.lock().await;
            if refreshed.is_none_or(|at| at.elapsed() >= STORE_GAUGE_MAX_AGE) {
                *refreshed = Some(std::time::Instant::now());
                let now = chrono::Utc::now();
                match tokio::time::timeout(
                    STORE_GAUGE_TIMEOUT,
                    store.lease_gauges(crate::domain::Timestamp::from(now)),
                )
                .await
                {
                    Ok(Ok(gauges)) => self.observe_leases(&gauges, now),
                    Ok(Err(e)) => tracing::warn!(error = %e, "metrics: could not count leases"),
                    Err(_) => tracing::warn!("metrics: counting leases timed out"),
                }
            }
        }
        let count = tokio::time::timeout(
            STORE_GAUGE_TIMEOUT,
            store.count_leases_in_state(LeaseState::RevokeFailed),
        )
        .await;
        match count {
            Ok(Ok(n)) => self
                .leases_revoke_failed
                .set(i64::try_from(n).unwrap_or(i64::MAX)),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "metrics: could not count REVOKE_FAILED leases")
            }
            Err(_) => tracing::warn!("metrics: counting REVOKE_FAILED leases timed out"),
        }
        match tokio::time::timeout(STORE_GAUGE_TIMEOUT, CredentialStatus::read(store)).await {
            Ok(Ok(status)) => self.observe_credential(&status),
            // Unknown is not OK: creates fail without the database anyway.
            Ok(Err(e)) => {
                self.credential_ok.set(0);
                tracing::warn!(error = %e, "metrics: could not read the upstream credential")
            }
            Err(_) => {
                self.credential_ok.set(0);
                tracing::warn!("metrics: reading the upstream credential timed out")
            }
        }
    }

    /// Sets the upstream credential gauges from `status`.
    pub fn observe_credential(&self, status: &CredentialStatus) {
        self.credential_ok.set(i64::from(status.ok()));
        self.refresh_token_age.set(
            status
                .age
                .map_or(0, |a| i64::try_from(a.as_secs()).unwrap_or(i64::MAX)),
        );
        self.last_refresh.set(
            status
                .last_refresh_time
                .map_or(0, |t| t.as_datetime().timestamp()),
        );
    }

    /// Counts one committed `audit.tamper_detected` row (the
    /// [`AuditLog`](crate::audit::AuditLog) tamper observer).
    pub fn observe_tamper(&self) {
        self.tamper_detected.inc();
    }

    /// Records one audit append: moves the chain head forward (never back:
    /// racing appends may arrive out of order) and counts the decision.
    pub fn observe_append(&self, event: &AuditEvent, appended: &AppendedEvent) {
        {
            let mut head = self.head.lock().unwrap_or_else(|p| p.into_inner());
            if head.is_none_or(|h| h < appended.id) {
                self.head_id.set(appended.id);
                *head = Some(appended.id);
            }
        }
        match (event.action.as_str(), event.outcome) {
            (audit::LEASE_CREATE, Outcome::Allowed) => self.leases_created.inc(),
            (audit::LEASE_REVOKE, Outcome::Allowed) => self.revocations.inc(),
            (audit::LEASE_EXPIRE, Outcome::Allowed) => self.expirations.inc(),
            (audit::LEASE_RECONCILE, outcome) => {
                self.reconciled.with_label_values(&[outcome.as_str()]).inc()
            }
            (audit::PAT_REVOKE_ORPHAN, outcome) => self
                .sweep_revocations
                .with_label_values(&[outcome.as_str()])
                .inc(),
            _ => {}
        }
    }

    /// Counts one refused authentication (the authenticator's refusal
    /// counter calls it on the request path: a counter increment only).
    pub fn observe_refusal(&self, _reason: &'static str) {
        self.auth_failures.inc();
    }

    /// Every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into memory cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: Arc<Metrics>,
    store: Arc<dyn Store>,
}

/// The admin HTTP routes: `/metrics`, `/healthz`, `/readyz`.
pub fn router(metrics: Arc<Metrics>, store: Arc<dyn Store>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(AdminState { metrics, store })
}

/// Longest a scrape waits for the store to count leases (Prometheus'
/// default scrape timeout is 10 s).
pub const STORE_GAUGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// How long gauges read from the store are reused before a scrape reads
/// them again.
pub const STORE_GAUGE_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(5);

async fn metrics_text(State(s): State<AdminState>) -> impl IntoResponse {
    s.metrics.refresh_from_store(s.store.as_ref()).await;
    (
        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        s.metrics.render(),
    )
}

/// Longest a readiness ping may take before the broker counts as not
/// ready (probes time out too; kubelet's default is 1 s).
const READY_PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// 200 when the store answers; the body also names the upstream
/// credential's state, but a failing credential does not make a replica
/// unready (an Entra outage must not empty the Service).
async fn ready(State(s): State<AdminState>) -> impl IntoResponse {
    match tokio::time::timeout(READY_PING_TIMEOUT, CredentialStatus::read(s.store.as_ref())).await {
        Ok(Ok(status)) => {
            let mut body = format!("ready\nupstream credential: {}", status.state);
            if let Some(error) = &status.last_error {
                body.push_str(&format!(": {error}"));
            }
            if let Some(warning) = &status.warning {
                body.push_str(&format!("\nwarning: {warning}"));
            }
            body.push('\n');
            return (StatusCode::OK, body);
        }
        Err(_) => tracing::warn!("readyz: the store ping timed out"),
        Ok(Err(e)) => tracing::warn!(error = %e, "readyz: the store does not answer"),
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "not ready: the database does not answer\n".to_owned(),
    )
}

/// Serves the admin routes on `listener` until `shutdown` resolves.
/// Errors: the OS error of the accept loop.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    store: Arc<dyn Store>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    const SERVING: &str = "token-broker serving admin HTTP (/metrics, /healthz, /readyz)";
    match listener.local_addr() {
        Ok(addr) => tracing::info!(%addr, "{SERVING}"),
        Err(e) => tracing::info!(error = %e, "{SERVING}"),
    }
    axum::serve(listener, router(metrics, store))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn event(action: &str, outcome: Outcome) -> AuditEvent {
        AuditEvent::new(Utc::now(), "apikey:ci", action, outcome)
    }

    fn head(id: i64, c: char) -> AppendedEvent {
        AppendedEvent {
            id,
            mac: c.to_string().repeat(64),
        }
    }

    #[test]
    fn the_head_metric_follows_the_newest_append_without_a_series_per_row() {
        let m = Metrics::new();
        m.observe_append(&event("lease.create", Outcome::Allowed), &head(4, 'a'));
        m.observe_append(&event("lease.revoke", Outcome::Allowed), &head(6, 'b'));
        // A racing append that lost arrives late: the head stays at 6.
        m.observe_append(&event("authenticate", Outcome::Denied), &head(5, 'c'));
        // Refusals count as they happen, not from their aggregated rows.
        m.observe_refusal("UNAUTHENTICATED");
        let text = m.render();
        assert_lines(
            &text,
            &[
                "token_broker_audit_chain_head_id 6",
                "token_broker_audit_chain_tamper_detected_total 0",
                "token_broker_leases_created_total 1",
                "token_broker_lease_revocations_total 1",
                "token_broker_auth_failures_total 1",
            ],
        );
        for mac in ['a', 'b', 'c'] {
            assert!(!text.contains(&mac.to_string().repeat(64)), "{text}");
        }
        m.observe_tamper();
        assert_lines(
            &m.render(),
            &["token_broker_audit_chain_tamper_detected_total 1"],
        );
    }

    #[test]
    fn expiries_are_counted_apart_from_revocations() {
        let m = Metrics::new();
        m.observe_append(&event("lease.expire", Outcome::Allowed), &head(1, 'a'));
        m.observe_append(&event("lease.expire", Outcome::Error), &head(2, 'b'));
        assert_lines(
            &m.render(),
            &[
                "token_broker_lease_expirations_total 1",
                "token_broker_lease_revocations_total 0",
            ],
        );
    }

    /// Asserts that `text` holds each of `lines`, newline-terminated.
    fn assert_lines(text: &str, lines: &[&str]) {
        for line in lines {
            assert!(text.contains(&format!("{line}\n")), "{text}");
        }
    }

    #[test]
    fn denied_creations_are_not_counted_as_created() {
        let m = Metrics::new();
        m.observe_append(&event("lease.create", Outcome::Denied), &head(1, 'a'));
        assert!(m.render().contains("token_broker_leases_created_total 0\n"));
    }
}
