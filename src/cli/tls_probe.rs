//! Why an mTLS broker closed a connection under a call. With TLS 1.3 the
//! broker judges the client's certificate after the client's handshake has
//! ended, so its refusal (an alert) reaches a client that is already
//! sending its request; hyper then reports only "connection closed", which
//! looks like "retry later". One more handshake, made only after such a
//! failure and sending no request and no credential, tells a refusal
//! (exit 3) from a lost connection (exit 5).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};
use secrecy::zeroize::Zeroizing;
use tokio::io::AsyncReadExt as _;

use super::grpc::{endpoint_url, read_pem, tls_failure, ClientArgs, ClientError};

/// Budget for the probe's connection and handshake.
const PROBE_CONNECT: Duration = Duration::from_secs(5);

/// How long the probe waits for the broker's verdict after its handshake.
const PROBE_VERDICT: Duration = Duration::from_secs(2);

/// `e` as [`ClientError::Tls`] when it is a connection lost under a call
/// to an `https://` broker and a probe shows the broker refuses this
/// client's certificate (or wants one and none was given); else `e`.
pub async fn diagnose(args: &ClientArgs, e: ClientError) -> ClientError {
    if !matches!(e, ClientError::Lost(_)) || !endpoint_url(&args.addr).starts_with("https://") {
        return e;
    }
    match probe(args).await {
        Some(refusal) => ClientError::Tls(refusal),
        None => e,
    }
}

/// The broker's refusal of this client's certificate, if it refuses it.
async fn probe(args: &ClientArgs) -> Option<String> {
    let uri: tonic::codegen::http::Uri = endpoint_url(&args.addr).parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(443);
    let roots = roots(args)?;
    let identity = identity(args);
    let given = identity.is_some();
    let resolver = Arc::new(Recorder {
        requested: AtomicBool::new(false),
        identity,
    });
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .ok()?
            .with_root_certificates(roots)
            .with_client_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = ServerName::try_from(host.to_owned()).ok()?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect((host, port)).await?;
        connector.connect(name, tcp).await
    };
    let mut tls = match tokio::time::timeout(PROBE_CONNECT, handshake).await.ok()? {
        Ok(tls) => tls,
        // Refused within the handshake (TLS 1.2), or not TLS trouble.
        Err(e) => return tls_failure(&e),
    };
    // TLS 1.3: the verdict on our certificate comes now, as an alert, or
    // not at all (the broker waits for a request that never comes).
    let mut byte = [0u8; 1];
    if let Ok(Err(e)) = tokio::time::timeout(PROBE_VERDICT, tls.read(&mut byte)).await {
        if let Some(refusal) = tls_failure(&e) {
            return Some(refusal);
        }
    }
    (resolver.requested.load(Ordering::SeqCst) && !given)
        .then(|| "the broker requires a client certificate (mTLS) and none was given".to_owned())
}

/// The roots the call trusted: `--ca-file`, else the system's.
fn roots(args: &ClientArgs) -> Option<RootCertStore> {
    let mut roots = RootCertStore::empty();
    match &args.ca_file {
        Some(path) => {
            let pem = read_pem("--ca-file", path).ok()?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                roots.add(cert.ok()?).ok()?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    Some(roots)
}

/// The client certificate the call presented, if any (its files were
/// checked before the call).
fn identity(args: &ClientArgs) -> Option<Arc<CertifiedKey>> {
    let cert_pem = read_pem("--client-cert-file", args.client_cert_file.as_ref()?).ok()?;
    let key_pem =
        Zeroizing::new(read_pem("--client-key-file", args.client_key_file.as_ref()?).ok()?);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .ok()?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).ok()?;
    let key = rustls::crypto::ring::sign::any_supported_type(&key).ok()?;
    Some(Arc::new(CertifiedKey::new(chain, key)))
}

/// Answers the broker's certificate request with the call's certificate
/// (or none), remembering that it asked.
#[derive(Debug)]
struct Recorder {
    requested: AtomicBool,
    identity: Option<Arc<CertifiedKey>>,
}

impl ResolvesClientCert for Recorder {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.requested.store(true, Ordering::SeqCst);
        self.identity.clone()
    }

    fn has_certs(&self) -> bool {
        // Always asked, so a request is recorded even without a certificate.
        true
    }
}
