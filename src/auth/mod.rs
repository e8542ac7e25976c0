//! Who is calling: turns request credentials into a typed [`Identity`].
//!
//! Today: API keys (issue 4). Kubernetes service-account tokens and mTLS
//! client certificates come later (issue 5) as further kinds beside
//! [`ApiKeys`]. This module knows no tonic: the `api` layer hands it the
//! `authorization` header's value.

mod jwks;
pub mod kubernetes;

use crate::domain::Identity;
use crate::error::{ErrorCode, ServiceError};

mod api_key;

pub use api_key::{ApiKeyHash, ApiKeys, GeneratedApiKey, API_KEY_PREFIX};

/// An authenticated caller, as the lease rules see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Typed identity.
    pub identity: Identity,
    /// Remote socket address, when known, for the audit trail.
    pub peer: Option<String>,
}

/// Why a caller was not authenticated. Never carries the presented
/// credential, not even in part.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` header.
    #[error("missing credentials: send `authorization: Bearer <api key>`")]
    Missing,
    /// The header is not `Bearer <credential>` in printable ASCII.
    #[error("malformed authorization header: expected `Bearer <api key>`")]
    Malformed,
    /// A well-formed credential that no configured key matches.
    #[error("invalid credentials")]
    Invalid,
}

impl ServiceError for AuthError {
    fn code(&self) -> ErrorCode {
        ErrorCode::Unauthenticated
    }
    fn reason(&self) -> &'static str {
        "UNAUTHENTICATED"
    }
}

/// Authenticates callers from the value of their `authorization` header.
#[derive(Clone, Debug, Default)]
pub struct Authenticator {
    api_keys: ApiKeys,
}

impl Authenticator {
    /// An authenticator accepting the given API keys.
    pub fn new(api_keys: ApiKeys) -> Self {
        Authenticator { api_keys }
    }

    /// The identity proven by `authorization` (the header's value, `None`
    /// when absent). Scheme match is case-insensitive (RFC 9110 §11.1).
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Identity, AuthError> {
        let header = authorization.ok_or(AuthError::Missing)?;
        let header = std::str::from_utf8(header).map_err(|_| AuthError::Malformed)?;
        let (scheme, credential) = header.split_once(' ').ok_or(AuthError::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Malformed);
        }
        let credential = credential.trim();
        if credential.is_empty() || !credential.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AuthError::Malformed);
        }
        self.api_keys.verify(credential).ok_or(AuthError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authenticator_with(name: &str) -> (Authenticator, GeneratedApiKey) {
        let key = GeneratedApiKey::generate(name).unwrap();
        let keys = ApiKeys::new(vec![(name.to_owned(), key.hash.clone())]).unwrap();
        (Authenticator::new(keys), key)
    }

    #[test]
    fn a_configured_key_authenticates_as_its_named_api_key_identity() {
        let (auth, key) = authenticator_with("ci");
        let header = format!("Bearer {}", secrecy::ExposeSecret::expose_secret(&key.key));
        assert_eq!(
            auth.authenticate(Some(header.as_bytes())),
            Ok(Identity::ApiKey("ci".into()))
        );
        let lower = format!("bearer {}", secrecy::ExposeSecret::expose_secret(&key.key));
        assert!(auth.authenticate(Some(lower.as_bytes())).is_ok());
    }

    #[test]
    fn missing_malformed_and_unknown_credentials_are_refused_without_echoing_them() {
        let (auth, _) = authenticator_with("ci");
        assert_eq!(auth.authenticate(None), Err(AuthError::Missing));
        assert_eq!(
            auth.authenticate(Some(b"Basic abc")),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            auth.authenticate(Some(b"Bearer ")),
            Err(AuthError::Malformed)
        );
        let unknown = "tbk_this-key-was-never-configured";
        let err = auth
            .authenticate(Some(format!("Bearer {unknown}").as_bytes()))
            .unwrap_err();
        assert_eq!(err, AuthError::Invalid);
        assert!(!err.to_string().contains(unknown));
        assert!(!format!("{err:?}").contains(unknown));
        assert_eq!(err.reason(), "UNAUTHENTICATED");
        assert_eq!(err.code(), ErrorCode::Unauthenticated);
    }

    #[test]
    fn no_configured_keys_refuses_everyone() {
        let auth = Authenticator::default();
        assert_eq!(
            auth.authenticate(Some(b"Bearer tbk_anything")),
            Err(AuthError::Invalid)
        );
    }
}
