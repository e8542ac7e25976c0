use std::fmt;
use std::str::FromStr;

use super::DomainError;

/// Where one version of a managed credential is in its life (issue 17,
/// docs/policy.md "Managed credentials"). Stored and printed as the
/// upper-case names (`PENDING`, `CURRENT`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VersionState {
    /// Intent recorded before the upstream create; the PAT may or may not
    /// exist yet; no token handed out.
    Pending,
    /// The version readers get.
    Current,
    /// Superseded by a newer version, still valid until its `revoke_at`
    /// (the overlap).
    Previous,
    /// Revocation upstream began (retried from the row until it succeeds).
    Revoking,
    /// Revoked upstream (terminal).
    Revoked,
    /// Never became usable; no token was handed out (terminal).
    Failed,
}

impl VersionState {
    /// Every state, in lifecycle order.
    pub const ALL: [VersionState; 6] = [
        VersionState::Pending,
        VersionState::Current,
        VersionState::Previous,
        VersionState::Revoking,
        VersionState::Revoked,
        VersionState::Failed,
    ];

    /// The stored name, e.g. `CURRENT`.
    pub fn as_str(&self) -> &'static str {
        match self {
            VersionState::Pending => "PENDING",
            VersionState::Current => "CURRENT",
            VersionState::Previous => "PREVIOUS",
            VersionState::Revoking => "REVOKING",
            VersionState::Revoked => "REVOKED",
            VersionState::Failed => "FAILED",
        }
    }

    /// True while the version's PAT may exist upstream and is owned by it
    /// (the orphan sweep leaves such PATs alone).
    pub fn is_live(&self) -> bool {
        !matches!(self, VersionState::Revoked | VersionState::Failed)
    }

    /// True while the version's token is kept (sealed) and usable.
    pub fn holds_token(&self) -> bool {
        matches!(self, VersionState::Current | VersionState::Previous)
    }
}

impl fmt::Display for VersionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for VersionState {
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        VersionState::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| DomainError::UnknownVersionState(s.to_owned()))
    }
}
