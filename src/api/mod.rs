//! The gRPC edge: `tokenbroker.v1.LeaseService`,
//! `tokenbroker.v1.CredentialService` and `tokenbroker.v1.AdminService`
//! behind authentication ([`Authenticated`]),
//! plus `grpc.health.v1.Health` and server reflection (v1 and v1alpha)
//! served without authentication so stock tools work (grpcurl,
//! grpc_health_probe, grpcio's v1alpha-only client); all of it optionally
//! over TLS or mTLS (`grpc.tls`).
//!
//! This is the only module that knows tonic; [`status`] is the only place
//! errors become `tonic::Status`. [`transport`] accepts and serves the
//! connections, within the `[grpc]` connection limits.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;
use tonic_health::ServingStatus;
use tower::Service;

use crate::auth::tls::{ClientAuth, TlsMaterial};
use crate::auth::{Authenticator, Caller, Credentials};
use crate::config::GrpcConfig;
use crate::credential_access::CredentialAccess;
use crate::error::{ErrorCode, ServiceError as _};
use crate::leases::Leases;
use crate::proto::v1::admin_service_server::AdminServiceServer;
use crate::proto::v1::credential_service_server::CredentialServiceServer;
use crate::proto::v1::lease_service_server::LeaseServiceServer;
use crate::store::Store;

pub mod admin;
pub mod codec;
pub mod convert;
pub mod credentials;
pub mod filter;
pub mod observe;
pub mod rpc_span;
mod service;
pub mod status;
pub mod transport;

pub use admin::{AdminApi, ADMIN_SERVICE_NAME};
pub use credentials::{CredentialApi, CREDENTIAL_SERVICE_NAME};
pub use service::LeaseApi;

/// Full name of the lease service, as health checks and reflection list it.
pub const LEASE_SERVICE_NAME: &str = "tokenbroker.v1.LeaseService";

/// How often the health reporter pings the store.
const HEALTH_PING_INTERVAL: Duration = Duration::from_secs(5);

/// Why the gRPC server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The reflection service could not be built from the descriptors.
    #[error("cannot build gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The TLS configuration could not be built from the `grpc.tls` files.
    #[error("grpc.tls: {0}")]
    Tls(String),
}

/// What one call presented, copied out of its request so that the request
/// itself is not held across the (asynchronous) authentication.
struct Presented {
    authorization: Option<http::HeaderValue>,
    /// The chain rustls verified against the client CA (leaf first).
    certificates: Option<Arc<Vec<CertificateDer<'static>>>>,
    peer: Option<SocketAddr>,
}

impl Presented {
    fn of<B>(request: &http::Request<B>) -> Presented {
        let tls = request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>();
        let peer = tls.and_then(|i| i.get_ref().remote_addr()).or_else(|| {
            request
                .extensions()
                .get::<TcpConnectInfo>()
                .and_then(TcpConnectInfo::remote_addr)
        });
        Presented {
            authorization: request.headers().get(http::header::AUTHORIZATION).cloned(),
            // rustls only hands out a chain it verified against the client CA.
            certificates: tls.and_then(TlsConnectInfo::peer_certs),
            peer,
        }
    }
}

/// Authenticates one call from its `authorization` header and the client
/// certificate its TLS connection verified (see [`crate::auth`] for which
/// decides). Refusals carry the error's stable reason, never the credential.
async fn authenticate_presented(
    auth: &Authenticator,
    presented: &Presented,
) -> Result<Caller, Status> {
    authenticate_again(auth, presented).await.map_err(|e| {
        // DEBUG, not INFO: a flood of refusals must not become a flood of
        // log lines; they are counted and audited aggregated.
        if e.code() == ErrorCode::Unauthenticated {
            let peer = presented.peer.map(|a| a.to_string());
            tracing::debug!(
                reason = e.reason(),
                error = %e,
                peer = peer.as_deref().unwrap_or("-"),
                "caller not authenticated"
            );
        }
        status::to_status(&e)
    })
}

/// [`Authenticator::authenticate`] of what `presented` holds.
async fn authenticate_again(
    auth: &Authenticator,
    presented: &Presented,
) -> Result<Caller, crate::auth::AuthError> {
    let credentials = Credentials {
        authorization: presented.authorization.as_ref().map(|v| v.as_bytes()),
        verified_client_certificate: presented
            .certificates
            .as_ref()
            .and_then(|c| c.first())
            .map(|c| c.as_ref()),
        peer: presented.peer,
    };
    auth.authenticate(credentials).await
}

/// What an authenticated call presented, kept so that a long call (a
/// server stream) can prove its caller again later, by the same rules as
/// at its start ([`Reauthenticate::caller`]): a service-account token
/// that has expired since, or an API key removed from the keys file, is
/// then refused. [`Authenticated`] leaves one in every call's extensions.
/// Holds the call's bearer credential in memory for the call's life; it is
/// never logged (`Debug` shows none of it).
#[derive(Clone)]
pub struct Reauthenticate {
    auth: Arc<Authenticator>,
    presented: Arc<Presented>,
}

impl std::fmt::Debug for Reauthenticate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reauthenticate")
            .field("peer", &self.presented.peer)
            .finish_non_exhaustive()
    }
}

impl Reauthenticate {
    /// The caller the call's credentials prove now.
    ///
    /// Errors: as [`Authenticator::authenticate`] (e.g. `TOKEN_EXPIRED`
    /// for a service-account token past its `exp` and the leeway); a
    /// refusal is counted with the other refused authentications.
    pub async fn caller(&self) -> Result<Caller, crate::auth::AuthError> {
        authenticate_again(&self.auth, &self.presented).await
    }
}

/// A gRPC service behind authentication: each call is authenticated
/// (asynchronously: a service-account token may need its cluster's keys)
/// before `S` sees it, and `S` finds the [`Caller`] in the request
/// extensions. A refused call never reaches `S`.
#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

impl<S> Authenticated<S> {
    /// `inner` behind `auth`.
    pub fn new(inner: S, auth: Arc<Authenticator>) -> Self {
        Authenticated { inner, auth }
    }
}

impl<S: NamedService> NamedService for Authenticated<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Authenticated<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // The clone that was polled ready serves this call (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        let presented = Arc::new(Presented::of(&request));
        Box::pin(async move {
            match authenticate_presented(&auth, &presented).await {
                Ok(caller) => {
                    rpc_span::record_caller(&caller.identity);
                    // For the access log (observe::Observed).
                    if let Some(slot) = request.extensions().get::<observe::CallerSlot>() {
                        slot.fill(&caller);
                    }
                    request.extensions_mut().insert(caller);
                    request
                        .extensions_mut()
                        .insert(Reauthenticate { auth, presented });
                    inner.call(request).await
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

/// `LeaseService` behind authentication; request messages larger than
/// `max_request_size` bytes are refused OUT_OF_RANGE (tonic's answer).
pub fn lease_service(
    leases: Arc<Leases>,
    auth: Arc<Authenticator>,
    max_request_size: usize,
) -> Authenticated<LeaseServiceServer<LeaseApi>> {
    Authenticated::new(
        LeaseServiceServer::new(LeaseApi::new(leases)).max_decoding_message_size(max_request_size),
        auth,
    )
}

/// The server's TLS configuration from checked `grpc.tls` files: its
/// certificate chain and key, ALPN `h2`, and with a client CA the client
/// certificate verifier (a certificate required, or optional with
/// `client_auth = "optional"`); TLS 1.2 and 1.3 with ring.
pub fn server_tls(material: &TlsMaterial) -> Result<Arc<rustls::ServerConfig>, ApiError> {
    let tls_error = |e: &dyn std::fmt::Display| ApiError::Tls(e.to_string());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = CertificateDer::pem_slice_iter(&material.cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error(&e))?;
    // The parser's error never quotes the key.
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(material.key_pem())
        .map_err(|e| tls_error(&e))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(&e))?;
    let builder = match &material.client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca) {
                roots
                    .add(cert.map_err(|e| tls_error(&e))?)
                    .map_err(|e| tls_error(&e))?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider);
            let verifier = if material.client_auth == Some(ClientAuth::Optional) {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| tls_error(&e))?)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| tls_error(&e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// `AdminService` behind the same authentication (admin rights are
/// checked by the lease and credential rules, per call); request messages
/// larger than `max_request_size` bytes are refused OUT_OF_RANGE (tonic's
/// answer).
pub fn admin_service(
    leases: Arc<Leases>,
    credentials: CredentialAccess,
    auth: Arc<Authenticator>,
    max_request_size: usize,
) -> Authenticated<AdminServiceServer<AdminApi>> {
    Authenticated::new(
        AdminServiceServer::new(AdminApi::new(leases, credentials))
            .max_decoding_message_size(max_request_size),
        auth,
    )
}

/// `CredentialService` behind the same authentication (readers are
/// checked by the credential rules, per call and per version streamed);
/// request messages larger than `max_request_size` bytes are refused
/// OUT_OF_RANGE (tonic's answer).
pub fn credential_service(
    credentials: CredentialAccess,
    auth: Arc<Authenticator>,
    max_request_size: usize,
    stopping: tokio::sync::watch::Receiver<bool>,
) -> Authenticated<CredentialServiceServer<CredentialApi>> {
    Authenticated::new(
        CredentialServiceServer::new(CredentialApi::new(credentials, stopping))
            .max_decoding_message_size(max_request_size),
        auth,
    )
}

/// Serves the broker's gRPC API on `listener` until `shutdown` resolves,
/// then stops accepting and lets in-flight calls finish. With `tls`, every
/// connection is TLS (and client certificates are verified when the
/// material has a client CA); a failed handshake closes that connection
/// only. `grpc`'s connection limits apply ([`transport`]), and its
/// `max_request_size` to every service.
///
/// Every call runs in its span, is counted in `rpc_metrics` and is
/// access-logged ([`observe`]).
///
/// Health (for `""` and each tokenbroker service) is SERVING when the
/// store answers a ping, checked once before the first call is accepted and
/// then every 5 s; NOT_SERVING while the store is down.
// Each argument is a separate part the composition root builds.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    listener: TcpListener,
    leases: Arc<Leases>,
    credentials: CredentialAccess,
    auth: Arc<Authenticator>,
    tls: Option<TlsMaterial>,
    grpc: GrpcConfig,
    store: Arc<dyn Store>,
    rpc_metrics: Arc<observe::RpcMetrics>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ApiError> {
    let tls = tls.as_ref().map(server_tls).transpose()?;
    // Watch streams never end by themselves: at shutdown they are told to
    // (UNAVAILABLE), so the transport's wait for open calls is short.
    let (stop_streams, stopping) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = stop_streams.send(true);
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let (reporter, health) = tonic_health::server::health_reporter();
    // First check before accepting calls, so the first probe sees the truth.
    let first = check_store(store.as_ref()).await;
    set_health(&reporter, first).await;
    let health_task = tokio::spawn(report_health(reporter, store, first));

    let limit = grpc.max_request_size;
    let routes = tonic::service::Routes::new(health.max_decoding_message_size(limit))
        .add_service(reflection_v1.max_decoding_message_size(limit))
        .add_service(reflection_v1alpha.max_decoding_message_size(limit))
        .add_service(admin_service(
            leases.clone(),
            credentials.clone(),
            auth.clone(),
            limit,
        ))
        .add_service(credential_service(
            credentials,
            auth.clone(),
            limit,
            stopping,
        ))
        .add_service(lease_service(leases, auth, limit))
        .prepare();
    transport::serve(
        listener,
        // Every call: its span, metrics and access log (one layer, outermost).
        observe::Observed::new(routes, rpc_metrics),
        tls,
        transport::ConnectionLimits::from(&grpc),
        shutdown,
    )
    .await;
    health_task.abort();
    Ok(())
}

/// The encoded file descriptor sets of every service [`serve`] serves
/// (for the labels of [`observe::RpcMetrics`]).
pub const SERVED_DESCRIPTOR_SETS: [&[u8]; 4] = [
    crate::proto::v1::FILE_DESCRIPTOR_SET,
    tonic_health::pb::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
];

fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

async fn check_store(store: &dyn Store) -> ServingStatus {
    match store.ping().await {
        Ok(()) => ServingStatus::Serving,
        Err(e) => {
            tracing::warn!(error = %e, "store ping failed; health is NOT_SERVING");
            ServingStatus::NotServing
        }
    }
}

async fn set_health(reporter: &tonic_health::server::HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter
        .set_service_status(LEASE_SERVICE_NAME, status)
        .await;
    reporter
        .set_service_status(ADMIN_SERVICE_NAME, status)
        .await;
    reporter
        .set_service_status(CREDENTIAL_SERVICE_NAME, status)
        .await;
}

async fn report_health(
    reporter: tonic_health::server::HealthReporter,
    store: Arc<dyn Store>,
    mut last: ServingStatus,
) {
    loop {
        tokio::time::sleep(HEALTH_PING_INTERVAL).await;
        let status = check_store(store.as_ref()).await;
        if status != last {
            set_health(&reporter, status).await;
            last = status;
        }
    }
}
