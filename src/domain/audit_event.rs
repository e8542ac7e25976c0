//! The audit event: one row of the chained audit trail. A domain type, so
//! the store can keep rows and the audit log can chain them without either
//! importing the other.

use super::{LeaseId, Timestamp};

/// How a decision came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
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

/// One audit row. Never holds a token, only its keyed fingerprint.
///
/// Built with [`AuditEvent::new`] and struct update for the optional
/// fields: `AuditEvent { reason: Some(..), ..AuditEvent::new(..) }`.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditEvent {
    /// Store-assigned, increasing; 0 before it is appended.
    pub id: i64,
    /// When it happened (UTC).
    pub time: Timestamp,
    /// The caller's typed identity, or `-` when unauthenticated.
    pub identity: String,
    /// The caller's socket address, when known; for aggregated refused
    /// authentications its IP address only, or `other`.
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
    /// More about the caller than its identity: for a Kubernetes service
    /// account, its token's claims as `pod=NAME pod_uid=UID sa_uid=UID
    /// jti=ID` (absent claims left out; see
    /// [`Caller::audit_detail`](crate::auth::Caller::audit_detail)); for
    /// aggregated refused authentications, `count=N interval_start=RFC3339
    /// interval_end=RFC3339` (see [`crate::audit::RefusalCounter`]).
    /// `None` for other callers and for rows from before migration 0003.
    pub caller_detail: Option<String>,
}

impl AuditEvent {
    /// An event not yet appended (`id` 0): `identity` did `action` at
    /// `time` (kept to the microsecond) and it came out as `outcome`; every
    /// optional field unset.
    pub fn new(
        time: impl Into<Timestamp>,
        identity: impl Into<String>,
        action: impl Into<String>,
        outcome: Outcome,
    ) -> Self {
        AuditEvent {
            id: 0,
            time: time.into(),
            identity: identity.into(),
            peer: None,
            action: action.into(),
            outcome,
            reason: None,
            policy_rule: None,
            lease_id: None,
            organization: None,
            scopes: None,
            token_fingerprint: None,
            caller_detail: None,
        }
    }
}
