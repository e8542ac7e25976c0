//! The Entra token endpoint `POST /{tenant}/oauth2/v2.0/token`
//! (docs/upstream-api.md, "Entra token endpoint"), the device authorization
//! endpoint `POST /{tenant}/oauth2/v2.0/devicecode` (RFC 8628) and the check
//! of the bearer tokens they issued.

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::distributions::Alphanumeric;
use rand::Rng;
use serde::Serialize;

use super::state::{
    digest, to_chrono, AccessTokenRecord, DeviceCodeRecord, DeviceCodeStatus, Emulator,
    RefreshTokenRecord, TokenKind, DEFAULT_ACCOUNT,
};
use super::wire;

/// The Azure DevOps resource id ("User-delegated Entra tokens only" [V]).
pub const AZURE_DEVOPS_RESOURCE: &str = "499b84ac-1321-427f-aa17-267ca6975798";

/// Successful token answer ("Entra token endpoint" [V] ENTRA-AC / ENTRA-CC).
#[derive(Serialize)]
struct TokenAnswer {
    token_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
    expires_in: u64,
    ext_expires_in: u64,
    access_token: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id_token: Option<String>,
}

/// The grant type of RFC 8628 §3.4.
const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// Where Entra sends the user to enter the code.
const VERIFICATION_URI: &str = "https://microsoft.com/devicelogin";

/// How long a device code lives (Entra: 15 minutes).
const DEVICE_CODE_LIFETIME_SECS: u64 = 900;

/// Answer of the devicecode endpoint (RFC 8628 §3.2, Entra's field names).
#[derive(Serialize)]
struct DeviceCodeAnswer {
    user_code: String,
    device_code: String,
    verification_uri: &'static str,
    expires_in: u64,
    interval: u64,
    message: String,
}

/// Error answer ("Entra token endpoint" [V]): 400 with `error`, an `AADSTS…`
/// description and `error_codes`.
#[derive(Serialize)]
struct TokenErrorAnswer {
    error: &'static str,
    error_description: String,
    error_codes: [u32; 1],
    timestamp: String,
    trace_id: String,
    correlation_id: String,
}

fn token_error(status: StatusCode, error: &'static str, code: u32, text: &str) -> Response {
    let now = chrono::Utc::now();
    let trace_id = uuid::Uuid::new_v4();
    let correlation_id = uuid::Uuid::new_v4();
    wire::json_status(
        status,
        &TokenErrorAnswer {
            error,
            error_description: format!(
                "AADSTS{code}: {text} Trace ID: {trace_id} Correlation ID: {correlation_id} Timestamp: {}",
                now.format("%Y-%m-%d %H:%M:%SZ")
            ),
            error_codes: [code],
            timestamp: now.format("%Y-%m-%d %H:%M:%SZ").to_string(),
            trace_id: trace_id.to_string(),
            correlation_id: correlation_id.to_string(),
        },
    )
}

/// A JWT-shaped access token. It is not signed in any verifiable way: the
/// emulator recognises its own tokens by digest; the claims only make the
/// shape familiar (`scp` + `idtyp=user` for delegated, `roles` + `idtyp=app`
/// for app-only, "What the emulator models").
fn mint_access_token(kind: TokenKind, tenant: &str, exp: i64, account: Option<&str>) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"RS256","kid":"emulator"}"#);
    let claims = match kind {
        TokenKind::User => {
            let account = account.unwrap_or(DEFAULT_ACCOUNT);
            serde_json::json!({
                "aud": AZURE_DEVOPS_RESOURCE, "iss": format!("https://sts.windows.net/{tenant}/"),
                "exp": exp, "idtyp": "user", "scp": "user_impersonation vso.pats vso.pats_manage",
                "oid": account_oid(account), "tid": tenant,
                "upn": account, "preferred_username": account, "uti": random_string(22),
            })
        }
        TokenKind::App => serde_json::json!({
            "aud": AZURE_DEVOPS_RESOURCE, "iss": format!("https://sts.windows.net/{tenant}/"),
            "exp": exp, "idtyp": "app", "roles": [],
            "oid": "a9f0c2d4-0000-4000-8000-00000000a0a0", "tid": tenant, "uti": random_string(22),
        }),
    };
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signature: String = random_string(86);
    format!("{header}.{claims}.{signature}")
}

/// An unsigned, JWT-shaped ID token (`alg: none`): who signed in, for the
/// client `client_id`. `profile` adds `preferred_username` and `name`, as
/// Entra does for the `profile` scope.
fn mint_id_token(tenant: &str, client_id: &str, account: &str, profile: bool, exp: i64) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"none"}"#);
    let now = chrono::Utc::now().timestamp();
    let mut claims = serde_json::json!({
        "ver": "2.0", "iss": format!("https://login.microsoftonline.com/{tenant}/v2.0"),
        "aud": client_id, "iat": now, "nbf": now, "exp": exp,
        "tid": tenant, "oid": account_oid(account), "sub": URL_SAFE_NO_PAD.encode(digest(account)),
    });
    if profile {
        claims["preferred_username"] = account.into();
        claims["name"] = display_name(account).into();
    }
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{claims}.")
}

/// A stable object id per account; the seeded account keeps the one the
/// emulator always used.
fn account_oid(account: &str) -> String {
    if account == DEFAULT_ACCOUNT {
        return "6f1c1b8e-0000-4000-8000-00000000e0e0".to_owned();
    }
    let d = digest(account);
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&d[..16]);
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// `emulated.user@fabrikam.example` → `Emulated User`.
fn display_name(account: &str) -> String {
    let local = account.split('@').next().unwrap_or(account);
    local
        .split(['.', '_', '-'])
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut chars = w.chars();
            chars
                .next()
                .map(|c| c.to_uppercase().chain(chars).collect::<String>())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A user code like Entra's: 9 upper-case letters and digits.
fn user_code() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::thread_rng();
    (0..9)
        .map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())]))
        .collect()
}

pub(crate) fn random_string(len: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

fn missing(name: &str) -> Response {
    token_error(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        900144,
        &format!("The request body must contain the following parameter: '{name}'."),
    )
}

/// The form fields of an Entra request; None when the body is not
/// form-encoded (Entra then answers as if the first field were missing).
fn read_form(headers: &HeaderMap, body: &[u8]) -> Option<Vec<(String, String)>> {
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        });
    is_form.then(|| {
        url::form_urlencoded::parse(body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    })
}

/// A non-empty form field.
fn form_field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

/// Handles the token endpoint. Every tenant name is accepted ([I]: the
/// emulator is one tenant under every name).
pub(crate) fn token(emu: &Emulator, tenant: &str, headers: &HeaderMap, body: &[u8]) -> Response {
    let Some(form) = read_form(headers, body) else {
        return missing("grant_type");
    };
    let field = |name: &str| form_field(&form, name);
    let Some(grant_type) = field("grant_type") else {
        return missing("grant_type");
    };
    // A confidential client may authenticate with Basic instead of form
    // fields ("Entra token endpoint" [V]).
    let basic_client = headers.get(header::AUTHORIZATION).is_some();
    if field("client_id").is_none() && !basic_client {
        return missing("client_id");
    }
    match grant_type {
        "refresh_token" => refresh_grant(
            emu,
            tenant,
            field("client_id").unwrap_or_default(),
            field("refresh_token"),
            field("scope"),
        ),
        DEVICE_CODE_GRANT => {
            device_code_grant(emu, tenant, field("client_id"), field("device_code"))
        }
        "client_credentials" => {
            let has_credential = basic_client
                || field("client_secret").is_some()
                || field("client_assertion").is_some();
            if !has_credential {
                return token_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    7000218,
                    "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
                );
            }
            let Some(scope) = field("scope") else {
                return missing("scope");
            };
            // Client credentials take exactly one `<resource>/.default`
            // ("Entra token endpoint" [V]).
            if !scope.trim().ends_with("/.default") || scope.split_whitespace().count() != 1 {
                return token_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_scope",
                    1002012,
                    "The provided value for scope is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI).",
                );
            }
            issue(emu, tenant, TokenKind::App, None, None, None)
        }
        _ => token_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type.",
        ),
    }
}

fn refresh_grant(
    emu: &Emulator,
    tenant: &str,
    client_id: &str,
    refresh_token: Option<&str>,
    scope: Option<&str>,
) -> Response {
    let Some(refresh_token) = refresh_token else {
        return token_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'refresh_token'.",
        );
    };
    let key = digest(refresh_token);
    let account = {
        let inner = emu.lock();
        let now = inner.now();
        // AADSTS codes per the Entra error-code list; which one the service
        // picks for each case is [I].
        match inner.refresh_tokens.get(&key) {
            None => {
                return token_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    9002313,
                    "Invalid request. Request is malformed or invalid.",
                )
            }
            Some(r) if r.revoked => {
                return token_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    50173,
                    "The provided grant has expired due to it being revoked, a fresh auth token is needed. The user might have changed or reset their password.",
                )
            }
            Some(r) if r.expires_at <= now => {
                return token_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    700082,
                    "The refresh token has expired due to inactivity.",
                )
            }
            // The new tokens belong to the refresh token's account.
            Some(r) => r.account.clone(),
        }
    };
    // A new refresh token every time; the old one stays valid ("Refresh tokens" [V]).
    let new_refresh = format!("0.AEmu{}", random_string(300));
    let user = UserGrant {
        account: &account,
        client_id,
        scope: scope.unwrap_or_default(),
    };
    issue(
        emu,
        tenant,
        TokenKind::User,
        Some(new_refresh),
        scope.map(granted_scope),
        Some(&user),
    )
}

/// Echo the resource scopes granted, as Entra does (shape [I]).
fn granted_scope(requested: &str) -> String {
    requested
        .split_whitespace()
        .filter(|s| !matches!(*s, "offline_access" | "openid" | "profile"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn has_scope(scope: &str, word: &str) -> bool {
    scope.split_whitespace().any(|w| w == word)
}

/// Who a user-delegated grant signs in, and what for (the `id_token`).
struct UserGrant<'a> {
    account: &'a str,
    client_id: &'a str,
    /// The scope asked for: `openid` adds an `id_token`, `profile` its
    /// `preferred_username` and `name`.
    scope: &'a str,
}

fn issue(
    emu: &Emulator,
    tenant: &str,
    kind: TokenKind,
    refresh_token: Option<String>,
    scope: Option<String>,
    user: Option<&UserGrant<'_>>,
) -> Response {
    let lifetime = emu.config.access_token_lifetime;
    let account = user.map(|u| u.account.to_owned());
    let mut inner = emu.lock();
    let now = inner.now();
    let expires_at = now + to_chrono(lifetime);
    let access_token = mint_access_token(kind, tenant, expires_at.timestamp(), account.as_deref());
    inner.access_tokens.insert(
        digest(&access_token),
        AccessTokenRecord {
            kind,
            expires_at,
            account: account.clone(),
        },
    );
    if let Some(rt) = &refresh_token {
        let expires_at = now + to_chrono(emu.config.refresh_token_lifetime);
        inner.refresh_tokens.insert(
            digest(rt),
            RefreshTokenRecord {
                expires_at,
                revoked: false,
                account: account
                    .clone()
                    .unwrap_or_else(|| DEFAULT_ACCOUNT.to_owned()),
            },
        );
    }
    drop(inner);
    let id_token = user.filter(|u| has_scope(u.scope, "openid")).map(|u| {
        mint_id_token(
            tenant,
            u.client_id,
            u.account,
            has_scope(u.scope, "profile"),
            expires_at.timestamp(),
        )
    });
    tracing::debug!(?kind, tenant, "emulator issued an access token");
    wire::json_ok(&TokenAnswer {
        token_type: "Bearer",
        scope,
        expires_in: lifetime.as_secs(),
        ext_expires_in: lifetime.as_secs(),
        access_token,
        refresh_token,
        id_token,
    })
}

/// Handles `POST /{tenant}/oauth2/v2.0/devicecode` (RFC 8628 §3.1–3.2):
/// `client_id` and `scope` are required.
pub(crate) fn device_code(emu: &Emulator, headers: &HeaderMap, body: &[u8]) -> Response {
    let Some(form) = read_form(headers, body) else {
        return missing("client_id");
    };
    let Some(client_id) = form_field(&form, "client_id") else {
        return missing("client_id");
    };
    let Some(scope) = form_field(&form, "scope") else {
        return missing("scope");
    };
    let device_code = format!("DAQABIQEAAAEmu{}", random_string(160));
    let interval = emu.config.device_code_interval.as_secs().max(1);
    let mut inner = emu.lock();
    let now = inner.now();
    // Forget codes an hour past their expiry (until then they answer
    // expired_token).
    inner
        .device_codes
        .retain(|_, r| r.expires_at + chrono::Duration::hours(1) > now);
    let user_code = loop {
        let code = user_code();
        if !inner.device_codes.values().any(|r| r.user_code == code) {
            break code;
        }
    };
    inner.device_codes.insert(
        digest(&device_code),
        DeviceCodeRecord {
            user_code: user_code.clone(),
            client_id: client_id.to_owned(),
            scope: scope.to_owned(),
            expires_at: now + chrono::Duration::seconds(DEVICE_CODE_LIFETIME_SECS as i64),
            interval_secs: interval,
            last_poll: None,
            status: DeviceCodeStatus::Pending,
            slow_down_next: false,
        },
    );
    drop(inner);
    wire::json_ok(&DeviceCodeAnswer {
        message: format!(
            "To sign in, use a web browser to open the page {VERIFICATION_URI} and enter the code {user_code} to authenticate."
        ),
        user_code,
        device_code,
        verification_uri: VERIFICATION_URI,
        expires_in: DEVICE_CODE_LIFETIME_SECS,
        interval,
    })
}

/// A poll closer to the previous one than the interval, less this much
/// (the client measures on its own clock), gets `slow_down`.
const POLL_TOLERANCE_MS: i64 = 50;

/// The device-code grant (RFC 8628 §3.4–3.5, Entra's error names). The
/// AADSTS codes (70016 pending and slow_down, 70000 declined and
/// bad_verification_code, 70020 expired) are [I] ("Device authorization grant").
fn device_code_grant(
    emu: &Emulator,
    tenant: &str,
    client_id: Option<&str>,
    device_code: Option<&str>,
) -> Response {
    let Some(device_code) = device_code else {
        return missing("device_code");
    };
    let bad_code = || {
        token_error(
            StatusCode::BAD_REQUEST,
            "bad_verification_code",
            70000,
            "The provided value for the input parameter 'device_code' is not valid.",
        )
    };
    let slow_down = || {
        token_error(
            StatusCode::BAD_REQUEST,
            "slow_down",
            70016,
            "OAuth 2.0 device flow error. Authorization is pending and the client polls too often; wait longer between requests.",
        )
    };
    let key = digest(device_code);
    let mut inner = emu.lock();
    let now = inner.now();
    let Some(record) = inner.device_codes.get_mut(&key) else {
        // Unknown, or already redeemed: Entra forgets a device code once it
        // has issued tokens for it, so a second redemption finds no code
        // and gets bad_verification_code, not invalid_grant ([I],
        // "Device authorization grant").
        return bad_code();
    };
    if client_id.is_some_and(|c| c != record.client_id) {
        // A code is only good for the client that asked for it ([I]).
        return bad_code();
    }
    if record.expires_at <= now {
        return token_error(
            StatusCode::BAD_REQUEST,
            "expired_token",
            70020,
            "The provided value for the input parameter 'device_code' is not valid. Device codes expire 15 minutes after they are issued; have the user sign in again.",
        );
    }
    if record.status == DeviceCodeStatus::Declined {
        return token_error(
            StatusCode::BAD_REQUEST,
            "authorization_declined",
            70000,
            "The user declined the authentication request.",
        );
    }
    let previous_poll = record.last_poll.replace(now);
    if std::mem::take(&mut record.slow_down_next) {
        record.interval_secs += 5;
        return slow_down();
    }
    let account = match &record.status {
        DeviceCodeStatus::Approved { account } => account.clone(),
        _ => {
            // slow_down is a variant of authorization_pending (RFC 8628 §3.5).
            let interval = chrono::Duration::seconds(record.interval_secs as i64)
                - chrono::Duration::milliseconds(POLL_TOLERANCE_MS);
            if previous_poll.is_some_and(|p| now - p < interval) {
                record.interval_secs += 5;
                return slow_down();
            }
            return token_error(
                StatusCode::BAD_REQUEST,
                "authorization_pending",
                70016,
                "OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
            );
        }
    };
    let Some(record) = inner.device_codes.remove(&key) else {
        return bad_code();
    };
    drop(inner);
    let user = UserGrant {
        account: &account,
        client_id: &record.client_id,
        scope: &record.scope,
    };
    // A refresh token only when offline_access was asked for (Entra).
    let refresh_token =
        has_scope(&record.scope, "offline_access").then(|| format!("0.AEmu{}", random_string(300)));
    issue(
        emu,
        tenant,
        TokenKind::User,
        refresh_token,
        Some(granted_scope(&record.scope)),
        Some(&user),
    )
}

/// The outcome of checking a PAT API caller's `Authorization` header.
pub(crate) enum Bearer {
    /// A live user-delegated token this emulator issued.
    User,
    /// Anything else: none, Basic (a PAT), unknown, expired or app-only.
    Refused,
}

/// Checks `Authorization: Bearer …` against issued tokens. Only a live
/// user-delegated token passes ("User-delegated Entra tokens only" [V] DOC-PATAPI).
pub(crate) fn check_bearer(emu: &Emulator, headers: &HeaderMap) -> Bearer {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return Bearer::Refused;
    };
    let Some((scheme, token)) = value.trim().split_once(' ') else {
        return Bearer::Refused;
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Bearer::Refused;
    }
    let inner = emu.lock();
    match inner.access_tokens.get(&digest(token.trim())) {
        Some(r) if r.kind == TokenKind::User && r.expires_at > inner.now() => Bearer::User,
        _ => Bearer::Refused,
    }
}

/// What a test does to a device code through `/_emulator/device-codes/…`.
pub(crate) enum DeviceCodeAction {
    /// Sign in as this account.
    Approve(String),
    Decline,
    /// The next poll answers `slow_down`.
    SlowDown,
}

impl Emulator {
    /// Acts on the device code whose user code is `user_code` (case
    /// ignored); false when there is none (unknown, redeemed or forgotten).
    pub(crate) fn device_code_action(&self, user_code: &str, action: DeviceCodeAction) -> bool {
        let mut inner = self.lock();
        let Some(record) = inner
            .device_codes
            .values_mut()
            .find(|r| r.user_code.eq_ignore_ascii_case(user_code.trim()))
        else {
            return false;
        };
        match action {
            DeviceCodeAction::Approve(account) => {
                record.status = DeviceCodeStatus::Approved { account }
            }
            DeviceCodeAction::Decline => record.status = DeviceCodeStatus::Declined,
            DeviceCodeAction::SlowDown => record.slow_down_next = true,
        }
        true
    }

    /// Revokes one refresh token (by value), or every one when `None`, as
    /// Graph `revokeSignInSessions` does ("Refresh tokens" [V]). Returns how many.
    pub(crate) fn revoke_refresh_tokens(&self, refresh_token: Option<&str>) -> usize {
        let mut inner = self.lock();
        match refresh_token {
            Some(rt) => inner
                .refresh_tokens
                .get_mut(&digest(rt))
                .map(|r| r.revoked = true)
                .map_or(0, |_| 1),
            None => inner
                .refresh_tokens
                .values_mut()
                .map(|r| r.revoked = true)
                .count(),
        }
    }
}
