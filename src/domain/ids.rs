use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::DomainError;

/// A lease's id: a random (v4) UUID. Its resource name is `leases/{uuid}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LeaseId(Uuid);

impl LeaseId {
    /// A fresh random id.
    pub fn new() -> Self {
        LeaseId(Uuid::new_v4())
    }

    /// Wraps a stored UUID.
    pub fn from_uuid(id: Uuid) -> Self {
        LeaseId(id)
    }

    /// The UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }

    /// Parses the resource name `leases/{uuid}`.
    pub fn from_name(name: &str) -> Result<Self, DomainError> {
        name.strip_prefix("leases/")
            .and_then(|id| Uuid::parse_str(id).ok())
            .map(LeaseId)
            .ok_or_else(|| DomainError::InvalidLeaseName(name.to_owned()))
    }

    /// The resource name `leases/{uuid}`.
    pub fn name(&self) -> String {
        format!("leases/{}", self.0)
    }
}

impl Default for LeaseId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for LeaseId {
    /// The bare UUID, hyphenated lower case.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for LeaseId {
    type Err = DomainError;
    /// Parses a bare UUID.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(LeaseId)
            .map_err(|_| DomainError::InvalidUuid(s.to_owned()))
    }
}

/// Upstream's id of a PAT (`authorizationId`, a UUID in the PAT Lifecycle
/// API): the only handle to get, update or revoke it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AuthorizationId(Uuid);

impl AuthorizationId {
    /// Wraps a UUID.
    pub fn from_uuid(id: Uuid) -> Self {
        AuthorizationId(id)
    }

    /// The UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl fmt::Display for AuthorizationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for AuthorizationId {
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(AuthorizationId)
            .map_err(|_| DomainError::InvalidUuid(s.to_owned()))
    }
}
