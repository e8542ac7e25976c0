//! Opaque page tokens (ListLeases; ListAuditEvents through [`seal`] and
//! [`open`]). A lease token is base64url of the keyset cursor (the last
//! row's create_time and id), bound to the caller and filter by a keyed MAC
//! so a token altered, or replayed with another filter, is refused.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use secrecy::SecretString;

use super::LeaseError;
use crate::crypto::TokenFingerprinter;
use crate::domain::{LeaseId, Timestamp};
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

fn mac(fingerprinter: &TokenFingerprinter, domain: &str, binding: &str, payload: &str) -> String {
    // Domain-separated input: never equal to a PAT, so MACs and token
    // fingerprints cannot be confused.
    let input = SecretString::from(format!("{domain}\n{binding}\n{payload}"));
    let mut mac = fingerprinter.fingerprint(&input);
    mac.truncate(MAC_HEX_LEN);
    mac
}

/// `payload` as an opaque token bound by a keyed MAC to `domain` (what kind
/// of token) and `binding` (the query it pages through).
pub(super) fn seal(
    fingerprinter: &TokenFingerprinter,
    domain: &str,
    binding: &str,
    payload: &str,
) -> String {
    let mac = mac(fingerprinter, domain, binding, payload);
    URL_SAFE_NO_PAD.encode(format!("{payload}|{mac}"))
}

/// The payload of a token [`seal`] made for the same `domain` and
/// `binding`. Errors: `InvalidPageToken` for anything else.
pub(super) fn open(
    fingerprinter: &TokenFingerprinter,
    domain: &str,
    binding: &str,
    token: &str,
) -> Result<String, LeaseError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| LeaseError::InvalidPageToken)?;
    let text = String::from_utf8(bytes).map_err(|_| LeaseError::InvalidPageToken)?;
    let (payload, given_mac) = text.rsplit_once('|').ok_or(LeaseError::InvalidPageToken)?;
    let expected = mac(fingerprinter, domain, binding, payload);
    let same: bool =
        subtle::ConstantTimeEq::ct_eq(expected.as_bytes(), given_mac.as_bytes()).into();
    if !same {
        return Err(LeaseError::InvalidPageToken);
    }
    Ok(payload.to_owned())
}

const LEASE_DOMAIN: &str = "tokenbroker.page_token.v1";

/// The token for the page after `cursor` under `filter`.
pub(super) fn encode(
    fingerprinter: &TokenFingerprinter,
    filter: &LeaseFilter,
    cursor: &PageCursor,
) -> String {
    let payload = format!("v1|{}|{}", cursor.create_time.timestamp_micros(), cursor.id);
    seal(fingerprinter, LEASE_DOMAIN, &binding(filter), &payload)
}

/// The cursor in `token`, if this service issued it for `filter`.
/// Errors: `InvalidPageToken` for anything else.
pub(super) fn decode(
    fingerprinter: &TokenFingerprinter,
    filter: &LeaseFilter,
    token: &str,
) -> Result<PageCursor, LeaseError> {
    let payload = open(fingerprinter, LEASE_DOMAIN, &binding(filter), token)?;
    let mut parts = payload.split('|');
    let (Some("v1"), Some(micros), Some(id), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(LeaseError::InvalidPageToken);
    };
    let create_time = micros
        .parse::<i64>()
        .ok()
        .and_then(Timestamp::from_micros)
        .ok_or(LeaseError::InvalidPageToken)?;
    let id: LeaseId = id.parse().map_err(|_| LeaseError::InvalidPageToken)?;
    Ok(PageCursor { create_time, id })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Keyring;
    use crate::domain::{Identity, LeaseState, Organization};

    fn fingerprinter() -> TokenFingerprinter {
        TokenFingerprinter::new(Keyring::generate_key()).unwrap()
    }

    fn filter(holder: &str) -> LeaseFilter {
        LeaseFilter {
            holder: Some(holder.parse::<Identity>().unwrap()),
            states: vec![LeaseState::Active],
            organization: Some(Organization::parse("fabrikam").unwrap()),
        }
    }

    fn cursor() -> PageCursor {
        PageCursor {
            create_time: Timestamp::from_micros(1_764_400_000_123_456).unwrap(),
            id: LeaseId::new(),
        }
    }

    #[test]
    fn a_page_token_leads_back_to_its_cursor() {
        let f = fingerprinter();
        let c = cursor();
        let token = encode(&f, &filter("apikey:ci"), &c);
        assert_eq!(decode(&f, &filter("apikey:ci"), &token).unwrap(), c);
    }

    #[test]
    fn a_page_token_is_refused_for_another_filter_or_holder() {
        let f = fingerprinter();
        let token = encode(&f, &filter("apikey:ci"), &cursor());
        let mut other_state = filter("apikey:ci");
        other_state.states = vec![LeaseState::Revoked];
        for other in [filter("apikey:other"), other_state] {
            assert!(matches!(
                decode(&f, &other, &token),
                Err(LeaseError::InvalidPageToken)
            ));
        }
    }

    #[test]
    fn an_altered_or_foreign_page_token_is_refused() {
        let f = fingerprinter();
        let c = cursor();
        let token = encode(&f, &filter("apikey:ci"), &c);
        let text = String::from_utf8(URL_SAFE_NO_PAD.decode(&token).unwrap()).unwrap();
        let moved = text.replacen(&c.create_time.timestamp_micros().to_string(), "1", 1);
        let forged = URL_SAFE_NO_PAD.encode(moved);
        for bad in [forged.as_str(), "garbage!", "", "djF8MXwy"] {
            assert!(matches!(
                decode(&f, &filter("apikey:ci"), bad),
                Err(LeaseError::InvalidPageToken)
            ));
        }
        // Another deployment's key does not accept it either.
        assert!(decode(&fingerprinter(), &filter("apikey:ci"), &token).is_err());
    }
}
