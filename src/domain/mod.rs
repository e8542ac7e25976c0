//! Domain types that validate on construction, so a bare `String` never
//! wanders through the broker.

mod audit_event;
mod identity;
mod ids;
mod lease_state;
mod organization;
mod scope;
mod time;
mod version_state;

pub use audit_event::{AuditEvent, Outcome};
pub use identity::Identity;
pub use ids::{AuthorizationId, LeaseId};
pub use lease_state::LeaseState;
pub use organization::Organization;
pub use scope::{Scope, ScopeSet};
pub use time::Timestamp;
pub use version_state::VersionState;

/// A value that failed validation. The caller knows which request field it
/// came from and attaches that name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// Not an Azure DevOps organization name.
    #[error("invalid organization name: {0}")]
    InvalidOrganization(String),
    /// Not in the Azure DevOps scope catalogue.
    #[error("unknown scope: {0:?}")]
    UnknownScope(String),
    /// An empty scope list where at least one is required.
    #[error("at least one scope is required")]
    NoScopes,
    /// Not a `leases/{uuid}` resource name.
    #[error("invalid lease name {0:?}: expected leases/{{uuid}}")]
    InvalidLeaseName(String),
    /// Not a UUID.
    #[error("invalid UUID: {0:?}")]
    InvalidUuid(String),
    /// Not a typed identity.
    #[error("invalid identity {0:?}: {1}")]
    InvalidIdentity(String, &'static str),
    /// Not a lease state name.
    #[error("unknown lease state {0:?}")]
    UnknownLeaseState(String),
    /// Not a credential version state name.
    #[error("unknown credential version state {0:?}")]
    UnknownVersionState(String),
}
