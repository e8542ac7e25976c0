//! A small data plane that takes a PAT as HTTP Basic auth
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

/// Serves one data-plane call.
pub(crate) fn serve(
    emu: &Emulator,
    org: &str,
    resource: Resource,
    headers: &HeaderMap,
) -> Response {
    if !headers.contains_key(header::AUTHORIZATION) {
        // No credential at all: the sign-in page, or 401 with Suppress
        // ("Wrongly authenticated calls" [C]).
        return wire::authentication_refused(headers);
    }
    let Some(pat) = basic_password(headers) else {
        // A credential that is not a readable Basic PAT: 401 ("Data plane: using a PAT" [C]).
        return wire::unauthorized("");
    };
    let inner = emu.lock();
    let now = inner.now();
    let record = inner
        .by_token
        .get(&digest(&pat))
        .and_then(|id| inner.pat(*id));
    let Some(record) = record else {
        // Unknown token: 401 TF400813 ([I]; the service's exact answer to a
        // wrong PAT is not documented).
        return wire::unauthorized("");
    };
    match record.state(now) {
        PatState::Active => {}
        // Revoked: treated as unknown ([I]).
        PatState::Revoked => return wire::unauthorized(""),
        // Expired: 401 AccessCheckException ("Error envelope" [C]).
        PatState::Expired => return wire::pat_expired(),
    }
    let org_id = inner.organizations.get(org).copied();
    let in_org = match &record.target_accounts {
        // Global PAT: every organization, until RN-270's end date ("Global PAT retirement" [V]).
        None => now < global_usage_end(),
        Some(accounts) => org_id.is_some_and(|id| accounts.contains(&id)),
    };
    if !in_org {
        // A PAT of another organization is not recognised here ([I]).
        return wire::unauthorized("");
    }
    let covered = ScopeSet::parse_upstream(&record.scope)
        .ok()
        .zip(Scope::parse(resource.needs()).ok())
        .is_some_and(|(held, needed)| held.covers_scope(&needed));
    if !covered {
        // Out of scope: 401 TF400813 naming the user ([I]: no public capture).
        return wire::unauthorized("6f1c1b8e-0000-4000-8000-00000000e0e0");
    }
    let org_id = org_id.unwrap_or_default();
    drop(inner);
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
