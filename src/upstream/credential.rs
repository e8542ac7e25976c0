//! The broker's upstream credential: one Entra refresh token, sealed in the
//! store and shared by every replica (migration 0007).
//!
//! - Every refresh reads the stored version, redeems it, and stores Entra's
//!   rotated refresh token as the next version before the access token is
//!   used ([`CredentialWrite::Rotate`], a compare-and-set on the version). A
//!   replica that loses that race keeps its access token and takes the
//!   winner's refresh token next time: Entra does not revoke a redeemed
//!   refresh token, so both stay valid (docs/upstream-sign-in.md).
//! - A login, `set-refresh-token` or a changed `upstream.refresh_token`
//!   stores a new version, which every replica reads at its next refresh:
//!   no restart.
//! - Access tokens are cached until shortly before `expires_in`; a refused
//!   version is retried at most every [`RETRY_REFUSED_AFTER`] per replica.
//! - [`BrokerCredential::keep_alive`] refreshes at least every
//!   `upstream.keepalive_interval`, so the refresh token never reaches
//!   Entra's 90-day inactivity end while a broker runs.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::entra::{access_refresh_at, EntraClient, EntraConfig, TokenSource};
use super::UpstreamError;
use crate::crypto::Keyring;
use crate::domain::Timestamp;
use crate::store::{
    CredentialSource, CredentialState, CredentialWrite, NewUpstreamCredential, RefreshRecord,
    Store, StoreError, UpstreamCredential,
};

/// How an operator re-seeds the credential; every error that asks for it
/// ends with this.
pub const RESEED_HINT: &str = "re-seed it with `token-broker upstream login`, or \
     `token-broker upstream set-refresh-token` with the token on stdin";

/// How long a replica waits before redeeming a refused version again
/// (unless a new version is stored, which is tried at once).
pub const RETRY_REFUSED_AFTER: Duration = Duration::from_secs(30);

/// Entra ends a refresh token unused for this long (AADSTS700082; Microsoft
/// identity platform, "Refresh tokens": 90 days).
pub const INACTIVITY_END: Duration = Duration::from_secs(90 * 24 * 3600);

/// A credential whose refresh token is older than this is reported as
/// nearing its end (30 days before [`INACTIVITY_END`]).
pub const WARN_AFTER: Duration = Duration::from_secs(60 * 24 * 3600);

/// The digest kept of the last adopted `upstream.refresh_token` value:
/// SHA-256 (hex) under a fixed label. A refresh token is long and random,
/// so its digest reveals nothing useful; it is not a key, so key rotation
/// never makes an unchanged configured value look new.
pub fn configured_digest(refresh_token: &SecretString) -> String {
    let mut hash = Sha256::new();
    hash.update(b"token-broker upstream.refresh_token v1\0");
    hash.update(refresh_token.expose_secret().as_bytes());
    hex::encode(hash.finalize())
}

/// Seals `refresh_token` and stores it as the next version, replacing
/// whatever is stored (login, `set-refresh-token`); `redeemed`: it came
/// from a grant just now (sets the last refresh time). Returns the version.
pub async fn store_refresh_token(
    store: &dyn Store,
    keyring: &Keyring,
    refresh_token: &SecretString,
    account: Option<String>,
    source: CredentialSource,
    redeemed: bool,
) -> Result<i64, StoreError> {
    let new = NewUpstreamCredential {
        sealed: keyring.seal(refresh_token, UpstreamCredential::AAD),
        account,
        source,
        refreshed: redeemed,
    };
    store
        .save_upstream_credential(&new, CredentialWrite::Replace, Timestamp::now())
        .await?
        .ok_or_else(|| StoreError::Database("the upstream credential was not stored".into()))
}

/// Adopts the configured `upstream.refresh_token` as a new version if it
/// differs from the last configured value adopted (by any replica, ever).
/// Returns the new version, or `None` when it was adopted before, so a
/// restart with an old Secret never overwrites a newer login or rotation.
pub async fn adopt_configured(
    store: &dyn Store,
    keyring: &Keyring,
    refresh_token: &SecretString,
) -> Result<Option<i64>, StoreError> {
    let digest = configured_digest(refresh_token);
    let new = NewUpstreamCredential {
        sealed: keyring.seal(refresh_token, UpstreamCredential::AAD),
        account: None,
        source: CredentialSource::Config,
        refreshed: false,
    };
    store
        .save_upstream_credential(
            &new,
            CredentialWrite::AdoptConfigured { digest: &digest },
            Timestamp::now(),
        )
        .await
}

/// The broker's bearer source over the stored credential.
pub struct BrokerCredential {
    /// Err: why no grant can be made (an unusable `upstream.entra`).
    entra: Result<EntraClient, String>,
    store: Arc<dyn Store>,
    keyring: Arc<Keyring>,
    state: Mutex<State>,
}

impl fmt::Debug for BrokerCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerCredential")
            .field("entra", &self.entra)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    access: Option<Access>,
    refused: Option<Refused>,
}

struct Access {
    token: SecretString,
    refresh_at: Instant,
}

/// The last refusal this replica saw, by version.
struct Refused {
    version: i64,
    at: Instant,
    message: String,
}

impl BrokerCredential {
    /// A source over `store`'s credential. An unusable `entra` (no
    /// client id, say) does not stop the broker: every call then fails
    /// with an authentication error naming the setting.
    pub fn new(entra: EntraConfig, store: Arc<dyn Store>, keyring: Arc<Keyring>) -> Self {
        let entra = EntraClient::new(entra).map_err(|e| match e {
            UpstreamError::Protocol(m) => m,
            other => other.to_string(),
        });
        if let Err(e) = &entra {
            tracing::warn!(error = %e, "the upstream credential cannot be redeemed until upstream.entra is fixed");
        }
        BrokerCredential {
            entra,
            store,
            keyring,
            state: Mutex::new(State::default()),
        }
    }

    async fn refresh(
        &self,
        state: &mut State,
        forced: bool,
    ) -> Result<SecretString, UpstreamError> {
        let stored = self.store.load_upstream_credential().await.map_err(|e| {
            UpstreamError::Unavailable(format!("cannot read the stored upstream credential: {e}"))
        })?;
        let Some(cred) = stored else {
            return Err(UpstreamError::Authentication(format!(
                "no upstream credential is stored; {RESEED_HINT}, or set upstream.refresh_token"
            )));
        };
        if let Some(refused) = &state.refused {
            if !forced
                && refused.version == cred.version
                && refused.at.elapsed() < RETRY_REFUSED_AFTER
            {
                return Err(UpstreamError::Authentication(refused.message.clone()));
            }
        }
        // A credential this replica cannot use is failing here, whatever
        // Entra would say: recorded, so `upstream status`, `/readyz` and
        // the metric show why creates fail.
        let usable = match &self.entra {
            Err(m) => Err(m.clone()),
            Ok(entra) => self
                .keyring
                .open(&cred.sealed, UpstreamCredential::AAD)
                .map(|token| (entra, token))
                .map_err(|e| {
                    format!(
                        "the stored upstream credential (version {}) cannot be opened with this broker's keys ({e}): are its keys the ones the credential was stored with?",
                        cred.version
                    )
                }),
        };
        let (entra, refresh_token) = match usable {
            Ok(usable) => usable,
            Err(reason) => {
                self.record(
                    cred.version,
                    &RefreshRecord::Refused {
                        error: reason.clone(),
                    },
                )
                .await;
                state.access = None;
                state.refused = Some(Refused {
                    version: cred.version,
                    at: Instant::now(),
                    message: reason.clone(),
                });
                return Err(UpstreamError::Authentication(reason));
            }
        };
        match entra.redeem_refresh_token(&refresh_token).await {
            Ok(grant) => {
                self.record_success(&cred, &grant.refresh_token, grant.account)
                    .await;
                state.refused = None;
                state.access = Some(Access {
                    token: grant.access_token.clone(),
                    refresh_at: access_refresh_at(grant.lifetime),
                });
                Ok(grant.access_token)
            }
            Err(UpstreamError::Authentication(reason)) => {
                let message = format!("{reason}; {RESEED_HINT}");
                self.record(cred.version, &RefreshRecord::Refused { error: reason })
                    .await;
                state.access = None;
                state.refused = Some(Refused {
                    version: cred.version,
                    at: Instant::now(),
                    message: message.clone(),
                });
                Err(UpstreamError::Authentication(message))
            }
            Err(other) => {
                self.record(
                    cred.version,
                    &RefreshRecord::Unavailable {
                        error: other.to_string(),
                    },
                )
                .await;
                Err(other)
            }
        }
    }

    /// Stores the rotated refresh token as the next version (only if
    /// `cred` is still the stored one), else records the success.
    async fn record_success(
        &self,
        cred: &UpstreamCredential,
        rotated: &Option<SecretString>,
        account: Option<String>,
    ) {
        let Some(rotated) = rotated else {
            self.record(cred.version, &RefreshRecord::Succeeded { account })
                .await;
            return;
        };
        let new = NewUpstreamCredential {
            sealed: self.keyring.seal(rotated, UpstreamCredential::AAD),
            account,
            source: CredentialSource::Rotated,
            refreshed: true,
        };
        let write = CredentialWrite::Rotate {
            expected_version: cred.version,
        };
        match self
            .store
            .save_upstream_credential(&new, write, Timestamp::now())
            .await
        {
            Ok(Some(version)) => {
                tracing::debug!(version, "stored the rotated upstream refresh token");
            }
            // Another replica (or a login) stored a newer version first;
            // it is the one every replica redeems next.
            Ok(None) => tracing::debug!(
                version = cred.version,
                "a newer upstream credential was stored meanwhile; keeping it"
            ),
            // The redeemed version stays valid at Entra; the next refresh
            // tries again.
            Err(e) => {
                tracing::warn!(error = %e, "could not store the rotated upstream refresh token")
            }
        }
    }

    async fn record(&self, version: i64, record: &RefreshRecord) {
        if let Err(e) = self
            .store
            .record_upstream_refresh(version, record, Timestamp::now())
            .await
        {
            tracing::warn!(error = %e, "could not record the upstream refresh outcome");
        }
    }

    /// Until `stop` resolves: every check period (a quarter of `interval`,
    /// at most an hour), redeems the stored credential if no replica has
    /// for `interval` (or ever), and warns when it is failing or nearing
    /// its end. The first check runs at once, so a bad credential shows at
    /// start.
    pub async fn keep_alive(
        &self,
        interval: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let period = (interval / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
        // The first check at once: a credential never redeemed (just
        // adopted or set) is redeemed now, and a missing one is reported.
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = ticks.tick() => self.check(interval).await,
            }
        }
    }

    async fn check(&self, interval: Duration) {
        let stored = match self.store.load_upstream_credential().await {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!(error = %e, "keep-alive: cannot read the stored upstream credential");
                return;
            }
        };
        let Some(cred) = stored else {
            tracing::warn!(
                "no upstream credential is stored: creates fail until one is; {RESEED_HINT}"
            );
            return;
        };
        let now = Timestamp::now();
        let due = cred
            .last_refresh_time
            .is_none_or(|t| elapsed(t, now) >= interval);
        if due {
            // A refused version is retried at the same pace as on demand
            // (RETRY_REFUSED_AFTER), however short the interval.
            let forced = cred.state != CredentialState::Failing;
            let result = {
                let mut state = self.state.lock().await;
                self.refresh(&mut state, forced).await.map(drop)
            };
            match result {
                Ok(()) => tracing::info!("refreshed the upstream credential (keep-alive)"),
                Err(e) => {
                    tracing::error!(error = %e, "the upstream credential could not be refreshed")
                }
            }
            return;
        }
        if let Some(warning) = CredentialStatus::from_stored(Some(cred), now).warning {
            tracing::warn!("{warning}");
        }
    }
}

#[async_trait]
impl TokenSource for BrokerCredential {
    async fn bearer(&self) -> Result<SecretString, UpstreamError> {
        // One refresh per replica at a time: callers that wait here find
        // the token the first one fetched.
        let mut state = self.state.lock().await;
        if let Some(access) = &state.access {
            if Instant::now() < access.refresh_at {
                return Ok(access.token.clone());
            }
        }
        self.refresh(&mut state, false).await
    }

    async fn invalidate(&self) {
        self.state.lock().await.access = None;
    }
}

fn elapsed(since: Timestamp, now: Timestamp) -> Duration {
    (now.as_datetime() - since.as_datetime())
        .to_std()
        .unwrap_or_default()
}

/// What `token-broker upstream status`, `/readyz` and the credential
/// metrics report: the stored credential's story, never a token.
#[derive(Clone, Debug, PartialEq)]
pub struct CredentialStatus {
    /// The signed-in account, once known.
    pub account: Option<String>,
    /// The stored version; 0 when none is stored.
    pub version: i64,
    /// `config`, `login`, `stdin` or `rotated`; None when none is stored.
    pub source: Option<CredentialSource>,
    /// When the current version was stored.
    pub store_time: Option<Timestamp>,
    /// Last successful redemption.
    pub last_refresh_time: Option<Timestamp>,
    /// `OK`, `FAILING` or `MISSING`.
    pub state: &'static str,
    /// The last refresh error, if any (an OAuth error and AADSTS code).
    pub last_error: Option<String>,
    /// Age of the stored refresh token (since it was stored).
    pub age: Option<Duration>,
    /// What an operator should do, when anything.
    pub warning: Option<String>,
}

impl CredentialStatus {
    /// The status of `stored` at `now`.
    pub fn from_stored(stored: Option<UpstreamCredential>, now: Timestamp) -> Self {
        let Some(cred) = stored else {
            return CredentialStatus {
                account: None,
                version: 0,
                source: None,
                store_time: None,
                last_refresh_time: None,
                state: "MISSING",
                last_error: None,
                age: None,
                warning: Some(format!(
                    "no upstream credential is stored: creates fail until one is; {RESEED_HINT}"
                )),
            };
        };
        let age = elapsed(cred.update_time, now);
        let warning = if cred.state == CredentialState::Failing {
            Some(format!("Entra refuses this credential: {RESEED_HINT}"))
        } else if age >= WARN_AFTER {
            let days_left = INACTIVITY_END
                .saturating_sub(age)
                .as_secs()
                .div_ceil(86_400);
            Some(format!(
                "the refresh token was stored {} days ago; Entra ends it after 90 days unused (AADSTS700082), {days_left} days from now. A running broker refreshes it every upstream.keepalive_interval: is one running? Else {RESEED_HINT}",
                age.as_secs() / 86_400
            ))
        } else {
            None
        };
        CredentialStatus {
            account: cred.account,
            version: cred.version,
            source: Some(cred.source),
            store_time: Some(cred.update_time),
            last_refresh_time: cred.last_refresh_time,
            state: cred.state.as_str(),
            last_error: cred.last_error,
            age: Some(age),
            warning,
        }
    }

    /// Reads the stored credential's status.
    pub async fn read(store: &dyn Store) -> Result<Self, StoreError> {
        let stored = store.load_upstream_credential().await?;
        Ok(Self::from_stored(stored, Timestamp::now()))
    }

    /// True when a credential is stored and not refused.
    pub fn ok(&self) -> bool {
        self.state == "OK"
    }

    /// The JSON shape of `upstream status --output json`: `account`,
    /// `version`, `source`, `storeTime`, `lastRefreshTime`, `state`,
    /// `lastError` (null when unknown), and `warning`.
    pub fn json(&self) -> Value {
        json!({
            "account": self.account,
            "version": self.version,
            "source": self.source.map(CredentialSource::as_str),
            "storeTime": self.store_time.map(|t| t.to_text()),
            "lastRefreshTime": self.last_refresh_time.map(|t| t.to_text()),
            "state": self.state,
            "lastError": self.last_error,
            "warning": self.warning,
        })
    }

    /// Aligned `field  value` lines, then the warning, if any.
    pub fn text(&self) -> String {
        let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        let mut out = format!(
            "state             {}\naccount           {}\nversion           {}\nsource            {}\nstored            {}\nlast refresh      {}\nlast error        {}",
            self.state,
            or_dash(self.account.clone()),
            self.version,
            or_dash(self.source.map(|s| s.as_str().to_owned())),
            or_dash(self.store_time.map(|t| t.to_text())),
            or_dash(self.last_refresh_time.map(|t| t.to_text())),
            or_dash(self.last_error.clone()),
        );
        if let Some(warning) = &self.warning {
            out.push_str(&format!("\nwarning: {warning}"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configured_digest_is_stable_and_names_no_token() {
        let a = configured_digest(&"rt-1".to_owned().into());
        assert_eq!(a, configured_digest(&"rt-1".to_owned().into()));
        assert_ne!(a, configured_digest(&"rt-2".to_owned().into()));
        assert_eq!(a.len(), 64);
        assert!(!a.contains("rt-1"));
    }

    fn stored(age_days: i64, state: CredentialState) -> UpstreamCredential {
        let now = Timestamp::now();
        UpstreamCredential {
            version: 7,
            sealed: crate::crypto::Sealed {
                key_id: "k1".into(),
                nonce: [0; 12],
                ciphertext: vec![1; 16],
            },
            update_time: now.saturating_sub(Duration::from_secs(age_days as u64 * 86_400 + 3600)),
            account: Some("ops@contoso.com".into()),
            source: CredentialSource::Rotated,
            last_refresh_time: None,
            state,
            last_error: None,
        }
    }

    #[test]
    fn a_credential_nearing_its_inactivity_end_or_refused_carries_a_warning() {
        let now = Timestamp::now();
        let fresh = CredentialStatus::from_stored(Some(stored(1, CredentialState::Ok)), now);
        assert_eq!((fresh.state, fresh.warning.as_deref()), ("OK", None));
        assert!(fresh.ok());

        let old = CredentialStatus::from_stored(Some(stored(75, CredentialState::Ok)), now);
        let warning = old.warning.clone().unwrap();
        assert!(warning.contains("75 days ago"), "{warning}");
        assert!(warning.contains("15 days from now"), "{warning}");
        assert!(old.text().contains("warning: "), "{}", old.text());

        let failing = CredentialStatus::from_stored(Some(stored(1, CredentialState::Failing)), now);
        assert!(!failing.ok());
        assert_eq!(failing.json()["state"], "FAILING");
        assert!(failing
            .warning
            .unwrap()
            .contains("token-broker upstream login"));
    }

    #[test]
    fn a_missing_credential_says_how_to_seed_one() {
        let s = CredentialStatus::from_stored(None, Timestamp::now());
        assert_eq!(s.state, "MISSING");
        assert!(!s.ok());
        assert!(s.warning.unwrap().contains("token-broker upstream login"));
        let json = CredentialStatus::from_stored(None, Timestamp::now()).json();
        for field in [
            "account",
            "version",
            "source",
            "storeTime",
            "lastRefreshTime",
            "state",
            "lastError",
        ] {
            assert!(json.get(field).is_some(), "{field} in {json}");
        }
    }
}
