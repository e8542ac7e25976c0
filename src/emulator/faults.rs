//! Fault injection: the rules of `PUT /_emulator/faults` and how
//! a matched rule changes an answer.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use serde::{Deserialize, Serialize};

use super::state::Emulator;
use super::wire;

/// The operations a rule can target, named as in rules and in
/// `/_emulator/stats`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, strum::IntoStaticStr)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum Operation {
    /// `POST …/_apis/tokens/pats`.
    Create,
    /// `GET …/_apis/tokens/pats?authorizationId=`.
    Get,
    /// `GET …/_apis/tokens/pats` without `authorizationId`.
    List,
    /// `PUT …/_apis/tokens/pats`.
    Update,
    /// `DELETE …/_apis/tokens/pats`.
    Revoke,
    /// `POST /{tenant}/oauth2/v2.0/token`.
    Token,
    /// The data plane (`git/repositories`, `packaging/feeds`).
    Dataplane,
    /// Every operation above.
    #[serde(rename = "*")]
    #[strum(serialize = "*")]
    Any,
}

impl Operation {
    /// The name used in rules and in `/_emulator/stats`.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// When the latency is spent relative to the operation's effect.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LatencyWhen {
    /// Before the operation runs; a fault answer then replaces it (no effect).
    #[default]
    Before,
    /// After the operation took effect; a fault answer then replaces its
    /// answer (the effect stays: e.g. a PAT was created but the caller sees a 500).
    After,
}

/// One fault rule. Unknown fields are refused.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultRule {
    /// Which operation it applies to.
    pub operation: Operation,
    /// Delay in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// Whether the delay (and any fault answer) comes before or after the effect.
    #[serde(default)]
    pub latency_when: LatencyWhen,
    /// Answer with this HTTP status instead (429 gets TF400733, 5xx an
    /// internal error, 400 the `JsonReaderException` of an unreadable
    /// body); a 2xx lets the real answer through (see `decorate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Sends `Retry-After` in seconds; implies status 429 when `status` is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
    /// Answer with the 203 HTML sign-in page.
    #[serde(default)]
    pub sign_in_page: bool,
    /// Close the connection without answering.
    #[serde(default)]
    pub drop_connection: bool,
    /// List only: the answer's continuation token points at the same page again.
    #[serde(default)]
    pub repeat_page: bool,
    /// The rule lapses after matching this many calls; absent = until cleared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub times: Option<u32>,
}

impl FaultRule {
    fn matches(&self, op: Operation) -> bool {
        self.operation == Operation::Any || self.operation == op
    }

    /// The status the rule answers with: `status`, or 429 when only
    /// `retryAfterSeconds` is given.
    fn effective_status(&self) -> Option<u16> {
        self.status.or(self.retry_after_seconds.map(|_| 429))
    }

    /// True if the rule replaces the answer. A 2xx `status` does not: it
    /// marks a delayed-but-served call, whose real answer gets the
    /// rate-limit headers (DOC-RATELIMITS: "The response still returns
    /// HTTP 200", "Rate limits and Retry-After" [V]).
    pub fn replaces_answer(&self) -> bool {
        self.sign_in_page
            || self.drop_connection
            || self
                .effective_status()
                .is_some_and(|s| !(200..300).contains(&s))
    }

    /// The delay, if any.
    pub fn latency(&self) -> Option<Duration> {
        self.latency_ms.map(Duration::from_millis)
    }

    /// Adds `Retry-After` and `X-RateLimit-*` ("Rate limits and Retry-After" [V]) to an
    /// answer the rule let through.
    pub fn decorate(&self, resp: &mut Response) {
        if self.retry_after_seconds.is_some() {
            self.rate_limit_headers(resp, false);
        }
    }

    fn rate_limit_headers(&self, resp: &mut Response, blocked: bool) {
        let h = resp.headers_mut();
        let retry_after = self.retry_after_seconds.unwrap_or(0);
        h.insert("retry-after", HeaderValue::from(retry_after));
        h.insert(
            "x-ratelimit-resource",
            HeaderValue::from_static("ATCPU/Emulator"),
        );
        h.insert("x-ratelimit-limit", HeaderValue::from_static("200"));
        h.insert("x-ratelimit-remaining", HeaderValue::from_static("0"));
        let reset = chrono::Utc::now().timestamp() + i64::try_from(retry_after).unwrap_or(0);
        h.insert("x-ratelimit-reset", HeaderValue::from(reset));
        // "Except for X-RateLimit-Delay, all these headers are sent before
        // requests start getting delayed": Delay only on a delayed answer.
        if !blocked {
            let delay = format!("{:.3}", self.latency_ms.unwrap_or(0) as f64 / 1000.0);
            if let Ok(v) = HeaderValue::from_str(&delay) {
                h.insert("x-ratelimit-delay", v);
            }
        }
    }

    /// The answer that replaces the operation's own (None: keep it).
    /// For `dropConnection` the caller closes the connection instead.
    pub fn answer(&self) -> Option<Response> {
        if self.sign_in_page {
            return Some(wire::sign_in_page());
        }
        let status = self.effective_status()?;
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let resp = if status == StatusCode::TOO_MANY_REQUESTS {
            // DOC-RATELIMITS ("Rate limits and Retry-After" [V]): TF400733 and
            // the X-RateLimit-* headers.
            let mut r = wire::envelope(
                status,
                "RequestBlockedException",
                "Microsoft.TeamFoundation.Framework.Server.RequestBlockedException, Microsoft.TeamFoundation.Framework.Server",
                "TF400733: The request has been canceled: Request was blocked due to exceeding usage of resource 'ATCPU' in namespace 'User'.",
                3000,
            );
            self.rate_limit_headers(&mut r, true);
            r
        } else if status.is_server_error() {
            let mut r = wire::envelope(
                status,
                "VssServiceException",
                "Microsoft.VisualStudio.Services.Common.VssServiceException, Microsoft.VisualStudio.Services.Common",
                &format!(
                    "TF400898: An Internal Error Occurred. Activity Id: {}.",
                    uuid::Uuid::new_v4()
                ),
                3000,
            );
            if let Some(secs) = self.retry_after_seconds {
                r.headers_mut()
                    .insert("retry-after", HeaderValue::from(secs));
            }
            r
        } else if status == StatusCode::BAD_REQUEST {
            // The service's one captured 400: an unreadable body.
            wire::json_reader_error()
        } else {
            wire::envelope(
                status,
                "VssServiceException",
                "Microsoft.VisualStudio.Services.Common.VssServiceException, Microsoft.VisualStudio.Services.Common",
                "Injected by the emulator's fault rules.",
                3000,
            )
        };
        Some(resp)
    }
}

impl Emulator {
    /// Takes the first live rule for `op`, counting down its `times`.
    pub(crate) fn take_fault(&self, op: Operation) -> Option<FaultRule> {
        let mut inner = self.lock();
        let idx = inner.faults.iter().position(|r| r.matches(op))?;
        let rule = inner.faults[idx].clone();
        if let Some(times) = &mut inner.faults[idx].times {
            *times = times.saturating_sub(1);
            if *times == 0 {
                inner.faults.remove(idx);
            }
        }
        Some(rule)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_from_the_documented_shape() {
        let rules: Vec<FaultRule> = serde_json::from_str(
            r#"[{"operation":"create","latencyMs":50,"latencyWhen":"after","status":500,"times":1},
                {"operation":"*","retryAfterSeconds":3},
                {"operation":"list","repeatPage":true},
                {"operation":"token","signInPage":true,"dropConnection":false}]"#,
        )
        .unwrap();
        assert_eq!(rules.len(), 4);
        assert_eq!(rules[0].latency_when, LatencyWhen::After);
        assert_eq!(rules[1].operation, Operation::Any);
        assert!(
            serde_json::from_str::<Vec<FaultRule>>(r#"[{"operation":"create","bogus":1}]"#)
                .is_err()
        );
    }
}
