//! The Entra token endpoint `POST /{tenant}/oauth2/v2.0/token`
//! (docs/upstream-api.md, "Entra token endpoint") and the check of the bearer tokens it issued.

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::distributions::Alphanumeric;
use rand::Rng;
use serde::Serialize;

use super::state::{digest, to_chrono, AccessTokenRecord, Emulator, RefreshTokenRecord, TokenKind};
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
fn mint_access_token(kind: TokenKind, tenant: &str, exp: i64) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"RS256","kid":"emulator"}"#);
    let claims = match kind {
        TokenKind::User => serde_json::json!({
            "aud": AZURE_DEVOPS_RESOURCE, "iss": format!("https://sts.windows.net/{tenant}/"),
            "exp": exp, "idtyp": "user", "scp": "user_impersonation vso.pats vso.pats_manage",
            "oid": "6f1c1b8e-0000-4000-8000-00000000e0e0", "tid": tenant,
            "upn": "emulated.user@fabrikam.example", "uti": random_string(22),
        }),
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

pub(crate) fn random_string(len: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// Handles the token endpoint. Every tenant name is accepted ([I]: the
/// emulator is one tenant under every name).
pub(crate) fn token(emu: &Emulator, tenant: &str, headers: &HeaderMap, body: &[u8]) -> Response {
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        });
    if !is_form {
        return token_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'grant_type'.",
        );
    }
    let form: Vec<(String, String)> = url::form_urlencoded::parse(body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    let missing = |name: &str| {
        token_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            &format!("The request body must contain the following parameter: '{name}'."),
        )
    };
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
        "refresh_token" => refresh_grant(emu, tenant, field("refresh_token"), field("scope")),
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
            issue(emu, tenant, TokenKind::App, None, None)
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
    {
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
            Some(_) => {}
        }
    }
    // A new refresh token every time; the old one stays valid ("Refresh tokens" [V]).
    let new_refresh = format!("0.AEmu{}", random_string(300));
    let scope = scope.map(|s| {
        // Echo the resource scopes granted, as Entra does (shape [I]).
        s.split_whitespace()
            .filter(|s| !matches!(*s, "offline_access" | "openid" | "profile"))
            .collect::<Vec<_>>()
            .join(" ")
    });
    issue(emu, tenant, TokenKind::User, Some(new_refresh), scope)
}

fn issue(
    emu: &Emulator,
    tenant: &str,
    kind: TokenKind,
    refresh_token: Option<String>,
    scope: Option<String>,
) -> Response {
    let lifetime = emu.config.access_token_lifetime;
    let mut inner = emu.lock();
    let now = inner.now();
    let expires_at = now + to_chrono(lifetime);
    let access_token = mint_access_token(kind, tenant, expires_at.timestamp());
    inner.access_tokens.insert(
        digest(&access_token),
        AccessTokenRecord { kind, expires_at },
    );
    if let Some(rt) = &refresh_token {
        let expires_at = now + to_chrono(emu.config.refresh_token_lifetime);
        inner.refresh_tokens.insert(
            digest(rt),
            RefreshTokenRecord {
                expires_at,
                revoked: false,
            },
        );
    }
    drop(inner);
    tracing::debug!(?kind, tenant, "emulator issued an access token");
    wire::json_ok(&TokenAnswer {
        token_type: "Bearer",
        scope,
        expires_in: lifetime.as_secs(),
        ext_expires_in: lifetime.as_secs(),
        access_token,
        refresh_token,
    })
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

impl Emulator {
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
