//! A small data plane that takes a PAT as HTTP Basic auth (its check,
//! [`authorize`], also guards git over HTTP: `super::git`)
//! (docs/upstream-api.md, "Data plane: using a PAT"): `GET /{org}/_apis/git/repositories`
//! (needs a scope covering `vso.code`) and `GET /{org}/_apis/packaging/feeds`
//! (covering `vso.packaging`).

use axum::http::{header, HeaderMap};
use axum::response::Response;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::json;

use super::pats::global_usage_end;
use super::state::{digest, Emulator, PatState};
use super::wire;
use crate::domain::{Scope, ScopeSet};

/// Which data-plane resource was asked for.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Resource {
    GitRepositories,
    PackagingFeeds,
}

impl Resource {
    fn needs(self) -> &'static str {
        match self {
            Resource::GitRepositories => "vso.code",
            Resource::PackagingFeeds => "vso.packaging",
        }
    }
}

/// The PAT from `Authorization: Basic base64(user:PAT)`; the user name may
/// be empty or anything ("Data plane: using a PAT" [V]/[C]). Strict base64: a stray `=`
/// fails ("Data plane: using a PAT" [C]).
fn basic_password(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(encoded.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (_, password) = decoded.split_once(':')?;
    Some(password.to_owned())
}

/// Why the data plane refused a credential.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// No `Authorization` header.
    NoCredential,
    /// Not a readable Basic credential, or an unknown or revoked PAT.
    Unknown,
    /// The PAT's `validTo` has passed.
    Expired,
    /// A PAT of another organization.
    WrongOrganization,
    /// The PAT's scope does not cover the one needed.
    OutOfScope,
}

impl Refusal {
    /// The answer the REST data plane gives (see [`serve`]).
    fn answer(self, headers: &HeaderMap) -> Response {
        match self {
            // No credential at all: the sign-in page, or 401 with Suppress
            // ("Wrongly authenticated calls" [C]).
            Refusal::NoCredential => wire::authentication_refused(headers),
            // Unreadable, unknown or revoked: 401 TF400813 ([I]; the
            // service's exact answer to a wrong PAT is not documented).
            Refusal::Unknown | Refusal::WrongOrganization => wire::unauthorized(""),
            // Expired: 401 AccessCheckException ("Error envelope" [C]).
            Refusal::Expired => wire::pat_expired(),
            // Out of scope: 401 TF400813 naming the user ([I]: no public capture).
            Refusal::OutOfScope => wire::unauthorized(OUT_OF_SCOPE_USER),
        }
    }
}

/// The user id an out-of-scope refusal names ([I]).
pub(crate) const OUT_OF_SCOPE_USER: &str = "6f1c1b8e-0000-4000-8000-00000000e0e0";

/// What an accepted PAT is: its authorizationId (for logs and CGI's
/// `REMOTE_USER`) and the GUID of the organization it was used in.
pub(crate) struct Accepted {
    /// The PAT's authorizationId.
    pub authorization_id: uuid::Uuid,
    /// The organization's GUID.
    pub org_id: uuid::Uuid,
}

/// Checks the PAT in `headers` as the data plane does: a live PAT of
/// `org` whose scope covers `needs` (with inclusion, docs/upstream-api.md
/// "Scope catalogue and inclusion"). Touches only the emulator's memory.
pub(crate) fn authorize(
    emu: &Emulator,
    org: &str,
    needs: &str,
    headers: &HeaderMap,
) -> Result<Accepted, Refusal> {
    if !headers.contains_key(header::AUTHORIZATION) {
        return Err(Refusal::NoCredential);
    }
    let pat = basic_password(headers).ok_or(Refusal::Unknown)?;
    let inner = emu.lock();
    let now = inner.now();
    let record = inner
        .by_token
        .get(&digest(&pat))
        .and_then(|id| inner.pat(*id))
        .ok_or(Refusal::Unknown)?;
    match record.state(now) {
        PatState::Active => {}
        // Revoked: treated as unknown ([I]).
        PatState::Revoked => return Err(Refusal::Unknown),
        PatState::Expired => return Err(Refusal::Expired),
    }
    let org_id = inner.organizations.get(org).copied();
    let in_org = match &record.target_accounts {
        // Global PAT: every organization, until RN-270's end date ("Global PAT retirement" [V]).
        None => now < global_usage_end(),
        Some(accounts) => org_id.is_some_and(|id| accounts.contains(&id)),
    };
    if !in_org {
        // A PAT of another organization is not recognised here ([I]).
        return Err(Refusal::WrongOrganization);
    }
    let covered = ScopeSet::parse_upstream(&record.scope)
        .ok()
        .zip(Scope::parse(needs).ok())
        .is_some_and(|(held, needed)| held.covers_scope(&needed));
    if !covered {
        return Err(Refusal::OutOfScope);
    }
    Ok(Accepted {
        authorization_id: record.authorization_id,
        org_id: org_id.unwrap_or_default(),
    })
}

/// Serves one data-plane call.
pub(crate) fn serve(
    emu: &Emulator,
    org: &str,
    resource: Resource,
    headers: &HeaderMap,
) -> Response {
    let org_id = match authorize(emu, org, resource.needs(), headers) {
        Ok(accepted) => accepted.org_id,
        Err(refusal) => return refusal.answer(headers),
    };
    let body = match resource {
        Resource::GitRepositories => json!({
            "value": [{
                "id": "5febef5a-833d-4e14-b9c0-14cb638f91e6",
                "name": "emulated-repo",
                "url": format!("https://dev.azure.com/{org}/_apis/git/repositories/5febef5a-833d-4e14-b9c0-14cb638f91e6"),
                "project": {"id": org_id, "name": "emulated-project", "state": "wellFormed"},
                "defaultBranch": "refs/heads/main",
            }],
            "count": 1,
        }),
        Resource::PackagingFeeds => json!({
            "value": [{
                "id": "c2a7b1e0-5d3f-4c8e-9a6b-2f1e0d9c8b7a",
                "name": "emulated-feed",
                "url": format!("https://feeds.dev.azure.com/{org}/_apis/packaging/feeds/c2a7b1e0-5d3f-4c8e-9a6b-2f1e0d9c8b7a"),
            }],
            "count": 1,
        }),
    };
    wire::json_ok(&body)
}
