//! JSON shapes of the PAT Lifecycle API as they cross the wire
//! (field names exactly as in SPEC-7.1/7.2), and the lenient parsers the
//! client needs for them: date-times with 0 to 7 fractional digits and with
//! or without an offset, `patTokenError` with an unknown-value fallback, the
//! Azure DevOps error envelope and `Retry-After` (RFC 9110 section 10.2.3).
//! The facts are in docs/upstream-api.md: Request and response shapes,
//! Date-time formats, Refusals: patTokenError, Error envelope.

use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use secrecy::SecretString;
use serde::{Deserialize, Deserializer, Serialize};
use uuid::Uuid;

use super::{PatToken, PatTokenError, UpstreamError};
use crate::domain::AuthorizationId;

/// Why a date-time from upstream could not be read.
#[derive(Debug, thiserror::Error)]
#[error("not an RFC 3339 date-time: {0:?}")]
pub struct TimestampError(String);

/// Parses an upstream date-time into UTC.
///
/// Accepts RFC 3339 with any number of fractional-second digits (upstream
/// sends 0, 2, 3 or 7) and any offset; a value without a zone designator
/// (the token-admin example's `2018-07-19T00:00:00`) is read as UTC.
pub fn parse_timestamp(value: &str) -> Result<DateTime<Utc>, TimestampError> {
    let trimmed = value.trim();
    if let Ok(with_offset) = DateTime::parse_from_rfc3339(trimmed) {
        return Ok(with_offset.with_timezone(&Utc));
    }
    // No zone designator: .NET writes DateTime values of kind Unspecified
    // like this; the service keeps UTC.
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(trimmed, format) {
            return Ok(naive.and_utc());
        }
    }
    Err(TimestampError(value.chars().take(64).collect()))
}

/// Formats a date-time as upstream's examples do: UTC, milliseconds, `Z`.
pub fn format_timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Reads `patTokenError`: a string (the documented form), null/absent
/// (= none), or anything else kept verbatim as `Unknown`.
fn de_pat_token_error<'de, D: Deserializer<'de>>(d: D) -> Result<PatTokenError, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(d)?;
    Ok(match value {
        None | Some(serde_json::Value::Null) => PatTokenError::Known("none"),
        Some(serde_json::Value::String(s)) => PatTokenError::parse(&s),
        Some(other) => PatTokenError::Unknown(other.to_string()),
    })
}

fn default_none() -> PatTokenError {
    PatTokenError::Known("none")
}

/// `PatToken` as sent by upstream. Every field is optional on the wire; the
/// conversion to [`PatToken`] names any that is missing or malformed.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WirePatToken {
    /// `authorizationId`.
    pub authorization_id: Option<String>,
    /// `displayName`.
    pub display_name: Option<String>,
    /// `scope`.
    pub scope: Option<String>,
    /// `targetAccounts`: null for a global PAT.
    pub target_accounts: Option<Vec<Uuid>>,
    /// `token`: the secret; only in a create response.
    pub token: Option<SecretString>,
    /// `validFrom`, as sent.
    pub valid_from: Option<String>,
    /// `validTo`, as sent.
    pub valid_to: Option<String>,
}

impl TryFrom<WirePatToken> for PatToken {
    type Error = UpstreamError;

    /// Fails with [`UpstreamError::Protocol`] naming the missing or
    /// malformed field (never the token).
    fn try_from(wire: WirePatToken) -> Result<Self, UpstreamError> {
        let protocol = UpstreamError::Protocol;
        let authorization_id = wire
            .authorization_id
            .as_deref()
            .ok_or_else(|| protocol("patToken.authorizationId is missing".into()))?;
        let authorization_id = Uuid::parse_str(authorization_id)
            .map(AuthorizationId::from_uuid)
            .map_err(|_| {
                protocol(format!(
                    "patToken.authorizationId is not a UUID: {:?}",
                    shorten(authorization_id, 64)
                ))
            })?;
        let time = |name: &str, value: Option<String>| {
            let value = value.ok_or_else(|| protocol(format!("patToken.{name} is missing")))?;
            parse_timestamp(&value).map_err(|e| protocol(format!("patToken.{name}: {e}")))
        };
        Ok(PatToken {
            authorization_id,
            display_name: wire.display_name.unwrap_or_default(),
            scope: wire.scope.unwrap_or_default(),
            target_accounts: wire.target_accounts,
            token: wire.token,
            valid_from: time("validFrom", wire.valid_from)?,
            valid_to: time("validTo", wire.valid_to)?,
        })
    }
}

/// `PatTokenResult`: the answer to create, get and update.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WirePatTokenResult {
    /// `patToken`: null when the request was refused.
    pub pat_token: Option<WirePatToken>,
    /// `patTokenError`; `none` on success.
    #[serde(default = "default_none", deserialize_with = "de_pat_token_error")]
    pub pat_token_error: PatTokenError,
    /// `patTokenErrorMessage` (SPEC-7.2 only).
    pub pat_token_error_message: Option<String>,
}

/// `PagedPatTokens`: one page of the list operation.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WirePagedPatTokens {
    /// `continuationToken`: `""` (or absent) on the last page.
    pub continuation_token: Option<String>,
    /// `patTokens`.
    #[serde(default)]
    pub pat_tokens: Vec<WirePatToken>,
}

/// `PatTokenCreateRequest`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WireCreateRequest<'a> {
    /// `displayName`.
    pub display_name: &'a str,
    /// `scope`, space-separated.
    pub scope: &'a str,
    /// `validTo`, see [`format_timestamp`].
    pub valid_to: String,
    /// `allOrgs`: always false (docs/upstream-api.md, Global PAT retirement).
    pub all_orgs: bool,
}

/// `PatTokenUpdateRequest`; absent fields are kept by upstream.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WireUpdateRequest<'a> {
    /// `authorizationId`, in the body (not the query).
    pub authorization_id: Uuid,
    /// `displayName`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display_name: Option<&'a str>,
    /// `scope`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<&'a str>,
    /// `validTo`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub valid_to: Option<String>,
}

/// The Azure DevOps error envelope of non-2xx answers
/// (`{"$id","innerException","message","typeName","typeKey","errorCode","eventId"}`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorEnvelope {
    /// `message`, e.g. `TF400813: The user '' is not authorized...`.
    pub message: Option<String>,
    /// `typeKey`, e.g. `JsonReaderException`.
    pub type_key: Option<String>,
}

impl ErrorEnvelope {
    /// Reads the envelope from a body; an unreadable body gives an empty one.
    pub fn from_body(body: &[u8]) -> Self {
        serde_json::from_slice(strip_bom(body)).unwrap_or_default()
    }

    /// `typeKey: message`, shortened to a loggable length (300
    /// characters), control characters (line breaks among them) replaced
    /// by spaces, so it can go into a log line or a status message as is.
    pub fn summary(&self) -> String {
        let text = match (&self.type_key, &self.message) {
            (Some(key), Some(message)) => format!("{key}: {message}"),
            (Some(key), None) => key.clone(),
            (None, Some(message)) => message.clone(),
            (None, None) => "no error envelope".to_owned(),
        };
        let text: String = text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        shorten(&text, 300)
    }
}

/// Drops a UTF-8 byte-order mark (the service is .NET; the spec files
/// carry one).
pub fn strip_bom(body: &[u8]) -> &[u8] {
    body.strip_prefix(b"\xEF\xBB\xBF".as_slice())
        .unwrap_or(body)
}

/// At most `max` characters of `text`, marking a cut with an ellipsis.
pub fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let mut cut: String = text.chars().take(max).collect();
        cut.push('…');
        cut
    }
}

/// Reads `Retry-After`: delta-seconds (what Azure DevOps sends,
/// docs/upstream-api.md, Rate limits and Retry-After) or an HTTP-date,
/// relative to `now`. Unreadable values give None.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    if let Ok(seconds) = value.parse::<f64>() {
        if seconds.is_finite() && seconds >= 0.0 {
            return Some(Duration::from_secs_f64(seconds));
        }
    }
    let at = DateTime::parse_from_rfc2822(value)
        .ok()?
        .with_timezone(&Utc);
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use secrecy::ExposeSecret;

    use super::*;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32, nanos: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
            + chrono::Duration::nanoseconds(nanos.into())
    }

    #[test]
    fn timestamps_with_zero_to_seven_fraction_digits_parse() {
        let cases = [
            ("2020-12-01T23:46:23Z", 0),
            ("2020-12-01T23:46:23.3Z", 300_000_000),
            ("2020-12-01T23:46:23.32Z", 320_000_000),
            ("2020-12-01T23:46:23.319Z", 319_000_000),
            ("2020-12-01T23:46:23.3193Z", 319_300_000),
            ("2020-12-01T23:46:23.31933Z", 319_330_000),
            ("2020-12-01T23:46:23.319333Z", 319_333_000),
            ("2020-12-01T23:46:23.1033333Z", 103_333_300),
        ];
        for (text, nanos) in cases {
            assert_eq!(
                parse_timestamp(text).unwrap(),
                utc(2020, 12, 1, 23, 46, 23, nanos),
                "{text}"
            );
        }
    }

    #[test]
    fn timestamps_with_an_offset_are_converted_and_without_one_read_as_utc() {
        for (text, expected) in [
            (
                "2020-12-02T01:46:23.32+02:00",
                utc(2020, 12, 1, 23, 46, 23, 320_000_000),
            ),
            ("2020-12-01T23:46:23+00:00", utc(2020, 12, 1, 23, 46, 23, 0)),
            // No zone designator.
            ("2018-07-19T00:00:00", utc(2018, 7, 19, 0, 0, 0, 0)),
            (
                "2020-11-02T22:56:52.1033333",
                utc(2020, 11, 2, 22, 56, 52, 103_333_300),
            ),
        ] {
            assert_eq!(parse_timestamp(text).unwrap(), expected, "{text}");
        }
    }

    #[test]
    fn garbage_timestamps_are_refused() {
        for text in ["", "yesterday", "2020-13-01T00:00:00Z", "2020-12-01"] {
            assert!(parse_timestamp(text).is_err(), "{text}");
        }
    }

    #[test]
    fn sent_valid_to_is_utc_with_milliseconds() {
        assert_eq!(
            format_timestamp(utc(2020, 12, 1, 23, 46, 23, 319_400_000)),
            "2020-12-01T23:46:23.319Z"
        );
    }

    #[test]
    fn every_documented_pat_token_error_is_known() {
        for value in super::super::PAT_TOKEN_ERRORS {
            let parsed = PatTokenError::parse(value);
            assert_eq!(parsed, PatTokenError::Known(value));
            assert_eq!(parsed.as_str(), value);
        }
        assert!(PatTokenError::parse("none").is_none());
    }

    #[test]
    fn pat_token_error_matches_known_values_regardless_of_case() {
        assert_eq!(
            PatTokenError::parse("globalPatCreationBlocked"),
            PatTokenError::Known("globalPATCreationBlocked")
        );
        assert_eq!(
            PatTokenError::parse("AuthorizationNotFound"),
            PatTokenError::Known("authorizationNotFound")
        );
    }

    #[test]
    fn unknown_pat_token_error_is_kept_verbatim() {
        let parsed = PatTokenError::parse("somethingNewIn73");
        assert_eq!(parsed, PatTokenError::Unknown("somethingNewIn73".into()));
        assert!(!parsed.is_none());
        assert_eq!(parsed.to_string(), "somethingNewIn73 (unknown value)");
    }

    #[test]
    fn a_refusal_result_reads_as_error_without_token() {
        let body = br#"{"patToken":null,"patTokenError":"fullScopePatPolicyViolation","patTokenErrorMessage":"Full-scoped PATs are restricted"}"#;
        let result: WirePatTokenResult = serde_json::from_slice(body).unwrap();
        assert!(result.pat_token.is_none());
        assert_eq!(
            result.pat_token_error,
            PatTokenError::Known("fullScopePatPolicyViolation")
        );
        assert_eq!(
            result.pat_token_error_message.as_deref(),
            Some("Full-scoped PATs are restricted")
        );
    }

    #[test]
    fn a_result_with_an_unknown_or_numeric_error_still_reads() {
        let result: WirePatTokenResult =
            serde_json::from_slice(br#"{"patToken":null,"patTokenError":"brandNewError"}"#)
                .unwrap();
        assert_eq!(
            result.pat_token_error,
            PatTokenError::Unknown("brandNewError".into())
        );
        let result: WirePatTokenResult =
            serde_json::from_slice(br#"{"patToken":null,"patTokenError":27}"#).unwrap();
        assert_eq!(result.pat_token_error, PatTokenError::Unknown("27".into()));
        let result: WirePatTokenResult = serde_json::from_slice(br#"{"patToken":null}"#).unwrap();
        assert!(result.pat_token_error.is_none());
    }

    #[test]
    fn the_documented_create_example_converts_with_its_token() {
        // Shape of EX CreatePat (upstream-spec/tokens/7.1/httpExamples).
        let body = "\u{feff}{\"patToken\":{\"displayName\":\"new_token\",\"validTo\":\"2020-12-01T23:46:23.32Z\",\"scope\":\"app_token\",\"targetAccounts\":[\"38aaa865-2c70-4bf7-a308-0c6539c38c1a\"],\"validFrom\":\"2020-11-02T22:56:52.1033333Z\",\"authorizationId\":\"4ab5764f-4193-4f1d-b995-64144880b7d7\",\"token\":\"dip55dwf4vpitomw63jzvomefmi2jluguprzwwqwuc6xq4fhocwq\"},\"patTokenError\":\"none\"}";
        let result: WirePatTokenResult =
            serde_json::from_slice(strip_bom(body.as_bytes())).unwrap();
        assert!(result.pat_token_error.is_none());
        let pat = PatToken::try_from(result.pat_token.unwrap()).unwrap();
        assert_eq!(
            pat.authorization_id.to_string(),
            "4ab5764f-4193-4f1d-b995-64144880b7d7"
        );
        assert_eq!(pat.valid_to, utc(2020, 12, 1, 23, 46, 23, 320_000_000));
        assert_eq!(pat.valid_from, utc(2020, 11, 2, 22, 56, 52, 103_333_300));
        assert_eq!(
            pat.token.as_ref().unwrap().expose_secret(),
            "dip55dwf4vpitomw63jzvomefmi2jluguprzwwqwuc6xq4fhocwq"
        );
        assert!(!format!("{pat:?}").contains("dip55dwf"));
    }

    #[test]
    fn a_pat_with_a_missing_or_bad_field_names_the_field() {
        let wire = WirePatToken {
            authorization_id: Some("4ab5764f-4193-4f1d-b995-64144880b7d7".into()),
            valid_from: Some("2020-11-02T22:56:52Z".into()),
            valid_to: Some("soon".into()),
            ..Default::default()
        };
        let err = PatToken::try_from(wire).unwrap_err().to_string();
        assert!(err.contains("validTo"), "{err}");
        let err = PatToken::try_from(WirePatToken::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("authorizationId"), "{err}");
    }

    #[test]
    fn a_global_pat_has_no_target_accounts() {
        let body = br#"{"authorizationId":"4ab5764f-4193-4f1d-b995-64144880b7d7","displayName":"g","scope":"vso.code","targetAccounts":null,"token":null,"validFrom":"2020-11-02T22:56:52Z","validTo":"2020-12-01T23:46:23Z"}"#;
        let wire: WirePatToken = serde_json::from_slice(body).unwrap();
        let pat = PatToken::try_from(wire).unwrap();
        assert!(pat.target_accounts.is_none());
        assert!(pat.token.is_none());
    }

    #[test]
    fn the_last_list_page_has_an_empty_continuation_token() {
        let page: WirePagedPatTokens =
            serde_json::from_slice(br#"{"continuationToken":"","patTokens":[]}"#).unwrap();
        assert_eq!(page.continuation_token.as_deref(), Some(""));
        assert!(page.pat_tokens.is_empty());
    }

    #[test]
    fn update_request_omits_fields_that_are_not_changed() {
        let body = serde_json::to_value(WireUpdateRequest {
            authorization_id: Uuid::nil(),
            display_name: None,
            scope: None,
            valid_to: Some("2020-12-01T23:46:23.319Z".into()),
        })
        .unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "authorizationId": "00000000-0000-0000-0000-000000000000",
                "validTo": "2020-12-01T23:46:23.319Z"
            })
        );
    }

    #[test]
    fn create_request_uses_the_spec_field_names() {
        let body = serde_json::to_value(WireCreateRequest {
            display_name: "tb:dev:1",
            scope: "vso.code",
            valid_to: "2020-12-01T23:46:23.319Z".into(),
            all_orgs: false,
        })
        .unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "displayName": "tb:dev:1",
                "scope": "vso.code",
                "validTo": "2020-12-01T23:46:23.319Z",
                "allOrgs": false
            })
        );
    }

    #[test]
    fn error_envelope_summary_names_type_and_message() {
        let body = br#"{"$id":"1","innerException":null,"message":"TF400898: An Internal Error Occurred.","typeName":"Newtonsoft.Json.JsonReaderException, Newtonsoft.Json","typeKey":"JsonReaderException","errorCode":0,"eventId":0}"#;
        assert_eq!(
            ErrorEnvelope::from_body(body).summary(),
            "JsonReaderException: TF400898: An Internal Error Occurred."
        );
        assert_eq!(
            ErrorEnvelope::from_body(b"<html>").summary(),
            "no error envelope"
        );
    }

    #[test]
    fn error_envelope_summary_is_one_bounded_line() {
        let body = serde_json::json!({
            "typeKey": "JsonReaderException",
            "message": format!("line one\r\nline two\u{1b}[31m{}", "x".repeat(1000)),
        })
        .to_string();
        let summary = ErrorEnvelope::from_body(body.as_bytes()).summary();
        assert!(
            summary.starts_with("JsonReaderException: line one  line two [31mxxx"),
            "{summary}"
        );
        assert!(!summary.chars().any(char::is_control), "{summary}");
        assert_eq!(summary.chars().count(), 301, "300 and the ellipsis");
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = utc(2015, 10, 21, 7, 27, 0, 0);
        assert_eq!(parse_retry_after("30", now), Some(Duration::from_secs(30)));
        assert_eq!(
            parse_retry_after("1.5", now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("later", now), None);
    }
}
