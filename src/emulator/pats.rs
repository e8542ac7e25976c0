//! The PAT Lifecycle Management API: create, get, list, update, revoke at
//! `/{organization}/_apis/tokens/pats` (docs/upstream-api.md, "PAT
//! Lifecycle Management API"). The caller's bearer and the api-version were
//! checked by the dispatcher.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Duration as ChronoDuration, TimeZone, Utc};
use rand::Rng;
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::state::{digest, Emulator, Inner, PatRecord, PatState};
use super::wire::{self, member, ApiVersion, BadRequest, PatTokenJson, PatTokenResultJson, Query};
use super::LifespanMode;
use crate::domain::Scope;

/// Longest `displayName` accepted; the real limit is [U], 256 is [I].
const MAX_DISPLAY_NAME: usize = 256;
/// Most PATs one list page holds (`$top`, "limit of 100", "List options and
/// defaults" [V]).
const MAX_TOP: usize = 100;
/// Global PATs stop working on 2026-12-01 (RN-270, "Global PAT retirement" [V]).
pub(crate) const GLOBAL_PAT_USAGE_ENDS: (i32, u32, u32) = (2026, 12, 1);

/// HTTP 200 with `patToken: null` and a `patTokenError` ("Refusals:
/// patTokenError" [I], supported by AzureAuth's client [V]).
fn refused(v: ApiVersion, error: &'static str, message: &str) -> Response {
    wire::json_ok(&PatTokenResultJson {
        pat_token: None,
        pat_token_error: error,
        pat_token_error_message: v.has_error_message().then(|| Some(message.to_owned())),
    })
}

fn succeeded(v: ApiVersion, pat: PatTokenJson) -> Response {
    wire::json_ok(&PatTokenResultJson {
        pat_token: Some(pat),
        pat_token_error: "none",
        pat_token_error_message: v.has_error_message().then_some(None),
    })
}

fn to_json(p: &PatRecord, token: Option<String>) -> PatTokenJson {
    PatTokenJson {
        display_name: p.display_name.clone(),
        valid_to: wire::format_datetime(p.valid_to),
        scope: p.scope.clone(),
        target_accounts: p.target_accounts.clone(),
        valid_from: wire::format_datetime(p.valid_from),
        authorization_id: p.authorization_id,
        token,
    }
}

/// A new secret. Current format ("The PAT secret" [V] DOC-USEPAT): 84
/// characters of which 52 random, with `AZDO` at 0-based index 76 (that
/// reading of "positions 76-80" is [I], as is the rest of the layout: 24
/// characters derived from the random part, then a 4-character checksum).
/// Legacy format: 52 lower-case base32 characters (EX CreatePat [V]).
fn new_secret(legacy: bool) -> String {
    const BASE32: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::thread_rng();
    if legacy {
        return (0..52)
            .map(|_| BASE32[rng.gen_range(0..32)] as char)
            .collect();
    }
    let random: String = (0..52)
        .map(|_| BASE62[rng.gen_range(0..62)] as char)
        .collect();
    let derive = |input: &str, n: usize| -> String {
        Sha256::digest(input.as_bytes())
            .iter()
            .take(n)
            .map(|b| BASE62[usize::from(*b) % 62] as char)
            .collect()
    };
    let mut s = random.clone();
    s.push_str(&derive(&random, 24));
    s.push_str("AZDO");
    let check = derive(&s, 4);
    s.push_str(&check);
    s
}

/// Normalises a space-separated scope string and checks each name against
/// the scope catalogue ("Scope strings"). Lower-casing is [I]. Returns None
/// for an empty or unknown scope (→ `invalidScope`, "Scope strings" [I]).
fn normalise_scope(raw: &str) -> Option<String> {
    let mut names: Vec<String> = Vec::new();
    for name in raw.split_whitespace() {
        let name = name.to_ascii_lowercase();
        Scope::parse(&name).ok()?;
        if !names.contains(&name) {
            names.push(name);
        }
    }
    (!names.is_empty()).then(|| names.join(" "))
}

/// Fields of a create or update body, read as the service's JSON reader
/// would: a wrong type is a 400 `JsonReaderException`.
struct Body {
    authorization_id: Option<Value>,
    display_name: Option<String>,
    scope: Option<String>,
    valid_to: Option<DateTime<Utc>>,
    all_orgs: Option<bool>,
}

fn read_body(raw: &[u8]) -> Result<Option<Body>, BadRequest> {
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let value: Value = serde_json::from_slice(raw).map_err(|_| BadRequest::JsonReader)?;
    if value.is_null() {
        return Ok(None);
    }
    if !value.is_object() {
        return Err(BadRequest::JsonReader);
    }
    let string = |name: &str| -> Result<Option<String>, BadRequest> {
        match member(&value, name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(BadRequest::JsonReader),
        }
    };
    let valid_to = match string("validTo")? {
        None => None,
        Some(s) => Some(wire::parse_datetime(&s).ok_or(BadRequest::JsonReader)?),
    };
    let all_orgs = match member(&value, "allOrgs") {
        None => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => return Err(BadRequest::JsonReader),
    };
    Ok(Some(Body {
        authorization_id: member(&value, "authorizationId").cloned(),
        display_name: string("displayName")?,
        scope: string("scope")?,
        valid_to,
        all_orgs,
    }))
}

/// 400 for a missing body (ASP.NET's null-parameter check; text [I]).
fn body_required(name: &str) -> Response {
    wire::envelope(
        StatusCode::BAD_REQUEST,
        "ArgumentNullException",
        "System.ArgumentNullException, mscorlib",
        &format!("Value cannot be null.\r\nParameter name: {name}"),
        0,
    )
}

/// The policy outcome for a requested `validTo`.
enum Lifespan {
    Ok(DateTime<Utc>),
    Refused(&'static str, String),
}

/// Applies the lifetime rules to a requested `validTo` measured from `base`
/// (create: now; update: the PAT's creation, SPEC-7.2 [V]).
fn check_lifespan(
    emu: &Emulator,
    now: DateTime<Utc>,
    base: DateTime<Utc>,
    valid_to: DateTime<Utc>,
) -> Lifespan {
    // A validTo not in the future is refused; the service's answer is [U]
    // ("Past validTo"), `invalidValidTo` is [I].
    if valid_to <= now {
        return Lifespan::Refused(
            "invalidValidTo",
            "The expiration date must be in the future.".into(),
        );
    }
    let mut valid_to = valid_to;
    if let Some(days) = emu.config.max_lifespan_days {
        let max = base + ChronoDuration::days(i64::from(days));
        if valid_to > max {
            match emu.config.lifespan_mode {
                // RN-236 / SPEC-7.2 ("validTo clamping" [V]): clamp to base + max.
                LifespanMode::Clamp => valid_to = max,
                // Before RN-236, and some tenants still ("validTo clamping" [V]/[C]).
                LifespanMode::Reject => {
                    return Lifespan::Refused(
                        "patLifespanPolicyViolation",
                        format!("The expiration date exceeds the maximum lifespan of {days} days allowed by your organization's policy."),
                    )
                }
            }
        }
    }
    // Without a policy, at most one year ("Maximum lifetime" [V] DOC-ADMINREVOKE);
    // clamping rather than refusing is [I], after RN-236's behaviour.
    let year = base + ChronoDuration::days(365);
    if valid_to > year {
        valid_to = year;
    }
    Lifespan::Ok(wire::round_datetime(valid_to))
}

/// Global-PAT rules for `allOrgs: true` ("Global PAT retirement" [I]).
fn check_global(emu: &Emulator) -> Result<(), (&'static str, &'static str)> {
    if emu.config.block_global_creation {
        // RN-270 [V]: creation and regeneration of global PATs are blocked.
        return Err((
            "globalPATCreationBlocked",
            "Creation of global personal access tokens is blocked.",
        ));
    }
    if emu.config.restrict_global {
        return Err((
            "globalPatPolicyViolation",
            "Your organization's policy restricts the creation of global personal access tokens.",
        ));
    }
    Ok(())
}

fn check_full_scope(emu: &Emulator, scope: &str) -> Result<(), (&'static str, &'static str)> {
    if emu.config.restrict_full_scope && scope.split(' ').any(|s| s == "app_token") {
        return Err((
            "fullScopePatPolicyViolation",
            "Your organization's policy restricts the creation of full-scoped personal access tokens.",
        ));
    }
    Ok(())
}

/// "Restrict PAT creation" ("Organization policies" [V] DOC-POLICIES; the value
/// `disablePatCreationPolicyViolation` is [I]).
fn check_creation(emu: &Emulator, scope: &str) -> Result<(), (&'static str, &'static str)> {
    if !emu.config.restrict_creation {
        return Ok(());
    }
    let packaging_only = scope.split(' ').all(|s| s.starts_with("vso.packaging"));
    if emu.config.allow_packaging_only && packaging_only {
        return Ok(());
    }
    Err((
        "disablePatCreationPolicyViolation",
        "Your organization's policy restricts the creation of personal access tokens.",
    ))
}

/// `POST` (CreatePat).
pub(crate) fn create(emu: &Emulator, org: &str, v: ApiVersion, raw: &[u8]) -> Response {
    let body = match read_body(raw) {
        Ok(Some(b)) => b,
        Ok(None) => return body_required("patTokenCreateRequest"),
        Err(e) => return e.into_response(),
    };
    let display_name = body.display_name.unwrap_or_default();
    if display_name.trim().is_empty() {
        return refused(v, "displayNameRequired", "A display name is required.");
    }
    if display_name.chars().count() > MAX_DISPLAY_NAME {
        return refused(v, "invalidDisplayName", "The display name is too long.");
    }
    let Some(scope) = body.scope.as_deref().and_then(normalise_scope) else {
        return refused(v, "invalidScope", "The scope is not valid.");
    };
    let all_orgs = body.all_orgs.unwrap_or(false);
    if all_orgs {
        if let Err((e, m)) = check_global(emu) {
            return refused(v, e, m);
        }
    }
    if let Err((e, m)) = check_full_scope(emu, &scope) {
        return refused(v, e, m);
    }
    if let Err((e, m)) = check_creation(emu, &scope) {
        return refused(v, e, m);
    }
    let mut inner = emu.lock();
    let now = inner.now();
    // No validTo: 30 days, the UI's first preset ("Maximum lifetime" [C]); [I].
    let requested = body.valid_to.unwrap_or(now + ChronoDuration::days(30));
    let valid_to = match check_lifespan(emu, now, now, requested) {
        Lifespan::Ok(t) => t,
        Lifespan::Refused(e, m) => return refused(v, e, &m),
    };
    let target_accounts = (!all_orgs).then(|| vec![inner.organization_id(org)]);
    let secret = new_secret(emu.config.legacy_tokens);
    let record = PatRecord {
        organization: org.to_owned(),
        authorization_id: Uuid::new_v4(),
        display_name,
        scope,
        target_accounts,
        valid_from: wire::round_datetime(now),
        valid_to,
        revoked_at: None,
        token_digest: digest(&secret),
    };
    let json = to_json(&record, Some(secret));
    tracing::info!(organization = org, authorization_id = %record.authorization_id, "emulator created a PAT");
    inner.add_pat(record);
    succeeded(v, json)
}

fn parse_id(raw: Option<&str>) -> Option<Uuid> {
    raw.and_then(|s| Uuid::parse_str(s.trim()).ok())
}

fn not_found(v: ApiVersion) -> Response {
    // `authorizationNotFound` rather than `tokenNotFound` is [U]/[I] ("Refusals: patTokenError").
    refused(
        v,
        "authorizationNotFound",
        "The personal access token was not found.",
    )
}

fn invalid_id(v: ApiVersion) -> Response {
    refused(
        v,
        "invalidAuthorizationId",
        "The authorization id is not valid.",
    )
}

/// The PAT with `id` created in `org`. Other organizations' PATs are not
/// visible ([I]: the API is scoped to "this organization").
fn find<'a>(inner: &'a Inner, org: &str, id: Uuid) -> Option<&'a PatRecord> {
    inner.pat(id).filter(|p| p.organization == org)
}

/// `GET ?authorizationId=` (GetPat). Answers the PAT asked for (EX GetPat
/// answers another id, a documentation defect, "Documentation defects" [V]).
pub(crate) fn get(emu: &Emulator, org: &str, v: ApiVersion, id: &str) -> Response {
    let Some(id) = parse_id(Some(id)) else {
        return invalid_id(v);
    };
    let inner = emu.lock();
    match find(&inner, org, id) {
        Some(p) => succeeded(v, to_json(p, None)),
        None => not_found(v),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Filter {
    Active,
    Revoked,
    Expired,
    All,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum SortBy {
    DisplayName,
    DisplayDate,
    Status,
}

/// `displayFilterOption` values.
const FILTERS: [(&str, Filter); 4] = [
    ("active", Filter::Active),
    ("revoked", Filter::Revoked),
    ("expired", Filter::Expired),
    ("all", Filter::All),
];

/// `sortByOption` values.
const SORTS: [(&str, SortBy); 3] = [
    ("displayName", SortBy::DisplayName),
    ("displayDate", SortBy::DisplayDate),
    ("status", SortBy::Status),
];

/// The query parameter `name` as one of `values` (any case), `default`
/// when absent or empty.
fn parse_enum<T: Copy>(
    q: &Query,
    name: &'static str,
    values: &[(&str, T)],
    default: T,
) -> Result<T, BadRequest> {
    match q.get(name) {
        None | Some("") => Ok(default),
        Some(raw) => values
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(raw.trim()))
            .map(|(_, t)| *t)
            .ok_or_else(|| BadRequest::InvalidArgument {
                name,
                detail: format!("'{raw}' is not a valid value"),
            }),
    }
}

/// `GET` without `authorizationId` (ListPats). Defaults when a parameter
/// is absent are [U] ("List options and defaults"); chosen [I]: active, displayDate
/// (= creation time), ascending, 100 per page.
pub(crate) fn list(emu: &Emulator, org: &str, q: &Query, repeat_page: bool) -> Response {
    let options =
        parse_enum(q, "displayFilterOption", &FILTERS, Filter::Active).and_then(|filter| {
            let sort = parse_enum(q, "sortByOption", &SORTS, SortBy::DisplayDate)?;
            Ok((filter, sort))
        });
    let (filter, sort) = match options {
        Ok(options) => options,
        Err(e) => return e.into_response(),
    };
    let ascending = match q.get("isSortAscending").map(str::trim) {
        None | Some("") => true,
        Some(s) if s.eq_ignore_ascii_case("true") => true,
        Some(s) if s.eq_ignore_ascii_case("false") => false,
        Some(s) => {
            return wire::invalid_argument("isSortAscending", &format!("'{s}' is not a boolean"))
        }
    };
    let top = match q.get("$top").map(str::trim) {
        None | Some("") => MAX_TOP,
        Some(s) => match s.parse::<i64>() {
            Ok(n) if n > 0 => usize::try_from(n).unwrap_or(MAX_TOP).min(MAX_TOP),
            // Larger values are capped ([U] "List options and defaults");
            // non-positive refused ([I]).
            _ => {
                return wire::invalid_argument("$top", &format!("'{s}' must be a positive integer"))
            }
        },
    };
    // The continuation token is bound to the filter and sort options: the
    // spec asks for the same options on every page ("Continuation tokens" [V]);
    // refusing a mismatch rather than ignoring it is [I].
    let fingerprint = format!("{filter:?}:{sort:?}:{ascending}");
    let token_in = q.get("continuationToken").filter(|t| !t.trim().is_empty());
    let after: Option<Uuid> = match token_in {
        None => None,
        Some(t) => match decode_token(t) {
            Some((fp, cursor)) if fp == fingerprint => cursor,
            _ => {
                return wire::invalid_argument(
                    "continuationToken",
                    "the token is malformed or was issued for other filter or sort options",
                )
            }
        },
    };
    let inner = emu.lock();
    let now = inner.now();
    // Creation order breaks ties (validFrom has 1/300 s precision).
    let mut rows: Vec<(usize, &PatRecord)> = inner
        .pats
        .iter()
        .enumerate()
        .filter(|(_, p)| p.organization == org)
        .filter(|(_, p)| match filter {
            Filter::All => true,
            Filter::Active => p.state(now) == PatState::Active,
            Filter::Revoked => p.state(now) == PatState::Revoked,
            Filter::Expired => p.state(now) == PatState::Expired,
        })
        .collect();
    rows.sort_by(|(ai, a), (bi, b)| {
        let primary = match sort {
            SortBy::DisplayName => a
                .display_name
                .to_lowercase()
                .cmp(&b.display_name.to_lowercase()),
            SortBy::DisplayDate => a.valid_from.cmp(&b.valid_from),
            SortBy::Status => a.state(now).cmp(&b.state(now)),
        };
        let primary = if ascending {
            primary
        } else {
            primary.reverse()
        };
        primary.then(ai.cmp(bi))
    });
    let rows: Vec<&PatRecord> = rows.into_iter().map(|(_, p)| p).collect();
    let start = match after {
        None => 0,
        // Resume after the last PAT of the previous page; PATs are never
        // deleted, so the cursor is always found.
        Some(id) => rows
            .iter()
            .position(|p| p.authorization_id == id)
            .map_or(rows.len(), |i| i + 1),
    };
    let page: Vec<PatTokenJson> = rows
        .iter()
        .skip(start)
        .take(top)
        .map(|p| to_json(p, None))
        .collect();
    let more = start + page.len() < rows.len();
    let continuation_token = if repeat_page {
        // Fault knob: point the caller at this same page again.
        encode_token(&fingerprint, after)
    } else if more {
        encode_token(&fingerprint, page.last().map(|p| p.authorization_id))
    } else {
        // The last page carries "" ("Continuation tokens" [V]).
        String::new()
    };
    wire::json_ok(&wire::PagedPatTokensJson {
        continuation_token,
        pat_tokens: page,
    })
}

fn encode_token(fingerprint: &str, cursor: Option<Uuid>) -> String {
    let cursor = cursor.map(|c| c.to_string()).unwrap_or_default();
    URL_SAFE_NO_PAD.encode(format!("{fingerprint}|{cursor}"))
}

fn decode_token(token: &str) -> Option<(String, Option<Uuid>)> {
    let raw = String::from_utf8(URL_SAFE_NO_PAD.decode(token.trim()).ok()?).ok()?;
    let (fp, cursor) = raw.rsplit_once('|')?;
    let cursor = if cursor.is_empty() {
        None
    } else {
        Some(Uuid::parse_str(cursor).ok()?)
    };
    Some((fp.to_owned(), cursor))
}

/// `PUT` (UpdatePat): `authorizationId` in the body; omitted fields are
/// kept ("Update keeps omitted fields" [C], [I] for every field).
pub(crate) fn update(emu: &Emulator, org: &str, v: ApiVersion, raw: &[u8]) -> Response {
    let body = match read_body(raw) {
        Ok(Some(b)) => b,
        Ok(None) => return body_required("patTokenUpdateRequest"),
        Err(e) => return e.into_response(),
    };
    let id = match &body.authorization_id {
        Some(Value::String(s)) => match Uuid::parse_str(s.trim()) {
            Ok(id) => id,
            Err(_) => return wire::json_reader_error(),
        },
        None => return invalid_id(v),
        Some(_) => return wire::json_reader_error(),
    };
    let mut inner = emu.lock();
    let now = inner.now();
    let Some(current) = find(&inner, org, id).cloned() else {
        return not_found(v);
    };
    match current.state(now) {
        PatState::Active => {}
        // "To update a token, it must be valid (has not been revoked)"
        // ("Operations" [V]); the value is [I].
        PatState::Revoked => {
            return refused(
                v,
                "failedToUpdateAccessToken",
                "A revoked personal access token cannot be updated.",
            )
        }
        // RN-271 [V]; the value `expiredPatCannotBeExtended` is [I].
        PatState::Expired => {
            return refused(
                v,
                "expiredPatCannotBeExtended",
                "An expired personal access token cannot be modified or extended.",
            )
        }
    }
    let mut next = current.clone();
    if let Some(name) = body.display_name {
        if name.trim().is_empty() {
            return refused(v, "displayNameRequired", "A display name is required.");
        }
        if name.chars().count() > MAX_DISPLAY_NAME {
            return refused(v, "invalidDisplayName", "The display name is too long.");
        }
        next.display_name = name;
    }
    if let Some(scope) = body.scope {
        let Some(scope) = normalise_scope(&scope) else {
            return refused(v, "invalidScope", "The scope is not valid.");
        };
        if let Err((e, m)) = check_full_scope(emu, &scope) {
            return refused(v, e, m);
        }
        next.scope = scope;
    }
    match body.all_orgs {
        Some(true) => {
            if let Err((e, m)) = check_global(emu) {
                return refused(v, e, m);
            }
            next.target_accounts = None;
        }
        Some(false) => next.target_accounts = Some(vec![inner.organization_id(org)]),
        None => {}
    }
    if let Some(valid_to) = body.valid_to {
        next.valid_to = match check_lifespan(emu, now, current.valid_from, valid_to) {
            Lifespan::Ok(t) => t,
            Lifespan::Refused(e, m) => return refused(v, e, &m),
        };
    }
    let json = to_json(&next, None);
    if let Some(slot) = inner.pat_mut(id) {
        *slot = next;
    }
    tracing::info!(organization = org, authorization_id = %id, "emulator updated a PAT");
    succeeded(v, json)
}

/// `DELETE ?authorizationId=` (RevokePat): 204 as in the example
/// ("Documentation defects" [V]). Revoking a revoked or expired PAT succeeds again ([I]).
pub(crate) fn revoke(emu: &Emulator, org: &str, v: ApiVersion, id: Option<&str>) -> Response {
    let Some(id) = parse_id(id) else {
        return invalid_id(v);
    };
    let mut inner = emu.lock();
    let now = inner.now();
    let found = inner
        .pat_mut(id)
        .filter(|p| p.organization == org)
        .map(|p| {
            if p.revoked_at.is_none() {
                p.revoked_at = Some(now);
            }
        })
        .is_some();
    drop(inner);
    if !found {
        return not_found(v);
    }
    tracing::info!(organization = org, authorization_id = %id, "emulator revoked a PAT");
    // HTTP forbids a body on 204, so `{}` cannot travel; the answer is
    // empty, which a client reading "204 `{}`" must take as the same thing.
    (
        StatusCode::NO_CONTENT,
        [(
            axum::http::header::CONTENT_TYPE,
            "application/json; charset=utf-8",
        )],
    )
        .into_response()
}

/// Start of the day global PATs stop working.
pub(crate) fn global_usage_end() -> DateTime<Utc> {
    let (y, m, d) = GLOBAL_PAT_USAGE_ENDS;
    Utc.with_ymd_and_hms(y, m, d, 0, 0, 0)
        .single()
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_tokens_have_84_characters_with_azdo_at_76() {
        let t = new_secret(false);
        assert_eq!(t.len(), 84);
        assert_eq!(&t[76..80], "AZDO");
        assert!(t.chars().all(|c| c.is_ascii_alphanumeric()));
        let legacy = new_secret(true);
        assert_eq!(legacy.len(), 52);
        assert!(legacy
            .chars()
            .all(|c| c.is_ascii_lowercase() || ('2'..='7').contains(&c)));
    }

    #[test]
    fn continuation_tokens_round_trip() {
        let id = Uuid::new_v4();
        let t = encode_token("Active:DisplayDate:true", Some(id));
        assert_eq!(
            decode_token(&t),
            Some(("Active:DisplayDate:true".to_owned(), Some(id)))
        );
        assert_eq!(decode_token("not base64!"), None);
    }
}
