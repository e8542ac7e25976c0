//! Which identity may lease which organizations, scopes and TTLs.
//! TODO(policy helper): YAML rules, deny by default, first matching rule in
//! file order decides.

use std::time::Duration;

use crate::domain::{Identity, Organization, ScopeSet};

/// Why a request was refused. `reason()` values are stable API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denial {
    /// No rule matches the caller's identity.
    NoMatchingRule,
    /// A rule matches the identity but not the organization.
    OrganizationNotAllowed,
    /// A rule matches identity and organization but not every scope.
    ScopeNotAllowed,
    /// Everything matches but the TTL is above the rule's max.
    TtlExceedsMax,
}

impl Denial {
    /// `google.rpc.ErrorInfo.reason`: `NO_MATCHING_RULE`,
    /// `ORGANIZATION_NOT_ALLOWED`, `SCOPE_NOT_ALLOWED`, `TTL_EXCEEDS_MAX`.
    pub fn reason(&self) -> &'static str {
        match self {
            Denial::NoMatchingRule => "NO_MATCHING_RULE",
            Denial::OrganizationNotAllowed => "ORGANIZATION_NOT_ALLOWED",
            Denial::ScopeNotAllowed => "SCOPE_NOT_ALLOWED",
            Denial::TtlExceedsMax => "TTL_EXCEEDS_MAX",
        }
    }
}

/// A policy decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by the named rule.
    Allow {
        /// The rule's name.
        rule: String,
        /// The requested TTL, or the rule's default when none was asked.
        ttl: Duration,
        /// The rule's maximum TTL (caps renewals: max_expire_time).
        max_ttl: Duration,
    },
    /// Refused.
    Deny {
        /// Why.
        denial: Denial,
        /// The closest rule, if one matched the identity.
        rule: Option<String>,
    },
}

/// A parsed, validated policy.
#[derive(Clone, Debug, Default)]
pub struct Policy {}

impl Policy {
    /// Decides whether `identity` may lease `scopes` in `organization` for
    /// `ttl` (None: the rule's default).
    pub fn decide(
        &self,
        _identity: &Identity,
        _organization: &Organization,
        _scopes: &ScopeSet,
        _ttl: Option<Duration>,
    ) -> Decision {
        Decision::Deny {
            denial: Denial::NoMatchingRule,
            rule: None,
        }
    }
}
