//! Who is calling: turns request credentials into a typed
//! [`Identity`]. TODO(api helper): API keys (issue 4); Kubernetes and mTLS
//! come later (issue 5).

mod jwks;
pub mod kubernetes;

use crate::domain::Identity;

/// An authenticated caller, as the lease rules see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Typed identity.
    pub identity: Identity,
    /// Remote socket address, when known, for the audit trail.
    pub peer: Option<String>,
}
