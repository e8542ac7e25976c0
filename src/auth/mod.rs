//! Who is calling: turns request credentials into a typed [`Identity`].
//!
//! One place decides ([`Authenticator::authenticate`]), by credential:
//! - `authorization: Bearer tbk_…`: an API key (`apikey:NAME`);
//! - `authorization: Bearer <JWT>`: a Kubernetes service-account token
//!   (`k8s:system:serviceaccount:NS:NAME`), when `auth.kubernetes.enabled`;
//! - no `authorization` header and a client certificate the TLS handshake
//!   verified against `grpc.tls.client_ca_file`: the certificate's SPIFFE ID
//!   (`spiffe://…`) or DNS name (`x509:…`).
//!
//! When a call carries both a bearer and a client certificate, the bearer
//! decides and the certificate is not consulted: the bearer is chosen per
//! call by the caller, while a certificate may belong to a proxy or mesh
//! sidecar shared by many workloads. A refused bearer is never rescued by
//! the certificate.
//!
//! This module knows no tonic: the `api` layer hands it the
//! `authorization` header's value and the verified certificate.

mod jwks;
pub mod kubernetes;
pub mod tls;

use crate::domain::Identity;
use crate::error::{ErrorCode, ServiceError};

mod api_key;
mod api_keys_file;

pub use api_key::{ApiKeyHash, ApiKeys, GeneratedApiKey, API_KEY_PREFIX};
pub use api_keys_file::{
    parse_api_keys_file, ApiKeysFileError, ApiKeysHandle, ApiKeysReloadOutcome,
};
pub use kubernetes::{KubernetesAuthError, KubernetesVerifier, ServiceAccountClaims};
pub use tls::CertificateIdentityError;

/// An authenticated caller, as the lease rules see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Typed identity.
    pub identity: Identity,
    /// Remote socket address, when known, for the audit trail.
    pub peer: Option<String>,
    /// For a Kubernetes service account: the pod and uid claims of its
    /// token, for the audit trail. `None` for other kinds.
    pub service_account: Option<ServiceAccountClaims>,
}

impl Caller {
    /// A caller with no service-account claims.
    pub fn new(identity: Identity, peer: Option<String>) -> Self {
        Caller {
            identity,
            peer,
            service_account: None,
        }
    }

    /// The audit row's `caller_detail`: for a service account, its token's
    /// claims as `pod=NAME pod_uid=UID sa_uid=UID jti=ID` (claims from
    /// `kubernetes.io.pod.{name,uid}`, `kubernetes.io.serviceaccount.uid`,
    /// `jti`; absent ones left out; bytes other than ASCII letters, digits
    /// and `-._:` percent-encoded, so the text always splits back on
    /// spaces). `None` for other callers or when no claim is present.
    pub fn audit_detail(&self) -> Option<String> {
        let claims = self.service_account.as_ref()?;
        let parts: Vec<String> = [
            ("pod", &claims.pod_name),
            ("pod_uid", &claims.pod_uid),
            ("sa_uid", &claims.service_account_uid),
            ("jti", &claims.token_id),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some(format!("{name}={}", detail_value(value.as_deref()?))))
        .collect();
        (!parts.is_empty()).then(|| parts.join(" "))
    }
}

/// `value` with every byte outside `[A-Za-z0-9._:-]` as `%XX`.
fn detail_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Longest `authorization` credential (the part after `Bearer `) looked at,
/// in bytes: 16 KiB. Real ones are far shorter (API keys ~50 bytes,
/// Kubernetes service-account tokens about 1 KiB). A longer header is
/// refused as [`AuthError::TooLong`] (`TOKEN_MALFORMED`) before any parsing,
/// and the Kubernetes verifier refuses a longer token by the same bound.
pub const MAX_BEARER_BYTES: usize = 16 * 1024;

/// Longest `authorization` header value looked at: `Bearer ` and
/// [`MAX_BEARER_BYTES`].
const MAX_AUTHORIZATION_BYTES: usize = "Bearer ".len() + MAX_BEARER_BYTES;

/// Why a caller was not authenticated. Never carries the presented
/// credential, not even in part.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` header and no verified client certificate.
    #[error("missing credentials: send `authorization: Bearer <API key or service-account token>` or a client certificate")]
    Missing,
    /// The header is not `Bearer <credential>` in printable ASCII.
    #[error("malformed authorization header: expected `Bearer <credential>`")]
    Malformed,
    /// The `authorization` header is longer than `Bearer ` and
    /// [`MAX_BEARER_BYTES`] (`TOKEN_MALFORMED`); refused unread.
    #[error("authorization header too long: a credential has at most 16 KiB")]
    TooLong,
    /// A well-formed credential that no configured key matches, or a
    /// service-account token while `auth.kubernetes` is disabled.
    #[error("invalid credentials")]
    Invalid,
    /// A service-account token was refused; the reason is the verifier's
    /// (`TOKEN_*`, or UNAVAILABLE `JWKS_UNAVAILABLE` /
    /// `TOKEN_REVIEW_UNAVAILABLE`).
    #[error(transparent)]
    ServiceAccount(#[from] KubernetesAuthError),
    /// A verified client certificate names no usable identity
    /// (`CERTIFICATE_IDENTITY_INVALID`).
    #[error(transparent)]
    Certificate(#[from] CertificateIdentityError),
}

impl ServiceError for AuthError {
    fn code(&self) -> ErrorCode {
        match self {
            AuthError::ServiceAccount(e) => e.code(),
            _ => ErrorCode::Unauthenticated,
        }
    }
    fn reason(&self) -> &'static str {
        match self {
            AuthError::ServiceAccount(e) => e.reason(),
            AuthError::Certificate(_) => "CERTIFICATE_IDENTITY_INVALID",
            AuthError::TooLong => "TOKEN_MALFORMED",
            AuthError::Missing | AuthError::Malformed | AuthError::Invalid => "UNAUTHENTICATED",
        }
    }
}

/// What a call presented, as the transport saw it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Credentials<'a> {
    /// The `authorization` header's value, `None` when absent.
    pub authorization: Option<&'a [u8]>,
    /// DER of the client certificate (leaf) the TLS handshake verified
    /// against `grpc.tls.client_ca_file`; `None` without one. Never pass an
    /// unverified certificate here.
    pub verified_client_certificate: Option<&'a [u8]>,
    /// Remote socket address, for the audit trail.
    pub peer: Option<std::net::SocketAddr>,
}

/// A refused authentication, as the audit trail counts it. Holds no
/// credential.
#[derive(Clone, Copy, Debug)]
pub struct Refusal<'a> {
    /// Why (its [`ServiceError::reason`] and code say how to record it:
    /// UNAUTHENTICATED is a denial, UNAVAILABLE an error).
    pub error: &'a AuthError,
    /// Remote socket address, when known.
    pub peer: Option<std::net::SocketAddr>,
}

/// Where refused authentications go for the audit trail. Called on the
/// request path for every refusal, so it must be cheap and must not wait:
/// no I/O, no database (count in memory and write later; see
/// `audit::RefusalCounter`). A refusal is answered whether or not it could
/// be recorded.
pub trait RefusalAudit: Send + Sync {
    /// Records `refusal`; never blocks, never fails.
    fn refused(&self, refusal: Refusal<'_>);
}

/// Authenticates callers (see the module doc for which credential decides).
/// Cheap to share: one per server.
#[derive(Clone, Default)]
pub struct Authenticator {
    api_keys: ApiKeysHandle,
    kubernetes: Option<KubernetesVerifier>,
    audit: Option<std::sync::Arc<dyn RefusalAudit>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("api_keys", &self.api_keys)
            .field("kubernetes", &self.kubernetes)
            .field("audited", &self.audit.is_some())
            .finish()
    }
}

impl Authenticator {
    /// An authenticator accepting the given API keys (fixed [`ApiKeys`],
    /// or an [`ApiKeysHandle`] whose reloads take effect for the next
    /// call), and no service-account tokens.
    pub fn new(api_keys: impl Into<ApiKeysHandle>) -> Self {
        Authenticator {
            api_keys: api_keys.into(),
            kubernetes: None,
            audit: None,
        }
    }

    /// Reports every refusal to `audit`.
    pub fn with_refusal_audit(mut self, audit: std::sync::Arc<dyn RefusalAudit>) -> Self {
        self.audit = Some(audit);
        self
    }

    /// Also accepts Kubernetes service-account tokens, verified by
    /// `verifier`.
    pub fn with_kubernetes(mut self, verifier: KubernetesVerifier) -> Self {
        self.kubernetes = Some(verifier);
        self
    }

    /// True when no credential of any kind can succeed through this
    /// authenticator's own settings (no API key, no service accounts; an
    /// API keys file counts as keys, as a reload may add some). Client
    /// certificates depend on the transport and are not counted.
    pub fn accepts_no_bearer(&self) -> bool {
        self.api_keys.file().is_none()
            && self.api_keys.current().is_empty()
            && self.kubernetes.is_none()
    }

    /// The caller `credentials` prove. The `authorization` scheme match is
    /// case-insensitive (RFC 9110 §11.1).
    ///
    /// Errors: [`AuthError::Missing`], `Malformed` and `Invalid` (reason
    /// `UNAUTHENTICATED`), a service-account refusal with the verifier's
    /// reason, [`AuthError::TooLong`] (`TOKEN_MALFORMED`) for a header
    /// over [`MAX_BEARER_BYTES`], or a certificate without a usable
    /// identity. Each refusal is reported to the [`RefusalAudit`], if any,
    /// before it is returned (in memory: a refusal never waits on the
    /// database).
    pub async fn authenticate(&self, credentials: Credentials<'_>) -> Result<Caller, AuthError> {
        let result = self.decide(credentials).await;
        if let (Err(error), Some(audit)) = (&result, &self.audit) {
            audit.refused(Refusal {
                error,
                peer: credentials.peer,
            });
        }
        result
    }

    async fn decide(&self, credentials: Credentials<'_>) -> Result<Caller, AuthError> {
        let peer = credentials.peer.map(|a| a.to_string());
        let Some(header) = credentials.authorization else {
            return match credentials.verified_client_certificate {
                Some(der) => Ok(Caller::new(tls::certificate_identity(der)?, peer)),
                None => Err(AuthError::Missing),
            };
        };
        // First, before any parsing: an oversized header costs nothing more.
        if header.len() > MAX_AUTHORIZATION_BYTES {
            return Err(AuthError::TooLong);
        }
        let credential = bearer(header)?;
        if credential.starts_with(API_KEY_PREFIX) {
            // The set in force now; a reload swaps it whole, never midway.
            let identity = self
                .api_keys
                .current()
                .verify(credential)
                .ok_or(AuthError::Invalid)?;
            return Ok(Caller::new(identity, peer));
        }
        if kubernetes::looks_like_jwt(credential) {
            let verifier = self.kubernetes.as_ref().ok_or(AuthError::Invalid)?;
            let account = verifier.verify(credential).await?;
            return Ok(account.caller(peer));
        }
        Err(AuthError::Invalid)
    }
}

/// The credential of a `Bearer` header, printable ASCII.
fn bearer(header: &[u8]) -> Result<&str, AuthError> {
    let header = std::str::from_utf8(header).map_err(|_| AuthError::Malformed)?;
    let (scheme, credential) = header.split_once(' ').ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Malformed);
    }
    let credential = credential.trim();
    if credential.is_empty() || !credential.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AuthError::Malformed);
    }
    Ok(credential)
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret as _;

    use super::*;

    #[test]
    fn a_service_account_callers_audit_detail_lists_its_claims_and_escapes_odd_bytes() {
        let mut caller = Caller::new(Identity::ApiKey("ci".into()), None);
        assert_eq!(caller.audit_detail(), None, "API-key callers have none");
        caller.service_account = Some(ServiceAccountClaims {
            service_account_uid: Some("u-1".into()),
            pod_name: Some("web 1=x%".into()),
            pod_uid: None,
            token_id: Some("j.1".into()),
        });
        assert_eq!(
            caller.audit_detail().as_deref(),
            Some("pod=web%201%3Dx%25 sa_uid=u-1 jti=j.1")
        );
        caller.service_account = Some(ServiceAccountClaims {
            service_account_uid: None,
            pod_name: None,
            pod_uid: None,
            token_id: None,
        });
        assert_eq!(caller.audit_detail(), None, "no claim, no detail");
    }

    fn authenticator_with(name: &str) -> (Authenticator, GeneratedApiKey) {
        let key = GeneratedApiKey::generate(name).unwrap();
        let keys = ApiKeys::new(vec![(name.to_owned(), key.hash.clone())]).unwrap();
        (Authenticator::new(keys), key)
    }

    fn header(h: &str) -> Credentials<'_> {
        Credentials {
            authorization: Some(h.as_bytes()),
            ..Default::default()
        }
    }

    fn self_signed(sans: Vec<&str>) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(sans.into_iter().map(str::to_owned).collect::<Vec<_>>())
                .unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[tokio::test]
    async fn a_configured_key_authenticates_as_its_named_api_key_identity() {
        let (auth, key) = authenticator_with("ci");
        let h = format!("Bearer {}", key.key.expose_secret());
        let caller = auth.authenticate(header(&h)).await.unwrap();
        assert_eq!(caller.identity, Identity::ApiKey("ci".into()));
        assert_eq!(caller.service_account, None);
        let lower = format!("bearer {}", key.key.expose_secret());
        assert!(auth.authenticate(header(&lower)).await.is_ok());
    }

    #[tokio::test]
    async fn missing_malformed_and_unknown_credentials_are_refused_without_echoing_them() {
        let (auth, _) = authenticator_with("ci");
        assert_eq!(
            auth.authenticate(Credentials::default()).await,
            Err(AuthError::Missing)
        );
        assert_eq!(
            auth.authenticate(header("Basic abc")).await,
            Err(AuthError::Malformed)
        );
        assert_eq!(
            auth.authenticate(header("Bearer ")).await,
            Err(AuthError::Malformed)
        );
        let unknown = "tbk_this-key-was-never-configured";
        let err = auth
            .authenticate(header(&format!("Bearer {unknown}")))
            .await
            .unwrap_err();
        assert_eq!(err, AuthError::Invalid);
        assert!(!err.to_string().contains(unknown));
        assert!(!format!("{err:?}").contains(unknown));
        assert_eq!(err.reason(), "UNAUTHENTICATED");
        assert_eq!(err.code(), ErrorCode::Unauthenticated);
    }

    #[tokio::test]
    async fn a_bearer_over_16_kib_is_malformed_before_it_is_read() {
        let (auth, _) = authenticator_with("ci");
        let at_limit = format!("Bearer tbk_{}", "a".repeat(MAX_BEARER_BYTES - 4));
        assert_eq!(
            auth.authenticate(header(&at_limit)).await,
            Err(AuthError::Invalid),
            "16 KiB exactly is read (and refused as an unknown key)"
        );
        let over = format!("Bearer tbk_{}", "a".repeat(MAX_BEARER_BYTES - 3));
        let err = auth.authenticate(header(&over)).await.unwrap_err();
        assert_eq!(err, AuthError::TooLong);
        assert_eq!(err.reason(), "TOKEN_MALFORMED");
        assert_eq!(err.code(), ErrorCode::Unauthenticated);
        // Whatever it holds: not even its scheme or encoding is looked at.
        let junk = vec![0xff_u8; MAX_AUTHORIZATION_BYTES + 1];
        let err = auth
            .authenticate(Credentials {
                authorization: Some(&junk),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err, AuthError::TooLong);
    }

    #[tokio::test]
    async fn every_refusal_is_reported_with_its_reason_and_peer() {
        #[derive(Default)]
        struct Seen(std::sync::Mutex<Vec<(&'static str, Option<std::net::SocketAddr>)>>);
        impl RefusalAudit for Seen {
            fn refused(&self, refusal: Refusal<'_>) {
                let mut seen = self.0.lock().unwrap();
                seen.push((refusal.error.reason(), refusal.peer));
            }
        }
        let seen = std::sync::Arc::new(Seen::default());
        let (auth, key) = authenticator_with("ci");
        let auth = auth.with_refusal_audit(seen.clone());
        let peer: std::net::SocketAddr = "10.1.2.3:4567".parse().unwrap();
        let ok = format!("Bearer {}", key.key.expose_secret());
        let over = format!("Bearer {}", "x".repeat(MAX_BEARER_BYTES + 1));
        for h in [ok.as_str(), "Bearer tbk_nope", over.as_str()] {
            let _ = auth
                .authenticate(Credentials {
                    authorization: Some(h.as_bytes()),
                    peer: Some(peer),
                    ..Default::default()
                })
                .await;
        }
        assert_eq!(
            *seen.0.lock().unwrap(),
            [
                ("UNAUTHENTICATED", Some(peer)),
                ("TOKEN_MALFORMED", Some(peer))
            ]
        );
    }

    #[tokio::test]
    async fn no_configured_keys_refuses_everyone() {
        let auth = Authenticator::default();
        assert!(auth.accepts_no_bearer());
        assert_eq!(
            auth.authenticate(header("Bearer tbk_anything")).await,
            Err(AuthError::Invalid)
        );
    }

    #[tokio::test]
    async fn a_service_account_token_is_invalid_while_kubernetes_auth_is_disabled() {
        let (auth, _) = authenticator_with("ci");
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln";
        assert!(kubernetes::looks_like_jwt(jwt));
        let err = auth
            .authenticate(header(&format!("Bearer {jwt}")))
            .await
            .unwrap_err();
        assert_eq!(err, AuthError::Invalid);
    }

    #[tokio::test]
    async fn a_verified_certificate_without_a_bearer_authenticates_as_its_dns_name() {
        let (auth, _) = authenticator_with("ci");
        let der = self_signed(vec!["agent.example.org"]);
        let caller = auth
            .authenticate(Credentials {
                verified_client_certificate: Some(&der),
                peer: Some("127.0.0.1:4000".parse().unwrap()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(caller.identity, Identity::X509("agent.example.org".into()));
        assert_eq!(caller.peer.as_deref(), Some("127.0.0.1:4000"));
    }

    #[tokio::test]
    async fn with_both_a_bearer_and_a_certificate_the_bearer_decides() {
        let (auth, key) = authenticator_with("ci");
        let der = self_signed(vec!["agent.example.org"]);
        let h = format!("Bearer {}", key.key.expose_secret());
        let caller = auth
            .authenticate(Credentials {
                authorization: Some(h.as_bytes()),
                verified_client_certificate: Some(&der),
                peer: None,
            })
            .await
            .unwrap();
        assert_eq!(caller.identity, Identity::ApiKey("ci".into()));
        // A bad bearer is not rescued by the certificate.
        let err = auth
            .authenticate(Credentials {
                authorization: Some(b"Bearer tbk_wrong"),
                verified_client_certificate: Some(&der),
                peer: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err, AuthError::Invalid);
    }

    #[tokio::test]
    async fn a_certificate_without_a_usable_name_is_refused_with_its_own_reason() {
        let auth = Authenticator::default();
        let der = self_signed(vec![]);
        let err = auth
            .authenticate(Credentials {
                verified_client_certificate: Some(&der),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "CERTIFICATE_IDENTITY_INVALID");
        assert_eq!(err.code(), ErrorCode::Unauthenticated);
    }
}
