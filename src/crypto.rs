//! Sealing secrets at rest with AES-256-GCM under a keyring, and keyed
//! fingerprints of tokens for the audit trail.
//!
//! TODO(crypto helper): implement. Contract:
//! - A [`Sealed`] value carries the id of the key that sealed it; its text
//!   form is `v1:<key_id>:<base64(nonce || ciphertext)>`.
//! - The associated data is the owning row's id, so a ciphertext moved to
//!   another row fails to open.
//! - Keys come from configuration or files, never the database.

use secrecy::SecretString;

/// A sealed secret: which key sealed it, the 96-bit nonce and the
/// ciphertext with its GCM tag. Its Debug shows the key id only.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Id of the keyring key that sealed it.
    pub key_id: String,
    /// Random 96-bit GCM nonce.
    pub nonce: [u8; 12],
    /// Ciphertext followed by the 16-byte tag.
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealed")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// Why a seal or open failed. Never carries key or plaintext bytes.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The ciphertext names a key the keyring does not hold.
    #[error("no key with id {0:?} in the keyring")]
    UnknownKey(String),
    /// Authentication failed: wrong key, other row, or tampered bytes.
    #[error("sealed value failed authentication")]
    Unauthentic,
    /// The stored text is not a sealed value.
    #[error("malformed sealed value: {0}")]
    Malformed(&'static str),
    /// A key in configuration is not 32 bytes of base64.
    #[error("key {0:?} is not 32 bytes of standard base64")]
    BadKey(String),
}

/// Placeholder so the skeleton compiles; replaced by the crypto helper.
pub struct Keyring;

impl Keyring {
    /// Seals `plaintext` under the active key, binding it to `aad`.
    pub fn seal(&self, _plaintext: &SecretString, _aad: &[u8]) -> Sealed {
        todo!()
    }
    /// Opens a sealed value bound to `aad`.
    pub fn open(&self, _sealed: &Sealed, _aad: &[u8]) -> Result<SecretString, CryptoError> {
        todo!()
    }
}

/// Placeholder so the lease rules compile until the crypto helper's
/// `TokenFingerprinter` lands (branch `domain`); replaced on merge.
pub struct TokenFingerprinter;

impl TokenFingerprinter {
    /// Hex HMAC-SHA256 of `token` under the fingerprint key.
    pub fn fingerprint(&self, _token: &SecretString) -> String {
        todo!()
    }
}
