//! Opaque ListLeases page tokens: base64url of the keyset cursor (the last
//! row's create_time and id), bound to the caller and filter by a keyed MAC
//! so a token altered, or replayed with another filter, is refused.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::DateTime;
use secrecy::SecretString;

use super::LeaseError;
use crate::crypto::TokenFingerprinter;
use crate::domain::LeaseId;
use crate::store::{LeaseFilter, PageCursor};

/// Hex characters of the MAC kept in a token (128 bits).
const MAC_HEX_LEN: usize = 32;

/// What a token is bound to: the holder, the states (sorted) and the
/// organization of the query.
fn binding(filter: &LeaseFilter) -> String {
    let mut states: Vec<&str> = filter.states.iter().map(|s| s.as_str()).collect();
    states.sort_unstable();
    states.dedup();
    format!(
        "holder={}\nstates={}\norganization={}",
        filter
            .holder
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        states.join(","),
        filter
            .organization
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
    )
}

fn mac(fingerprinter: &TokenFingerprinter, filter: &LeaseFilter, payload: &str) -> String {
    // Domain-separated input: never equal to a PAT, so MACs and token
    // fingerprints cannot be confused.
    let input = SecretString::from(format!(
        "tokenbroker.page_token.v1\n{}\n{}",
        binding(filter),
        payload
    ));
    let mut mac = fingerprinter.fingerprint(&input);
    mac.truncate(MAC_HEX_LEN);
    mac
}

/// The token for the page after `cursor` under `filter`.
pub(super) fn encode(
    fingerprinter: &TokenFingerprinter,
    filter: &LeaseFilter,
    cursor: &PageCursor,
) -> String {
    let payload = format!("v1|{}|{}", cursor.create_time.timestamp_micros(), cursor.id);
    let mac = mac(fingerprinter, filter, &payload);
    URL_SAFE_NO_PAD.encode(format!("{payload}|{mac}"))
}

/// The cursor in `token`, if this service issued it for `filter`.
/// Errors: `InvalidPageToken` for anything else.
pub(super) fn decode(
    fingerprinter: &TokenFingerprinter,
    filter: &LeaseFilter,
    token: &str,
) -> Result<PageCursor, LeaseError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| LeaseError::InvalidPageToken)?;
    let text = String::from_utf8(bytes).map_err(|_| LeaseError::InvalidPageToken)?;
    let (payload, given_mac) = text.rsplit_once('|').ok_or(LeaseError::InvalidPageToken)?;
    let expected = mac(fingerprinter, filter, payload);
    let same: bool =
        subtle::ConstantTimeEq::ct_eq(expected.as_bytes(), given_mac.as_bytes()).into();
    if !same {
        return Err(LeaseError::InvalidPageToken);
    }
    let mut parts = payload.split('|');
    let (Some("v1"), Some(micros), Some(id), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(LeaseError::InvalidPageToken);
    };
    let create_time = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or(LeaseError::InvalidPageToken)?;
    let id: LeaseId = id.parse().map_err(|_| LeaseError::InvalidPageToken)?;
    Ok(PageCursor { create_time, id })
}
