//! Audit events: one append-only row per decision. Never holds a token,
//! only its keyed fingerprint.

use chrono::{DateTime, Utc};

use crate::domain::LeaseId;

/// How a decision came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Granted or done.
    Allowed,
    /// Refused by authentication or policy.
    Denied,
    /// Attempted and failed.
    Error,
}

impl Outcome {
    /// Stored form: `allowed`, `denied`, `error`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::Error => "error",
        }
    }

    /// Parses the stored form.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "allowed" => Some(Outcome::Allowed),
            "denied" => Some(Outcome::Denied),
            "error" => Some(Outcome::Error),
            _ => None,
        }
    }
}

/// One audit row.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditEvent {
    /// Store-assigned, increasing; 0 before it is appended.
    pub id: i64,
    /// When it happened (UTC).
    pub time: DateTime<Utc>,
    /// The caller's typed identity, or `-` when unauthenticated.
    pub identity: String,
    /// The caller's socket address, when known.
    pub peer: Option<String>,
    /// What was asked, e.g. `lease.create`, `lease.expire`.
    pub action: String,
    /// How it came out.
    pub outcome: Outcome,
    /// Stable reason, e.g. `SCOPE_NOT_ALLOWED`.
    pub reason: Option<String>,
    /// The policy rule that decided, if any.
    pub policy_rule: Option<String>,
    /// The lease concerned, if any.
    pub lease_id: Option<LeaseId>,
    /// The organization concerned, if any.
    pub organization: Option<String>,
    /// Scopes asked for or held, space separated.
    pub scopes: Option<String>,
    /// Keyed HMAC-SHA256 fingerprint of the token, hex; never the token.
    pub token_fingerprint: Option<String>,
}
