//! Metrics of managed credentials ([`CredentialMetrics`]), plain Prometheus
//! handles registered on the broker's registry (the admin port's
//! `/metrics`).

use prometheus::{GaugeVec, IntCounterVec, Opts, Registry};

/// Prometheus handles of the credential engine; cheap to clone.
///
/// - `token_broker_credential_rotation_failures_total{credential}`: minting
///   attempts of a new version that failed (upstream refused or was
///   unreachable, or the version could not be recorded); the engine
///   retries with backoff.
/// - `token_broker_credential_valid_until_seconds{credential}`: the validTo
///   (Unix seconds) of the credential's newest valid (CURRENT or PREVIOUS)
///   version; alert when it comes within the overlap of now, before readers
///   are left without a valid version. 0 for a credential in the policy
///   without one (so the same alert fires); absent for one no longer in
///   the policy.
#[derive(Clone, Debug)]
pub struct CredentialMetrics {
    rotation_failures: IntCounterVec,
    valid_until: GaugeVec,
}

impl Default for CredentialMetrics {
    /// Handles registered nowhere.
    fn default() -> Self {
        Self::unregistered().expect("valid metric definitions")
    }
}

impl CredentialMetrics {
    fn unregistered() -> Result<Self, prometheus::Error> {
        Ok(CredentialMetrics {
            rotation_failures: IntCounterVec::new(
                Opts::new(
                    "token_broker_credential_rotation_failures_total",
                    "Failed attempts to mint a new version of a managed credential, by credential.",
                ),
                &["credential"],
            )?,
            valid_until: GaugeVec::new(
                Opts::new(
                    "token_broker_credential_valid_until_seconds",
                    "validTo (Unix seconds) of the newest valid version of a managed credential.",
                ),
                &["credential"],
            )?,
        })
    }

    /// The handles, registered on `registry`.
    ///
    /// Errors: a metric of the same name is registered there already.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let metrics = Self::unregistered()?;
        registry.register(Box::new(metrics.rotation_failures.clone()))?;
        registry.register(Box::new(metrics.valid_until.clone()))?;
        Ok(metrics)
    }

    /// Starts `credential`'s failure series at 0, so a rate or increase
    /// over it works before the first failure.
    pub(super) fn declare(&self, credential: &str) {
        self.rotation_failures
            .with_label_values(&[credential])
            .inc_by(0);
    }

    /// Counts one failed minting attempt of `credential`.
    pub(super) fn rotation_failed(&self, credential: &str) {
        self.rotation_failures
            .with_label_values(&[credential])
            .inc();
    }

    /// Sets the newest valid validTo of `credential` (None: it has none,
    /// the series is removed).
    pub(super) fn set_valid_until(&self, credential: &str, valid_to: Option<f64>) {
        match valid_to {
            Some(seconds) => self
                .valid_until
                .with_label_values(&[credential])
                .set(seconds),
            None => {
                let _ = self.valid_until.remove_label_values(&[credential]);
            }
        }
    }
}
