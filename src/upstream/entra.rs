//! Microsoft Entra bearer tokens for the PAT Lifecycle API.
//!
//! The API takes only user-delegated Entra access tokens (docs/upstream-api.md,
//! User-delegated Entra tokens only), so the broker holds a user's refresh
//! token and redeems it with the refresh-token grant at
//! `{authority}/{tenant}/oauth2/v2.0/token` (docs/upstream-api.md, Entra
//! token endpoint). Entra answers every redemption with a new refresh token;
//! the broker stores each one before it uses it
//! ([`crate::upstream::credential`]). No token ever reaches a log, a span
//! or an error.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;
use url::Url;

use super::wire::{parse_retry_after, shorten};
use super::UpstreamError;

/// Where the PAT client gets its `Authorization: Bearer` value.
#[async_trait]
pub trait TokenSource: Send + Sync {
    /// A bearer token valid now. Errors are `Authentication` (the credential
    /// was refused), `RateLimited` (the token endpoint throttles) or
    /// `Unavailable` (it could not answer).
    async fn bearer(&self) -> Result<SecretString, UpstreamError>;
    /// Drops any cached token: upstream answered 401 with it.
    async fn invalidate(&self);
}

/// Receives every rotated refresh token, so the next start uses the newest.
#[async_trait]
pub trait RefreshTokenSink: Send + Sync {
    /// Persists `refresh_token` (the broker seals it first).
    async fn save(&self, refresh_token: &SecretString) -> Result<(), UpstreamError>;
}

/// A fixed bearer token (tests, or a token minted outside the broker).
pub struct StaticTokenSource(SecretString);

impl StaticTokenSource {
    /// Always answers `token`.
    pub fn new(token: SecretString) -> Self {
        StaticTokenSource(token)
    }
}

impl fmt::Debug for StaticTokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StaticTokenSource([REDACTED])")
    }
}

#[async_trait]
impl TokenSource for StaticTokenSource {
    async fn bearer(&self) -> Result<SecretString, UpstreamError> {
        Ok(self.0.clone())
    }
    async fn invalidate(&self) {}
}

/// Settings of the Entra refresh-token grant.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EntraConfig {
    /// Authority base URL; default `https://login.microsoftonline.com`.
    pub authority: Url,
    /// Tenant: a GUID, a domain, or `organizations` (ENTRA-AC).
    pub tenant: String,
    /// The app registration's client id.
    pub client_id: String,
    /// Client secret, for a confidential client; None for a public client.
    /// Surrounding whitespace is trimmed at start; empty is refused.
    pub client_secret: Option<SecretString>,
    /// Path of a file holding `client_secret` (a mounted Secret), read into
    /// it at start by [`Settings::new`](crate::settings::Settings::new); not
    /// with `client_secret`. The file must not be readable by others.
    pub client_secret_file: Option<std::path::PathBuf>,
    /// Requested scope; default the Azure DevOps resource
    /// (`499b84ac-1321-427f-aa17-267ca6975798/.default`) plus `offline_access`
    /// so that Entra keeps issuing refresh tokens.
    pub scope: String,
    /// Timeout of one token request; default 30 s.
    #[serde(deserialize_with = "crate::duration::de_duration")]
    pub request_timeout: Duration,
}

impl Default for EntraConfig {
    fn default() -> Self {
        EntraConfig {
            authority: Url::parse("https://login.microsoftonline.com").expect("static URL"),
            tenant: "organizations".to_owned(),
            client_id: String::new(),
            client_secret: None,
            client_secret_file: None,
            scope: "499b84ac-1321-427f-aa17-267ca6975798/.default offline_access".to_owned(),
            request_timeout: Duration::from_secs(30),
        }
    }
}

impl EntraConfig {
    /// `{authority}/{tenant}/oauth2/v2.0/token`.
    pub fn token_endpoint(&self) -> Result<Url, UpstreamError> {
        let mut url = self.authority.clone();
        url.path_segments_mut()
            .map_err(|()| {
                UpstreamError::Protocol(format!(
                    "entra authority {} cannot be a base URL",
                    self.authority
                ))
            })?
            .pop_if_empty()
            .extend([self.tenant.as_str(), "oauth2", "v2.0", "token"]);
        Ok(url)
    }
}

/// The Entra token endpoint's refresh-token grant: one HTTP client for
/// one [`EntraConfig`].
pub struct EntraClient {
    config: EntraConfig,
    endpoint: Url,
    http: reqwest::Client,
}

impl fmt::Debug for EntraClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntraClient")
            .field("endpoint", &self.endpoint.as_str())
            .field("client_id", &self.config.client_id)
            .finish_non_exhaustive()
    }
}

/// What a successful refresh-token grant answered.
pub struct TokenGrant {
    /// The bearer for the PAT Lifecycle API.
    pub access_token: SecretString,
    /// Entra's rotated refresh token, when it sent one (it does on every
    /// redemption of a user's refresh token).
    pub refresh_token: Option<SecretString>,
    /// `expires_in` of the access token.
    pub lifetime: Duration,
    /// The id token's `preferred_username`, when Entra sent an id token.
    pub account: Option<String>,
}

impl fmt::Debug for TokenGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenGrant")
            .field("lifetime", &self.lifetime)
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

impl EntraClient {
    /// Fails on an unusable authority URL or an empty tenant, client_id or
    /// scope, naming the setting.
    pub fn new(config: EntraConfig) -> Result<Self, UpstreamError> {
        let endpoint = config.token_endpoint()?;
        for (name, value) in [
            ("tenant", &config.tenant),
            ("client_id", &config.client_id),
            ("scope", &config.scope),
        ] {
            if value.trim().is_empty() {
                return Err(UpstreamError::Protocol(format!(
                    "invalid entra config: upstream.entra.{name} must not be empty"
                )));
            }
        }
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| UpstreamError::Protocol(format!("cannot build http client: {e}")))?;
        Ok(EntraClient {
            config,
            endpoint,
            http,
        })
    }

    /// The settings it was built from.
    pub fn config(&self) -> &EntraConfig {
        &self.config
    }

    /// The scope a refresh asks for: the configured scope plus `openid
    /// profile`, so the answer's id token names the account.
    fn refresh_scope(&self) -> String {
        with_scopes(&self.config.scope, &["openid", "profile"])
    }

    /// One refresh-token grant. Errors: `Authentication` (Entra refused
    /// the refresh token: its OAuth error and AADSTS code), `RateLimited`,
    /// `Unavailable` (5xx, transport), `Protocol` (an answer that is not
    /// the documented JSON).
    pub async fn redeem_refresh_token(
        &self,
        refresh_token: &SecretString,
    ) -> Result<TokenGrant, UpstreamError> {
        let scope = self.refresh_scope();
        let mut form: Vec<(&str, &str)> = vec![
            ("client_id", self.config.client_id.as_str()),
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose_secret()),
            ("scope", scope.as_str()),
        ];
        if let Some(secret) = &self.config.client_secret {
            form.push(("client_secret", secret.expose_secret()));
        }
        let response = self
            .http
            .post(self.endpoint.clone())
            .form(&form)
            .send()
            .await
            .map_err(|e| {
                UpstreamError::Unavailable(format!(
                    "entra token endpoint: {}",
                    describe_transport_error(&e)
                ))
            })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, chrono::Utc::now()));
        let body = response.bytes().await.map_err(|e| {
            UpstreamError::Unavailable(format!(
                "entra token endpoint: {}",
                describe_transport_error(&e)
            ))
        })?;
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Err(UpstreamError::RateLimited { retry_after });
        }
        if status.is_server_error() {
            return Err(UpstreamError::Unavailable(format!(
                "entra token endpoint answered {status}"
            )));
        }
        if !status.is_success() {
            let error: TokenErrorResponse = serde_json::from_slice(&body).unwrap_or_default();
            tracing::warn!(%status, error = %error.summary(), "entra refused the refresh token");
            return Err(UpstreamError::Authentication(format!(
                "entra refused the refresh token: {}",
                error.summary()
            )));
        }
        let answer: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
            UpstreamError::Protocol(format!(
                "entra token answer is not the documented JSON (line {}, column {})",
                e.line(),
                e.column()
            ))
        })?;
        if let Some(kind) = answer.token_type.as_deref() {
            if !kind.eq_ignore_ascii_case("bearer") {
                return Err(UpstreamError::Protocol(format!(
                    "entra issued a {} token, not a Bearer token",
                    shorten(kind, 32)
                )));
            }
        }
        let lifetime = expires_in(answer.expires_in.as_ref());
        tracing::debug!(
            expires_in_secs = lifetime.as_secs(),
            "entra access token refreshed"
        );
        Ok(TokenGrant {
            access_token: answer.access_token,
            refresh_token: answer.refresh_token,
            lifetime,
            account: answer
                .id_token
                .as_ref()
                .and_then(|t| super::device_code::preferred_username(t.expose_secret())),
        })
    }
}

/// `scope` plus each of `extra` it lacks, space separated.
pub(crate) fn with_scopes(scope: &str, extra: &[&str]) -> String {
    let mut words: Vec<&str> = scope.split_whitespace().collect();
    for word in extra {
        if !words.contains(word) {
            words.push(word);
        }
    }
    words.join(" ")
}

/// Access tokens from the refresh-token grant, cached until shortly before
/// `expires_in`; one refresh at a time (callers wait for it and share it).
/// Holds its refresh token in memory; the broker itself uses
/// [`crate::upstream::credential::BrokerCredential`], which keeps it in the store.
pub struct RefreshTokenSource {
    client: EntraClient,
    sink: std::sync::Arc<dyn RefreshTokenSink>,
    state: Mutex<RefreshState>,
}

struct RefreshState {
    refresh_token: SecretString,
    access: Option<CachedAccess>,
}

struct CachedAccess {
    token: SecretString,
    /// Refresh at or after this instant.
    refresh_at: Instant,
}

impl fmt::Debug for RefreshTokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshTokenSource")
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

/// Success answer of the token endpoint (ENTRA-AC).
#[derive(Deserialize)]
struct TokenResponse {
    access_token: SecretString,
    #[serde(default)]
    token_type: Option<String>,
    expires_in: Option<serde_json::Value>,
    #[serde(default)]
    refresh_token: Option<SecretString>,
    #[serde(default)]
    id_token: Option<SecretString>,
}

/// Error answer of the token endpoint: `{"error","error_description","error_codes",...}`.
#[derive(Default, Deserialize)]
pub(crate) struct TokenErrorResponse {
    #[serde(default)]
    pub(crate) error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
    #[serde(default)]
    error_codes: Option<Vec<u64>>,
    #[serde(default)]
    correlation_id: Option<String>,
}

impl TokenErrorResponse {
    /// `invalid_grant (AADSTS70008)`: the OAuth error and the AADSTS code,
    /// never the description's free text beyond its code.
    pub(crate) fn summary(&self) -> String {
        let error = self.error.as_deref().unwrap_or("unknown_error");
        let code = self
            .error_codes
            .as_ref()
            .and_then(|codes| codes.first())
            .map(|code| format!("AADSTS{code}"))
            .or_else(|| {
                let description = self.error_description.as_deref()?;
                let code = description.split(':').next()?.trim();
                (code.starts_with("AADSTS") && code[6..].chars().all(|c| c.is_ascii_digit()))
                    .then(|| code.to_owned())
            });
        let mut summary = shorten(error, 64);
        if let Some(code) = code {
            summary.push_str(&format!(" ({code})"));
        }
        if let Some(correlation_id) = &self.correlation_id {
            summary.push_str(&format!(", correlation id {}", shorten(correlation_id, 64)));
        }
        summary
    }
}

impl RefreshTokenSource {
    /// Redeems `initial_refresh_token` on first use; every rotated refresh
    /// token goes to `sink`. Fails as [`EntraClient::new`] does.
    pub fn new(
        config: EntraConfig,
        initial_refresh_token: SecretString,
        sink: std::sync::Arc<dyn RefreshTokenSink>,
    ) -> Result<Self, UpstreamError> {
        Ok(RefreshTokenSource {
            client: EntraClient::new(config)?,
            sink,
            state: Mutex::new(RefreshState {
                refresh_token: initial_refresh_token,
                access: None,
            }),
        })
    }

    /// One refresh-token grant; updates `state` and hands the rotated
    /// refresh token to the sink.
    async fn refresh(&self, state: &mut RefreshState) -> Result<SecretString, UpstreamError> {
        let grant = self
            .client
            .redeem_refresh_token(&state.refresh_token)
            .await?;
        if let Some(rotated) = grant.refresh_token {
            // Entra keeps the old refresh token valid, so a failed save
            // loses nothing yet; the next refresh saves a newer one.
            if let Err(e) = self.sink.save(&rotated).await {
                tracing::warn!(error = %e, "could not store the rotated refresh token");
            }
            state.refresh_token = rotated;
        }
        state.access = Some(CachedAccess {
            token: grant.access_token.clone(),
            refresh_at: access_refresh_at(grant.lifetime),
        });
        Ok(grant.access_token)
    }
}

/// When an access token of `lifetime`, fetched now, is replaced.
pub(crate) fn access_refresh_at(lifetime: Duration) -> Instant {
    Instant::now() + lifetime.saturating_sub(refresh_margin(lifetime))
}

/// `expires_in` in seconds (Entra sends a number; some proxies a string);
/// one hour when absent or unreadable, Entra's usual lifetime.
fn expires_in(value: Option<&serde_json::Value>) -> Duration {
    let seconds = match value {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    };
    Duration::from_secs(seconds.unwrap_or(3600))
}

/// How long before expiry a cached access token is replaced: five minutes,
/// or a tenth of a short lifetime, so clock skew and slow calls never send
/// an expired bearer.
fn refresh_margin(lifetime: Duration) -> Duration {
    Duration::from_secs(300).min(lifetime / 10)
}

/// A transport failure in words, without the URL's query (no secrets are
/// in URLs, but the words stay short and stable).
pub(crate) fn describe_transport_error(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "connection dropped while reading the answer"
    } else {
        "connection dropped"
    }
}

#[async_trait]
impl TokenSource for RefreshTokenSource {
    async fn bearer(&self) -> Result<SecretString, UpstreamError> {
        // The lock makes refreshes single-flight: whoever waits here finds
        // the token the first caller fetched.
        let mut state = self.state.lock().await;
        if let Some(access) = &state.access {
            if Instant::now() < access.refresh_at {
                return Ok(access.token.clone());
            }
        }
        self.refresh(&mut state).await
    }

    async fn invalidate(&self) {
        self.state.lock().await.access = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_endpoint_is_under_the_tenant() {
        let mut config = EntraConfig {
            tenant: "contoso.onmicrosoft.com".into(),
            ..Default::default()
        };
        assert_eq!(
            config.token_endpoint().unwrap().as_str(),
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        config.authority = Url::parse("http://127.0.0.1:8080/").unwrap();
        assert_eq!(
            config.token_endpoint().unwrap().as_str(),
            "http://127.0.0.1:8080/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
    }

    #[derive(Default)]
    struct NoSink;

    #[async_trait]
    impl RefreshTokenSink for NoSink {
        async fn save(&self, _: &SecretString) -> Result<(), UpstreamError> {
            Ok(())
        }
    }

    #[test]
    fn a_config_without_client_id_is_refused_naming_it() {
        let err = RefreshTokenSource::new(
            EntraConfig::default(),
            "rt".into(),
            std::sync::Arc::new(NoSink),
        )
        .unwrap_err();
        assert!(err.to_string().contains("client_id"), "{err}");
    }

    #[test]
    fn config_reads_with_defaults() {
        let config: EntraConfig =
            serde_json::from_value(serde_json::json!({"tenant": "t", "client_id": "c", "client_secret": "s3cr3t", "request_timeout": "5s"}))
                .unwrap();
        assert_eq!(
            config.authority.as_str(),
            "https://login.microsoftonline.com/"
        );
        assert_eq!(
            config.scope,
            "499b84ac-1321-427f-aa17-267ca6975798/.default offline_access"
        );
        assert_eq!(config.request_timeout, Duration::from_secs(5));
        assert!(!format!("{config:?}").contains("s3cr3t"));
    }

    #[test]
    fn token_error_summary_names_the_aadsts_code_only() {
        let error: TokenErrorResponse = serde_json::from_str(
            r#"{"error":"invalid_grant","error_description":"AADSTS70008: The provided authorization code or refresh token has expired. Token: 0.AAA","error_codes":[70008],"correlation_id":"c1"}"#,
        )
        .unwrap();
        assert_eq!(
            error.summary(),
            "invalid_grant (AADSTS70008), correlation id c1"
        );
        let error: TokenErrorResponse = serde_json::from_str(
            r#"{"error":"invalid_grant","error_description":"AADSTS50173: The provided grant has expired."}"#,
        )
        .unwrap();
        assert_eq!(error.summary(), "invalid_grant (AADSTS50173)");
    }

    #[test]
    fn access_tokens_are_replaced_before_they_expire() {
        assert_eq!(
            refresh_margin(Duration::from_secs(3599)),
            Duration::from_millis(359_900).min(Duration::from_secs(300))
        );
        assert_eq!(
            refresh_margin(Duration::from_secs(60)),
            Duration::from_secs(6)
        );
        assert_eq!(
            expires_in(Some(&serde_json::json!("3599"))),
            Duration::from_secs(3599)
        );
        assert_eq!(expires_in(None), Duration::from_secs(3600));
    }
}
