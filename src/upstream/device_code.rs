//! Signing an operator in with the OAuth 2.0 device authorization grant
//! (RFC 8628) at Entra: `{authority}/{tenant}/oauth2/v2.0/devicecode`, then
//! polling `{authority}/{tenant}/oauth2/v2.0/token` with
//! `grant_type=urn:ietf:params:oauth:grant-type:device_code` until the
//! operator has signed in in a browser. The result is the refresh token the
//! broker redeems later ([`super::entra`]); storing it is the caller's job.
//!
//! No token (device code, access, refresh or ID token) ever reaches a log,
//! an error or Debug output.

use std::fmt;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::time::Instant;
use url::Url;

use super::entra::{describe_transport_error, EntraConfig, TokenErrorResponse};
use super::wire::{parse_retry_after, shorten};

/// The grant type of RFC 8628 §3.4.
const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// Added to the polling interval on each `slow_down` (RFC 8628 §3.5).
const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);

/// Scopes every login adds: an ID token naming the account, and a refresh
/// token.
const LOGIN_SCOPES: [&str; 3] = ["openid", "profile", "offline_access"];

/// What the operator must do, from the devicecode answer.
#[derive(Clone, Debug)]
pub struct DevicePrompt {
    /// The code to enter at `verification_uri` (e.g. `FJ4C2K7QB`).
    pub user_code: String,
    /// Where to enter it (Entra: `https://microsoft.com/devicelogin`).
    pub verification_uri: String,
    /// Entra's own instruction, ready to print.
    pub message: String,
    /// How long the code stays valid (Entra: 15 minutes).
    pub expires_in: Duration,
    /// The wait between polls Entra asked for at the start (RFC default 5 s).
    pub interval: Duration,
}

/// A completed sign-in. Debug redacts the tokens.
pub struct SignedIn {
    /// The refresh token to keep (the broker seals it before storing).
    pub refresh_token: SecretString,
    /// An access token for the requested scope (about an hour).
    pub access_token: SecretString,
    /// Who signed in: the ID token's `preferred_username`, when Entra sent one.
    pub account: Option<String>,
}

impl fmt::Debug for SignedIn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedIn")
            .field("refresh_token", &"[REDACTED]")
            .field("access_token", &"[REDACTED]")
            .field("account", &self.account)
            .finish()
    }
}

/// Why a device-code sign-in did not complete. Messages are meant for the
/// operator; none carries a token.
#[derive(Debug, thiserror::Error)]
pub enum DeviceCodeError {
    /// The operator (or their tenant) declined (`authorization_declined`).
    #[error("the sign-in was declined in the browser")]
    Declined,
    /// Nobody signed in before the code expired (`expired_token`, or
    /// `expires_in` passed while polling).
    #[error(
        "the code expired before anyone signed in (codes last 15 minutes); run the command again"
    )]
    Expired,
    /// Entra refused with another OAuth error: its summary, e.g.
    /// `invalid_client (AADSTS7000218)` (never token text).
    #[error("entra refused the sign-in: {0}")]
    Refused(String),
    /// Entra signed the operator in without issuing a refresh token:
    /// `offline_access` was not granted.
    #[error("entra issued no refresh token: the app registration or tenant did not grant offline_access; allow it and run the command again")]
    NoRefreshToken,
    /// Entra could not be reached or failed (transport, 429, 5xx) when the
    /// code was requested.
    #[error("entra could not be reached: {0}; try again later")]
    Unavailable(String),
    /// A bad configuration or an answer that does not fit the protocol.
    #[error("the sign-in could not proceed: {0}")]
    Protocol(String),
}

/// The scope a login asks for: config.scope's words plus `openid profile offline_access` (no duplicates).
pub fn login_scope(config: &EntraConfig) -> String {
    let mut words: Vec<&str> = Vec::new();
    for word in config
        .scope
        .split_whitespace()
        .chain(LOGIN_SCOPES.iter().copied())
    {
        if !words.contains(&word) {
            words.push(word);
        }
    }
    words.join(" ")
}

/// Answer of the devicecode endpoint (RFC 8628 §3.2).
#[derive(Deserialize)]
struct DeviceCodeResponse {
    device_code: SecretString,
    user_code: String,
    /// Entra's v1 endpoint spelled it `verification_url`.
    #[serde(alias = "verification_url")]
    verification_uri: String,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
    #[serde(default)]
    interval: Option<serde_json::Value>,
    #[serde(default)]
    message: Option<String>,
}

/// Success answer of the token endpoint for the device-code grant.
#[derive(Deserialize)]
struct TokenResponse {
    access_token: SecretString,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    refresh_token: Option<SecretString>,
    #[serde(default)]
    id_token: Option<SecretString>,
}

/// What one poll found.
enum Poll {
    Done(SignedIn),
    Pending,
    SlowDown,
    /// A transient failure: poll again after at least this long.
    Retry(Option<Duration>),
    Failed(DeviceCodeError),
}

/// Runs the device authorization grant: asks Entra for a code with
/// [`login_scope`], hands it to `on_prompt` (print it for the operator),
/// then polls until the operator has signed in, declined, or the code
/// expired. A confidential client's `client_secret` is sent with each poll.
///
/// Polling follows RFC 8628: `interval` between polls, 5 s more after
/// each `slow_down`; transport errors, 429 and 5xx while polling are
/// retried at the interval until the code expires.
///
/// Errors: [`DeviceCodeError`]; `Unavailable` only when the code itself
/// could not be obtained.
pub async fn sign_in(
    config: &EntraConfig,
    on_prompt: impl FnOnce(&DevicePrompt) + Send,
) -> Result<SignedIn, DeviceCodeError> {
    for (name, value) in [("tenant", &config.tenant), ("client_id", &config.client_id)] {
        if value.trim().is_empty() {
            return Err(DeviceCodeError::Protocol(format!(
                "invalid entra config: {name} must not be empty"
            )));
        }
    }
    let token_endpoint = config
        .token_endpoint()
        .map_err(|e| DeviceCodeError::Protocol(e.to_string()))?;
    let device_endpoint = devicecode_endpoint(&token_endpoint)?;
    let http = reqwest::Client::builder()
        .timeout(config.request_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| DeviceCodeError::Protocol(format!("cannot build http client: {e}")))?;

    let scope = login_scope(config);
    let answer = request_code(&http, device_endpoint, &config.client_id, &scope).await?;
    let expires_in = seconds(answer.expires_in.as_ref()).unwrap_or(Duration::from_secs(900));
    let mut interval = seconds(answer.interval.as_ref())
        .unwrap_or(Duration::from_secs(5))
        .max(Duration::from_secs(1));
    let user_code = printable(&answer.user_code, 64);
    let verification_uri = printable(&answer.verification_uri, 256);
    let message = answer
        .message
        .as_deref()
        .map(|m| printable(m, 512))
        .unwrap_or_else(|| {
            format!("To sign in, use a web browser to open the page {verification_uri} and enter the code {user_code} to authenticate.")
        });
    let deadline = Instant::now() + expires_in;
    on_prompt(&DevicePrompt {
        user_code,
        verification_uri,
        message,
        expires_in,
        interval,
    });

    let mut wait = interval;
    loop {
        let next = Instant::now() + wait;
        if next >= deadline {
            tokio::time::sleep_until(deadline).await;
            return Err(DeviceCodeError::Expired);
        }
        tokio::time::sleep_until(next).await;
        wait = interval;
        match poll(&http, &token_endpoint, config, &answer.device_code).await {
            Poll::Done(signed_in) => return Ok(signed_in),
            Poll::Pending => {}
            Poll::SlowDown => {
                interval += SLOW_DOWN_STEP;
                wait = interval;
                tracing::debug!(
                    interval_secs = interval.as_secs(),
                    "entra asked to poll more slowly"
                );
            }
            Poll::Retry(advised) => wait = advised.map_or(interval, |a| a.max(interval)),
            Poll::Failed(e) => return Err(e),
        }
    }
}

/// `…/{tenant}/oauth2/v2.0/devicecode`, beside the token endpoint.
fn devicecode_endpoint(token_endpoint: &Url) -> Result<Url, DeviceCodeError> {
    let mut url = token_endpoint.clone();
    url.path_segments_mut()
        .map_err(|()| DeviceCodeError::Protocol("entra authority cannot be a base URL".into()))?
        .pop()
        .push("devicecode");
    Ok(url)
}

async fn request_code(
    http: &reqwest::Client,
    endpoint: Url,
    client_id: &str,
    scope: &str,
) -> Result<DeviceCodeResponse, DeviceCodeError> {
    let response = http
        .post(endpoint)
        .form(&[("client_id", client_id), ("scope", scope)])
        .send()
        .await
        .map_err(|e| {
            DeviceCodeError::Unavailable(format!(
                "entra devicecode endpoint: {}",
                describe_transport_error(&e)
            ))
        })?;
    let status = response.status();
    let body = response.bytes().await.map_err(|e| {
        DeviceCodeError::Unavailable(format!(
            "entra devicecode endpoint: {}",
            describe_transport_error(&e)
        ))
    })?;
    if status == reqwest::StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        return Err(DeviceCodeError::Unavailable(format!(
            "entra devicecode endpoint answered {status}"
        )));
    }
    if !status.is_success() {
        let error: TokenErrorResponse = serde_json::from_slice(&body).unwrap_or_default();
        return Err(DeviceCodeError::Refused(error.summary()));
    }
    serde_json::from_slice(&body).map_err(|e| {
        DeviceCodeError::Protocol(format!(
            "entra devicecode answer is not the documented JSON (line {}, column {})",
            e.line(),
            e.column()
        ))
    })
}

/// One poll of the token endpoint.
async fn poll(
    http: &reqwest::Client,
    endpoint: &Url,
    config: &EntraConfig,
    device_code: &SecretString,
) -> Poll {
    let mut form: Vec<(&str, &str)> = vec![
        ("grant_type", DEVICE_CODE_GRANT),
        ("client_id", config.client_id.as_str()),
        ("device_code", device_code.expose_secret()),
    ];
    if let Some(secret) = &config.client_secret {
        form.push(("client_secret", secret.expose_secret()));
    }
    let response = match http.post(endpoint.clone()).form(&form).send().await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(
                error = describe_transport_error(&e),
                "entra token endpoint unreachable while polling; retrying"
            );
            return Poll::Retry(None);
        }
    };
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, chrono::Utc::now()));
    let body = match response.bytes().await {
        Ok(b) => b,
        Err(e) => {
            tracing::debug!(
                error = describe_transport_error(&e),
                "entra token answer lost while polling; retrying"
            );
            return Poll::Retry(None);
        }
    };
    if status == reqwest::StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        tracing::debug!(%status, "entra token endpoint failed while polling; retrying");
        return Poll::Retry(retry_after);
    }
    if !status.is_success() {
        let error: TokenErrorResponse = serde_json::from_slice(&body).unwrap_or_default();
        return match error.error.as_deref() {
            Some("authorization_pending") => Poll::Pending,
            Some("slow_down") => Poll::SlowDown,
            Some("authorization_declined") => Poll::Failed(DeviceCodeError::Declined),
            Some("expired_token" | "code_expired") => Poll::Failed(DeviceCodeError::Expired),
            _ => {
                tracing::debug!(%status, error = %error.summary(), "entra refused the device code");
                Poll::Failed(DeviceCodeError::Refused(error.summary()))
            }
        };
    }
    let answer: TokenResponse = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => {
            return Poll::Failed(DeviceCodeError::Protocol(format!(
                "entra token answer is not the documented JSON (line {}, column {})",
                e.line(),
                e.column()
            )))
        }
    };
    if let Some(kind) = answer.token_type.as_deref() {
        if !kind.eq_ignore_ascii_case("bearer") {
            return Poll::Failed(DeviceCodeError::Protocol(format!(
                "entra issued a {} token, not a Bearer token",
                shorten(kind, 32)
            )));
        }
    }
    let Some(refresh_token) = answer.refresh_token else {
        return Poll::Failed(DeviceCodeError::NoRefreshToken);
    };
    let account = answer
        .id_token
        .as_ref()
        .and_then(|t| preferred_username(t.expose_secret()));
    tracing::debug!(
        with_account = account.is_some(),
        "device code sign-in completed"
    );
    Poll::Done(SignedIn {
        refresh_token,
        access_token: answer.access_token,
        account,
    })
}

/// `preferred_username` from an ID token's payload. The signature is not
/// checked: the account is only displayed and audited, and the token came
/// straight from the authority over TLS in answer to our own request.
pub(crate) fn preferred_username(id_token: &str) -> Option<String> {
    let payload = id_token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let name = claims.get("preferred_username")?.as_str()?;
    let name = printable(name, 256);
    (!name.is_empty()).then_some(name)
}

/// Seconds as Entra sends them (a number; some proxies a string).
fn seconds(value: Option<&serde_json::Value>) -> Option<Duration> {
    let seconds = match value? {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }?;
    Some(Duration::from_secs(seconds))
}

/// Text from the authority made safe to print on a terminal: control
/// characters dropped, at most `max` characters.
fn printable(text: &str, max: usize) -> String {
    let clean: String = text.chars().filter(|c| !c.is_control()).collect();
    shorten(clean.trim(), max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_scope_adds_the_sign_in_scopes_once() {
        let config = EntraConfig::default();
        assert_eq!(
            login_scope(&config),
            "499b84ac-1321-427f-aa17-267ca6975798/.default offline_access openid profile"
        );
        let config = EntraConfig {
            scope: "openid  a/.default".into(),
            ..EntraConfig::default()
        };
        assert_eq!(
            login_scope(&config),
            "openid a/.default profile offline_access"
        );
    }

    #[test]
    fn the_account_comes_from_the_id_token_payload() {
        let payload = URL_SAFE_NO_PAD.encode(r#"{"preferred_username":"ops@contoso.com"}"#);
        assert_eq!(
            preferred_username(&format!("e30.{payload}.")).as_deref(),
            Some("ops@contoso.com")
        );
        assert_eq!(preferred_username("not-a-jwt"), None);
        let payload = URL_SAFE_NO_PAD.encode(r#"{"name":"Ops"}"#);
        assert_eq!(preferred_username(&format!("e30.{payload}.sig")), None);
    }

    #[test]
    fn debug_of_a_sign_in_shows_no_token() {
        let signed_in = SignedIn {
            refresh_token: "rt-secret-value".into(),
            access_token: "at-secret-value".into(),
            account: Some("ops@contoso.com".into()),
        };
        let text = format!("{signed_in:?}");
        assert!(!text.contains("secret-value"), "{text}");
        assert!(text.contains("ops@contoso.com"), "{text}");
    }

    #[test]
    fn the_devicecode_endpoint_is_beside_the_token_endpoint() {
        let config = EntraConfig {
            tenant: "contoso.onmicrosoft.com".into(),
            ..EntraConfig::default()
        };
        let url = devicecode_endpoint(&config.token_endpoint().unwrap()).unwrap();
        assert_eq!(
            url.as_str(),
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/devicecode"
        );
    }
}
