//! Kubernetes service-account callers: a pod sends its projected
//! service-account token as `authorization: Bearer <jwt>`, and
//! [`KubernetesVerifier::verify`] turns it into an
//! `Identity::ServiceAccount`.
//!
//! Two ways to verify, chosen by configuration:
//! - **JWKS** (default): the signature (RS256 or ES256 only), `exp`, `nbf`,
//!   `iss` and `aud` are checked here against the cluster's signing keys
//!   (see `jwks`), with no call per request;
//! - **TokenReview**: the token is sent to the API server
//!   (`authentication.k8s.io/v1` TokenReview), which also refuses tokens of
//!   deleted pods and service accounts.
//!
//! The claims read are those of Kubernetes' bound service-account tokens
//! (KEP-1205): `sub = system:serviceaccount:NAMESPACE:NAME` and the private
//! `kubernetes.io` claim (`namespace`, `serviceaccount.{name,uid}`,
//! `pod.{name,uid}`). The token text never reaches an error, a log or a
//! `Debug` output.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use url::Url;

use super::jwks::{printable, read_capped, read_token_file, JwksCache, JwksSettings, JwksSource};
use super::Caller;
use crate::domain::Identity;
use crate::error::{ErrorCode, ServiceError};

/// Longest token we look at, in bytes (Kubernetes' tokens are about 1 KiB):
/// the authenticator's own bound, so a token the edge lets through is never
/// refused here for its length alone.
const MAX_TOKEN_BYTES: usize = super::MAX_BEARER_BYTES;

/// Largest accepted `leeway`: more would keep expired tokens alive.
const MAX_LEEWAY: Duration = Duration::from_secs(300);

/// `sub` (and TokenReview `user.username`) prefix of a service account.
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// TokenReview `user.extra` keys set for pod-bound tokens (Kubernetes
/// `authentication.kubernetes.io/*` user-info extras).
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const EXTRA_CREDENTIAL_ID: &str = "authentication.kubernetes.io/credential-id";

/// Settings of service-account authentication, embedded in the broker's
/// configuration as `auth.kubernetes`. Durations read from a number of
/// seconds or a humantime string (`"30s"`).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesAuthConfig {
    /// Accept service-account tokens at all; default false.
    pub enabled: bool,
    /// The cluster's service-account issuer (`--service-account-issuer`),
    /// compared exactly with the token's `iss`; for example
    /// `https://kubernetes.default.svc.cluster.local`. Required for JWKS
    /// verification; unused with `token_review`.
    pub issuer: Option<String>,
    /// Where the signing keys are; default: OIDC discovery,
    /// `{issuer}/.well-known/openid-configuration` → `jwks_uri`.
    pub jwks_url: Option<Url>,
    /// Accepted `aud` values; a token needs one of them. Default
    /// `["token-broker"]` (the pod's projected volume sets `audience`).
    pub audiences: Vec<String>,
    /// Least time between two JWKS fetches caused by an unknown `kid`;
    /// default 30 s. A key published within this time after the previous
    /// fetch is trusted only once the window has passed. Zero disables the
    /// limit (tests).
    #[serde(deserialize_with = "crate::duration::de_duration")]
    pub jwks_refetch_min_interval: Duration,
    /// Cached keys older than this are refreshed in the background on next
    /// use (and kept if that fails), so a key removed from the JWKS stops
    /// being trusted; default 10 min.
    #[serde(deserialize_with = "crate::duration::de_duration")]
    pub jwks_max_age: Duration,
    /// Clock skew allowed on `exp` and `nbf` (whole seconds); default 30 s,
    /// at most 5 min.
    #[serde(deserialize_with = "crate::duration::de_duration")]
    pub leeway: Duration,
    /// Timeout of one discovery, JWKS or TokenReview exchange; default 10 s.
    #[serde(deserialize_with = "crate::duration::de_duration")]
    pub http_timeout: Duration,
    /// PEM bundle of the CAs trusted for the discovery and JWKS URLs
    /// (instead of the built-in web roots); in a pod usually
    /// `/var/run/secrets/kubernetes.io/serviceaccount/ca.crt`.
    pub ca_file: Option<PathBuf>,
    /// Bearer token file sent with discovery and JWKS requests, read on each
    /// fetch. The API server's `/openid/v1/jwks` wants an authenticated
    /// caller unless anonymous discovery is allowed; in a pod usually
    /// `/var/run/secrets/kubernetes.io/serviceaccount/token`.
    pub jwks_token_file: Option<PathBuf>,
    /// Verify through the API server's TokenReview instead of the JWKS.
    pub token_review: Option<TokenReviewConfig>,
}

impl Default for KubernetesAuthConfig {
    fn default() -> Self {
        KubernetesAuthConfig {
            enabled: false,
            issuer: None,
            jwks_url: None,
            audiences: vec!["token-broker".to_owned()],
            jwks_refetch_min_interval: Duration::from_secs(30),
            jwks_max_age: Duration::from_secs(600),
            leeway: Duration::from_secs(30),
            http_timeout: Duration::from_secs(10),
            ca_file: None,
            jwks_token_file: None,
            token_review: None,
        }
    }
}

/// How to reach the API server's TokenReview endpoint
/// (`POST {api_server}/apis/authentication.k8s.io/v1/tokenreviews`). The
/// broker's service account needs RBAC `create` on `tokenreviews`
/// (ClusterRole `system:auth-delegator`).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenReviewConfig {
    /// API server base URL; default `https://kubernetes.default.svc`.
    pub api_server: Url,
    /// PEM bundle of the CAs trusted for the API server; in a pod usually
    /// `/var/run/secrets/kubernetes.io/serviceaccount/ca.crt`. Default: the
    /// built-in web roots.
    pub ca_file: Option<PathBuf>,
    /// The broker's own service-account token, sent as bearer, read on each
    /// review (kubelet rotates it); default
    /// `/var/run/secrets/kubernetes.io/serviceaccount/token`.
    pub token_file: PathBuf,
}

impl Default for TokenReviewConfig {
    fn default() -> Self {
        TokenReviewConfig {
            api_server: Url::parse("https://kubernetes.default.svc").expect("static URL"),
            ca_file: None,
            token_file: PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token"),
        }
    }
}

/// A configuration the verifier cannot start with; names the setting.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesConfigError {
    /// A setting is missing or wrong.
    #[error("auth.kubernetes.{setting}: {problem}")]
    Invalid {
        /// Dotted path below `auth.kubernetes`.
        setting: &'static str,
        /// What is wrong, for the operator.
        problem: String,
    },
}

fn invalid(setting: &'static str, problem: impl Into<String>) -> KubernetesConfigError {
    KubernetesConfigError::Invalid {
        setting,
        problem: problem.into(),
    }
}

/// Why a service-account token was refused. Never carries the token, not
/// even in part. Each has a stable [`ServiceError::reason`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KubernetesAuthError {
    /// Not a compact JWS, unreadable header or claims, or a required claim
    /// missing (`TOKEN_MALFORMED`).
    #[error("service-account token is malformed: {0}")]
    Malformed(&'static str),
    /// `alg` other than RS256 or ES256, such as `none` or HS256
    /// (`TOKEN_ALGORITHM_UNSUPPORTED`).
    #[error("service-account token algorithm {alg:?} is not accepted; only RS256 and ES256 are")]
    UnsupportedAlgorithm {
        /// The header's `alg`, shortened to printable ASCII.
        alg: String,
    },
    /// No signing key of the cluster has the token's `kid`, even after a
    /// refetch (or the refetch was rate-limited) (`TOKEN_KEY_UNKNOWN`).
    #[error("service-account token is signed by an unknown key (kid {kid:?})")]
    UnknownKey {
        /// The header's `kid`, shortened to printable ASCII.
        kid: Option<String>,
    },
    /// The signature does not verify with the key (`TOKEN_SIGNATURE_INVALID`).
    #[error("service-account token signature does not verify")]
    BadSignature,
    /// `exp` is past, beyond the leeway (`TOKEN_EXPIRED`).
    #[error("service-account token has expired")]
    Expired,
    /// `nbf` is ahead, beyond the leeway (`TOKEN_NOT_YET_VALID`).
    #[error("service-account token is not valid yet")]
    NotYetValid,
    /// `iss` is missing or not the configured issuer (`TOKEN_ISSUER_MISMATCH`).
    #[error("service-account token was issued by another issuer")]
    WrongIssuer,
    /// `aud` is missing or names none of the configured audiences
    /// (`TOKEN_AUDIENCE_MISMATCH`).
    #[error("service-account token is not meant for this audience")]
    WrongAudience,
    /// `sub` is not `system:serviceaccount:NAMESPACE:NAME`, or disagrees with
    /// the `kubernetes.io` claim (`TOKEN_SUBJECT_INVALID`).
    #[error("service-account token subject is not a valid service account: {0}")]
    InvalidSubject(&'static str),
    /// The API server's TokenReview did not authenticate the token, for
    /// example because its pod was deleted (`TOKEN_REVIEW_REFUSED`).
    #[error("the API server refused the service-account token: {0}")]
    ReviewRefused(String),
    /// The signing keys cannot be fetched (`JWKS_UNAVAILABLE`, UNAVAILABLE).
    #[error("the cluster's signing keys are unavailable: {0}")]
    JwksUnavailable(String),
    /// The TokenReview call failed (`TOKEN_REVIEW_UNAVAILABLE`, UNAVAILABLE).
    #[error("the API server's TokenReview is unavailable: {0}")]
    ReviewUnavailable(String),
}

impl ServiceError for KubernetesAuthError {
    fn code(&self) -> ErrorCode {
        match self {
            KubernetesAuthError::JwksUnavailable(_) | KubernetesAuthError::ReviewUnavailable(_) => {
                ErrorCode::Unavailable
            }
            _ => ErrorCode::Unauthenticated,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            KubernetesAuthError::Malformed(_) => "TOKEN_MALFORMED",
            KubernetesAuthError::UnsupportedAlgorithm { .. } => "TOKEN_ALGORITHM_UNSUPPORTED",
            KubernetesAuthError::UnknownKey { .. } => "TOKEN_KEY_UNKNOWN",
            KubernetesAuthError::BadSignature => "TOKEN_SIGNATURE_INVALID",
            KubernetesAuthError::Expired => "TOKEN_EXPIRED",
            KubernetesAuthError::NotYetValid => "TOKEN_NOT_YET_VALID",
            KubernetesAuthError::WrongIssuer => "TOKEN_ISSUER_MISMATCH",
            KubernetesAuthError::WrongAudience => "TOKEN_AUDIENCE_MISMATCH",
            KubernetesAuthError::InvalidSubject(_) => "TOKEN_SUBJECT_INVALID",
            KubernetesAuthError::ReviewRefused(_) => "TOKEN_REVIEW_REFUSED",
            KubernetesAuthError::JwksUnavailable(_) => "JWKS_UNAVAILABLE",
            KubernetesAuthError::ReviewUnavailable(_) => "TOKEN_REVIEW_UNAVAILABLE",
        }
    }
}

/// A verified service-account caller, with the claims the audit keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccountCaller {
    /// Always `Identity::ServiceAccount { namespace, name }`.
    pub identity: Identity,
    /// The service account's uid (`kubernetes.io.serviceaccount.uid`, or
    /// TokenReview `user.uid`).
    pub service_account_uid: Option<String>,
    /// The pod the token is bound to (`kubernetes.io.pod.name`); `None` for
    /// a token not bound to a pod (`kubectl create token`).
    pub pod_name: Option<String>,
    /// The bound pod's uid (`kubernetes.io.pod.uid`).
    pub pod_uid: Option<String>,
    /// The token's id (`jti`, or TokenReview extra `credential-id` without
    /// its `JTI=` prefix), when the cluster sets one (Kubernetes 1.29+).
    pub token_id: Option<String>,
}

/// The claims of a verified service-account token the audit keeps beside
/// the identity (see [`ServiceAccountCaller`] for where each comes from).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceAccountClaims {
    /// The service account's uid.
    pub service_account_uid: Option<String>,
    /// The pod the token is bound to.
    pub pod_name: Option<String>,
    /// The bound pod's uid.
    pub pod_uid: Option<String>,
    /// The token's id (`jti`).
    pub token_id: Option<String>,
}

impl ServiceAccountCaller {
    /// The [`Caller`] the lease rules see, carrying the pod and uid claims.
    pub fn caller(&self, peer: Option<String>) -> Caller {
        Caller {
            identity: self.identity.clone(),
            peer,
            service_account: Some(self.claims()),
        }
    }

    /// The claims kept for the audit.
    pub fn claims(&self) -> ServiceAccountClaims {
        ServiceAccountClaims {
            service_account_uid: self.service_account_uid.clone(),
            pod_name: self.pod_name.clone(),
            pod_uid: self.pod_uid.clone(),
            token_id: self.token_id.clone(),
        }
    }
}

/// Verifies projected service-account tokens. Cheap to clone; one per
/// server, shared by every call (it holds the JWKS cache).
#[derive(Clone)]
pub struct KubernetesVerifier {
    inner: Arc<Inner>,
}

struct Inner {
    audiences: Vec<String>,
    mode: Mode,
}

enum Mode {
    Jwks {
        keys: Arc<JwksCache>,
        /// Template checks; `algorithms` is set per token.
        validation: Validation,
    },
    TokenReview {
        http: reqwest::Client,
        endpoint: Url,
        token_file: PathBuf,
    },
}

impl std::fmt::Debug for KubernetesVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match &self.inner.mode {
            Mode::Jwks { .. } => "jwks",
            Mode::TokenReview { .. } => "token_review",
        };
        f.debug_struct("KubernetesVerifier")
            .field("mode", &mode)
            .field("audiences", &self.inner.audiences)
            .finish()
    }
}

impl KubernetesVerifier {
    /// Checks `config` and builds the HTTP clients (reading the CA files and,
    /// for TokenReview, checking the token file is readable). Fetches nothing:
    /// the keys are fetched on first use. Build one only when
    /// `config.enabled`.
    pub fn new(config: &KubernetesAuthConfig) -> Result<Self, KubernetesConfigError> {
        let audiences: Vec<String> = config
            .audiences
            .iter()
            .map(|a| a.trim().to_owned())
            .collect();
        if audiences.is_empty() || audiences.iter().any(String::is_empty) {
            return Err(invalid(
                "audiences",
                "list at least one non-empty audience (default [\"token-broker\"])",
            ));
        }
        if config.leeway > MAX_LEEWAY {
            return Err(invalid("leeway", "must be at most 5m"));
        }
        if config.http_timeout.is_zero() {
            return Err(invalid("http_timeout", "must be greater than zero"));
        }

        let mode = match &config.token_review {
            Some(review) => {
                std::fs::metadata(&review.token_file).map_err(|e| {
                    invalid(
                        "token_review.token_file",
                        format!("cannot read {}: {e}", review.token_file.display()),
                    )
                })?;
                let setting = "token_review.api_server";
                check_url(&review.api_server, setting)?;
                let endpoint = Url::parse(&format!(
                    "{}/apis/authentication.k8s.io/v1/tokenreviews",
                    review.api_server.as_str().trim_end_matches('/')
                ))
                .map_err(|e| invalid(setting, e.to_string()))?;
                Mode::TokenReview {
                    http: http_client(
                        config.http_timeout,
                        review.ca_file.as_deref(),
                        "token_review.ca_file",
                    )?,
                    endpoint,
                    token_file: review.token_file.clone(),
                }
            }
            None => {
                let issuer = match config.issuer.as_deref().map(str::trim) {
                    Some(issuer) if !issuer.is_empty() => issuer.to_owned(),
                    _ => {
                        return Err(invalid(
                            "issuer",
                            "required: the cluster's service-account issuer, e.g. \
                             https://kubernetes.default.svc.cluster.local",
                        ))
                    }
                };
                let source = match &config.jwks_url {
                    Some(url) => {
                        check_url(url, "jwks_url")?;
                        JwksSource::Url(url.clone())
                    }
                    None => {
                        let document = discovery_url(&issuer).map_err(|problem| {
                            invalid("issuer", format!("{problem}; or set jwks_url"))
                        })?;
                        check_url(&document, "issuer")?;
                        JwksSource::Discovery {
                            document,
                            issuer: issuer.clone(),
                        }
                    }
                };
                let mut validation = Validation::new(Algorithm::RS256);
                validation.set_issuer(&[&issuer]);
                validation.set_audience(&audiences);
                validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
                validation.validate_exp = true;
                validation.validate_nbf = true;
                validation.leeway = config.leeway.as_secs();
                Mode::Jwks {
                    keys: Arc::new(JwksCache::new(JwksSettings {
                        source,
                        http: http_client(
                            config.http_timeout,
                            config.ca_file.as_deref(),
                            "ca_file",
                        )?,
                        bearer_token_file: config.jwks_token_file.clone(),
                        min_refetch_interval: config.jwks_refetch_min_interval,
                        max_age: config.jwks_max_age,
                    })),
                    validation,
                }
            }
        };
        Ok(KubernetesVerifier {
            inner: Arc::new(Inner { audiences, mode }),
        })
    }

    /// Fetches the signing keys now (JWKS mode; nothing to do with
    /// TokenReview), so the first caller does not wait for them and start-up
    /// or readiness can report a cluster whose keys cannot be fetched.
    ///
    /// Errors: [`KubernetesAuthError::JwksUnavailable`].
    pub async fn prefetch_keys(&self) -> Result<(), KubernetesAuthError> {
        match &self.inner.mode {
            Mode::Jwks { keys, .. } => keys.keys_for(None).await.map(drop),
            Mode::TokenReview { .. } => Ok(()),
        }
    }

    /// Verifies `jwt` (the bearer credential, without `Bearer `) and returns
    /// the service account it proves.
    ///
    /// Errors: a [`KubernetesAuthError`] naming why; UNAUTHENTICATED except
    /// when the keys or the TokenReview cannot be reached (UNAVAILABLE).
    pub async fn verify(&self, jwt: &str) -> Result<ServiceAccountCaller, KubernetesAuthError> {
        let header = read_header(jwt)?;
        match &self.inner.mode {
            Mode::Jwks { keys, validation } => {
                self.verify_locally(jwt, &header, keys, validation).await
            }
            Mode::TokenReview {
                http,
                endpoint,
                token_file,
            } => self.review(jwt, http, endpoint, token_file).await,
        }
    }

    async fn verify_locally(
        &self,
        jwt: &str,
        header: &JoseHeader,
        keys: &Arc<JwksCache>,
        validation: &Validation,
    ) -> Result<ServiceAccountCaller, KubernetesAuthError> {
        let candidates = keys.keys_for(header.kid.as_deref()).await?;
        let mut validation = validation.clone();
        validation.algorithms = vec![header.alg];
        for key in candidates.iter().filter(|k| k.alg == header.alg) {
            match jsonwebtoken::decode::<Claims>(jwt, &key.key, &validation) {
                Ok(data) => return caller_from_claims(data.claims),
                // Without a `kid`, another key of the set may be the signer.
                Err(e) if *e.kind() == ErrorKind::InvalidSignature && header.kid.is_none() => {}
                Err(e) => return Err(map_jwt_error(e.kind())),
            }
        }
        if candidates.is_empty() {
            Err(KubernetesAuthError::UnknownKey { kid: None })
        } else {
            // Signed by none of the keys, or `alg` is not the key's algorithm.
            Err(KubernetesAuthError::BadSignature)
        }
    }

    async fn review(
        &self,
        jwt: &str,
        http: &reqwest::Client,
        endpoint: &Url,
        token_file: &Path,
    ) -> Result<ServiceAccountCaller, KubernetesAuthError> {
        let own_token = read_token_file(token_file)
            .await
            .map_err(KubernetesAuthError::ReviewUnavailable)?;
        let body = TokenReviewWire {
            api_version: "authentication.k8s.io/v1",
            kind: "TokenReview",
            spec: TokenReviewSpecWire {
                token: jwt,
                audiences: &self.inner.audiences,
            },
        };
        let unavailable = |what: String| KubernetesAuthError::ReviewUnavailable(what);
        let response = http
            .post(endpoint.clone())
            .bearer_auth(own_token.expose_secret())
            .header(reqwest::header::ACCEPT, "application/json")
            .json(&body)
            .send()
            .await
            .map_err(|e| unavailable(format!("POST {endpoint}: {}", e.without_url())))?;
        let status = response.status();
        if !status.is_success() {
            return Err(unavailable(format!("POST {endpoint}: HTTP {status}")));
        }
        let body = read_capped(response)
            .await
            .map_err(|e| unavailable(format!("POST {endpoint}: {e}")))?;
        let answer: TokenReviewAnswerWire = serde_json::from_slice(&body)
            .map_err(|_| unavailable(format!("POST {endpoint}: not a TokenReview")))?;
        let status = answer.status.unwrap_or_default();
        if !status.authenticated {
            let why = status
                .error
                .as_deref()
                .filter(|e| !e.is_empty() && !mentions_token(e, jwt))
                .map(|e| printable(e, 300))
                .unwrap_or_else(|| "not authenticated".to_owned());
            return Err(KubernetesAuthError::ReviewRefused(why));
        }
        // An empty status.audiences means "valid for the API server itself"
        // (TokenReviewStatus.audiences docs): not for us.
        if !status
            .audiences
            .iter()
            .any(|a| self.inner.audiences.contains(a))
        {
            return Err(KubernetesAuthError::WrongAudience);
        }
        let user = status.user.unwrap_or_default();
        let identity = service_account_identity(user.username.as_deref().unwrap_or(""))?;
        let first = |key: &str| user.extra.get(key).and_then(|v| v.first()).cloned();
        Ok(ServiceAccountCaller {
            identity,
            service_account_uid: user.uid.clone().filter(|u| !u.is_empty()),
            pod_name: first(EXTRA_POD_NAME),
            pod_uid: first(EXTRA_POD_UID),
            token_id: first(EXTRA_CREDENTIAL_ID)
                .map(|id| id.strip_prefix("JTI=").map(str::to_owned).unwrap_or(id)),
        })
    }
}

/// Whether `text` (an outside error message) holds the token or a
/// recognisable part of it; such text is dropped, never shown.
fn mentions_token(text: &str, jwt: &str) -> bool {
    jwt.split('.')
        .filter(|part| part.len() >= 8)
        .any(|part| text.contains(part))
}

/// An http(s) URL without credentials (they would show in errors and logs;
/// bearer tokens come from token files instead).
fn check_url(url: &Url, setting: &'static str) -> Result<(), KubernetesConfigError> {
    if !matches!(url.scheme(), "https" | "http") {
        return Err(invalid(setting, "must be an http(s) URL"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            setting,
            "must not carry credentials; use a token file",
        ));
    }
    Ok(())
}

/// Whether a bearer credential has the shape of a compact JWS (three
/// base64url parts, the header a JSON object: `eyJ…`), so the edge can send
/// it to [`KubernetesVerifier::verify`] rather than to the API keys (`tbk_…`).
/// Shape only: it proves nothing.
pub fn looks_like_jwt(credential: &str) -> bool {
    credential.starts_with("eyJ")
        && credential.split('.').count() == 3
        && credential
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn discovery_url(issuer: &str) -> Result<Url, String> {
    let base = Url::parse(issuer).map_err(|e| format!("{issuer:?} is not a URL ({e})"))?;
    if !matches!(base.scheme(), "https" | "http") {
        return Err(format!("{issuer:?} is not an http(s) URL"));
    }
    // OIDC Discovery section 4: the path is appended to the issuer as is.
    Url::parse(&format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    ))
    .map_err(|e| e.to_string())
}

fn http_client(
    timeout: Duration,
    ca_file: Option<&Path>,
    setting: &'static str,
) -> Result<reqwest::Client, KubernetesConfigError> {
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none());
    if let Some(path) = ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| invalid(setting, format!("cannot read {}: {e}", path.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            invalid(
                setting,
                format!("{}: not a PEM bundle: {e}", path.display()),
            )
        })?;
        if certs.is_empty() {
            return Err(invalid(
                setting,
                format!("{} holds no certificate", path.display()),
            ));
        }
        builder = builder.tls_built_in_root_certs(false);
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder
        .build()
        .map_err(|e| invalid(setting, format!("cannot build the HTTP client: {e}")))
}

/// The JOSE header members we read (RFC 7515 section 4.1).
#[derive(Debug)]
struct JoseHeader {
    alg: Algorithm,
    kid: Option<String>,
}

/// Checks the token's shape and reads its header; refuses every `alg` but
/// RS256 and ES256 before any key is touched (so `none` and HS256 made with
/// a public key never get near a verifier).
fn read_header(jwt: &str) -> Result<JoseHeader, KubernetesAuthError> {
    #[derive(Deserialize)]
    struct Wire {
        alg: String,
        #[serde(default)]
        kid: Option<String>,
        #[serde(default)]
        crit: Option<serde_json::Value>,
    }
    if jwt.len() > MAX_TOKEN_BYTES {
        return Err(KubernetesAuthError::Malformed("longer than 16 KiB"));
    }
    let mut parts = jwt.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(KubernetesAuthError::Malformed(
            "not three dot-separated parts",
        ));
    };
    let header = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| KubernetesAuthError::Malformed("header is not base64url"))?;
    let header: Wire = serde_json::from_slice(&header)
        .map_err(|_| KubernetesAuthError::Malformed("header is not a JOSE header"))?;
    if header.crit.is_some() {
        // RFC 7515 section 4.1.11: extensions we do not understand.
        return Err(KubernetesAuthError::Malformed(
            "header has critical extensions (crit)",
        ));
    }
    let alg = match header.alg.as_str() {
        "RS256" => Algorithm::RS256,
        "ES256" => Algorithm::ES256,
        other => {
            return Err(KubernetesAuthError::UnsupportedAlgorithm {
                alg: printable(other, 16),
            })
        }
    };
    Ok(JoseHeader {
        alg,
        kid: header.kid,
    })
}

fn map_jwt_error(kind: &ErrorKind) -> KubernetesAuthError {
    use KubernetesAuthError as E;
    match kind {
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::Crypto(_) => E::BadSignature,
        ErrorKind::ExpiredSignature => E::Expired,
        ErrorKind::ImmatureSignature => E::NotYetValid,
        ErrorKind::InvalidIssuer => E::WrongIssuer,
        ErrorKind::InvalidAudience => E::WrongAudience,
        ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
            "iss" => E::WrongIssuer,
            "aud" => E::WrongAudience,
            "sub" => E::InvalidSubject("no sub claim"),
            _ => E::Malformed("no exp claim"),
        },
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => E::UnsupportedAlgorithm {
            alg: "?".to_owned(),
        },
        ErrorKind::Json(_) => E::Malformed("claims are not the expected JSON"),
        _ => E::Malformed("not a valid JWS"),
    }
}

/// The claims of a bound service-account token we read.
#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    jti: Option<String>,
    #[serde(default, rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaim>,
}

#[derive(Deserialize)]
struct KubernetesClaim {
    namespace: String,
    serviceaccount: ObjectRef,
    #[serde(default)]
    pod: Option<ObjectRef>,
}

#[derive(Deserialize)]
struct ObjectRef {
    name: String,
    #[serde(default)]
    uid: Option<String>,
}

fn caller_from_claims(claims: Claims) -> Result<ServiceAccountCaller, KubernetesAuthError> {
    let identity = service_account_identity(&claims.sub)?;
    let Some(k8s) = claims.kubernetes else {
        return Err(KubernetesAuthError::InvalidSubject(
            "no kubernetes.io claim",
        ));
    };
    let Identity::ServiceAccount { namespace, name } = &identity else {
        unreachable!("service_account_identity makes service accounts");
    };
    if &k8s.namespace != namespace || &k8s.serviceaccount.name != name {
        return Err(KubernetesAuthError::InvalidSubject(
            "sub disagrees with the kubernetes.io claim",
        ));
    }
    let (pod_name, pod_uid) = match k8s.pod {
        Some(pod) => (Some(pod.name), pod.uid),
        None => (None, None),
    };
    Ok(ServiceAccountCaller {
        identity,
        service_account_uid: k8s.serviceaccount.uid,
        pod_name,
        pod_uid,
        token_id: claims.jti,
    })
}

/// `system:serviceaccount:NS:NAME` → `Identity::ServiceAccount`, with the
/// domain's rules for the parts.
fn service_account_identity(subject: &str) -> Result<Identity, KubernetesAuthError> {
    if !subject.starts_with(SERVICE_ACCOUNT_PREFIX) {
        return Err(KubernetesAuthError::InvalidSubject(
            "not system:serviceaccount:NAMESPACE:NAME",
        ));
    }
    match format!("k8s:{subject}").parse::<Identity>() {
        Ok(identity @ Identity::ServiceAccount { .. }) => Ok(identity),
        _ => Err(KubernetesAuthError::InvalidSubject(
            "not system:serviceaccount:NAMESPACE:NAME",
        )),
    }
}

/// `authentication.k8s.io/v1` TokenReview request. Holds the token: no
/// `Debug`.
#[derive(Serialize)]
struct TokenReviewWire<'a> {
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    kind: &'static str,
    spec: TokenReviewSpecWire<'a>,
}

#[derive(Serialize)]
struct TokenReviewSpecWire<'a> {
    token: &'a str,
    audiences: &'a [String],
}

#[derive(Deserialize)]
struct TokenReviewAnswerWire {
    #[serde(default)]
    status: Option<TokenReviewStatusWire>,
}

#[derive(Default, Deserialize)]
struct TokenReviewStatusWire {
    #[serde(default)]
    authenticated: bool,
    #[serde(default)]
    user: Option<UserInfoWire>,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Default, Deserialize)]
struct UserInfoWire {
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    extra: HashMap<String, Vec<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_toml(text: &str) -> KubernetesAuthConfig {
        use figment::providers::{Format, Toml};
        figment::Figment::from(Toml::string(text))
            .extract()
            .expect("valid config")
    }

    #[test]
    fn defaults_accept_the_token_broker_audience_with_a_30_second_leeway() {
        let config = from_toml("enabled = true\nissuer = \"https://k8s.example\"\n");
        assert_eq!(config.audiences, vec!["token-broker"]);
        assert_eq!(config.leeway, Duration::from_secs(30));
        assert_eq!(config.jwks_refetch_min_interval, Duration::from_secs(30));
        assert!(config.token_review.is_none());
    }

    #[test]
    fn durations_read_humantime_or_seconds() {
        let config = from_toml("jwks_refetch_min_interval = \"1m\"\nleeway = 5\n");
        assert_eq!(config.jwks_refetch_min_interval, Duration::from_secs(60));
        assert_eq!(config.leeway, Duration::from_secs(5));
    }

    #[test]
    fn an_empty_token_review_table_means_the_in_cluster_defaults() {
        let config = from_toml("[token_review]\n");
        let review = config.token_review.expect("token_review");
        assert_eq!(
            review.api_server.as_str(),
            "https://kubernetes.default.svc/"
        );
        assert_eq!(
            review.token_file,
            PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
        );
    }

    /// Why `config` is refused.
    fn refusal(config: &KubernetesAuthConfig) -> String {
        KubernetesVerifier::new(config).unwrap_err().to_string()
    }

    #[test]
    fn jwks_verification_without_an_issuer_is_refused_naming_the_setting() {
        let err = refusal(&KubernetesAuthConfig {
            enabled: true,
            ..Default::default()
        });
        assert!(err.starts_with("auth.kubernetes.issuer:"), "{err}");
    }

    #[test]
    fn an_empty_audience_list_is_refused_naming_the_setting() {
        let err = refusal(&KubernetesAuthConfig {
            issuer: Some("https://k8s.example".into()),
            audiences: vec![],
            ..Default::default()
        });
        assert!(err.starts_with("auth.kubernetes.audiences:"), "{err}");
    }

    #[test]
    fn a_missing_token_review_token_file_is_refused_naming_the_setting() {
        let err = refusal(&KubernetesAuthConfig {
            token_review: Some(TokenReviewConfig {
                token_file: "/nonexistent/token".into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert!(
            err.starts_with("auth.kubernetes.token_review.token_file:"),
            "{err}"
        );
    }

    #[test]
    fn unsafe_settings_are_refused_naming_the_setting() {
        let base = KubernetesAuthConfig {
            issuer: Some("https://k8s.example".into()),
            ..Default::default()
        };
        for (config, setting) in [
            (
                KubernetesAuthConfig {
                    leeway: Duration::from_secs(3600),
                    ..base.clone()
                },
                "leeway",
            ),
            (
                KubernetesAuthConfig {
                    http_timeout: Duration::ZERO,
                    ..base.clone()
                },
                "http_timeout",
            ),
            (
                KubernetesAuthConfig {
                    jwks_url: Some("https://user:pw@k8s.example/jwks".parse().unwrap()),
                    ..base.clone()
                },
                "jwks_url",
            ),
            (
                KubernetesAuthConfig {
                    jwks_url: Some("file:///etc/jwks.json".parse().unwrap()),
                    ..base.clone()
                },
                "jwks_url",
            ),
            (
                KubernetesAuthConfig {
                    ca_file: Some("/nonexistent/ca.crt".into()),
                    ..base.clone()
                },
                "ca_file",
            ),
        ] {
            let err = refusal(&config);
            assert!(
                err.starts_with(&format!("auth.kubernetes.{setting}:")),
                "{err}"
            );
            assert!(!err.contains("pw@"), "{err}");
        }
    }

    #[test]
    fn discovery_appends_the_well_known_path_to_the_issuer() {
        assert_eq!(
            discovery_url("https://oidc.example/cluster-1/")
                .unwrap()
                .as_str(),
            "https://oidc.example/cluster-1/.well-known/openid-configuration"
        );
        assert!(discovery_url("kubernetes/serviceaccount").is_err());
    }

    #[test]
    fn jwt_shaped_credentials_are_told_from_api_keys() {
        assert!(looks_like_jwt("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"));
        assert!(looks_like_jwt("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."));
        for other in [
            "tbk_0123456789abcdef",
            "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0",
            "eyJ.a.b.c",
            "eyJ a.b.c",
            "",
        ] {
            assert!(!looks_like_jwt(other), "{other}");
        }
    }

    #[test]
    fn only_service_account_subjects_make_identities() {
        assert_eq!(
            service_account_identity("system:serviceaccount:build:restorer").unwrap(),
            Identity::ServiceAccount {
                namespace: "build".into(),
                name: "restorer".into()
            }
        );
        for bad in [
            "alice",
            "system:serviceaccount:build",
            "system:serviceaccount:a:b:c",
            "system:serviceaccount::b",
            "system:node:worker-1",
        ] {
            assert!(service_account_identity(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_rs256_and_es256_headers_are_read() {
        let token = |header: &str| format!("{}.e30.c2ln", URL_SAFE_NO_PAD.encode(header));
        assert!(read_header(&token(r#"{"alg":"RS256","kid":"a"}"#)).is_ok());
        assert!(read_header(&token(r#"{"alg":"ES256"}"#)).is_ok());
        for alg in ["none", "None", "HS256", "RS512", "ES384", "EdDSA", "PS256"] {
            let err = read_header(&token(&format!(r#"{{"alg":"{alg}"}}"#))).unwrap_err();
            assert_eq!(err.reason(), "TOKEN_ALGORITHM_UNSUPPORTED", "{alg}");
        }
        let crit = token(r#"{"alg":"ES256","crit":["b64"],"b64":false}"#);
        assert_eq!(read_header(&crit).unwrap_err().reason(), "TOKEN_MALFORMED");
        for garbage in ["", "a.b", "a.b.c.d", "!!.e30.c2ln"] {
            assert_eq!(
                read_header(garbage).unwrap_err().reason(),
                "TOKEN_MALFORMED"
            );
        }
    }
}
