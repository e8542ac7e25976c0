//! What goes over the wire: JSON shapes, time formats, api-version parsing
//! and the service's error answers (docs/upstream-api.md: "Host, path and
//! api-version", "Request and response shapes", "Date-time formats", "Error
//! envelope", "Wrongly authenticated calls").

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};
use serde::Serialize;
use uuid::Uuid;

/// `PatToken` with the spec's field names, in the order Microsoft's
/// examples print them ("Request and response shapes").
#[derive(Serialize, Clone, Debug)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PatTokenJson {
    pub display_name: String,
    pub valid_to: String,
    pub scope: String,
    pub target_accounts: Option<Vec<Uuid>>,
    pub valid_from: String,
    pub authorization_id: Uuid,
    /// The secret, only in a create answer ("The PAT secret"); null elsewhere.
    pub token: Option<String>,
}

/// `PatTokenResult` ("Request and response shapes").
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PatTokenResultJson {
    pub pat_token: Option<PatTokenJson>,
    pub pat_token_error: &'static str,
    /// SPEC-7.2 only ("Request and response shapes" [V]); omitted for older api-versions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pat_token_error_message: Option<Option<String>>,
}

/// `PagedPatTokens` ("Request and response shapes").
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PagedPatTokensJson {
    pub continuation_token: String,
    pub pat_tokens: Vec<PatTokenJson>,
}

/// The error envelope of the Azure DevOps REST family ("Error envelope" [C]).
#[derive(Serialize, Debug)]
struct EnvelopeJson<'a> {
    #[serde(rename = "$id")]
    id: &'a str,
    #[serde(rename = "innerException")]
    inner_exception: Option<()>,
    message: &'a str,
    #[serde(rename = "typeName")]
    type_name: &'a str,
    #[serde(rename = "typeKey")]
    type_key: &'a str,
    #[serde(rename = "errorCode")]
    error_code: i32,
    #[serde(rename = "eventId")]
    event_id: i32,
}

/// A non-2xx JSON error in the service's envelope. The message is also sent
/// URL-encoded in `X-TFS-ServiceError` ("Error envelope" [C]).
pub(crate) fn envelope(
    status: StatusCode,
    type_key: &str,
    type_name: &str,
    message: &str,
    event_id: i32,
) -> Response {
    let body = serde_json::to_vec(&EnvelopeJson {
        id: "1",
        inner_exception: None,
        message,
        type_name,
        type_key,
        error_code: 0,
        event_id,
    })
    .unwrap_or_default();
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    let encoded: String = url::form_urlencoded::byte_serialize(message.as_bytes())
        .collect::<String>()
        .replace('+', "%20");
    if let Ok(v) = HeaderValue::from_str(&encoded) {
        h.insert("x-tfs-serviceerror", v);
    }
    resp
}

/// The Basic challenge every 401 carries ("Wrongly authenticated calls" [C]).
pub(crate) const BASIC_CHALLENGE: &str = "Basic realm=\"https://emulator.vssps.dev.azure.com/\"";

/// 401 `UnauthorizedRequestException` TF400813 ("Error envelope", "Wrongly
/// authenticated calls" [C]).
pub(crate) fn unauthorized(user: &str) -> Response {
    let message = format!("TF400813: The user '{user}' is not authorized to access this resource.");
    let mut resp = envelope(
        StatusCode::UNAUTHORIZED,
        "UnauthorizedRequestException",
        "Microsoft.TeamFoundation.Framework.Server.UnauthorizedRequestException, Microsoft.TeamFoundation.Framework.Server",
        &message,
        3000,
    );
    // Section 2.2 [C]: an unauthenticated probe is told both schemes.
    let h = resp.headers_mut();
    h.append(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(
            "Bearer authorization_uri=https://login.microsoftonline.com/common",
        ),
    );
    h.append(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(BASIC_CHALLENGE),
    );
    resp
}

/// 401 `AccessCheckException` for an expired PAT ("Error envelope" [C]).
pub(crate) fn pat_expired() -> Response {
    envelope(
        StatusCode::UNAUTHORIZED,
        "AccessCheckException",
        "Microsoft.TeamFoundation.Framework.Server.AccessCheckException, Microsoft.TeamFoundation.Framework.Server",
        "Access Denied: The Personal Access Token used has expired.",
        3000,
    )
}

/// 400 `JsonReaderException` for a body the service cannot read
/// ("Error envelope" [C]: TF400898, eventId 0).
pub(crate) fn json_reader_error() -> Response {
    let message = format!(
        "TF400898: An Internal Error Occurred. Activity Id: {}.",
        Uuid::new_v4()
    );
    envelope(
        StatusCode::BAD_REQUEST,
        "JsonReaderException",
        "Newtonsoft.Json.JsonReaderException, Newtonsoft.Json",
        &message,
        0,
    )
}

/// A request answered with a 400 envelope.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BadRequest {
    /// The body is not JSON of the expected shape (Newtonsoft's reader).
    #[error("the request body cannot be read")]
    JsonReader,
    /// A query parameter has a value the service does not accept.
    #[error("parameter {name}: {detail}")]
    InvalidArgument { name: &'static str, detail: String },
}

impl IntoResponse for BadRequest {
    fn into_response(self) -> Response {
        match self {
            BadRequest::JsonReader => json_reader_error(),
            BadRequest::InvalidArgument { name, detail } => invalid_argument(name, &detail),
        }
    }
}

/// 400 for a bad query parameter. The type name is [I]: no public capture.
pub(crate) fn invalid_argument(name: &str, detail: &str) -> Response {
    envelope(
        StatusCode::BAD_REQUEST,
        "InvalidArgumentValueException",
        "Microsoft.TeamFoundation.Framework.Server.InvalidArgumentValueException, Microsoft.TeamFoundation.Framework.Server",
        &format!("TF400813: The value of parameter '{name}' is not valid: {detail}"),
        3000,
    )
}

/// 404 for a path no route serves (shape per "Error envelope" [C]; type [I]).
pub(crate) fn not_found(path: &str) -> Response {
    envelope(
        StatusCode::NOT_FOUND,
        "RouteNotFoundException",
        "Microsoft.TeamFoundation.Framework.Server.RouteNotFoundException, Microsoft.TeamFoundation.Framework.Server",
        &format!("TF400898: The resource cannot be found: {path}"),
        3000,
    )
}

/// 405 for a known path with another method ([I]).
pub(crate) fn method_not_allowed() -> Response {
    envelope(
        StatusCode::METHOD_NOT_ALLOWED,
        "HttpMethodNotAllowedException",
        "Microsoft.VisualStudio.Services.WebApi.HttpMethodNotAllowedException, Microsoft.VisualStudio.Services.WebApi",
        "The requested resource does not support http method.",
        3000,
    )
}

/// 203 Non-Authoritative Information with the HTML sign-in page: what the
/// service gives a GET/POST without a credential it accepts ("Wrongly authenticated calls" [C]).
pub(crate) fn sign_in_page() -> Response {
    let body = "<!DOCTYPE html><html><head><title>Azure DevOps Services | Sign In</title></head>\
<body><p>Object moved to <a href=\"https://app.vssps.visualstudio.com/_signin?realm=vssps.dev.azure.com&amp;reply_to=emulator\">here</a>.</p></body></html>";
    (
        StatusCode::NON_AUTHORITATIVE_INFORMATION,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

/// True when the caller sent `X-TFS-FedAuthRedirect: Suppress` ("Wrongly authenticated calls" [C]).
pub(crate) fn suppresses_redirect(headers: &HeaderMap) -> bool {
    headers
        .get("x-tfs-fedauthredirect")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("suppress"))
}

/// The refusal for a call without a credential the endpoint accepts:
/// 401 JSON with Suppress, else the 203 sign-in page ("Wrongly authenticated calls" [C]).
pub(crate) fn authentication_refused(headers: &HeaderMap) -> Response {
    if suppresses_redirect(headers) {
        unauthorized("")
    } else {
        sign_in_page()
    }
}

/// A JSON 200 answer.
pub(crate) fn json_ok<T: Serialize>(value: &T) -> Response {
    json_status(StatusCode::OK, value)
}

/// A JSON answer with `status`.
pub(crate) fn json_status<T: Serialize>(status: StatusCode, value: &T) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_default();
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body,
    )
        .into_response()
}

// ---------------------------------------------------------------- time

/// Rounds to SQL Server `datetime` precision, 1/300 s, as the service
/// stores `validTo` ("validTo rounding" [I]: `.319Z` came back `.32Z`), then to
/// .NET's 100 ns ticks.
pub(crate) fn round_datetime(t: DateTime<Utc>) -> DateTime<Utc> {
    let secs = t.timestamp();
    let nanos = i64::from(t.timestamp_subsec_nanos());
    // Nearest 300th of a second (half up).
    let three_hundredths = (nanos * 300 + 500_000_000) / 1_000_000_000;
    // Back to 100 ns ticks, rounded half up.
    let ticks = (three_hundredths * 10_000_000 + 150) / 300;
    let total_ns = i128::from(secs) * 1_000_000_000 + i128::from(ticks) * 100;
    let secs = total_ns.div_euclid(1_000_000_000) as i64;
    let nanos = total_ns.rem_euclid(1_000_000_000) as u32;
    Utc.timestamp_opt(secs, nanos).single().unwrap_or(t)
}

/// Formats like .NET's round-trip form, trailing zeros of the seven
/// fraction digits dropped: `2020-12-01T23:46:23.32Z`, `…52.1033333Z`,
/// `…23Z` ("Date-time formats" [V]).
pub(crate) fn format_datetime(t: DateTime<Utc>) -> String {
    let base = t.format("%Y-%m-%dT%H:%M:%S").to_string();
    let ticks = t.timestamp_subsec_nanos() / 100;
    if ticks == 0 {
        return format!("{base}Z");
    }
    let frac = format!("{ticks:07}");
    format!("{base}.{}Z", frac.trim_end_matches('0'))
}

/// Parses a JSON date-time as the service's JSON reader does: RFC 3339
/// with any number of fraction digits and any offset, a value without a
/// zone (taken as UTC, "Date-time formats" [I]), or a bare date.
pub(crate) fn parse_datetime(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    // RFC 3339 caps nothing, but chrono stops at nine digits: cut longer
    // fractions down before the zone.
    if let Some(t) = parse_long_fraction(s) {
        return Some(t);
    }
    for f in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
            return Some(t.and_utc());
        }
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

fn parse_long_fraction(s: &str) -> Option<DateTime<Utc>> {
    let dot = s.find('.')?;
    let digits = s[dot + 1..]
        .bytes()
        .take_while(|b| b.is_ascii_digit())
        .count();
    if digits <= 9 {
        return None;
    }
    let shortened = format!("{}{}", &s[..dot + 10], &s[dot + 1 + digits..]);
    parse_datetime(&shortened)
}

// ---------------------------------------------------------- api-version

/// A parsed `api-version` value:
/// `{major}.{minor}[-preview[.{resource-version}]]` ("Host, path and
/// api-version" [V] DOC-VERSIONING).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ApiVersion {
    pub major: u32,
    pub minor: u32,
    pub preview: bool,
}

impl ApiVersion {
    /// True for 7.2 and later, whose `PatTokenResult` has `patTokenErrorMessage`.
    pub fn has_error_message(&self) -> bool {
        (self.major, self.minor) >= (7, 2)
    }
}

/// Why an `api-version` was refused.
pub(crate) enum ApiVersionError {
    Missing,
    Malformed(String),
    OutOfRange(String),
}

impl ApiVersionError {
    /// The service's 400 answer. The malformed message is [C]
    /// ("Host, path and api-version"); type names and the other messages are [I].
    pub fn into_response(self) -> Response {
        match self {
            ApiVersionError::Missing => envelope(
                StatusCode::BAD_REQUEST,
                "VssVersionNotSpecifiedException",
                "Microsoft.VisualStudio.Services.WebApi.VssVersionNotSpecifiedException, Microsoft.VisualStudio.Services.WebApi",
                "No api-version was supplied for the request. The version must be supplied either as part of the Accept header (e.g. \"application/json; api-version=1.0\") or as a query parameter (e.g. \"?api-version=1.0\").",
                3000,
            ),
            ApiVersionError::Malformed(v) => envelope(
                StatusCode::BAD_REQUEST,
                "VssInvalidApiVersionException",
                "Microsoft.VisualStudio.Services.WebApi.VssInvalidApiVersionException, Microsoft.VisualStudio.Services.WebApi",
                &format!("Invalid api version string: \"{v}\". Api version string must be in the format: {{Major}}.{{Minor}}[-preview[.{{ResourceVersion}}]]."),
                3000,
            ),
            ApiVersionError::OutOfRange(v) => envelope(
                StatusCode::BAD_REQUEST,
                "VssVersionOutOfRangeException",
                "Microsoft.VisualStudio.Services.WebApi.VssVersionOutOfRangeException, Microsoft.VisualStudio.Services.WebApi",
                &format!("The requested REST API version of {v} is out of range for this resource. This resource supports versions 6.1 through 7.2."),
                3000,
            ),
        }
    }
}

/// Reads the api-version from the query (`api-version`) or the `Accept`
/// header (`application/json;api-version=…`, "Host, path and api-version" [V]).
pub(crate) fn api_version(
    query: &Query,
    headers: &HeaderMap,
) -> Result<ApiVersion, ApiVersionError> {
    let from_accept = || {
        headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .and_then(|accept| {
                accept.split([';', ',']).find_map(|part| {
                    let (k, v) = part.split_once('=')?;
                    k.trim()
                        .eq_ignore_ascii_case("api-version")
                        .then(|| v.trim().to_owned())
                })
            })
    };
    let raw = query
        .get("api-version")
        .map(str::to_owned)
        .or_else(from_accept)
        .ok_or(ApiVersionError::Missing)?;
    let v = parse_api_version(&raw).ok_or_else(|| ApiVersionError::Malformed(raw.clone()))?;
    // The tokens/pats resource exists in specs 6.1 to 7.2 ("Host, path and api-version" [V]);
    // refusing others is [I]. A GA form like `7.1` is accepted: DOC-USEPAT
    // shows it and whether the service takes it is [U].
    if (v.major, v.minor) < (6, 1) || (v.major, v.minor) > (7, 2) {
        return Err(ApiVersionError::OutOfRange(raw));
    }
    Ok(v)
}

fn parse_api_version(raw: &str) -> Option<ApiVersion> {
    let (numbers, stage) = match raw.split_once('-') {
        Some((n, s)) => (n, Some(s)),
        None => (raw, None),
    };
    let (major, minor) = numbers.split_once('.')?;
    let number = |s: &str| -> Option<u32> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let (major, minor) = (number(major)?, number(minor)?);
    let preview = match stage {
        None => false,
        Some(stage) => {
            let (name, resource) = match stage.split_once('.') {
                Some((n, r)) => (n, Some(r)),
                None => (stage, None),
            };
            if !name.eq_ignore_ascii_case("preview") {
                return None;
            }
            if let Some(r) = resource {
                number(r)?;
            }
            true
        }
    };
    Some(ApiVersion {
        major,
        minor,
        preview,
    })
}

// ---------------------------------------------------------------- query

/// A decoded query string. Names are matched case-insensitively, as
/// ASP.NET binds them ([I]).
#[derive(Debug, Default)]
pub(crate) struct Query(Vec<(String, String)>);

impl Query {
    pub fn parse(raw: Option<&str>) -> Self {
        Query(
            raw.map(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect()
            })
            .unwrap_or_default(),
        )
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Looks a JSON object's member up case-insensitively, as Newtonsoft.Json
/// binds request bodies ([I]).
pub(crate) fn member<'a>(body: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    body.as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
        .filter(|v| !v.is_null())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_to_is_rounded_like_sql_server_datetime() {
        let t = parse_datetime("2020-12-01T23:46:23.319Z").unwrap();
        assert_eq!(
            format_datetime(round_datetime(t)),
            "2020-12-01T23:46:23.32Z"
        );
        let t = parse_datetime("2020-11-23T04:04:38.5233Z").unwrap();
        assert_eq!(
            format_datetime(round_datetime(t)),
            "2020-11-23T04:04:38.5233333Z"
        );
        let t = parse_datetime("2020-11-23T23:59:59.999Z").unwrap();
        assert_eq!(format_datetime(round_datetime(t)), "2020-11-24T00:00:00Z");
    }

    #[test]
    fn date_times_parse_with_any_fraction_and_offset() {
        let want = parse_datetime("2030-01-01T10:00:00Z").unwrap();
        for s in [
            "2030-01-01T10:00:00.0000000Z",
            "2030-01-01T10:00:00.000000000000Z",
            "2030-01-01T12:00:00+02:00",
            "2030-01-01T10:00:00",
        ] {
            assert_eq!(parse_datetime(s), Some(want), "{s}");
        }
        assert!(parse_datetime("next tuesday").is_none());
    }

    #[test]
    fn api_version_forms() {
        for ok in [
            "6.1-preview",
            "7.1-preview.1",
            "7.1",
            "7.2-preview.1",
            "7.0-PREVIEW",
        ] {
            assert!(parse_api_version(ok).is_some(), "{ok}");
        }
        for bad in ["4.1.", "7", "7.1-beta", "7.1-preview.x", "", "a.b"] {
            assert!(parse_api_version(bad).is_none(), "{bad}");
        }
    }
}
