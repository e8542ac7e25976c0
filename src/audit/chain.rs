//! The audit chain: a keyed MAC per row over the previous row's MAC and
//! this row's fields, and the verifier that walks it.
//!
//! # Canonical encoding (version 1)
//!
//! `mac = hex(HMAC-SHA256(chain key, message))` (RFC 2104; 64 lower-case
//! hex characters), where `message` is the concatenation of:
//!
//! 1. the domain tag `token-broker/audit-chain/v1` (raw bytes);
//! 2. `str(prev)`: the previous row's stored `mac` text, or
//!    [`GENESIS_MAC`] when there is no earlier row or it has no MAC;
//! 3. `i64be(id)`;
//! 4. `i64be(time)`: microseconds since the Unix epoch, UTC (the stored
//!    precision);
//! 5. `str(identity)`, `opt(peer)`, `str(action)`, `str(outcome)` (stored
//!    form: `allowed`, `denied`, `error`), `opt(reason)`,
//!    `opt(policy_rule)`, `opt(lease_id)` (hyphenated lower-case UUID),
//!    `opt(organization)`, `opt(scopes)`, `opt(token_fingerprint)`;
//! 6. only when `caller_detail` is present (migration 0003):
//!    `0x01 || str(caller_detail)`. When it is absent nothing is added, so
//!    rows without it (every row written before it existed) encode exactly
//!    as before and old chains keep verifying; the fields before it are
//!    self-delimiting, so a row with it never encodes like one without.
//!
//! # Canonical encoding (version 2: rows with key ids, migration 0008)
//!
//! A row whose `chain_key_id` is set (every row written since migration
//! 0008) is MAC'd under the chain key of that id over:
//!
//! 1. the domain tag `token-broker/audit-chain/v2` (raw bytes);
//! 2. `str(chain_key_id)`, `opt(fingerprint_key_id)`;
//! 3. items 2 to 5 of version 1;
//! 4. `opt(caller_detail)` (always present, unlike version 1).
//!
//! So the key ids are covered by the MAC: relabelling a row to another key
//! id, or to none (which selects version 1 under key `default`), makes its
//! MAC wrong. A row with no `chain_key_id` is version 1 under key id
//! `default`, exactly as before, and must have no `fingerprint_key_id`
//! (version 1 does not cover it). Besides, the key id may change only at a
//! switch row ([`CHAIN_KEY_ROTATE`], identity `system:token-broker`,
//! `caller_detail` `from=OLD to=NEW`, MAC'd under NEW), so an edit that
//! relabels rows to a key id the verifier lacks is reported as tampering
//! rather than as a missing key (docs/audit-chain.md, "Rotating the chain
//! key").
//!
//! `str(s) = u32be(byte length of s) || UTF-8 bytes of s`;
//! `opt(None) = 0x00`, `opt(Some(s)) = 0x01 || str(s)`. Every field is
//! length-prefixed or fixed-width and every absent field is marked, so two
//! different rows never encode alike. Values are encoded as typed (as
//! read back), not as the backend's column text: both backends produce the
//! same MAC for the same row, and a text edit that keeps the value (an
//! upper-case UUID in SQLite) is not a change of meaning.
//!
//! # What verification proves, and its limit
//!
//! Chained rows have contiguous ids, never reused. An edited field, a
//! deleted or inserted row, or rows moved to other ids break the chain at
//! the first row affected. Dropping the newest rows leaves a shorter chain
//! that is still consistent until the next append (whose id then leaves a
//! gap): only a chain head recorded outside the database (the `audit chain
//! head` log line, `token-broker audit head`) catches that, so pass it to
//! [`verify`] as `expected_head` (several: [`verify_heads`]). Every row must carry a MAC: the chain
//! ships with the first release, so a row without one was written around
//! the chain key or had its MAC erased (erasing every MAC must not pass as
//! "old rows"), and it breaks the chain.

use std::fmt;

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::Sha256;

use std::collections::BTreeMap;

use super::{AppendedEvent, AuditEvent, SYSTEM_IDENTITY};
use crate::crypto::{CryptoError, KEY_LEN};
use crate::error::{ErrorCode, ServiceError};
use crate::store::{AuditKeyIds, Store, StoreError, DEFAULT_KEY_ID};

/// The `prev` value of the first chained row: 64 hex zeros.
pub const GENESIS_MAC: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Domain separation for the chain MAC (version 1 of the encoding).
const DOMAIN_TAG: &[u8] = b"token-broker/audit-chain/v1";

/// Domain separation for version 2 (rows with key ids).
const DOMAIN_TAG_V2: &[u8] = b"token-broker/audit-chain/v2";

/// `action` of the row that records a switch of the active chain key:
/// identity `system:token-broker`, `caller_detail` `from=OLD to=NEW`,
/// MAC'd under NEW.
pub const CHAIN_KEY_ROTATE: &str = "audit.chain_key_rotate";

/// The `caller_detail` of a switch row from key id `from` to `to`.
pub fn switch_detail(from: &str, to: &str) -> String {
    format!("from={from} to={to}")
}

/// Rows read per page while verifying.
const VERIFY_PAGE: u32 = 1000;

/// The audit chain key: 32 bytes, from configuration or a file, never the
/// database. Debug shows nothing of it.
pub struct ChainKey {
    key: SecretBox<[u8; KEY_LEN]>,
}

impl fmt::Debug for ChainKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChainKey").finish_non_exhaustive()
    }
}

impl ChainKey {
    /// Builds one from standard base64 (RFC 4648 section 4) of 32 bytes,
    /// surrounding whitespace ignored (as `crypto::Keyring::generate_key`
    /// makes). Errors: [`CryptoError::BadKey`] naming `audit chain`.
    pub fn new(key: &SecretString) -> Result<Self, CryptoError> {
        Ok(ChainKey {
            key: crate::crypto::decode_key("audit chain", key)?,
        })
    }

    /// The chain MAC of `event` (its `id` and `time` as stored) following a
    /// row whose MAC is `prev` (`None`: first row, [`GENESIS_MAC`]), in the
    /// module's canonical encoding. 64 lower-case hex characters.
    /// This is encoding version 1: a row without key ids.
    pub fn mac(&self, prev: Option<&str>, event: &AuditEvent) -> String {
        self.mac_with_ids(prev, event, &AuditKeyIds::default())
    }

    /// The chain MAC of `event` stored with `key_ids`: encoding version 2
    /// when `key_ids.chain` is set, else version 1 (`key_ids.fingerprint`
    /// then ignored). 64 lower-case hex characters.
    pub fn mac_with_ids(
        &self,
        prev: Option<&str>,
        event: &AuditEvent,
        key_ids: &AuditKeyIds,
    ) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.key.expose_secret())
            .expect("HMAC takes keys of any length");
        mac.update(&encode(prev.unwrap_or(GENESIS_MAC), event, key_ids));
        hex::encode(mac.finalize().into_bytes())
    }
}

/// The audit chain keys by id (`keys.audit_chain_keys`, or the
/// single-string `keys.audit_chain` as id `default`): the active one MACs
/// new rows, every one verifies the rows made with it. Debug shows the ids
/// only.
pub struct ChainKeys {
    active: String,
    keys: BTreeMap<String, ChainKey>,
}

impl fmt::Debug for ChainKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChainKeys")
            .field("active", &self.active)
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl From<ChainKey> for ChainKeys {
    /// One key, id `default` (what a single-string `keys.audit_chain` is).
    fn from(key: ChainKey) -> Self {
        ChainKeys {
            active: DEFAULT_KEY_ID.to_owned(),
            keys: [(DEFAULT_KEY_ID.to_owned(), key)].into(),
        }
    }
}

impl ChainKeys {
    /// Builds a keyring from `(id, standard base64 of 32 bytes)` pairs.
    /// Errors: [`CryptoError::InvalidKeyId`], [`CryptoError::DuplicateKey`],
    /// [`CryptoError::BadKey`] naming the id, [`CryptoError::UnknownKey`]
    /// when `active` is not among them.
    pub fn new(
        active: impl Into<String>,
        keys: impl IntoIterator<Item = (String, SecretString)>,
    ) -> Result<Self, CryptoError> {
        let active = active.into();
        let mut map = BTreeMap::new();
        for (id, key) in keys {
            if !crate::crypto::valid_key_id(&id) {
                return Err(CryptoError::InvalidKeyId(id));
            }
            let key = ChainKey {
                key: crate::crypto::decode_key(&id, &key)?,
            };
            if map.insert(id.clone(), key).is_some() {
                return Err(CryptoError::DuplicateKey(id));
            }
        }
        if !map.contains_key(&active) {
            return Err(CryptoError::UnknownKey(active));
        }
        Ok(ChainKeys { active, keys: map })
    }

    /// Id of the key new rows are MAC'd with.
    pub fn active_key_id(&self) -> &str {
        &self.active
    }

    /// The active key.
    pub fn active(&self) -> &ChainKey {
        &self.keys[&self.active]
    }

    /// The key with id `id`, if held.
    pub fn get(&self, id: &str) -> Option<&ChainKey> {
        self.keys.get(id)
    }

    /// The ids held, sorted.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }
}

/// The canonical message for one row (see the module doc).
fn encode(prev: &str, e: &AuditEvent, key_ids: &AuditKeyIds) -> Vec<u8> {
    fn str(out: &mut Vec<u8>, s: &str) {
        let len = u32::try_from(s.len()).expect("audit field under 4 GiB");
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    fn opt(out: &mut Vec<u8>, s: Option<&str>) {
        match s {
            None => out.push(0),
            Some(s) => {
                out.push(1);
                str(out, s);
            }
        }
    }
    let mut out = Vec::with_capacity(256);
    match &key_ids.chain {
        None => out.extend_from_slice(DOMAIN_TAG),
        Some(chain) => {
            out.extend_from_slice(DOMAIN_TAG_V2);
            str(&mut out, chain);
            opt(&mut out, key_ids.fingerprint.as_deref());
        }
    }
    str(&mut out, prev);
    out.extend_from_slice(&e.id.to_be_bytes());
    out.extend_from_slice(&e.time.timestamp_micros().to_be_bytes());
    str(&mut out, &e.identity);
    opt(&mut out, e.peer.as_deref());
    str(&mut out, &e.action);
    str(&mut out, e.outcome.as_str());
    opt(&mut out, e.reason.as_deref());
    opt(&mut out, e.policy_rule.as_deref());
    opt(&mut out, e.lease_id.map(|l| l.to_string()).as_deref());
    opt(&mut out, e.organization.as_deref());
    opt(&mut out, e.scopes.as_deref());
    opt(&mut out, e.token_fingerprint.as_deref());
    if key_ids.chain.is_some() {
        opt(&mut out, e.caller_detail.as_deref());
    } else if let Some(detail) = &e.caller_detail {
        // Appended only when present: see item 6 of the module doc.
        opt(&mut out, Some(detail));
    }
    out
}

/// What [`verify`] found on an intact chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// Chained rows checked.
    pub chained_rows: u64,
    /// The newest chained row, if any.
    pub head: Option<AppendedEvent>,
}

impl fmt::Display for VerifyReport {
    /// One line for `token-broker audit verify`, e.g.
    /// `audit chain intact: 42 chained rows, head 42:<mac>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "audit chain intact: {} chained rows", self.chained_rows)?;
        match &self.head {
            Some(head) => write!(f, ", head {}:{}", head.id, head.mac),
            None => f.write_str(", no head"),
        }
    }
}

/// An expected chain head given as text was not `<audit_id>:<mac>`.
#[derive(Debug, thiserror::Error)]
#[error("expected head {0:?} is not <audit_id>:<64 hex characters of mac>")]
pub struct BadHead(String);

/// Parses an expected chain head written `<audit_id>:<mac>` (as
/// [`VerifyReport`]'s Display and the `audit chain head` log line's
/// `audit_id` and `mac` fields give it), for [`verify`]'s `expected_head`.
/// The MAC is normalized to lower case. Errors: [`BadHead`].
pub fn parse_expected_head(text: &str) -> Result<(i64, String), BadHead> {
    let bad = || BadHead(text.to_owned());
    let (id, mac) = text.trim().split_once(':').ok_or_else(bad)?;
    let id: i64 = id.parse().map_err(|_| bad())?;
    if id < 1 || mac.len() != 64 || !mac.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    Ok((id, mac.to_ascii_lowercase()))
}

/// What is wrong at the row [`ChainBroken`] names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Defect {
    /// The stored MAC is not the MAC of this row's fields after the
    /// previous row: a field of this row was edited, or rows were moved.
    MacMismatch,
    /// Ids jump from `after` to this row: the rows between were deleted.
    RowsMissing {
        /// The chained row before the gap.
        after: i64,
    },
    /// The row has no MAC: it was written without the chain key (not
    /// through `AuditLog`) or its MAC was erased.
    MacMissing,
    /// The stored fields do not parse; carries the parse error.
    Unreadable(String),
    /// The expected head row is gone: the newest rows were dropped.
    HeadMissing {
        /// The newest chained row still stored, if any.
        newest: Option<i64>,
    },
    /// The row at the expected head's id carries another MAC.
    HeadMismatch,
    /// The row's chain key id differs from the row before it without
    /// being a switch row `from=FROM to=TO` (or a row without a chain key
    /// id carries a fingerprint key id): key ids were relabelled.
    KeyIdChanged {
        /// The previous row's chain key id (NULL: `default`).
        from: String,
        /// This row's chain key id (NULL: `default`).
        to: String,
    },
}

impl fmt::Display for Defect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Defect::MacMismatch => {
                f.write_str("MAC does not match: a field was edited or rows were moved (reordered)")
            }
            Defect::RowsMissing { after } => {
                write!(f, "rows after id {after} are missing (deleted)")
            }
            Defect::MacMissing => {
                f.write_str("no MAC: written without the chain key, or its MAC was erased")
            }
            Defect::Unreadable(why) => write!(f, "fields do not parse ({why})"),
            Defect::HeadMissing {
                newest: Some(newest),
            } => write!(
                f,
                "expected chain head is gone, newest row is {newest}: the newest rows were dropped"
            ),
            Defect::HeadMissing { newest: None } => f.write_str(
                "expected chain head is gone and no chained row is left: the rows were dropped",
            ),
            Defect::HeadMismatch => f.write_str("MAC differs from the expected chain head"),
            Defect::KeyIdChanged { from, to } if from == to => write!(
                f,
                "key ids relabelled: a row without a chain key id carries a fingerprint key id"
            ),
            Defect::KeyIdChanged { from, to } => write!(
                f,
                "chain key id changes from {from:?} to {to:?} without a switch row: key ids were relabelled"
            ),
        }
    }
}

/// The first broken place in the chain.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("audit chain broken at row {row_id}: {defect}")]
pub struct ChainBroken {
    /// The first row found broken (for a dropped head: the expected head's id).
    pub row_id: i64,
    /// What is wrong there.
    pub defect: Defect,
}

/// Why [`verify`] did not prove the chain.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The chain is broken at a named row.
    #[error(transparent)]
    Broken(#[from] ChainBroken),
    /// The store could not be read; nothing is proved either way.
    #[error("cannot read the audit trail: {0}")]
    Store(#[from] StoreError),
    /// Row `row_id` (and every row after it, until a switch to a held
    /// key) was MAC'd under chain key `key_id`, which is not configured:
    /// not a sign of tampering, but nothing from that row on is proved.
    /// `checked` rows before it verified.
    #[error(
        "audit chain cannot be verified from row {row_id}: needs chain key {key_id:?}, not configured (keys.audit_chain_keys); {checked} rows before it verified"
    )]
    KeyMissing {
        /// The first row that needs the key.
        row_id: i64,
        /// The key id it needs.
        key_id: String,
        /// Rows verified before it.
        checked: u64,
    },
}

impl ServiceError for VerifyError {
    fn code(&self) -> ErrorCode {
        match self {
            VerifyError::Broken(_) | VerifyError::KeyMissing { .. } => ErrorCode::Internal,
            VerifyError::Store(e) => e.code(),
        }
    }
    fn reason(&self) -> &'static str {
        match self {
            VerifyError::Broken(_) => "AUDIT_CHAIN_BROKEN",
            VerifyError::KeyMissing { .. } => "AUDIT_CHAIN_KEY_MISSING",
            VerifyError::Store(_) => "AUDIT_UNAVAILABLE",
        }
    }
}

/// Walks every audit row in id order and checks each chained row's MAC
/// under the key of its own `chain_key_id` (NULL: `default`) from
/// `chain_keys`, that chained ids are contiguous, and that the key id
/// changes only at a switch row. With
/// `expected_head` (`(audit_id, mac)` from the last `audit chain head` log
/// line or `token-broker audit head`), also checks that row is still there with that MAC, which
/// catches dropped newest rows; rows appended after it are fine.
///
/// Errors: [`VerifyError::Broken`] naming the first broken row and what is
/// wrong; [`VerifyError::KeyMissing`] at the first row whose chain key is
/// not in `chain_keys` (rows before it verified; not tampering);
/// [`VerifyError::Store`] if the rows cannot be read.
pub async fn verify(
    store: &dyn Store,
    chain_keys: &ChainKeys,
    expected_head: Option<(i64, String)>,
) -> Result<VerifyReport, VerifyError> {
    let heads: Vec<(i64, String)> = expected_head.into_iter().collect();
    verify_heads(store, chain_keys, &heads).await
}

/// As [`verify`], checking each of `expected_heads` (`(audit_id, mac)`,
/// e.g. every head published so far, in any order): each must still be
/// stored with its MAC. A head whose id now holds another MAC
/// ([`Defect::HeadMismatch`]) or no row ([`Defect::HeadMissing`]) fails;
/// the error names the first such head in the order given. Errors: as
/// [`verify`].
pub async fn verify_heads(
    store: &dyn Store,
    chain_keys: &ChainKeys,
    expected_heads: &[(i64, String)],
) -> Result<VerifyReport, VerifyError> {
    verify_from(store, chain_keys, None, expected_heads).await
}

/// As [`verify_heads`], starting after `start` (`(audit_id, mac)`: a head
/// recorded before the rows up to it were archived and deleted) instead of
/// at the first row: the next stored row must be `audit_id + 1` and chain
/// from `mac`, so the rows left prove themselves back to that recorded
/// head (docs/durability.md, "Archiving audit rows"). Rows at or before
/// `audit_id` are not read; `chained_rows` counts the rows after it. An
/// expected head at `audit_id` must carry `mac`; one before it is not
/// checked. Errors: as [`verify`].
pub async fn verify_from(
    store: &dyn Store,
    chain_keys: &ChainKeys,
    start: Option<(i64, String)>,
    expected_heads: &[(i64, String)],
) -> Result<VerifyReport, VerifyError> {
    let mut report = VerifyReport {
        chained_rows: 0,
        head: None,
    };
    // The MAC stored at each expected head's id, once seen.
    let mut heads_seen: BTreeMap<i64, Option<String>> = expected_heads
        .iter()
        .filter(|(id, _)| start.as_ref().is_none_or(|(from, _)| id >= from))
        .map(|(id, _)| (*id, None))
        .collect();
    let mut prev_key_id: Option<String> = None;
    let mut after = 0;
    if let Some((id, mac)) = start {
        if let Some(seen) = heads_seen.get_mut(&id) {
            *seen = Some(mac.clone());
        }
        after = id;
        report.head = Some(AppendedEvent { id, mac });
    }
    loop {
        let rows = store.list_audit_chain(after, VERIFY_PAGE).await?;
        let Some(last) = rows.last() else { break };
        after = last.id;
        for row in rows {
            let broken = |defect| ChainBroken {
                row_id: row.id,
                defect,
            };
            let event = row
                .event
                .map_err(|e| broken(Defect::Unreadable(e.to_string())))?;
            let Some(mac) = row.mac else {
                return Err(broken(Defect::MacMissing).into());
            };
            let prev = report.head.as_ref();
            if let Some(prev) = prev.filter(|p| Some(row.id) != p.id.checked_add(1)) {
                return Err(broken(Defect::RowsMissing { after: prev.id }).into());
            }
            let key_id = row.key_ids.chain.as_deref().unwrap_or(DEFAULT_KEY_ID);
            if row.key_ids.chain.is_none() && row.key_ids.fingerprint.is_some() {
                return Err(broken(Defect::KeyIdChanged {
                    from: key_id.to_owned(),
                    to: key_id.to_owned(),
                })
                .into());
            }
            if let Some(from) = prev_key_id.as_deref().filter(|from| *from != key_id) {
                let is_switch = row.key_ids.chain.is_some()
                    && event.action == CHAIN_KEY_ROTATE
                    && event.identity == SYSTEM_IDENTITY
                    && event.caller_detail.as_deref() == Some(&switch_detail(from, key_id));
                if !is_switch {
                    return Err(broken(Defect::KeyIdChanged {
                        from: from.to_owned(),
                        to: key_id.to_owned(),
                    })
                    .into());
                }
            }
            let Some(chain_key) = chain_keys.get(key_id) else {
                return Err(VerifyError::KeyMissing {
                    row_id: row.id,
                    key_id: key_id.to_owned(),
                    checked: report.chained_rows,
                });
            };
            let expected =
                chain_key.mac_with_ids(prev.map(|p| p.mac.as_str()), &event, &row.key_ids);
            // Not secret, but compare in constant time anyway: it costs nothing.
            if !bool::from(subtle::ConstantTimeEq::ct_eq(
                expected.as_bytes(),
                mac.as_bytes(),
            )) {
                return Err(broken(Defect::MacMismatch).into());
            }
            if let Some(seen) = heads_seen.get_mut(&row.id) {
                *seen = Some(mac.clone());
            }
            report.chained_rows += 1;
            report.head = Some(AppendedEvent { id: row.id, mac });
            prev_key_id = Some(key_id.to_owned());
        }
    }
    for (id, mac) in expected_heads {
        if !heads_seen.contains_key(id) {
            continue;
        }
        let broken = |defect| ChainBroken {
            row_id: *id,
            defect,
        };
        match heads_seen.get(id).and_then(Option::as_ref) {
            Some(seen) if seen.eq_ignore_ascii_case(mac) => {}
            Some(_) => return Err(broken(Defect::HeadMismatch).into()),
            None => {
                return Err(broken(Defect::HeadMissing {
                    newest: report.head.as_ref().map(|h| h.id),
                })
                .into())
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Outcome;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use base64::Engine as _;
    use chrono::TimeZone;

    fn key(byte: u8) -> ChainKey {
        ChainKey::new(&SecretString::from(BASE64.encode([byte; KEY_LEN]))).unwrap()
    }

    fn event() -> AuditEvent {
        let time = chrono::Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap();
        AuditEvent {
            id: 7,
            organization: Some("contoso".into()),
            ..AuditEvent::new(time, "apikey:ci", "lease.create", Outcome::Allowed)
        }
    }

    #[test]
    fn the_mac_is_64_hex_and_depends_on_key_prev_and_every_field() {
        let k = key(1);
        let base = k.mac(None, &event());
        assert_eq!(base.len(), 64);
        assert!(base.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(base, k.mac(Some(GENESIS_MAC), &event()));
        assert_ne!(base, key(2).mac(None, &event()));
        assert_ne!(base, k.mac(Some(&base), &event()));
        let edits: Vec<fn(&mut AuditEvent)> = vec![
            |e| e.id += 1,
            |e| e.time += chrono::Duration::microseconds(1),
            |e| e.identity.push('x'),
            |e| e.peer = Some(String::new()),
            |e| e.action.push('x'),
            |e| e.outcome = Outcome::Denied,
            |e| e.reason = Some("R".into()),
            |e| e.policy_rule = Some("r".into()),
            |e| e.lease_id = Some(crate::domain::LeaseId::new()),
            |e| e.organization = None,
            |e| e.scopes = Some("vso.code".into()),
            |e| e.token_fingerprint = Some("ab".into()),
            |e| e.caller_detail = Some(String::new()),
            |e| e.caller_detail = Some("pod=a".into()),
        ];
        for edit in edits {
            let mut e = event();
            edit(&mut e);
            assert_ne!(base, k.mac(None, &e));
        }
    }

    #[test]
    fn a_row_without_caller_detail_keeps_its_version_1_mac_and_one_with_it_is_covered() {
        // Known answers computed independently from the module doc's encoding.
        assert_eq!(
            key(1).mac(None, &event()),
            "11f98856313fe0678e1617e42c843f7dd73ac65534fd9e9223ba18b8f3e7998e"
        );
        let mut e = event();
        e.caller_detail = Some("pod=web-1 sa_uid=u1".into());
        assert_eq!(
            key(1).mac(None, &e),
            "09a0ced6a0dbaf4285c5f33f0c1e47016e39fdcd87b7f51ad2b68478395602fc"
        );
    }

    #[test]
    fn rows_with_key_ids_use_version_2_which_covers_both_ids() {
        let k = key(1);
        let ids = |chain: Option<&str>, fingerprint: Option<&str>| AuditKeyIds {
            chain: chain.map(str::to_owned),
            fingerprint: fingerprint.map(str::to_owned),
        };
        // No chain key id: version 1, byte for byte (the fingerprint key id
        // is not covered there, and verify refuses a row that has one).
        assert_eq!(
            k.mac_with_ids(None, &event(), &ids(None, None)),
            k.mac(None, &event())
        );
        let v2 = k.mac_with_ids(None, &event(), &ids(Some("default"), None));
        assert_ne!(v2, k.mac(None, &event()));
        for other in [
            ids(Some("a2"), None),
            ids(Some("default"), Some("default")),
            ids(Some("default"), Some("")),
            ids(Some(""), None),
        ] {
            assert_ne!(v2, k.mac_with_ids(None, &event(), &other), "{other:?}");
        }
        // caller_detail absent and empty differ in version 2 as well.
        let mut e = event();
        e.caller_detail = Some(String::new());
        assert_ne!(v2, k.mac_with_ids(None, &e, &ids(Some("default"), None)));
    }

    #[test]
    fn a_chain_keyring_checks_its_ids_and_shows_none_of_its_keys() {
        let secret = || SecretString::from(BASE64.encode([7u8; KEY_LEN]));
        let ring =
            ChainKeys::new("a2", [("a1".into(), secret()), ("a2".into(), secret())]).unwrap();
        assert_eq!(ring.active_key_id(), "a2");
        assert!(ring.get("a1").is_some() && ring.get("a3").is_none());
        assert_eq!(
            format!("{ring:?}"),
            r#"ChainKeys { active: "a2", key_ids: ["a1", "a2"] }"#
        );
        assert!(matches!(
            ChainKeys::new("a3", [("a1".into(), secret())]),
            Err(CryptoError::UnknownKey(id)) if id == "a3"
        ));
        assert!(matches!(
            ChainKeys::new("a 1", [("a 1".into(), secret())]),
            Err(CryptoError::InvalidKeyId(_))
        ));
        assert_eq!(ChainKeys::from(key(1)).active_key_id(), "default");
    }

    #[test]
    fn moving_bytes_between_adjacent_fields_changes_the_mac() {
        let k = key(1);
        let mut a = event();
        (a.reason, a.policy_rule) = (Some("ab".into()), Some("c".into()));
        let mut b = event();
        (b.reason, b.policy_rule) = (Some("a".into()), Some("bc".into()));
        assert_ne!(k.mac(None, &a), k.mac(None, &b));
        let mut c = event();
        (c.reason, c.policy_rule) = (Some(String::new()), None);
        let mut d = event();
        (d.reason, d.policy_rule) = (None, Some(String::new()));
        assert_ne!(k.mac(None, &c), k.mac(None, &d));
    }

    #[test]
    fn an_expected_head_parses_from_id_colon_mac() {
        let mac = "AB".repeat(32);
        assert_eq!(
            parse_expected_head(&format!(" 42:{mac}\n")).unwrap(),
            (42, "ab".repeat(32))
        );
        for bad in [
            "",
            "42",
            "x:ab",
            "0:ab",
            &format!("42:{}", "ab".repeat(31)),
            &format!("-1:{mac}"),
            &format!("42:{}", "zz".repeat(32)),
        ] {
            assert!(parse_expected_head(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_bad_chain_key_is_refused_and_debug_shows_nothing() {
        for bad in ["", "short", &BASE64.encode([1u8; 16])] {
            assert!(matches!(
                ChainKey::new(&SecretString::from(bad)),
                Err(CryptoError::BadKey(ref name)) if name == "audit chain"
            ));
        }
        assert_eq!(format!("{:?}", key(1)), "ChainKey { .. }");
    }
}
