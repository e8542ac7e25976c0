//! The cluster's service-account signing keys: a JSON Web Key Set (RFC 7517)
//! fetched from a fixed URL or through OIDC discovery (OpenID Connect
//! Discovery 1.0 section 4: `{issuer}/.well-known/openid-configuration` →
//! `jwks_uri`), cached, and refetched when a token names an unknown `kid`,
//! at most once per rate-limit window. Concurrent misses share one fetch, so
//! a burst of forged tokens with random `kid`s costs one request upstream.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, DecodingKey};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tracing::{info, warn};
use url::Url;

use super::kubernetes::KubernetesAuthError;

/// Largest discovery document or JWKS read, in bytes. A cluster's JWKS holds
/// a handful of keys; anything near this is not one.
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Where the key set comes from.
#[derive(Clone, Debug)]
pub(crate) enum JwksSource {
    /// A configured `jwks_url`.
    Url(Url),
    /// OIDC discovery: the document's `issuer` must equal `issuer` exactly.
    Discovery { issuer: String, document: Url },
}

/// One usable verification key.
#[derive(Clone)]
pub(crate) struct VerifyingKey {
    /// The JWK's `kid`, if it has one.
    pub kid: Option<String>,
    /// The only algorithm this key verifies: RS256 for `kty: RSA`, ES256 for
    /// `kty: EC, crv: P-256`.
    pub alg: Algorithm,
    pub key: DecodingKey,
}

struct KeySet {
    keys: Vec<VerifyingKey>,
    fetched_at: Instant,
}

impl KeySet {
    /// Keys with this `kid`; every key when the token names none.
    fn matching(&self, kid: Option<&str>) -> Vec<VerifyingKey> {
        self.keys
            .iter()
            .filter(|k| kid.is_none() || k.kid.as_deref() == kid)
            .cloned()
            .collect()
    }
}

/// Guarded by the fetch lock: only its holder fetches.
#[derive(Default)]
struct FetchState {
    last_attempt: Option<Instant>,
    /// Why the latest attempt failed; `None` after a success.
    last_error: Option<String>,
    /// `jwks_uri` from the discovery document, kept until a fetch from it fails.
    discovered_jwks_uri: Option<Url>,
}

/// Settings of [`JwksCache`].
pub(crate) struct JwksSettings {
    pub source: JwksSource,
    pub http: reqwest::Client,
    /// Bearer token file sent with discovery and JWKS requests, read on each
    /// fetch (kubelet rotates projected tokens).
    pub bearer_token_file: Option<PathBuf>,
    /// Least time between two fetches caused by unknown `kid`s.
    pub min_refetch_interval: Duration,
    /// Keys older than this are refreshed in the background on next use
    /// (and kept if that fails).
    pub max_age: Duration,
}

/// Cached key set with rate-limited, single-flight refetch.
pub(crate) struct JwksCache {
    settings: JwksSettings,
    current: RwLock<Option<Arc<KeySet>>>,
    /// Fetch attempts finished so far; a caller that saw a miss and finds
    /// this moved on while it waited for the lock does not fetch again.
    finished_attempts: AtomicU64,
    fetch: tokio::sync::Mutex<FetchState>,
    /// A background refresh of aged keys is running.
    refreshing: AtomicBool,
}

impl JwksCache {
    pub fn new(settings: JwksSettings) -> Self {
        JwksCache {
            settings,
            current: RwLock::new(None),
            finished_attempts: AtomicU64::new(0),
            fetch: tokio::sync::Mutex::new(FetchState::default()),
            refreshing: AtomicBool::new(false),
        }
    }

    fn snapshot(&self) -> Option<Arc<KeySet>> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The cached keys a token with this `kid` may be verified with (every
    /// key when it has no `kid`). An unknown `kid` refetches the set unless a
    /// fetch ran within the rate-limit window or finished while this caller
    /// waited for the running one. Keys older than `max_age` are still used
    /// while a refresh runs in the background, so no caller waits for it.
    ///
    /// Errors: [`KubernetesAuthError::UnknownKey`] when no key has this `kid`
    /// after all; [`KubernetesAuthError::JwksUnavailable`] when the keys were
    /// never fetched or the latest fetch failed.
    pub async fn keys_for(
        self: &Arc<Self>,
        kid: Option<&str>,
    ) -> Result<Vec<VerifyingKey>, KubernetesAuthError> {
        let seen_attempts = self.finished_attempts.load(Ordering::Acquire);
        if let Some(set) = self.snapshot() {
            let found = set.matching(kid);
            if !found.is_empty() || kid.is_none() {
                if set.fetched_at.elapsed() >= self.settings.max_age {
                    self.refresh_in_background();
                }
                return Ok(found);
            }
        }

        let mut state = self.fetch.lock().await;
        let fetched_meanwhile = self.finished_attempts.load(Ordering::Acquire) != seen_attempts;
        if !fetched_meanwhile && self.window_open(&state) {
            self.attempt(&mut state).await;
        }

        let Some(set) = self.snapshot() else {
            return Err(KubernetesAuthError::JwksUnavailable(
                state
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "not fetched yet".to_owned()),
            ));
        };
        let found = set.matching(kid);
        if !found.is_empty() || kid.is_none() {
            return Ok(found);
        }
        match &state.last_error {
            Some(error) => Err(KubernetesAuthError::JwksUnavailable(error.clone())),
            None => Err(KubernetesAuthError::UnknownKey {
                kid: kid.map(|k| printable(k, 64)),
            }),
        }
    }

    fn window_open(&self, state: &FetchState) -> bool {
        state
            .last_attempt
            .is_none_or(|at| at.elapsed() >= self.settings.min_refetch_interval)
    }

    /// Starts one background refresh of aged keys, unless one is running,
    /// a fetch holds the lock, or the rate-limit window is closed.
    fn refresh_in_background(self: &Arc<Self>) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            if let Ok(mut state) = this.fetch.try_lock() {
                let aged = this
                    .snapshot()
                    .is_none_or(|set| set.fetched_at.elapsed() >= this.settings.max_age);
                if aged && this.window_open(&state) {
                    this.attempt(&mut state).await;
                }
            }
            this.refreshing.store(false, Ordering::Release);
        });
    }

    /// One fetch attempt under the lock: installs the keys, or keeps the old
    /// ones and records why it failed. State changes only once the fetch has
    /// ended, so a caller that gives up midway (its call was cancelled)
    /// leaves the window open for the next one.
    async fn attempt(&self, state: &mut FetchState) {
        let outcome = self.fetch_keys(state).await;
        state.last_attempt = Some(Instant::now());
        match outcome {
            Ok(keys) => {
                let set = Arc::new(KeySet {
                    keys,
                    fetched_at: Instant::now(),
                });
                *self
                    .current
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(set);
                state.last_error = None;
            }
            Err(error) => {
                warn!(%error, "service-account signing keys fetch failed");
                state.last_error = Some(error);
            }
        }
        self.finished_attempts.fetch_add(1, Ordering::Release);
    }

    /// One fetch (with discovery first when needed). Errors are descriptions
    /// for the log and the error; they hold URLs and statuses, no token.
    async fn fetch_keys(&self, state: &mut FetchState) -> Result<Vec<VerifyingKey>, String> {
        let url = match &self.settings.source {
            JwksSource::Url(url) => url.clone(),
            JwksSource::Discovery { issuer, document } => match &state.discovered_jwks_uri {
                Some(url) => url.clone(),
                None => {
                    let url = self.discover(issuer, document).await?;
                    state.discovered_jwks_uri = Some(url.clone());
                    url
                }
            },
        };
        let set: JwkSetWire = match self.get_json(&url).await {
            Ok(set) => set,
            Err(error) => {
                // The issuer may have moved its keys: discover again next time.
                state.discovered_jwks_uri = None;
                return Err(error);
            }
        };
        let total = set.keys.len();
        let keys: Vec<VerifyingKey> = set.keys.into_iter().filter_map(usable_key).collect();
        if keys.is_empty() {
            return Err(format!(
                "JWKS at {url} has no usable RS256 or ES256 signing key ({total} keys)"
            ));
        }
        info!(jwks_uri = %url, keys = keys.len(), skipped = total - keys.len(),
            "fetched service-account signing keys");
        Ok(keys)
    }

    async fn discover(&self, issuer: &str, document: &Url) -> Result<Url, String> {
        let doc: DiscoveryWire = self.get_json(document).await?;
        if doc.issuer != issuer {
            return Err(format!(
                "discovery document at {document} names issuer {:?}, not the configured {issuer:?}",
                printable(&doc.issuer, 200)
            ));
        }
        Url::parse(&doc.jwks_uri)
            .map_err(|e| format!("discovery document at {document}: jwks_uri is not a URL: {e}"))
    }

    async fn get_json<T: DeserializeOwned>(&self, url: &Url) -> Result<T, String> {
        let mut request = self
            .settings
            .http
            .get(url.clone())
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(path) = &self.settings.bearer_token_file {
            request = request.bearer_auth(read_token_file(path).await?.expose_secret());
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("GET {url}: {}", e.without_url()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("GET {url}: HTTP {status}"));
        }
        let body = read_capped(response)
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        serde_json::from_slice(&body).map_err(|e| format!("GET {url}: not the expected JSON: {e}"))
    }
}

/// Reads a bearer token file (a projected service-account token), trimmed.
pub(crate) async fn read_token_file(path: &std::path::Path) -> Result<SecretString, String> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("token file {} is empty", path.display()));
    }
    Ok(SecretString::from(token.to_owned()))
}

/// The body, refused past [`MAX_BODY_BYTES`].
pub(crate) async fn read_capped(mut response: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("reading the answer: {}", e.without_url()))?
    {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(format!("answer larger than {MAX_BODY_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// At most `max` printable ASCII characters of an outside string, for errors.
pub(crate) fn printable(s: &str, max: usize) -> String {
    s.chars()
        .take(max)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

#[derive(Deserialize)]
struct DiscoveryWire {
    issuer: String,
    jwks_uri: String,
}

#[derive(Deserialize)]
struct JwkSetWire {
    /// Raw values, so one key of a kind we do not know spoils nothing.
    keys: Vec<serde_json::Value>,
}

/// The JWK members we read (RFC 7517 section 4, RFC 7518 section 6).
#[derive(Deserialize)]
struct JwkWire {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    key_use: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

/// A key we can verify with, or `None` (other kinds, encryption keys,
/// broken parameters are skipped).
fn usable_key(value: serde_json::Value) -> Option<VerifyingKey> {
    let jwk: JwkWire = serde_json::from_value(value).ok()?;
    if jwk.key_use.as_deref().is_some_and(|u| u != "sig") {
        return None;
    }
    let (alg, key) = match (jwk.kty.as_str(), jwk.alg.as_deref()) {
        ("RSA", None | Some("RS256")) => (
            Algorithm::RS256,
            DecodingKey::from_rsa_components(jwk.n.as_deref()?, jwk.e.as_deref()?).ok()?,
        ),
        ("EC", None | Some("ES256")) if jwk.crv.as_deref() == Some("P-256") => (
            Algorithm::ES256,
            DecodingKey::from_ec_components(jwk.x.as_deref()?, jwk.y.as_deref()?).ok()?,
        ),
        _ => return None,
    };
    Some(VerifyingKey {
        kid: jwk.kid,
        alg,
        key,
    })
}
