use std::fmt;
use std::str::FromStr;

use super::DomainError;

/// Where a lease is in its lifecycle (the transitions are the methods in
/// `leases::transition`; docs/architecture.md, "The lease state machine").
/// Stored and
/// printed as the UPPER_SNAKE_CASE names of the proto enum `Lease.State`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LeaseState {
    /// Intent recorded; the upstream PAT may or may not exist yet.
    Pending,
    /// The PAT is live and held.
    Active,
    /// Revocation started, not yet confirmed upstream.
    Revoking,
    /// Revoked on request.
    Revoked,
    /// Revoked by the reaper at expiry.
    Expired,
    /// Never became usable; no token was handed out.
    Failed,
    /// Revocation failed past the retry budget; retried slowly.
    RevokeFailed,
}

impl LeaseState {
    /// Every state, in lifecycle order.
    pub const ALL: [LeaseState; 7] = [
        LeaseState::Pending,
        LeaseState::Active,
        LeaseState::Revoking,
        LeaseState::Revoked,
        LeaseState::Expired,
        LeaseState::Failed,
        LeaseState::RevokeFailed,
    ];

    /// The stored name, e.g. `ACTIVE`.
    pub fn as_str(&self) -> &'static str {
        match self {
            LeaseState::Pending => "PENDING",
            LeaseState::Active => "ACTIVE",
            LeaseState::Revoking => "REVOKING",
            LeaseState::Revoked => "REVOKED",
            LeaseState::Expired => "EXPIRED",
            LeaseState::Failed => "FAILED",
            LeaseState::RevokeFailed => "REVOKE_FAILED",
        }
    }

    /// True once nothing more will happen to the lease.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            LeaseState::Revoked | LeaseState::Expired | LeaseState::Failed
        )
    }
}

impl fmt::Display for LeaseState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LeaseState {
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LeaseState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| DomainError::UnknownLeaseState(s.to_owned()))
    }
}
