//! A lease's PAT at rest: sealed under the keyring with the lease id as
//! associated data, opened only to hand it back or fingerprint it.

use secrecy::SecretString;

use super::{LeaseDeps, LeaseError};
use crate::crypto::Sealed;
use crate::domain::LeaseId;
use crate::store::LeaseRecord;

/// Associated data binding a sealed token to its lease row: the lease id in
/// its hyphenated text form (the row's id is the associated data, see the
/// token sealing in docs/architecture.md).
fn token_aad(id: LeaseId) -> Vec<u8> {
    crate::store::SecretOwner::Lease(id).aad()
}

/// `token` sealed for the row of lease `id`.
pub(super) fn seal_token(deps: &LeaseDeps, id: LeaseId, token: &SecretString) -> Sealed {
    deps.keyring.seal(token, &token_aad(id))
}

/// The PAT of `lease`, opened from its sealed copy.
pub(super) fn open_token(
    deps: &LeaseDeps,
    lease: &LeaseRecord,
) -> Result<SecretString, LeaseError> {
    let sealed = lease.sealed_token.as_ref().ok_or_else(|| {
        LeaseError::Internal(format!(
            "lease {} in state {} holds no token",
            lease.id, lease.state
        ))
    })?;
    Ok(deps.keyring.open(sealed, &token_aad(lease.id))?)
}

/// Keyed fingerprint of the lease's token for the audit trail, if it has one
/// that opens (an unopenable token is logged, never fatal for the audit).
pub(super) fn lease_token_fingerprint(deps: &LeaseDeps, lease: &LeaseRecord) -> Option<String> {
    lease.sealed_token.as_ref()?;
    match open_token(deps, lease) {
        Ok(token) => Some(deps.fingerprinter.fingerprint(&token)),
        Err(e) => {
            tracing::warn!(lease_id = %lease.id, error = %e, "sealed token does not open");
            None
        }
    }
}
