//! Keys that match, or no start (issue 14): the database records, per
//! purpose and key id, a check value of each configured key (migration
//! 0009), and every command that opens the database ([`check_keys`])
//! refuses to go on when a configured key differs from the recorded one,
//! or when stored secrets or audit rows need a key id the keyring lacks.
//! Also the counts behind `keys status` ([`status`]) and the re-sealing
//! behind `keys rewrap` ([`rewrap`]).
//!
//! A check value is hex HMAC-SHA256 of [`CHECK_LABEL`] under the key: it
//! tells keys apart and reveals nothing of them.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret as _, SecretString};
use sha2::Sha256;

use crate::config::ResolvedKeys;
use crate::crypto::{self, CryptoError, Keyring};
use crate::domain::Timestamp;
use crate::store::{KeyCheck, SecretOwner, SecretReplacement, Store, StoreError, DEFAULT_KEY_ID};

/// The label whose HMAC under a key is that key's check value.
pub const CHECK_LABEL: &[u8] = b"token-broker key check v1";

/// Default `keys rewrap --batch-size`: secrets re-sealed per transaction.
pub const DEFAULT_REWRAP_BATCH: u32 = 500;

/// Passes `rewrap` makes at most: a pass that still leaves secrets under
/// other keys (written meanwhile by a replica with an older active key) is
/// followed by another while the last one re-sealed something.
const REWRAP_PASSES: usize = 5;

/// What a key is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Purpose {
    /// Sealing secrets at rest (`keys.sealing`).
    Sealing,
    /// Chaining the audit rows (`keys.audit_chain`).
    AuditChain,
    /// Token fingerprints in the audit trail (`keys.fingerprint`).
    Fingerprint,
}

impl Purpose {
    /// Stored form (`key_checks.purpose`): `sealing`, `audit_chain`,
    /// `fingerprint`.
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Sealing => "sealing",
            Purpose::AuditChain => "audit_chain",
            Purpose::Fingerprint => "fingerprint",
        }
    }

    /// In prose: `sealing`, `audit chain`, `fingerprint`.
    pub fn describe(self) -> &'static str {
        match self {
            Purpose::Sealing => "sealing",
            Purpose::AuditChain => "audit chain",
            Purpose::Fingerprint => "fingerprint",
        }
    }

    /// The setting that holds key `id`: `keys.sealing.<id>`; for the
    /// audit chain and fingerprint keys `keys.audit_chain` /
    /// `keys.fingerprint` for key id `default`, else
    /// `keys.audit_chain_keys.<id>` / `keys.fingerprint_keys.<id>`.
    pub fn setting(self, id: &str) -> String {
        match self {
            Purpose::Sealing => format!("keys.sealing.{id}"),
            _ if id == DEFAULT_KEY_ID => format!("keys.{}", self.as_str()),
            _ => format!("keys.{}_keys.{id}", self.as_str()),
        }
    }
}

/// One purpose's configured keyring: the active key id and every key.
pub struct ConfiguredKeys {
    /// What the keys are for.
    pub purpose: Purpose,
    /// Id of the key new seals, MACs or fingerprints use.
    pub active: String,
    /// Key id -> standard base64 of the 32-byte key (secret).
    pub keys: BTreeMap<String, SecretString>,
}

/// The configured keyrings of all three purposes (the single-string
/// `keys.audit_chain` / `keys.fingerprint` are key id `default`).
pub fn configured(keys: &ResolvedKeys) -> Vec<ConfiguredKeys> {
    vec![
        ConfiguredKeys {
            purpose: Purpose::Sealing,
            active: keys.active.clone(),
            keys: keys.sealing.clone(),
        },
        ConfiguredKeys {
            purpose: Purpose::AuditChain,
            active: keys.audit_chain_active.clone(),
            keys: keys.audit_chain_keys.clone(),
        },
        ConfiguredKeys {
            purpose: Purpose::Fingerprint,
            active: keys.fingerprint_active.clone(),
            keys: keys.fingerprint_keys.clone(),
        },
    ]
}

/// The check value of `key` (standard base64 of 32 bytes): 64 lower-case
/// hex characters of HMAC-SHA256 of [`CHECK_LABEL`] under the key bytes.
///
/// Errors: [`CryptoError::BadKey`] naming `id` for a key that is not 32
/// bytes of standard base64.
pub fn check_value(id: &str, key: &SecretString) -> Result<String, CryptoError> {
    let key = crypto::decode_key(id, key)?;
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.expose_secret())
        .expect("HMAC takes keys of any length");
    mac.update(CHECK_LABEL);
    Ok(hex::encode(mac.finalize().into_bytes()))
}

/// Why the keys do not fit the database. Names purposes and key ids,
/// never key bytes.
#[derive(Debug, thiserror::Error)]
pub enum KeyProblem {
    /// A configured key differs from the one recorded under its id.
    #[error("{setting} does not match the key this database recorded for {purpose} key {key_id}: wrong keys file?")]
    Mismatch {
        /// The setting holding the key, e.g. `keys.sealing.k1`.
        setting: String,
        /// [`Purpose::describe`].
        purpose: &'static str,
        /// The key id.
        key_id: String,
    },
    /// Stored secrets are sealed with a key id the keyring lacks.
    #[error("{} sealed with sealing key {key_id}, which is not configured", counted(*count, "stored secret is", "stored secrets are"))]
    SealingKeyMissing {
        /// The key id.
        key_id: String,
        /// How many secrets it seals.
        count: u64,
    },
    /// Audit rows are chained with a key id the keyring lacks.
    #[error("{} chained with audit chain key {key_id}, which is not configured", counted(*count, "audit row is", "audit rows are"))]
    ChainKeyMissing {
        /// The key id.
        key_id: String,
        /// How many rows it chains.
        count: u64,
    },
    /// Audit rows carry fingerprints made with a key id the keyring lacks.
    #[error("{} token fingerprints made with fingerprint key {key_id}, which is not configured", counted(*count, "audit row carries", "audit rows carry"))]
    FingerprintKeyMissing {
        /// The key id.
        key_id: String,
        /// How many rows carry one.
        count: u64,
    },
}

fn counted(n: u64, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

/// Why [`check_keys`] refused, or could not check.
#[derive(Debug, thiserror::Error)]
pub enum KeyCheckError {
    /// The keys do not fit the database: every problem found.
    #[error("keys: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Refused(Vec<KeyProblem>),
    /// A configured key is malformed.
    #[error("keys: {0}")]
    Key(#[from] CryptoError),
    /// The database could not be read or written.
    #[error("database: {0}")]
    Store(#[from] StoreError),
}

/// Records the check value of every configured key not yet recorded
/// (race-safe across replicas starting together) and refuses when a
/// configured key's check value differs from the recorded one, when stored
/// secrets are sealed with a key id `keys` lacks, or when audit rows were
/// chained or fingerprinted with a key id it lacks. Cheap: a few small
/// reads, indexed lookups per sealing key id, and one aggregate over the
/// audit rows.
pub async fn check_keys(store: &dyn Store, keys: &ResolvedKeys) -> Result<(), KeyCheckError> {
    let keyrings = configured(keys);
    let mut checks = Vec::new();
    for ring in &keyrings {
        for (id, key) in &ring.keys {
            checks.push(KeyCheck {
                purpose: ring.purpose.as_str().to_owned(),
                key_id: id.clone(),
                check_value: check_value(&ring.purpose.setting(id), key)?,
            });
        }
    }
    let recorded = store.record_key_checks(&checks, Timestamp::now()).await?;
    let mut problems = Vec::new();
    for check in &checks {
        let differs = recorded.iter().any(|r| {
            r.purpose == check.purpose
                && r.key_id == check.key_id
                && r.check_value != check.check_value
        });
        if differs {
            let purpose = keyrings
                .iter()
                .map(|r| r.purpose)
                .find(|p| p.as_str() == check.purpose)
                .expect("checks come from the keyrings");
            problems.push(KeyProblem::Mismatch {
                setting: purpose.setting(&check.key_id),
                purpose: purpose.describe(),
                key_id: check.key_id.clone(),
            });
        }
    }

    let lacks = |purpose: Purpose, id: &str| {
        keyrings
            .iter()
            .any(|r| r.purpose == purpose && !r.keys.contains_key(id))
    };
    let missing: Vec<String> = store
        .sealed_key_ids()
        .await?
        .into_iter()
        .filter(|id| lacks(Purpose::Sealing, id))
        .collect();
    if !missing.is_empty() {
        for (key_id, count) in store.count_sealed_by_key(&missing).await? {
            problems.push(KeyProblem::SealingKeyMissing { key_id, count });
        }
    }
    let (chain, fingerprint) = store.count_audit_rows_by_key().await?;
    for (key_id, count) in chain {
        if count > 0 && lacks(Purpose::AuditChain, &key_id) {
            problems.push(KeyProblem::ChainKeyMissing { key_id, count });
        }
    }
    for (key_id, count) in fingerprint {
        if count > 0 && lacks(Purpose::Fingerprint, &key_id) {
            problems.push(KeyProblem::FingerprintKeyMissing { key_id, count });
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(KeyCheckError::Refused(problems))
    }
}

/// One purpose's keys for `keys status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PurposeStatus {
    /// What the keys are for.
    pub purpose: Purpose,
    /// The configured active key id.
    pub active: String,
    /// Key id -> (stored secrets or audit rows it protects, configured).
    /// Every configured key (0 when it protects nothing) and every key id
    /// the database needs that is not configured.
    pub keys: BTreeMap<String, (u64, bool)>,
}

/// Per purpose, the active key id and how many stored secrets (sealing) or
/// audit rows (audit chain, fingerprint) each key id protects.
pub async fn status(
    store: &dyn Store,
    keys: &ResolvedKeys,
) -> Result<Vec<PurposeStatus>, StoreError> {
    let sealing_ids: Vec<String> = store.sealed_key_ids().await?.into_iter().collect();
    let sealing = store.count_sealed_by_key(&sealing_ids).await?;
    let (chain, fingerprint) = store.count_audit_rows_by_key().await?;
    Ok(configured(keys)
        .into_iter()
        .map(|ring| {
            let counts = match ring.purpose {
                Purpose::Sealing => &sealing,
                Purpose::AuditChain => &chain,
                Purpose::Fingerprint => &fingerprint,
            };
            let mut keys: BTreeMap<String, (u64, bool)> =
                ring.keys.keys().map(|id| (id.clone(), (0, true))).collect();
            for (id, count) in counts.iter().filter(|(_, n)| **n > 0) {
                keys.entry(id.clone()).or_insert((0, false)).0 = *count;
            }
            PurposeStatus {
                purpose: ring.purpose,
                active: ring.active,
                keys,
            }
        })
        .collect())
}

/// Why `keys rewrap` stopped.
#[derive(Debug, thiserror::Error)]
pub enum RewrapError {
    /// A stored secret does not open (names its row, never its value).
    #[error("{owner} does not open: {source}")]
    Open {
        /// Its row, e.g. `lease 0190…` or `the upstream credential`.
        owner: String,
        /// Why.
        source: CryptoError,
    },
    /// The database could not be read or written.
    #[error("database: {0}")]
    Store(#[from] StoreError),
}

/// What [`rewrap`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RewrapReport {
    /// Secrets re-sealed under the active key.
    pub rewrapped: u64,
    /// Secrets still under other keys when it ended (0 unless a replica
    /// kept sealing under an older active key meanwhile).
    pub remaining: u64,
}

/// How many stored secrets are sealed under a key other than `active`.
pub async fn count_not_under(store: &dyn Store, active: &str) -> Result<u64, StoreError> {
    let others: Vec<String> = store
        .sealed_key_ids()
        .await?
        .into_iter()
        .filter(|id| id != active)
        .collect();
    Ok(store.count_sealed_by_key(&others).await?.values().sum())
}

fn describe_owner(owner: &SecretOwner) -> String {
    match owner {
        SecretOwner::UpstreamCredential => "the upstream credential".into(),
        SecretOwner::Lease(id) => format!("lease {id}"),
        SecretOwner::CredentialVersion {
            credential,
            version,
        } => format!("credential {credential} version {version}"),
    }
}

/// Re-seals every stored secret not under `keyring`'s active key with it,
/// `batch_size` at a time: each batch opens its secrets (each with the
/// associated data its reader uses), seals them anew and replaces each row
/// by compare-and-set in one transaction, so a live broker's write in
/// between wins and a kill loses nothing (a rerun carries on). After each
/// batch, `progress` gets how many secrets it re-sealed.
pub async fn rewrap(
    store: &dyn Store,
    keyring: &Keyring,
    batch_size: u32,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<RewrapReport, RewrapError> {
    let active = keyring.active_key_id().to_owned();
    let batch_size = batch_size.max(1);
    let mut rewrapped = 0;
    for _ in 0..REWRAP_PASSES {
        let mut after: Option<SecretOwner> = None;
        let mut this_pass = 0;
        loop {
            let page = store
                .list_secrets_not_under(&active, after.as_ref(), batch_size)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.owner.clone());
            let mut replacements = Vec::with_capacity(page.len());
            for secret in page {
                let aad = secret.owner.aad();
                let plain =
                    keyring
                        .open(&secret.sealed, &aad)
                        .map_err(|source| RewrapError::Open {
                            owner: describe_owner(&secret.owner),
                            source,
                        })?;
                replacements.push(SecretReplacement {
                    new: keyring.seal(&plain, &aad),
                    owner: secret.owner,
                    old: secret.sealed,
                });
            }
            let done = store.replace_secrets(&replacements).await?;
            this_pass += done;
            progress(done);
        }
        rewrapped += this_pass;
        let remaining = count_not_under(store, &active).await?;
        if remaining == 0 || this_pass == 0 {
            return Ok(RewrapReport {
                rewrapped,
                remaining,
            });
        }
    }
    Ok(RewrapReport {
        rewrapped,
        remaining: count_not_under(store, &active).await?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_value_is_hex_hmac_of_the_label_and_differs_per_key() {
        let (k1, k2) = (Keyring::generate_key(), Keyring::generate_key());
        let a = check_value("k1", &k1).unwrap();
        assert_eq!(a.len(), 64);
        assert_eq!(a, check_value("k1", &k1).unwrap());
        assert_ne!(a, check_value("k2", &k2).unwrap());
        assert!(!a.contains(k1.expose_secret()));
        // HMAC-SHA256 (RFC 4231 style) under 32 zero bytes, computed apart.
        let zero = SecretString::from("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=");
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&[0u8; 32]).unwrap();
        mac.update(b"token-broker key check v1");
        assert_eq!(
            check_value("z", &zero).unwrap(),
            hex::encode(mac.finalize().into_bytes())
        );
    }

    #[test]
    fn settings_name_the_key() {
        assert_eq!(Purpose::Sealing.setting("k1"), "keys.sealing.k1");
        assert_eq!(Purpose::AuditChain.setting("default"), "keys.audit_chain");
        assert_eq!(
            Purpose::Fingerprint.setting("f2"),
            "keys.fingerprint_keys.f2"
        );
    }

    #[test]
    fn problems_read_as_the_issue_says() {
        let mismatch = KeyProblem::Mismatch {
            setting: "keys.sealing.k1".into(),
            purpose: "sealing",
            key_id: "k1".into(),
        };
        assert_eq!(
            mismatch.to_string(),
            "keys.sealing.k1 does not match the key this database recorded for sealing key k1: wrong keys file?"
        );
        let missing = KeyProblem::SealingKeyMissing {
            key_id: "k1".into(),
            count: 12,
        };
        assert_eq!(
            missing.to_string(),
            "12 stored secrets are sealed with sealing key k1, which is not configured"
        );
    }
}
