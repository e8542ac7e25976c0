//! Lease business rules: issue, renew, revoke, expire (DESIGN.md section 5).
//! Knows no SQL and no HTTP: it speaks to [`crate::store::Store`] and
//! [`crate::upstream::PatClient`].
//!
//! TODO(leases helper): implement [`Leases`]. The api layer has already
//! validated input into domain types and authenticated the caller.

use std::time::Duration;

use secrecy::SecretString;
use uuid::Uuid;

use crate::domain::{LeaseState, Organization, ScopeSet};
use crate::store::LeaseRecord;

/// A validated CreateLease request.
#[derive(Clone, Debug)]
pub struct CreateLease {
    /// Organization.
    pub organization: Organization,
    /// Requested scopes.
    pub scopes: ScopeSet,
    /// Requested TTL; None: the policy's default.
    pub ttl: Option<Duration>,
    /// Idempotency key.
    pub request_id: Option<Uuid>,
}

/// A freshly issued (or replayed) lease and its PAT.
pub struct IssuedLease {
    /// The lease.
    pub lease: LeaseRecord,
    /// The PAT, to hand to the caller once.
    pub token: SecretString,
}

/// A validated ListLeases request.
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    /// 1..=1000 (the api layer applies the default and the cap).
    pub page_size: u32,
    /// Opaque token from a previous page; empty for the first.
    pub page_token: String,
    /// Only these states (empty: all).
    pub states: Vec<LeaseState>,
    /// Only this organization.
    pub organization: Option<Organization>,
}

/// One page of leases.
#[derive(Clone, Debug)]
pub struct LeasePage {
    /// Newest first.
    pub leases: Vec<LeaseRecord>,
    /// Empty on the last page.
    pub next_page_token: String,
}
