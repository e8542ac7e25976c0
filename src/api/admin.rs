//! `tokenbroker.v1.AdminService`: validates requests, calls the admin
//! operations of [`Leases`] (which check admin rights), converts answers.
//! Authenticated by the same layer as `LeaseService`, and a bulk revoke
//! runs to completion like LeaseService's mutating calls.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use secrecy::zeroize::Zeroizing;
use secrecy::SecretString;
use tonic::{Request, Response};

use tracing::Instrument as _;

use super::convert;
use super::credentials;
use super::filter::{self, Field, Op};
use super::service::{caller_and_message, run_to_completion, Reply, TaskFailed};
use super::status::{to_status, InvalidField};
use crate::audit::{AuditEvent, Outcome};
use crate::credential_access::CredentialAccess;
use crate::domain::{Identity, LeaseId, Scope};
use crate::leases::{AuditQuery, LeaseSelector, Leases, ListQuery, MAX_FORCE_REASON_CHARS};
use crate::proto::v1 as pb;
use crate::proto::v1::admin_service_server::AdminService;

/// Full name of the admin service, as reflection lists it.
pub const ADMIN_SERVICE_NAME: &str = "tokenbroker.v1.AdminService";

/// The tonic implementation of `AdminService`.
pub struct AdminApi {
    leases: Arc<Leases>,
    credentials: CredentialAccess,
}

impl AdminApi {
    /// Serves the admin operations of `leases` and of `credentials`.
    pub fn new(leases: Arc<Leases>, credentials: CredentialAccess) -> Self {
        AdminApi {
            leases,
            credentials,
        }
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn revoke_leases(
        &self,
        request: Request<pb::RevokeLeasesRequest>,
    ) -> Reply<pb::RevokeLeasesResponse> {
        let (caller, req) = caller_and_message(request)?;
        let selector = selector(req)?;
        // Incident response finishes even if the caller goes away: the bulk
        // revoke runs on a task of its own, not in the cancellable call.
        let done = run_to_completion(&self.leases, |l| async move {
            l.admin_revoke(&caller, selector).await
        })
        .await?;
        Ok(Response::new(pb::RevokeLeasesResponse {
            matched_count: done.matched as i64,
            revoked_count: done.revoked as i64,
            revoking_count: done.revoking as i64,
            pending_count: done.pending as i64,
            failed_count: done.failed as i64,
            not_found_names: done.not_found.iter().map(|id| id.name()).collect(),
        }))
    }

    async fn list_leases(
        &self,
        request: Request<pb::AdminListLeasesRequest>,
    ) -> Reply<pb::ListLeasesResponse> {
        let (caller, req) = caller_and_message(request)?;
        let (holder, query) = admin_list_query(req)?;
        let page = self.leases.admin_list(&caller, holder, query).await?;
        Ok(Response::new(convert::lease_page(
            page,
            convert::admin_lease,
        )))
    }

    async fn force_revoke_lease(
        &self,
        request: Request<pb::ForceRevokeLeaseRequest>,
    ) -> Reply<pb::Lease> {
        let (caller, req) = caller_and_message(request)?;
        let (id, reason) = force_revoke(req)?;
        let closed = self.leases.admin_force_revoke(&caller, id, reason).await?;
        Ok(Response::new(convert::admin_lease(&closed)))
    }

    async fn lookup_token(&self, request: Request<pb::LookupTokenRequest>) -> Reply<pb::Lease> {
        let (caller, req) = caller_and_message(request)?;
        let token = lookup_token(req)?;
        let lease = self.leases.admin_lookup_token(&caller, &token).await?;
        Ok(Response::new(convert::admin_lease(&lease)))
    }

    async fn rotate_credential(
        &self,
        request: Request<pb::RotateCredentialRequest>,
    ) -> Reply<pb::CredentialVersion> {
        let (caller, req) = caller_and_message(request)?;
        let (name, revoke_previous) = credentials::rotate_request(req)?;
        // A rotation mints upstream: it finishes even if the caller goes
        // away, on a task of its own (as run_to_completion does for leases).
        let access = self.credentials.clone();
        let rotated = tokio::spawn(
            async move { access.rotate(&caller, &name, revoke_previous).await }.in_current_span(),
        )
        .await
        .map_err(|join| to_status(&TaskFailed(join.to_string())))??;
        Ok(Response::new(credentials::version(&rotated, None)))
    }

    async fn list_credentials(
        &self,
        request: Request<pb::ListCredentialsRequest>,
    ) -> Reply<pb::ListCredentialsResponse> {
        let (caller, req) = caller_and_message(request)?;
        // Checked before the admin check and the listing: a bad page size
        // or token is the caller's mistake whoever they are.
        credentials::list_page(Vec::new(), req.page_size, &req.page_token)?;
        let versions = self.credentials.list(&caller).await?;
        Ok(Response::new(credentials::list_page(
            versions,
            req.page_size,
            &req.page_token,
        )?))
    }

    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Reply<pb::ListAuditEventsResponse> {
        let (caller, req) = caller_and_message(request)?;
        let query = audit_query(req)?;
        let page = self.leases.audit_events(&caller, query).await?;
        Ok(Response::new(pb::ListAuditEventsResponse {
            audit_events: page.events.iter().map(audit_event).collect(),
            next_page_token: page.next_page_token,
        }))
    }
}

/// Validates a RevokeLeases request (an empty one is refused by the lease
/// rules, after the admin check).
pub fn selector(req: pb::RevokeLeasesRequest) -> Result<LeaseSelector, InvalidField> {
    let holder = given(&req.holder)
        .map(|h| identity("holder", h))
        .transpose()?;
    let organization = given(&req.organization)
        .map(convert::organization)
        .transpose()?;
    let scope = given(&req.scope)
        .map(|s| {
            Scope::parse(s).map_err(|e| InvalidField::new("scope", "SCOPE_UNKNOWN", e.to_string()))
        })
        .transpose()?;
    let leases = req
        .names
        .iter()
        .map(|n| {
            convert::lease_name(n).map_err(|e| InvalidField::new("names", e.reason, e.message))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(LeaseSelector {
        holder,
        organization,
        scope,
        leases,
    })
}

/// Validates a ForceRevokeLease request: the lease id, and the operator's
/// reason (None when empty) of at most [`MAX_FORCE_REASON_CHARS`]
/// characters without control characters (it lands in the audit row, the
/// lease and the logs' neighbours, one line each).
pub fn force_revoke(
    req: pb::ForceRevokeLeaseRequest,
) -> Result<(LeaseId, Option<String>), InvalidField> {
    let id = convert::lease_name(&req.name)?;
    convert::at_most(
        "reason",
        "REASON_INVALID",
        &req.reason,
        MAX_FORCE_REASON_CHARS,
    )?;
    if req.reason.chars().any(char::is_control) {
        return Err(InvalidField::new(
            "reason",
            "REASON_INVALID",
            "must not contain control characters (newlines, tabs, ...)",
        ));
    }
    let reason = req.reason.trim();
    Ok((id, (!reason.is_empty()).then(|| reason.to_owned())))
}

/// Longest token a LookupToken request may carry, in bytes (as long as a
/// bearer credential may be; a PAT is 52 or 84 characters).
pub const MAX_LOOKUP_TOKEN_BYTES: usize = crate::auth::MAX_BEARER_BYTES;

/// Validates a LookupToken request: the token without surrounding
/// whitespace, not empty, at most [`MAX_LOOKUP_TOKEN_BYTES`]. The error
/// never quotes the token.
pub fn lookup_token(req: pb::LookupTokenRequest) -> Result<SecretString, InvalidField> {
    let text = Zeroizing::new(req.token);
    let token = text.trim();
    if token.is_empty() {
        return Err(InvalidField::new(
            "token",
            "TOKEN_INVALID",
            "is required: the PAT to look up",
        ));
    }
    if token.len() > MAX_LOOKUP_TOKEN_BYTES {
        return Err(InvalidField::new(
            "token",
            "TOKEN_INVALID",
            format!("is longer than {MAX_LOOKUP_TOKEN_BYTES} bytes"),
        ));
    }
    Ok(SecretString::from(token.to_owned()))
}

/// `value`, or None when empty (proto3's "not given").
fn given(value: &str) -> Option<&str> {
    (!value.is_empty()).then_some(value)
}

fn identity(field: &'static str, text: &str) -> Result<Identity, InvalidField> {
    text.parse::<Identity>()
        .map_err(|e| InvalidField::new(field, "IDENTITY_INVALID", e.to_string()))
}

/// Validates an AdminService.ListLeases request: the holder filter and the
/// lease query.
pub fn admin_list_query(
    req: pb::AdminListLeasesRequest,
) -> Result<(Option<Identity>, ListQuery), InvalidField> {
    let page_size = convert::page_size(req.page_size)?;
    let filter = convert::filter(&req.filter, |f| {
        convert::lease_filter(f, convert::ADMIN_LEASE_FIELDS)
    })?;
    Ok((
        filter.holder,
        ListQuery {
            page_size,
            page_token: req.page_token,
            states: filter.states,
            organization: filter.organization,
        },
    ))
}

/// What the audit listing can filter on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AuditField {
    Identity,
    Action,
    Lease,
    StartTime,
    EndTime,
}

const AUDIT_FIELDS: &[Field<AuditField>] = &[
    Field::new(AuditField::Identity, "identity", Op::Eq),
    Field::new(AuditField::Action, "action", Op::Eq),
    Field::new(AuditField::Lease, "lease", Op::Eq),
    Field::new(AuditField::StartTime, "time", Op::Ge),
    Field::new(AuditField::EndTime, "time", Op::Lt),
];

/// Validates a ListAuditEvents request.
pub fn audit_query(req: pb::ListAuditEventsRequest) -> Result<AuditQuery, InvalidField> {
    let query = AuditQuery {
        page_size: convert::page_size(req.page_size)?,
        page_token: req.page_token,
        ..AuditQuery::default()
    };
    convert::filter(&req.filter, |f| audit_filter(f, query))
}

/// `query` narrowed by the audit `filter` (see [`super::filter`]).
fn audit_filter(text: &str, mut query: AuditQuery) -> Result<AuditQuery, String> {
    for (field, value) in filter::parse(text, AUDIT_FIELDS)? {
        match field {
            AuditField::Identity => query.identity = Some(value),
            AuditField::Action => query.action = Some(value),
            AuditField::Lease => {
                // A bare uuid names a lease too.
                let name = if value.starts_with("leases/") {
                    value
                } else {
                    format!("leases/{value}")
                };
                // Not the value: it may be a pasted PAT.
                let id =
                    convert::lease_name(&name).map_err(|e| format!("the lease {}", e.message))?;
                query.lease_id = Some(id);
            }
            AuditField::StartTime => query.start_time = Some(rfc3339(&value)?),
            AuditField::EndTime => query.end_time = Some(rfc3339(&value)?),
        }
    }
    Ok(query)
}

fn rfc3339(value: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(value)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{value:?} is not an RFC 3339 time: {e}"))
}

/// An audit row as the API shows it.
pub fn audit_event(e: &AuditEvent) -> pb::AuditEvent {
    use pb::audit_event::Outcome as O;
    pb::AuditEvent {
        id: e.id,
        time: Some(convert::timestamp(e.time)),
        identity: e.identity.clone(),
        peer: e.peer.clone().unwrap_or_default(),
        action: e.action.clone(),
        outcome: match e.outcome {
            Outcome::Allowed => O::Allowed,
            Outcome::Denied => O::Denied,
            Outcome::Error => O::Error,
        } as i32,
        reason: e.reason.clone().unwrap_or_default(),
        policy_rule: e.policy_rule.clone().unwrap_or_default(),
        lease: e.lease_id.map(|l| l.name()).unwrap_or_default(),
        organization: e.organization.clone().unwrap_or_default(),
        scopes: e.scopes.clone().unwrap_or_default(),
        token_fingerprint: e.token_fingerprint.clone().unwrap_or_default(),
        caller_detail: e.caller_detail.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::convert::DEFAULT_PAGE_SIZE;
    use crate::domain::LeaseState;

    fn list(filter: &str) -> Result<(Option<Identity>, ListQuery), InvalidField> {
        admin_list_query(pb::AdminListLeasesRequest {
            filter: filter.into(),
            ..Default::default()
        })
    }

    fn audit(filter: &str) -> Result<AuditQuery, InvalidField> {
        audit_query(pb::ListAuditEventsRequest {
            filter: filter.into(),
            ..Default::default()
        })
    }

    #[test]
    fn a_pat_pasted_as_a_lease_name_is_not_repeated_in_the_error() {
        // A 52-character PAT (the older format) fits under the name limit.
        let pat = "abcdefghijklmnopqrstuvwxyz234567abcdefghijklmnopqrst";
        let e = audit(&format!("lease = \"{pat}\"")).unwrap_err();
        assert!(!e.message.contains(pat), "{}", e.message);
        let e = crate::api::convert::lease_name(&format!("leases/{pat}")).unwrap_err();
        assert!(!e.message.contains(pat), "{}", e.message);
    }

    #[test]
    fn admin_lease_filters_add_holder_to_state_and_organization() {
        let (holder, q) =
            list(r#"holder = "k8s:system:serviceaccount:ci:builder" AND state = ACTIVE"#).unwrap();
        assert_eq!(
            holder.unwrap().to_string(),
            "k8s:system:serviceaccount:ci:builder"
        );
        assert_eq!(q.states, vec![LeaseState::Active]);
        let (holder, q) = list("organization = fabrikam").unwrap();
        assert!(holder.is_none());
        assert_eq!(q.organization.unwrap().as_str(), "fabrikam");
        assert_eq!(q.page_size, DEFAULT_PAGE_SIZE);
        for bad in [
            "holder = nobody",
            "holder = apikey:a AND holder = apikey:b",
            "scope = vso.code",
            "state >= ACTIVE",
            "state = ACTIVE OR state = REVOKED",
        ] {
            let e = list(bad).unwrap_err();
            assert_eq!((e.field, e.reason), ("filter", "FILTER_INVALID"), "{bad}");
        }
    }

    #[test]
    fn an_over_long_admin_filter_is_refused_before_it_is_parsed() {
        let long = format!("identity = \"apikey:{}\"", "a".repeat(9000));
        let e = list(&long).unwrap_err();
        assert_eq!((e.field, e.reason), ("filter", "FILTER_INVALID"));
        let e = audit(&long).unwrap_err();
        assert_eq!((e.field, e.reason), ("filter", "FILTER_INVALID"));
        assert!(e.to_string().len() < 200, "{e}");
    }

    #[test]
    fn audit_filters_take_identity_action_lease_and_a_time_range() {
        let q = audit(
            r#"identity = "apikey:ci" AND action = lease.create AND time >= "2026-01-01T00:00:00Z" AND time < "2026-01-02T00:00:00+00:00""#,
        )
        .unwrap();
        assert_eq!(q.identity.as_deref(), Some("apikey:ci"));
        assert_eq!(q.action.as_deref(), Some("lease.create"));
        assert_eq!(
            q.start_time.unwrap().to_rfc3339(),
            "2026-01-01T00:00:00+00:00"
        );
        assert_eq!(
            q.end_time.unwrap().to_rfc3339(),
            "2026-01-02T00:00:00+00:00"
        );
        let id = crate::domain::LeaseId::new();
        assert_eq!(audit(&format!("lease = {id}")).unwrap().lease_id, Some(id));
        assert_eq!(
            audit(&format!("lease = \"{}\"", id.name()))
                .unwrap()
                .lease_id,
            Some(id)
        );
        for bad in [
            "time = \"2026-01-01T00:00:00Z\"",
            "time >= yesterday",
            "identity >= x",
            "holder = apikey:ci",
            "action = a AND action = b",
            "action =",
        ] {
            let e = audit(bad).unwrap_err();
            assert_eq!((e.field, e.reason), ("filter", "FILTER_INVALID"), "{bad}");
        }
    }

    #[test]
    fn a_force_revoke_names_one_lease_and_a_short_one_line_reason() {
        let id = LeaseId::new();
        let req = |name: &str, reason: &str| pb::ForceRevokeLeaseRequest {
            name: name.into(),
            reason: reason.into(),
        };
        assert_eq!(force_revoke(req(&id.name(), "")).unwrap(), (id, None));
        assert_eq!(
            force_revoke(req(&id.name(), "  INC-42: org deleted ")).unwrap(),
            (id, Some("INC-42: org deleted".to_owned()))
        );
        let e = force_revoke(req(&id.to_string(), "")).unwrap_err();
        assert_eq!((e.field, e.reason), ("name", "NAME_INVALID"));
        let long = "x".repeat(MAX_FORCE_REASON_CHARS + 1);
        for bad in [long.as_str(), "two\nlines", "tab\there"] {
            let e = force_revoke(req(&id.name(), bad)).unwrap_err();
            assert_eq!((e.field, e.reason), ("reason", "REASON_INVALID"), "{bad}");
        }
        assert!(force_revoke(req(&id.name(), &"é".repeat(MAX_FORCE_REASON_CHARS))).is_ok());
    }

    #[test]
    fn a_looked_up_token_is_trimmed_and_refused_empty_or_over_long_without_being_quoted() {
        use secrecy::ExposeSecret as _;
        let req = |token: &str| pb::LookupTokenRequest {
            token: token.into(),
        };
        let token = lookup_token(req(" \tpat-secret-value\r\n")).unwrap();
        assert_eq!(token.expose_secret(), "pat-secret-value");
        let at_limit = "p".repeat(MAX_LOOKUP_TOKEN_BYTES);
        assert!(lookup_token(req(&at_limit)).is_ok());
        let over = format!("{at_limit}q");
        for bad in ["", " \r\n", over.as_str()] {
            let e = lookup_token(req(bad)).unwrap_err();
            assert_eq!((e.field, e.reason), ("token", "TOKEN_INVALID"), "{bad:?}");
            assert!(!e.to_string().contains("pppp"), "{e}");
        }
        assert!(!format!("{:?}", req("pat-secret-value")).contains("pat-secret-value"));
    }

    #[test]
    fn bulk_revoke_selectors_name_the_bad_field() {
        let bad = |req: pb::RevokeLeasesRequest| {
            let e = selector(req).unwrap_err();
            (e.field, e.reason)
        };
        assert_eq!(
            bad(pb::RevokeLeasesRequest {
                holder: "ci".into(),
                ..Default::default()
            }),
            ("holder", "IDENTITY_INVALID")
        );
        assert_eq!(
            bad(pb::RevokeLeasesRequest {
                scope: "vso.kode".into(),
                ..Default::default()
            }),
            ("scope", "SCOPE_UNKNOWN")
        );
        assert_eq!(
            bad(pb::RevokeLeasesRequest {
                names: vec!["leases/nope".into()],
                ..Default::default()
            }),
            ("names", "NAME_INVALID")
        );
        assert!(selector(pb::RevokeLeasesRequest::default())
            .unwrap()
            .is_empty());
    }
}
