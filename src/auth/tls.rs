//! TLS on the gRPC port (`grpc.tls`) and the identity a verified client
//! certificate proves.
//!
//! The files are read and checked once at start-up ([`TlsConfig::load`]):
//! the certificate chain and key must parse and match, the client CA bundle
//! must hold at least one usable CA. The handshake itself (rustls, through
//! tonic) verifies client certificates against that CA; this module only
//! reads the identity out of a certificate that already passed.
//!
//! Identity ([`certificate_identity`]): the SPIFFE ID in the URI SAN
//! (`spiffe://…`, SPIFFE X.509-SVID: exactly one), else the first DNS SAN
//! (`x509:NAME`, lower-cased). Nothing else in a certificate (subject CN,
//! other SANs) is trusted. The kinds never collide: a DNS SAN spelled like
//! a service account is an `x509:` identity or none at all, never `k8s:`.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::{ExposeSecret as _, SecretSlice};
use serde::Deserialize;
use x509_parser::extensions::GeneralName;

use crate::domain::Identity;

/// `grpc.tls`: serve gRPC over TLS, optionally verifying client
/// certificates (mTLS).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// `grpc.tls.cert_file`: PEM certificate chain of the server, leaf
    /// first.
    pub cert_file: PathBuf,
    /// `grpc.tls.key_file`: PEM private key of the leaf (PKCS#8, PKCS#1 or
    /// SEC1). Secret: never logged.
    pub key_file: PathBuf,
    /// `grpc.tls.client_ca_file`: PEM bundle of the CAs whose client
    /// certificates are accepted. Unset: no client certificate is asked for
    /// (plain TLS; callers use API keys or service-account tokens).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// `grpc.tls.client_auth`: `required` (default when a client CA is set:
    /// the handshake fails without a certificate from the CA) or `optional`
    /// (a connection without a certificate is let through to bearer
    /// authentication, one with a certificate from another CA still fails).
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
}

/// Whether a client certificate is needed to connect at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// A connection without a client certificate is allowed; its calls
    /// need a bearer credential.
    Optional,
    /// The handshake fails without a client certificate from the CA.
    Required,
}

/// A `grpc.tls` setting the server cannot start with.
#[derive(Debug, thiserror::Error)]
#[error("grpc.tls.{setting}: {problem}")]
pub struct TlsConfigError {
    /// Setting below `grpc.tls`, e.g. `cert_file`.
    pub setting: &'static str,
    /// What is wrong (never key material).
    pub problem: String,
}

fn invalid(setting: &'static str, problem: impl Into<String>) -> TlsConfigError {
    TlsConfigError {
        setting,
        problem: problem.into(),
    }
}

/// The checked contents of the `grpc.tls` files, ready for the transport.
pub struct TlsMaterial {
    /// The server's certificate chain, PEM as read.
    pub cert_pem: Vec<u8>,
    key_pem: SecretSlice<u8>,
    /// The client CA bundle, PEM as read, when client certificates are
    /// verified.
    pub client_ca_pem: Option<Vec<u8>>,
    /// With a client CA: whether a certificate is required to connect.
    pub client_auth: Option<ClientAuth>,
}

impl TlsMaterial {
    /// The server's private key, PEM. Secret: hand it to the TLS stack
    /// only.
    pub fn key_pem(&self) -> &[u8] {
        self.key_pem.expose_secret()
    }
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Reads and checks the files: the chain parses and matches the key
    /// (rustls builds a server configuration from them), the client CA
    /// bundle holds at least one CA certificate webpki accepts, and
    /// `client_auth` is only set with a client CA.
    ///
    /// Errors name the setting: `grpc.tls.cert_file`, `grpc.tls.key_file`,
    /// `grpc.tls.client_ca_file`, `grpc.tls.client_auth`.
    pub fn load(&self) -> Result<TlsMaterial, TlsConfigError> {
        let cert_pem = read(&self.cert_file, "cert_file")?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                invalid(
                    "cert_file",
                    format!("{}: not PEM: {e}", show(&self.cert_file)),
                )
            })?;
        if chain.is_empty() {
            return Err(invalid(
                "cert_file",
                format!("{} holds no CERTIFICATE", show(&self.cert_file)),
            ));
        }
        let key_pem = SecretSlice::from(read(&self.key_file, "key_file")?);
        // The parser's error never quotes the key.
        let key = PrivateKeyDer::from_pem_slice(key_pem.expose_secret()).map_err(|e| {
            invalid(
                "key_file",
                format!("{}: no usable PEM private key ({e})", show(&self.key_file)),
            )
        })?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("cert_file", e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| {
                invalid(
                    "key_file",
                    format!(
                        "{} does not fit the certificate in {}: {e}",
                        show(&self.key_file),
                        show(&self.cert_file)
                    ),
                )
            })?;

        let client_ca_pem = match &self.client_ca_file {
            Some(path) => {
                let pem = read(path, "client_ca_file")?;
                let cas = CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| {
                        invalid("client_ca_file", format!("{}: not PEM: {e}", show(path)))
                    })?;
                let mut roots = rustls::RootCertStore::empty();
                let (added, ignored) = roots.add_parsable_certificates(cas);
                if added == 0 || ignored > 0 {
                    return Err(invalid(
                        "client_ca_file",
                        format!(
                            "{}: {added} usable CA certificate(s), {ignored} unusable; list one or more CA certificates",
                            show(path)
                        ),
                    ));
                }
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| invalid("client_ca_file", format!("{}: {e}", show(path))))?;
                Some(pem)
            }
            None => None,
        };
        let client_auth = match (&client_ca_pem, self.client_auth) {
            (Some(_), auth) => Some(auth.unwrap_or(ClientAuth::Required)),
            (None, None) => None,
            (None, Some(_)) => return Err(invalid(
                "client_auth",
                "needs grpc.tls.client_ca_file (the CAs client certificates are verified against)",
            )),
        };
        Ok(TlsMaterial {
            cert_pem,
            key_pem,
            client_ca_pem,
            client_auth,
        })
    }
}

fn show(path: &Path) -> String {
    path.display().to_string()
}

fn read(path: &Path, setting: &'static str) -> Result<Vec<u8>, TlsConfigError> {
    std::fs::read(path).map_err(|e| invalid(setting, format!("cannot read {}: {e}", show(path))))
}

/// Why a verified client certificate names no usable identity
/// (`CERTIFICATE_IDENTITY_INVALID`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CertificateIdentityError {
    /// The certificate does not parse as X.509.
    #[error("client certificate is not valid X.509")]
    Unparsable,
    /// More than one SPIFFE ID (an X.509-SVID has exactly one).
    #[error("client certificate names more than one SPIFFE ID")]
    SeveralSpiffeIds,
    /// The SPIFFE URI SAN breaks the SPIFFE ID rules.
    #[error("client certificate's SPIFFE ID is not valid: {0}")]
    InvalidSpiffeId(&'static str),
    /// The first DNS SAN is not a plain DNS name (wildcards and other
    /// characters are refused).
    #[error("client certificate's DNS name is not a plain host name")]
    InvalidDnsName,
    /// Neither a SPIFFE URI SAN nor a DNS SAN.
    #[error("client certificate names no SPIFFE ID and no DNS name")]
    NoIdentity,
}

/// The identity a verified client certificate (DER of the leaf) proves:
/// its SPIFFE URI SAN as `Identity::Spiffe`, else its first DNS SAN,
/// lower-cased, as `Identity::X509`.
///
/// SPIFFE ID rules from the SPIFFE-ID spec (section 2): scheme `spiffe`,
/// a trust domain of lower-case letters, digits, `.`, `-`, `_`, a path of
/// non-empty segments (letters, digits, `.`, `-`, `_`; not `.` or `..`),
/// no query, fragment, port or user info.
pub fn certificate_identity(der: &[u8]) -> Result<Identity, CertificateIdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|_| CertificateIdentityError::Unparsable)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| CertificateIdentityError::Unparsable)?;
    let names: &[GeneralName] = san.map(|s| s.value.general_names.as_slice()).unwrap_or(&[]);
    let spiffe: Vec<&str> = names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(uri)
                if uri
                    .get(..9)
                    .is_some_and(|s| s.eq_ignore_ascii_case("spiffe://")) =>
            {
                Some(*uri)
            }
            _ => None,
        })
        .collect();
    match spiffe.as_slice() {
        [] => {}
        [id] => return spiffe_identity(id),
        _ => return Err(CertificateIdentityError::SeveralSpiffeIds),
    }
    let dns = names.iter().find_map(|n| match n {
        GeneralName::DNSName(name) => Some(*name),
        _ => None,
    });
    match dns {
        Some(name) => {
            let name = name.to_ascii_lowercase();
            if name.is_empty()
                || !name.split('.').all(|label| {
                    !label.is_empty()
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                })
            {
                return Err(CertificateIdentityError::InvalidDnsName);
            }
            format!("x509:{name}")
                .parse()
                .map_err(|_| CertificateIdentityError::InvalidDnsName)
        }
        None => Err(CertificateIdentityError::NoIdentity),
    }
}

fn spiffe_identity(id: &str) -> Result<Identity, CertificateIdentityError> {
    let bad = CertificateIdentityError::InvalidSpiffeId;
    let rest = id
        .strip_prefix("spiffe://")
        .ok_or(bad("the scheme must be lower-case spiffe"))?;
    let (trust_domain, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if trust_domain.is_empty()
        || !trust_domain.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
    {
        return Err(bad(
            "the trust domain must be lower-case letters, digits, '.', '-' or '_'",
        ));
    }
    if !path.is_empty() {
        for segment in path[1..].split('/') {
            if segment.is_empty() || segment == "." || segment == ".." {
                return Err(bad("path segments must be non-empty and not '.' or '..'"));
            }
            if !segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            {
                return Err(bad("path segments use letters, digits, '.', '-' or '_'"));
            }
        }
    }
    match id.parse::<Identity>() {
        Ok(identity @ Identity::Spiffe(_)) => Ok(identity),
        _ => Err(bad("not a SPIFFE ID")),
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, SanType};

    use super::*;

    fn cert_with(sans: Vec<SanType>) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    fn dns(s: &str) -> SanType {
        SanType::DnsName(s.try_into().unwrap())
    }

    #[test]
    fn a_spiffe_uri_san_wins_over_dns_names() {
        let der = cert_with(vec![
            dns("agent.example.org"),
            uri("spiffe://example.org/ns/build/sa/restorer"),
        ]);
        assert_eq!(
            certificate_identity(&der),
            Ok(Identity::Spiffe(
                "spiffe://example.org/ns/build/sa/restorer".into()
            ))
        );
    }

    #[test]
    fn without_a_spiffe_id_the_first_dns_name_is_the_identity_lower_cased() {
        let der = cert_with(vec![
            uri("https://example.org/not-spiffe"),
            dns("Agent-1.Build.example.org"),
            dns("other.example.org"),
        ]);
        assert_eq!(
            certificate_identity(&der),
            Ok(Identity::X509("agent-1.build.example.org".into()))
        );
    }

    #[test]
    fn a_dns_name_spelled_like_a_service_account_is_no_identity_at_all() {
        let der = cert_with(vec![dns("system:serviceaccount:build:restorer")]);
        assert_eq!(
            certificate_identity(&der),
            Err(CertificateIdentityError::InvalidDnsName)
        );
        let der = cert_with(vec![dns("*.example.org")]);
        assert_eq!(
            certificate_identity(&der),
            Err(CertificateIdentityError::InvalidDnsName)
        );
    }

    #[test]
    fn bad_or_ambiguous_spiffe_ids_and_bare_certificates_are_refused() {
        for id in [
            "spiffe://Example.org/x",
            "spiffe://example.org/a//b",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/a?b=c",
            "spiffe://user@example.org/a",
            "spiffe:///a",
        ] {
            let der = cert_with(vec![uri(id)]);
            assert!(
                matches!(
                    certificate_identity(&der),
                    Err(CertificateIdentityError::InvalidSpiffeId(_))
                ),
                "{id}"
            );
        }
        let der = cert_with(vec![
            uri("spiffe://example.org/a"),
            uri("spiffe://example.org/b"),
        ]);
        assert_eq!(
            certificate_identity(&der),
            Err(CertificateIdentityError::SeveralSpiffeIds)
        );
        assert_eq!(
            certificate_identity(&cert_with(vec![])),
            Err(CertificateIdentityError::NoIdentity)
        );
        assert_eq!(
            certificate_identity(b"not a certificate"),
            Err(CertificateIdentityError::Unparsable)
        );
    }
}
