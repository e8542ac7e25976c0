//! Test PKI for TLS and mTLS callers: certificate authorities, a server
//! certificate for `localhost` / 127.0.0.1, and client certificates with
//! the SANs a test chooses, all made here with rcgen and written to files
//! the broker's `grpc.tls` settings name.

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use token_broker::auth::tls::{ClientAuth, TlsConfig};

/// A certificate and its private key, PEM.
pub struct Issued {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key (PKCS#8), PEM.
    pub key_pem: String,
}

impl Issued {
    /// `(certificate, key)`, as [`super::broker::TestBroker::tls_channel`]
    /// takes them.
    pub fn pair(&self) -> (&str, &str) {
        (&self.cert_pem, &self.key_pem)
    }
}

/// A certificate authority made for one test.
pub struct TestAuthority {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestAuthority {
    /// A fresh CA whose subject CN is `name`.
    pub fn new(name: &str) -> TestAuthority {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("CA certificate");
        TestAuthority {
            ca_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> Issued {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A client certificate with exactly `sans` (see [`uri`], [`dns`]).
    pub fn client(&self, sans: Vec<SanType>) -> Issued {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, "test client");
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    fn issue(&self, params: CertificateParams) -> Issued {
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// A URI SAN, such as a SPIFFE ID.
pub fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().expect("IA5 URI"))
}

/// A DNS SAN (not checked: tests put odd names in on purpose).
pub fn dns(s: &str) -> SanType {
    SanType::DnsName(s.try_into().expect("IA5 DNS name"))
}

/// The broker's `grpc.tls` files, kept in a temporary directory for as
/// long as this lives.
pub struct ServerTls {
    _dir: tempfile::TempDir,
    /// The settings naming the files.
    pub config: TlsConfig,
}

impl ServerTls {
    /// Server certificate from `server_ca`; with `client_ca`, client
    /// certificates are verified against it (`client_auth` as given, else
    /// the default, required).
    pub fn new(
        server_ca: &TestAuthority,
        client_ca: Option<&TestAuthority>,
        client_auth: Option<ClientAuth>,
    ) -> ServerTls {
        let dir = tempfile::tempdir().expect("temp dir");
        let write = |name: &str, text: &str| -> PathBuf {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write TLS file");
            path
        };
        let server = server_ca.server();
        let config = TlsConfig {
            cert_file: write("server.crt", &server.cert_pem),
            key_file: write("server.key", &server.key_pem),
            client_ca_file: client_ca.map(|ca| write("clients-ca.crt", ca.ca_pem())),
            client_auth,
        };
        ServerTls { _dir: dir, config }
    }
}
