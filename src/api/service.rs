//! `tokenbroker.v1.LeaseService`: validates requests, calls [`Leases`],
//! converts answers. The caller was authenticated by
//! [`super::Authenticated`], which left a [`Caller`] in the request
//! extensions.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert;
use super::status::to_status;
use crate::auth::{AuthError, Caller};
use crate::leases::Leases;
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

fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    // Only reachable without a Caller if the service were mounted without
    // its authentication layer: refuse rather than serve anonymously.
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| to_status(&AuthError::Missing))
}

#[tonic::async_trait]
impl LeaseService for LeaseApi {
    async fn create_lease(
        &self,
        request: Request<pb::CreateLeaseRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let caller = caller(&request)?;
        let req = convert::create_lease(request.into_inner())?;
        let issued = self
            .leases
            .create(&caller, req)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(convert::lease(
            &issued.lease,
            Some(&issued.token),
        )))
    }

    async fn get_lease(
        &self,
        request: Request<pb::GetLeaseRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let caller = caller(&request)?;
        let id = convert::lease_name(&request.get_ref().name)?;
        let lease = self
            .leases
            .get(&caller, id)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(convert::lease(&lease, None)))
    }

    async fn list_leases(
        &self,
        request: Request<pb::ListLeasesRequest>,
    ) -> Result<Response<pb::ListLeasesResponse>, Status> {
        let caller = caller(&request)?;
        let query = convert::list_query(request.into_inner())?;
        let page = self
            .leases
            .list(&caller, query)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::ListLeasesResponse {
            leases: page
                .leases
                .iter()
                .map(|l| convert::lease(l, None))
                .collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn renew_lease(
        &self,
        request: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let id = convert::lease_name(&req.name)?;
        let increment = req
            .increment
            .map(|d| convert::duration("increment", d))
            .transpose()?;
        let lease = self
            .leases
            .renew(&caller, id, increment)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(convert::lease(&lease, None)))
    }

    async fn revoke_lease(
        &self,
        request: Request<pb::RevokeLeaseRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let caller = caller(&request)?;
        let id = convert::lease_name(&request.get_ref().name)?;
        let lease = self
            .leases
            .revoke(&caller, id)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(convert::lease(&lease, None)))
    }
}
