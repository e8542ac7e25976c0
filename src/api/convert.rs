//! Proto messages <-> validated domain types. Every check names the proto
//! field it concerns (AIP-193 `BadRequest.FieldViolation.field`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret as _, SecretString};
use uuid::Uuid;

use super::filter::{self, Field, Op};
use super::status::InvalidField;
use crate::domain::{DomainError, Identity, LeaseId, LeaseState, Organization, ScopeSet};
use crate::leases::{CreateLease, LeasePage, ListQuery};
use crate::proto::v1 as pb;
use crate::store::LeaseRecord;

/// Upstream's longest PAT lifetime, one year (docs/upstream-api.md,
/// Maximum lifetime): the largest `ttl` or `increment` accepted.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// `page_size` used when the request leaves it 0 (AIP-158).
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Larger `page_size` values are coerced to this (AIP-158).
pub const MAX_PAGE_SIZE: u32 = 1000;

/// Longest organization name Azure DevOps allows, in characters.
pub const MAX_ORGANIZATION_CHARS: usize = 50;
/// Longer than any scope (docs/upstream-api.md, Scope catalogue and
/// inclusion).
pub const MAX_SCOPE_CHARS: usize = 64;
/// A `request_id` is a UUID in its canonical hyphenated form (RFC 9562).
pub const REQUEST_ID_CHARS: usize = 36;
/// `leases/` plus a hyphenated UUID is 43; anything past 64 is not a name.
pub const MAX_NAME_CHARS: usize = 64;
/// Longest `filter` of any listing, in characters.
pub const MAX_FILTER_CHARS: usize = 1024;

/// Refuses a value longer than `max` characters before anything parses or
/// echoes it.
pub(super) fn at_most(
    field: &'static str,
    reason: &'static str,
    value: &str,
    max: usize,
) -> Result<(), InvalidField> {
    let len = value.chars().count();
    if len > max {
        return Err(InvalidField::new(
            field,
            reason,
            format!("is {len} characters long; at most {max} are allowed"),
        ));
    }
    Ok(())
}

/// Validates a CreateLease request.
pub fn create_lease(req: pb::CreateLeaseRequest) -> Result<CreateLease, InvalidField> {
    let organization = organization(&req.organization)?;
    for scope in &req.scopes {
        at_most("scopes", "SCOPE_UNKNOWN", scope, MAX_SCOPE_CHARS)?;
    }
    let scopes = ScopeSet::parse(&req.scopes).map_err(|e| match e {
        DomainError::NoScopes => {
            InvalidField::new("scopes", "SCOPES_EMPTY", "at least one scope is required")
        }
        other => InvalidField::new("scopes", "SCOPE_UNKNOWN", other.to_string()),
    })?;
    let ttl = req.ttl.map(|d| duration("ttl", d)).transpose()?;
    let request_id = if req.request_id.is_empty() {
        None
    } else {
        Some(request_id(&req.request_id)?)
    };
    Ok(CreateLease {
        organization,
        scopes,
        ttl,
        request_id,
    })
}

/// Parses a `request_id`: a UUID in the canonical hyphenated form
/// `8-4-4-4-12` hex digits (RFC 9562 section 4), any case, answered in
/// lower case; the nil UUID is refused (it is nobody's unique id).
pub fn request_id(value: &str) -> Result<Uuid, InvalidField> {
    let bad = |m: &str| InvalidField::new("request_id", "REQUEST_ID_INVALID", m.to_owned());
    let canonical = value.len() == REQUEST_ID_CHARS
        && value.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    if !canonical {
        return Err(bad(
            "must be a UUID in the hyphenated form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx",
        ));
    }
    let id = Uuid::parse_str(value).map_err(|_| bad("is not a UUID"))?;
    if id.is_nil() {
        return Err(bad("must not be the nil UUID"));
    }
    Ok(id)
}

/// Validates an organization name (field `organization`).
pub fn organization(name: &str) -> Result<Organization, InvalidField> {
    if name.is_empty() {
        return Err(InvalidField::new(
            "organization",
            "ORGANIZATION_INVALID",
            "is required",
        ));
    }
    at_most(
        "organization",
        "ORGANIZATION_INVALID",
        name,
        MAX_ORGANIZATION_CHARS,
    )?;
    Organization::parse(name)
        .map_err(|e| InvalidField::new("organization", "ORGANIZATION_INVALID", e.to_string()))
}

/// Validates a resource name `leases/{uuid}` (field `name`). The error does
/// not repeat the value: a caller who pasted a PAT where the name goes
/// would get it back in an error, and into logs.
pub fn lease_name(name: &str) -> Result<LeaseId, InvalidField> {
    at_most("name", "NAME_INVALID", name, MAX_NAME_CHARS)?;
    LeaseId::from_name(name).map_err(|_| {
        InvalidField::new(
            "name",
            "NAME_INVALID",
            "is not a lease name; expected leases/{uuid}",
        )
    })
}

/// Converts a `google.protobuf.Duration` that must be at least 1 s and at most
/// [`MAX_TTL`] (field `field`).
pub fn duration(field: &'static str, d: prost_types::Duration) -> Result<Duration, InvalidField> {
    let bad = |m: &str| InvalidField::new(field, "TTL_OUT_OF_RANGE", m.to_owned());
    if !(-999_999_999..=999_999_999).contains(&d.nanos)
        || (d.seconds > 0 && d.nanos < 0)
        || (d.seconds < 0 && d.nanos > 0)
    {
        return Err(bad("is not a valid google.protobuf.Duration"));
    }
    if d.seconds < 1 {
        // Upstream validTo has whole seconds; less than 1 s is no lease.
        return Err(bad("must be at least 1s"));
    }
    let out = Duration::new(d.seconds as u64, d.nanos as u32);
    if out > MAX_TTL {
        return Err(bad(
            "must be at most one year (365 days), the upstream PAT limit",
        ));
    }
    Ok(out)
}

/// A `page_size` (AIP-158): 0 means [`DEFAULT_PAGE_SIZE`], larger than
/// [`MAX_PAGE_SIZE`] means that, negative is refused.
pub(super) fn page_size(n: i32) -> Result<u32, InvalidField> {
    match n {
        n if n < 0 => Err(InvalidField::new(
            "page_size",
            "PAGE_SIZE_INVALID",
            "must not be negative",
        )),
        0 => Ok(DEFAULT_PAGE_SIZE),
        n => Ok((n as u32).min(MAX_PAGE_SIZE)),
    }
}

/// A listing's `filter` read by `parse`: FILTER_INVALID when longer than
/// [`MAX_FILTER_CHARS`] (before anything parses it) or when `parse` refuses.
pub(super) fn filter<T>(
    text: &str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, InvalidField> {
    at_most("filter", "FILTER_INVALID", text, MAX_FILTER_CHARS)?;
    parse(text).map_err(|m| InvalidField::new("filter", "FILTER_INVALID", m))
}

/// Validates a ListLeases request.
pub fn list_query(req: pb::ListLeasesRequest) -> Result<ListQuery, InvalidField> {
    let page_size = page_size(req.page_size)?;
    let (states, organization) = filter(&req.filter, parse_filter)?;
    Ok(ListQuery {
        page_size,
        page_token: req.page_token,
        states,
        organization,
    })
}

/// What a lease listing can filter on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LeaseField {
    Holder,
    State,
    Organization,
}

/// ListLeases' filter fields: the caller's own leases by state and
/// organization.
const LEASE_FIELDS: &[Field<LeaseField>] = &[STATE, ORGANIZATION];
/// AdminService.ListLeases' filter fields: those and the holder.
pub(super) const ADMIN_LEASE_FIELDS: &[Field<LeaseField>] = &[
    Field::new(LeaseField::Holder, "holder", Op::Eq),
    STATE,
    ORGANIZATION,
];
const STATE: Field<LeaseField> = Field::new(LeaseField::State, "state", Op::Eq);
const ORGANIZATION: Field<LeaseField> =
    Field::new(LeaseField::Organization, "organization", Op::Eq);

/// A parsed lease filter.
#[derive(Debug, Default, PartialEq)]
pub(super) struct ListFilter {
    pub holder: Option<Identity>,
    pub states: Vec<LeaseState>,
    pub organization: Option<Organization>,
}

/// Parses a lease listing's filter over `fields` (see [`super::filter`]).
pub(super) fn lease_filter(text: &str, fields: &[Field<LeaseField>]) -> Result<ListFilter, String> {
    let mut out = ListFilter::default();
    for (field, value) in filter::parse(text, fields)? {
        match field {
            LeaseField::Holder => {
                out.holder = Some(value.parse::<Identity>().map_err(|e| e.to_string())?)
            }
            LeaseField::State => out.states.push(
                value
                    .parse::<LeaseState>()
                    .map_err(|_| format!("unknown state {value:?}"))?,
            ),
            LeaseField::Organization => {
                out.organization = Some(Organization::parse(&value).map_err(|e| e.to_string())?)
            }
        }
    }
    Ok(out)
}

/// Parses ListLeases' filter: comparisons `state = ACTIVE` and
/// `organization = "fabrikam"` joined by `AND`, each field at most once.
/// Empty: no filter.
pub fn parse_filter(text: &str) -> Result<(Vec<LeaseState>, Option<Organization>), String> {
    let f = lease_filter(text, LEASE_FIELDS)?;
    Ok((f.states, f.organization))
}

pub(super) fn timestamp(t: impl Into<DateTime<Utc>>) -> prost_types::Timestamp {
    let t = t.into();
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// The proto state of a lease.
pub fn state(s: LeaseState) -> pb::lease::State {
    use pb::lease::State;
    match s {
        LeaseState::Pending => State::Pending,
        LeaseState::Active => State::Active,
        LeaseState::Revoking => State::Revoking,
        LeaseState::Revoked => State::Revoked,
        LeaseState::Expired => State::Expired,
        LeaseState::Failed => State::Failed,
        LeaseState::RevokeFailed => State::RevokeFailed,
    }
}

/// A lease record as the API shows it. `token` is set only for CreateLease.
pub fn lease(record: &LeaseRecord, token: Option<&SecretString>) -> pb::Lease {
    pb::Lease {
        name: record.id.name(),
        organization: record.organization.to_string(),
        scopes: record.scopes.to_strings(),
        holder: record.holder.to_string(),
        state: state(record.state) as i32,
        create_time: Some(timestamp(record.create_time)),
        expire_time: Some(timestamp(record.expire_time)),
        max_expire_time: Some(timestamp(record.max_expire_time)),
        revoke_time: record.revoke_time.map(timestamp),
        renewable: record.state == LeaseState::Active
            && record.expire_time < record.max_expire_time,
        display_name: record.display_name.clone(),
        authorization_id: record
            .authorization_id
            .map(|a| a.to_string())
            .unwrap_or_default(),
        token: token
            .map(|t| t.expose_secret().to_owned())
            .unwrap_or_default(),
        // The operator's view: see `admin_lease`.
        revocation_attempts: 0,
        last_error: String::new(),
        next_attempt_time: None,
        pat_expire_time: None,
    }
}

/// A page of leases as the API shows it, each lease by `show`.
pub fn lease_page(
    page: LeasePage,
    show: impl Fn(&LeaseRecord) -> pb::Lease,
) -> pb::ListLeasesResponse {
    pb::ListLeasesResponse {
        leases: page.leases.iter().map(show).collect(),
        next_page_token: page.next_page_token,
    }
}

/// A lease record as AdminService shows it: [`lease`] without a token,
/// plus the operator's view (revocation attempts, last error, next retry,
/// the PAT's upstream validTo), which LeaseService leaves empty.
pub fn admin_lease(record: &LeaseRecord) -> pb::Lease {
    pb::Lease {
        revocation_attempts: record.attempts,
        last_error: record.last_error.clone().unwrap_or_default(),
        next_attempt_time: record.next_attempt_time.map(timestamp),
        pat_expire_time: record.upstream_valid_to.map(timestamp),
        ..lease(record, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(
        org: &str,
        scopes: &[&str],
        ttl: Option<(i64, i32)>,
        rid: &str,
    ) -> pb::CreateLeaseRequest {
        pb::CreateLeaseRequest {
            organization: org.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            ttl: ttl.map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
            request_id: rid.into(),
        }
    }

    fn field_of(r: Result<CreateLease, InvalidField>) -> (&'static str, &'static str) {
        let e = r.unwrap_err();
        (e.field, e.reason)
    }

    #[test]
    fn a_good_create_request_becomes_domain_types() {
        let id = Uuid::new_v4();
        let c = create_lease(create(
            "Fabrikam",
            &["vso.code", "vso.code"],
            Some((900, 0)),
            &id.to_string(),
        ))
        .unwrap();
        assert_eq!(c.organization.as_str(), "fabrikam");
        assert_eq!(c.scopes.to_strings(), vec!["vso.code"]);
        assert_eq!(c.ttl, Some(Duration::from_secs(900)));
        assert_eq!(c.request_id, Some(id));
        let c = create_lease(create("fabrikam", &["vso.code"], None, "")).unwrap();
        assert_eq!((c.ttl, c.request_id), (None, None));
    }

    #[test]
    fn bad_create_requests_name_the_field() {
        let ok = ["vso.code"];
        assert_eq!(
            field_of(create_lease(create("", &ok, None, ""))),
            ("organization", "ORGANIZATION_INVALID")
        );
        assert_eq!(
            field_of(create_lease(create("-bad-", &ok, None, ""))),
            ("organization", "ORGANIZATION_INVALID")
        );
        assert_eq!(
            field_of(create_lease(create("fabrikam", &[], None, ""))),
            ("scopes", "SCOPES_EMPTY")
        );
        assert_eq!(
            field_of(create_lease(create("fabrikam", &["vso.nope"], None, ""))),
            ("scopes", "SCOPE_UNKNOWN")
        );
        for ttl in [
            (0, 0),
            (0, 999_999_999),
            (-5, 0),
            (366 * 86400, 0),
            (1, -1),
            (0, 2_000_000_000),
        ] {
            assert_eq!(
                field_of(create_lease(create("fabrikam", &ok, Some(ttl), ""))),
                ("ttl", "TTL_OUT_OF_RANGE"),
                "{ttl:?}"
            );
        }
        assert_eq!(
            field_of(create_lease(create("fabrikam", &ok, None, "not-a-uuid"))),
            ("request_id", "REQUEST_ID_INVALID")
        );
    }

    #[test]
    fn request_ids_are_hyphenated_uuids_in_any_case_but_never_nil() {
        let id = Uuid::new_v4();
        let upper = id.to_string().to_uppercase();
        let c = create_lease(create("fabrikam", &["vso.code"], None, &upper)).unwrap();
        assert_eq!(c.request_id, Some(id));
        let simple = id.simple().to_string();
        let braced = id.braced().to_string();
        let urn = id.urn().to_string();
        let nil = Uuid::nil().to_string();
        for bad in [simple.as_str(), &braced, &urn, &nil] {
            assert_eq!(
                field_of(create_lease(create("fabrikam", &["vso.code"], None, bad))),
                ("request_id", "REQUEST_ID_INVALID"),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_ttl_under_one_second_says_so() {
        let e = duration(
            "ttl",
            prost_types::Duration {
                seconds: 0,
                nanos: 500_000_000,
            },
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "ttl: must be at least 1s");
        assert!(duration(
            "increment",
            prost_types::Duration {
                seconds: 1,
                nanos: 0
            }
        )
        .is_ok());
    }

    #[test]
    fn exactly_one_year_is_the_longest_ttl_accepted() {
        assert!(duration(
            "ttl",
            prost_types::Duration {
                seconds: 365 * 86400,
                nanos: 0
            }
        )
        .is_ok());
    }

    #[test]
    fn lease_names_must_be_leases_slash_uuid() {
        let id = LeaseId::new();
        assert_eq!(lease_name(&id.name()).unwrap(), id);
        for bad in ["", "leases/", "leases/123", &id.to_string(), "other/x"] {
            let e = lease_name(bad).unwrap_err();
            assert_eq!((e.field, e.reason), ("name", "NAME_INVALID"));
        }
    }

    #[test]
    fn filters_accept_state_and_organization_joined_by_and() {
        assert_eq!(parse_filter("").unwrap(), (vec![], None));
        assert_eq!(
            parse_filter("state = ACTIVE").unwrap(),
            (vec![LeaseState::Active], None)
        );
        let (s, o) = parse_filter(r#"state=REVOKE_FAILED AND organization = "Fabrikam""#).unwrap();
        assert_eq!(s, vec![LeaseState::RevokeFailed]);
        assert_eq!(o.unwrap().as_str(), "fabrikam");
        let (_, o) = parse_filter("organization = contoso").unwrap();
        assert_eq!(o.unwrap().as_str(), "contoso");
    }

    #[test]
    fn unparseable_filters_are_invalid_argument_on_filter() {
        for bad in [
            "state",
            "state =",
            "state = NOPE",
            "holder = x",
            "state = ACTIVE OR state = REVOKED",
            "state = ACTIVE AND",
            "state = ACTIVE AND state = EXPIRED",
            "organization = \"unterminated",
            "state != ACTIVE",
            "organization = \"-x-\"",
        ] {
            let e = list_query(pb::ListLeasesRequest {
                filter: bad.into(),
                ..Default::default()
            })
            .unwrap_err();
            assert_eq!((e.field, e.reason), ("filter", "FILTER_INVALID"), "{bad}");
        }
    }

    #[test]
    fn page_size_defaults_caps_and_refuses_negatives() {
        let q = |n| {
            list_query(pb::ListLeasesRequest {
                page_size: n,
                ..Default::default()
            })
        };
        assert_eq!(q(0).unwrap().page_size, DEFAULT_PAGE_SIZE);
        assert_eq!(q(7).unwrap().page_size, 7);
        assert_eq!(q(5000).unwrap().page_size, MAX_PAGE_SIZE);
        let e = q(-1).unwrap_err();
        assert_eq!((e.field, e.reason), ("page_size", "PAGE_SIZE_INVALID"));
    }
}
