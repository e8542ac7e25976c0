//! `tokenbroker.v1.LeaseService`: validates requests, calls [`Leases`],
//! converts answers. The caller was authenticated by
//! [`super::Authenticated`], which left a [`Caller`] in the request
//! extensions.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use super::convert;
use super::rpc_span::{record_lease, record_organization};
use super::status::to_status;
use crate::auth::{AuthError, Caller};
use crate::error::{ErrorCode, ServiceError};
use crate::leases::{LeaseError, Leases};
use crate::proto::v1 as pb;
use crate::proto::v1::lease_service_server::LeaseService;

/// The tonic implementation of `LeaseService`.
pub struct LeaseApi {
    leases: Arc<Leases>,
}

impl LeaseApi {
    /// Serves `leases`.
    pub fn new(leases: Arc<Leases>) -> Self {
        LeaseApi { leases }
    }
}

/// A mutating lease operation that ended in a panic (its task failed to
/// join). The lease it touched is left as the store last recorded it.
#[derive(Debug, thiserror::Error)]
#[error("lease operation task failed: {0}")]
pub(super) struct TaskFailed(pub(super) String);

impl ServiceError for TaskFailed {
    fn code(&self) -> ErrorCode {
        ErrorCode::Internal
    }
    fn reason(&self) -> &'static str {
        "INTERNAL"
    }
}

/// Runs a mutating lease operation (create, renew, revoke) on its own task
/// and awaits it. tonic drops a handler's future when the client cancels
/// or its deadline passes; on a task the operation still runs to its
/// commit, so an upstream PAT is never left between mint and record.
pub(super) async fn run_to_completion<T, F, Fut>(leases: &Arc<Leases>, op: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce(Arc<Leases>) -> Fut,
    Fut: std::future::Future<Output = Result<T, LeaseError>> + Send + 'static,
{
    // The task keeps the request's span, so its logs still name the call.
    match tokio::spawn(op(Arc::clone(leases)).in_current_span()).await {
        Ok(result) => result.map_err(Status::from),
        Err(join) => Err(to_status(&TaskFailed(join.to_string()))),
    }
}

/// What a tonic handler answers.
pub(super) type Reply<T> = Result<Response<T>, Status>;

/// The caller [`super::Authenticated`] left in `request`, and its message.
pub(super) fn caller_and_message<T>(request: Request<T>) -> Result<(Caller, T), Status> {
    // Only reachable without a Caller if the service were mounted without
    // its authentication layer: refuse rather than serve anonymously.
    let caller = request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| to_status(&AuthError::Missing))?;
    Ok((caller, request.into_inner()))
}

#[tonic::async_trait]
impl LeaseService for LeaseApi {
    async fn create_lease(&self, request: Request<pb::CreateLeaseRequest>) -> Reply<pb::Lease> {
        let (caller, req) = caller_and_message(request)?;
        let req = convert::create_lease(req)?;
        record_organization(&req.organization);
        let issued = run_to_completion(
            &self.leases,
            |l| async move { l.create(&caller, req).await },
        )
        .await?;
        Ok(Response::new(convert::lease(
            &issued.lease,
            issued.token.as_ref(),
        )))
    }

    async fn get_lease(&self, request: Request<pb::GetLeaseRequest>) -> Reply<pb::Lease> {
        let (caller, req) = caller_and_message(request)?;
        let id = convert::lease_name(&req.name)?;
        record_lease(id);
        let lease = self.leases.get(&caller, id).await?;
        record_organization(&lease.organization);
        Ok(Response::new(convert::lease(&lease, None)))
    }

    async fn list_leases(
        &self,
        request: Request<pb::ListLeasesRequest>,
    ) -> Reply<pb::ListLeasesResponse> {
        let (caller, req) = caller_and_message(request)?;
        let page = self.leases.list(&caller, convert::list_query(req)?).await?;
        Ok(Response::new(convert::lease_page(page, |l| {
            convert::lease(l, None)
        })))
    }

    async fn renew_lease(&self, request: Request<pb::RenewLeaseRequest>) -> Reply<pb::Lease> {
        let (caller, req) = caller_and_message(request)?;
        let id = convert::lease_name(&req.name)?;
        record_lease(id);
        let increment = req
            .increment
            .map(|d| convert::duration("increment", d))
            .transpose()?;
        let lease = run_to_completion(&self.leases, |l| async move {
            l.renew(&caller, id, increment).await
        })
        .await?;
        record_organization(&lease.organization);
        Ok(Response::new(convert::lease(&lease, None)))
    }

    async fn revoke_lease(&self, request: Request<pb::RevokeLeaseRequest>) -> Reply<pb::Lease> {
        let (caller, req) = caller_and_message(request)?;
        let id = convert::lease_name(&req.name)?;
        record_lease(id);
        let lease =
            run_to_completion(&self.leases, |l| async move { l.revoke(&caller, id).await }).await?;
        record_organization(&lease.organization);
        Ok(Response::new(convert::lease(&lease, None)))
    }
}
