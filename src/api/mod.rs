//! The gRPC edge: `tokenbroker.v1.LeaseService` and
//! `tokenbroker.v1.AdminService` behind the authentication interceptor, plus `grpc.health.v1.Health` and server reflection (v1 and
//! v1alpha) served without authentication so stock tools work
//! (grpcurl, grpc_health_probe, grpcio's v1alpha-only client).
//!
//! This is the only module that knows tonic; [`status`] is the only place
//! errors become `tonic::Status`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Status};
use tonic_health::ServingStatus;

use crate::auth::{Authenticator, Caller};
use crate::leases::Leases;
use crate::proto::v1::admin_service_server::AdminServiceServer;
use crate::proto::v1::lease_service_server::LeaseServiceServer;
use crate::store::Store;

pub mod admin;
pub mod convert;
mod service;
pub mod status;

pub use admin::{AdminApi, ADMIN_SERVICE_NAME};
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
    /// The transport failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Authenticates a call from its `authorization` metadata and leaves the
/// [`Caller`] in the request extensions. Refusals carry ErrorInfo reason
/// `UNAUTHENTICATED` and never echo the credential.
pub fn authenticate(auth: &Authenticator, mut request: Request<()>) -> Result<Request<()>, Status> {
    let header = request
        .metadata()
        .get("authorization")
        .map(|v| v.as_bytes());
    match auth.authenticate(header) {
        Ok(identity) => {
            let peer = request.remote_addr().map(|a| a.to_string());
            request.extensions_mut().insert(Caller { identity, peer });
            Ok(request)
        }
        Err(e) => {
            let peer = request.remote_addr().map(|a| a.to_string());
            tracing::info!(reason = %e, peer = peer.as_deref().unwrap_or("-"), "caller not authenticated");
            Err(status::to_status(&e))
        }
    }
}

/// The authentication interceptor in front of `LeaseService`.
#[derive(Clone)]
pub struct AuthInterceptor(Arc<Authenticator>);

impl tonic::service::Interceptor for AuthInterceptor {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        authenticate(&self.0, request)
    }
}

/// `LeaseService` wrapped in its authentication interceptor.
pub fn lease_service(
    leases: Arc<Leases>,
    auth: Arc<Authenticator>,
) -> InterceptedService<LeaseServiceServer<LeaseApi>, AuthInterceptor> {
    LeaseServiceServer::with_interceptor(LeaseApi::new(leases), AuthInterceptor(auth))
}

/// `AdminService` wrapped in the same authentication interceptor (admin
/// rights are checked by the lease rules, per call).
pub fn admin_service(
    leases: Arc<Leases>,
    auth: Arc<Authenticator>,
) -> InterceptedService<AdminServiceServer<AdminApi>, AuthInterceptor> {
    AdminServiceServer::with_interceptor(AdminApi::new(leases), AuthInterceptor(auth))
}

/// Serves the broker's gRPC API on `listener` until `shutdown` resolves,
/// then stops accepting and lets in-flight calls finish.
///
/// Health (for `""` and `tokenbroker.v1.LeaseService`) is SERVING when the
/// store answers a ping, checked once before the first call is accepted and
/// then every 5 s; NOT_SERVING while the store is down.
pub async fn serve(
    listener: TcpListener,
    leases: Arc<Leases>,
    auth: Arc<Authenticator>,
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

    let result = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(admin_service(leases.clone(), auth.clone()))
        .add_service(lease_service(leases, auth))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    health_task.abort();
    result.map_err(ApiError::from)
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
