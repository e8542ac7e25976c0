//! Metrics of the calls to Azure DevOps ([`UpstreamMetrics`]), handed to
//! the [`AzureDevOpsClient`](super::azure_devops::AzureDevOpsClient) as
//! plain Prometheus handles, so the client knows no HTTP server.

use std::time::Duration;

use prometheus::{Counter, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

/// Prometheus handles of the upstream client; cheap to clone.
///
/// - `token_broker_upstream_requests_total{operation,status}`: HTTP
///   requests sent to the PAT API, every attempt counted (retries too).
///   `operation`: `create`, `get`, `list`, `update`, `revoke`; `status`:
///   the HTTP status code (e.g. `200`, `429`, `503`), or `timeout` /
///   `error` when no complete answer came (timed out; connection refused,
///   reset or dropped).
/// - `token_broker_upstream_request_duration_seconds{operation}`
///   (histogram): time of one attempt, from sending to the answer's last
///   byte, with Prometheus' default buckets.
/// - `token_broker_upstream_throttle_wait_seconds_total`: seconds calls
///   spent waiting out upstream's `Retry-After` before sending.
#[derive(Clone, Debug)]
pub struct UpstreamMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    throttle_wait: Counter,
}

impl Default for UpstreamMetrics {
    /// Handles registered nowhere (a client whose numbers nobody reads).
    fn default() -> Self {
        Self::unregistered().expect("valid metric definitions")
    }
}

impl UpstreamMetrics {
    fn unregistered() -> Result<Self, prometheus::Error> {
        Ok(UpstreamMetrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "token_broker_upstream_requests_total",
                    "HTTP requests sent to the Azure DevOps PAT API (every attempt), by operation and HTTP status code (or timeout/error when no answer came).",
                ),
                &["operation", "status"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "token_broker_upstream_request_duration_seconds",
                    "Duration of one HTTP request to the Azure DevOps PAT API, sending to the answer's last byte.",
                ),
                &["operation"],
            )?,
            throttle_wait: Counter::new(
                "token_broker_upstream_throttle_wait_seconds_total",
                "Seconds upstream calls waited out Azure DevOps' Retry-After before sending.",
            )?,
        })
    }

    /// The handles, registered on `registry`.
    ///
    /// Errors: a metric of the same name already registered there.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self::unregistered()?;
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        registry.register(Box::new(m.throttle_wait.clone()))?;
        Ok(m)
    }

    /// Counts one attempt of `operation` that ended with `status` (an HTTP
    /// status code or `timeout` / `error`) after `elapsed`.
    pub(crate) fn observe_request(&self, operation: &str, status: &str, elapsed: Duration) {
        self.requests.with_label_values(&[operation, status]).inc();
        self.duration
            .with_label_values(&[operation])
            .observe(elapsed.as_secs_f64());
    }

    /// Adds a wait for `Retry-After`.
    pub(crate) fn observe_throttle_wait(&self, wait: Duration) {
        self.throttle_wait.inc_by(wait.as_secs_f64());
    }
}
