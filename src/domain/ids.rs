use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::DomainError;

/// The UUID accessors of a UUID newtype, and its text form: the bare UUID,
/// hyphenated lower case (`Display`, and `FromStr`, which fails with
/// [`DomainError::InvalidUuid`]).
macro_rules! uuid_newtype {
    ($name:ident) => {
        impl $name {
            /// Wraps a UUID (e.g. a stored one).
            pub fn from_uuid(id: Uuid) -> Self {
                $name(id)
            }

            /// The UUID.
            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl fmt::Display for $name {
            /// The bare UUID, hyphenated lower case.
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = DomainError;
            /// Parses a bare UUID.
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s)
                    .map($name)
                    .map_err(|_| DomainError::InvalidUuid(s.to_owned()))
            }
        }
    };
}

/// A lease's id: a random (v4) UUID. Its resource name is `leases/{uuid}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LeaseId(Uuid);

uuid_newtype!(LeaseId);

impl LeaseId {
    /// A fresh random id.
    pub fn new() -> Self {
        LeaseId(Uuid::new_v4())
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

/// Upstream's id of a PAT (`authorizationId`, a UUID in the PAT Lifecycle
/// API): the only handle to get, update or revoke it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AuthorizationId(Uuid);

uuid_newtype!(AuthorizationId);
