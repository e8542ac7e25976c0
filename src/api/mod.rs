//! The gRPC edge: `tokenbroker.v1.LeaseService` and
//! `tokenbroker.v1.AdminService` behind authentication ([`Authenticated`]),
//! plus `grpc.health.v1.Health` and server reflection (v1 and v1alpha)
//! served without authentication so stock tools work (grpcurl,
//! grpc_health_probe, grpcio's v1alpha-only client); all of it optionally
//! over TLS or mTLS (`grpc.tls`).
//!
//! This is the only module that knows tonic; [`status`] is the only place
//! errors become `tonic::Status`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{Certificate, ServerTlsConfig};
use tonic::Status;
use tonic_health::ServingStatus;
use tower::Service;

use crate::auth::tls::{ClientAuth, TlsMaterial};
use crate::auth::{Authenticator, Caller, Credentials};
use crate::error::{ErrorCode, ServiceError as _};
use crate::leases::Leases;
use crate::proto::v1::admin_service_server::AdminServiceServer;
use crate::proto::v1::lease_service_server::LeaseServiceServer;
use crate::store::Store;

pub mod admin;
pub mod convert;
pub mod filter;
mod service;
pub mod status;

pub use admin::{AdminApi, ADMIN_SERVICE_NAME};
pub use service::LeaseApi;

/// Full name of the lease service, as health checks and reflection list it.
pub const LEASE_SERVICE_NAME: &str = "tokenbroker.v1.LeaseService";

/// Longest a TLS handshake may take before its connection is dropped, so
/// idle half-open connections cannot pile up.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest header block a request may send (HTTP/2
/// `SETTINGS_MAX_HEADER_LIST_SIZE`): comfortably above the authenticator's
/// [`MAX_BEARER_BYTES`](crate::auth::MAX_BEARER_BYTES), so an oversized
/// credential reaches it and is refused as `TOKEN_MALFORMED` (and counted)
/// rather than by the transport with a bare 431.
const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;

/// How often the health reporter pings the store.
const HEALTH_PING_INTERVAL: Duration = Duration::from_secs(5);

/// Why the gRPC server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The reflection service could not be built from the descriptors.
    #[error("cannot build gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
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
    presented: Presented,
) -> Result<Caller, Status> {
    let credentials = Credentials {
        authorization: presented.authorization.as_ref().map(|v| v.as_bytes()),
        verified_client_certificate: presented
            .certificates
            .as_ref()
            .and_then(|c| c.first())
            .map(|c| c.as_ref()),
        peer: presented.peer,
    };
    auth.authenticate(credentials).await.map_err(|e| {
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
        let presented = Presented::of(&request);
        Box::pin(async move {
            match authenticate_presented(&auth, presented).await {
                Ok(caller) => {
                    request.extensions_mut().insert(caller);
                    inner.call(request).await
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

/// `LeaseService` behind authentication.
pub fn lease_service(
    leases: Arc<Leases>,
    auth: Arc<Authenticator>,
) -> Authenticated<LeaseServiceServer<LeaseApi>> {
    Authenticated::new(LeaseServiceServer::new(LeaseApi::new(leases)), auth)
}

/// The transport's TLS settings from checked `grpc.tls` files.
pub fn server_tls(material: &TlsMaterial) -> ServerTlsConfig {
    let mut tls = ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            &material.cert_pem,
            material.key_pem(),
        ))
        .timeout(TLS_HANDSHAKE_TIMEOUT);
    if let Some(ca) = &material.client_ca_pem {
        tls = tls
            .client_ca_root(Certificate::from_pem(ca))
            .client_auth_optional(material.client_auth == Some(ClientAuth::Optional));
    }
    tls
}

/// `AdminService` behind the same authentication (admin rights are
/// checked by the lease rules, per call).
pub fn admin_service(
    leases: Arc<Leases>,
    auth: Arc<Authenticator>,
) -> Authenticated<AdminServiceServer<AdminApi>> {
    Authenticated::new(AdminServiceServer::new(AdminApi::new(leases)), auth)
}

/// Serves the broker's gRPC API on `listener` until `shutdown` resolves,
/// then stops accepting and lets in-flight calls finish. With `tls`, every
/// connection is TLS (and client certificates are verified when the
/// material has a client CA); a failed handshake closes that connection
/// only.
///
/// Health (for `""` and `tokenbroker.v1.LeaseService`) is SERVING when the
/// store answers a ping, checked once before the first call is accepted and
/// then every 5 s; NOT_SERVING while the store is down.
pub async fn serve(
    listener: TcpListener,
    leases: Arc<Leases>,
    auth: Arc<Authenticator>,
    tls: Option<TlsMaterial>,
    store: Arc<dyn Store>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ApiError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    // First check before accepting calls, so the first probe sees the truth.
    let first = check_store(store.as_ref()).await;
    set_health(&reporter, first).await;
    let health_task = tokio::spawn(report_health(reporter, store, first));

    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let mut builder =
        tonic::transport::Server::builder().http2_max_header_list_size(MAX_HEADER_LIST_BYTES);
    if let Some(material) = &tls {
        builder = builder.tls_config(server_tls(material))?;
    }
    let result = builder
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(admin_service(leases.clone(), auth.clone()))
        .add_service(lease_service(leases, auth))
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await;
    health_task.abort();
    result.map_err(ApiError::from)
}

/// Accepted connections with `TCP_NODELAY`: without it each small gRPC
/// answer waits on Nagle's algorithm for the peer's delayed ACK, a fixed
/// ~40 ms per exchange (`Server::tcp_nodelay` applies only when tonic binds
/// the socket itself).
fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

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
