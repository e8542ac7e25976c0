//! Test-only endpoints under `/_emulator/` (documented in the README, "The Azure DevOps emulator").
//! They need no credential and never show a secret.

use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Duration as ChronoDuration;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::entra::DeviceCodeAction;
use super::faults::FaultRule;
use super::state::{Emulator, DEFAULT_ACCOUNT};
use super::wire;

/// One row of `GET /_emulator/pats`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PatView {
    organization: String,
    authorization_id: Uuid,
    display_name: String,
    scope: String,
    target_accounts: Option<Vec<Uuid>>,
    valid_from: String,
    valid_to: String,
    /// `active`, `revoked` or `expired`, at emulator time.
    state: &'static str,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RevokeRefreshTokens {
    refresh_token: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AdvanceClock {
    advance_seconds: i64,
}

/// Body of `/_emulator/device-codes/{approve,decline,slow-down}`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DeviceCodeRequest {
    user_code: String,
    /// approve only: who signs in (default the seeded account).
    account: Option<String>,
}

fn device_code_endpoint(emu: &Emulator, action: &str, body: &[u8]) -> Response {
    let req = match serde_json::from_slice::<DeviceCodeRequest>(body) {
        Ok(r) => r,
        Err(e) => return bad_request(format!("body: {e}")),
    };
    let (action, state) = match action {
        "approve" => (
            DeviceCodeAction::Approve(req.account.unwrap_or_else(|| DEFAULT_ACCOUNT.to_owned())),
            "approved",
        ),
        "decline" => (DeviceCodeAction::Decline, "declined"),
        _ => (DeviceCodeAction::SlowDown, "slowDown"),
    };
    if emu.device_code_action(&req.user_code, action) {
        wire::json_ok(&serde_json::json!({ "userCode": req.user_code, "state": state }))
    } else {
        (
            StatusCode::NOT_FOUND,
            "no device code with that user code (unknown, redeemed or long expired)",
        )
            .into_response()
    }
}

fn bad_request(why: String) -> Response {
    (StatusCode::BAD_REQUEST, why).into_response()
}

fn clock_json(emu: &Emulator) -> Response {
    let now = emu.lock().now();
    wire::json_ok(&serde_json::json!({ "now": wire::format_datetime(now) }))
}

/// Serves `/_emulator/{rest}`; None when no such endpoint exists.
pub(crate) fn serve(
    emu: &Emulator,
    method: &Method,
    rest: &[String],
    body: &[u8],
) -> Option<Response> {
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    let resp = match (method, rest.as_slice()) {
        (&Method::GET, ["pats"]) => {
            let inner = emu.lock();
            let now = inner.now();
            let rows: Vec<PatView> = inner
                .pats
                .iter()
                .map(|p| PatView {
                    organization: p.organization.clone(),
                    authorization_id: p.authorization_id,
                    display_name: p.display_name.clone(),
                    scope: p.scope.clone(),
                    target_accounts: p.target_accounts.clone(),
                    valid_from: wire::format_datetime(p.valid_from),
                    valid_to: wire::format_datetime(p.valid_to),
                    state: p.state(now).as_str(),
                })
                .collect();
            wire::json_ok(&rows)
        }
        (&Method::GET, ["stats"]) => wire::json_ok(&emu.lock().stats),
        (&Method::DELETE, ["stats"]) => {
            emu.lock().reset_stats();
            StatusCode::NO_CONTENT.into_response()
        }
        (&Method::GET, ["requests"]) => wire::json_ok(&emu.lock().requests),
        (&Method::GET, ["faults"]) => wire::json_ok(&emu.lock().faults),
        (&Method::PUT, ["faults"]) => match serde_json::from_slice::<Vec<FaultRule>>(body) {
            Ok(rules) => {
                let rules: Vec<FaultRule> =
                    rules.into_iter().filter(|r| r.times != Some(0)).collect();
                emu.lock().faults = rules.clone();
                wire::json_ok(&rules)
            }
            Err(e) => bad_request(format!("fault rules: {e}")),
        },
        (&Method::DELETE, ["faults"]) => {
            emu.lock().faults.clear();
            StatusCode::NO_CONTENT.into_response()
        }
        (&Method::POST, ["refresh-tokens", "revoke"]) => {
            let req = if body.iter().all(u8::is_ascii_whitespace) {
                RevokeRefreshTokens::default()
            } else {
                match serde_json::from_slice::<RevokeRefreshTokens>(body) {
                    Ok(r) => r,
                    Err(e) => return Some(bad_request(format!("body: {e}"))),
                }
            };
            let revoked = emu.revoke_refresh_tokens(req.refresh_token.as_deref());
            wire::json_ok(&serde_json::json!({ "revoked": revoked }))
        }
        (&Method::POST, ["device-codes", action @ ("approve" | "decline" | "slow-down")]) => {
            device_code_endpoint(emu, action, body)
        }
        (&Method::GET, ["clock"]) => clock_json(emu),
        (&Method::POST, ["clock"]) => match serde_json::from_slice::<AdvanceClock>(body) {
            Ok(a) => {
                emu.lock().clock_offset += ChronoDuration::seconds(a.advance_seconds);
                clock_json(emu)
            }
            Err(e) => bad_request(format!("body: {e}")),
        },
        (
            _,
            ["pats"]
            | ["stats"]
            | ["requests"]
            | ["faults"]
            | ["refresh-tokens", "revoke"]
            | ["device-codes", "approve" | "decline" | "slow-down"]
            | ["clock"],
        ) => wire::method_not_allowed(),
        _ => return None,
    };
    Some(resp)
}
