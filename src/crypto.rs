//! Sealing secrets at rest with AES-256-GCM under a keyring, and keyed
//! fingerprints of tokens for the audit trail.
//!
//! Contract:
//! - A [`Sealed`] value carries the id of the key that sealed it; its text
//!   form is `v1:<key_id>:<base64(nonce || ciphertext)>` (standard base64
//!   with padding, RFC 4648 section 4).
//! - The associated data is the owning row's id, so a ciphertext moved to
//!   another row fails to open.
//! - Keys come from configuration or files, never the database. A keyring
//!   holds one active key (new seals) and any number of older ones (opens
//!   only), so keys rotate without re-sealing every row at once.
//! - Key bytes live in zeroizing containers and are never printed.
//! - Generated keys files are written here, mode 0600 ([`create_keys_file`]).

use std::collections::BTreeMap;
use std::fmt;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::Sha256;

use crate::error::{ErrorCode, ServiceError};

mod keys_file;

pub use keys_file::{add_audit_chain_key, create_keys_file, generate_keys_file, KeysFileError};

/// Length of an AES-256 key and of a fingerprint key, in bytes.
pub const KEY_LEN: usize = 32;
/// Length of an AES-GCM nonce, in bytes (96 bits, NIST SP 800-38D).
const NONCE_LEN: usize = 12;
/// Length of an AES-GCM tag, in bytes.
const TAG_LEN: usize = 16;
/// Version tag of the text form.
const VERSION: &str = "v1";

/// A sealed secret: which key sealed it, the 96-bit nonce and the
/// ciphertext with its GCM tag. Its Debug shows the key id only.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Id of the keyring key that sealed it.
    pub key_id: String,
    /// Random 96-bit GCM nonce.
    pub nonce: [u8; 12],
    /// Ciphertext followed by the 16-byte tag.
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealed")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Sealed {
    /// The stored text form `v1:<key_id>:<base64(nonce || ciphertext)>`.
    pub fn encode(&self) -> String {
        let mut payload = Vec::with_capacity(NONCE_LEN + self.ciphertext.len());
        payload.extend_from_slice(&self.nonce);
        payload.extend_from_slice(&self.ciphertext);
        format!("{VERSION}:{}:{}", self.key_id, BASE64.encode(payload))
    }

    /// Parses the text form written by [`Sealed::encode`].
    ///
    /// Errors: [`CryptoError::Malformed`] for another version, a bad key id,
    /// bad base64, or a payload shorter than nonce plus tag.
    pub fn decode(text: &str) -> Result<Sealed, CryptoError> {
        let mut parts = text.splitn(3, ':');
        let (Some(version), Some(key_id), Some(payload)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(CryptoError::Malformed("expected v1:<key_id>:<base64>"));
        };
        if version != VERSION {
            return Err(CryptoError::Malformed("unsupported version, expected v1"));
        }
        if !valid_key_id(key_id) {
            return Err(CryptoError::Malformed("invalid key id"));
        }
        let payload = BASE64
            .decode(payload)
            .map_err(|_| CryptoError::Malformed("payload is not standard base64"))?;
        if payload.len() < NONCE_LEN + TAG_LEN {
            return Err(CryptoError::Malformed("payload shorter than nonce and tag"));
        }
        let (nonce, ciphertext) = payload.split_at(NONCE_LEN);
        Ok(Sealed {
            key_id: key_id.to_owned(),
            nonce: nonce.try_into().expect("split at NONCE_LEN"),
            ciphertext: ciphertext.to_vec(),
        })
    }
}

/// Why a seal or open failed, or a key was refused. Never carries key or
/// plaintext bytes.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The ciphertext (or the configured active key id) names a key the
    /// keyring does not hold.
    #[error("no key with id {0:?} in the keyring")]
    UnknownKey(String),
    /// Authentication failed: wrong key, other row, or tampered bytes.
    #[error("sealed value failed authentication")]
    Unauthentic,
    /// The stored text is not a sealed value.
    #[error("malformed sealed value: {0}")]
    Malformed(&'static str),
    /// A key in configuration is not 32 bytes of base64.
    #[error("key {0:?} is not 32 bytes of standard base64")]
    BadKey(String),
    /// A key id is not `[A-Za-z0-9_-]{{1,32}}`.
    #[error("invalid key id {0:?}: use 1 to 32 letters, digits, '-' or '_'")]
    InvalidKeyId(String),
    /// The same key id was given twice.
    #[error("key id {0:?} is given more than once")]
    DuplicateKey(String),
}

impl ServiceError for CryptoError {
    /// Always internal: callers never supply keys or sealed values.
    fn code(&self) -> ErrorCode {
        ErrorCode::Internal
    }
    fn reason(&self) -> &'static str {
        match self {
            CryptoError::UnknownKey(_) => "SEALING_KEY_UNKNOWN",
            CryptoError::Unauthentic => "SEALED_VALUE_UNAUTHENTIC",
            CryptoError::Malformed(_) => "SEALED_VALUE_MALFORMED",
            CryptoError::BadKey(_)
            | CryptoError::InvalidKeyId(_)
            | CryptoError::DuplicateKey(_) => "SEALING_KEY_INVALID",
        }
    }
}

/// True for `[A-Za-z0-9_-]{1,32}`.
pub(crate) fn valid_key_id(id: &str) -> bool {
    (1..=32).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Decodes standard base64 of exactly [`KEY_LEN`] bytes (surrounding ASCII
/// whitespace, such as a key file's trailing newline, is ignored).
pub(crate) fn decode_key(
    id: &str,
    key: &SecretString,
) -> Result<SecretBox<[u8; KEY_LEN]>, CryptoError> {
    let bytes = Zeroizing::new(
        BASE64
            .decode(key.expose_secret().trim_ascii())
            .map_err(|_| CryptoError::BadKey(id.to_owned()))?,
    );
    if bytes.len() != KEY_LEN {
        return Err(CryptoError::BadKey(id.to_owned()));
    }
    let mut out = SecretBox::new(Box::new([0u8; KEY_LEN]));
    secrecy::ExposeSecretMut::expose_secret_mut(&mut out).copy_from_slice(&bytes);
    Ok(out)
}

/// AES-256-GCM keys by id: the active one seals, every one opens.
///
/// Debug prints the key ids only.
pub struct Keyring {
    active_key_id: String,
    keys: BTreeMap<String, SecretBox<[u8; KEY_LEN]>>,
}

impl Keyring {
    /// Builds a keyring from `(id, base64 of 32 bytes)` pairs.
    ///
    /// Errors: [`CryptoError::InvalidKeyId`] for an id outside
    /// `[A-Za-z0-9_-]{1,32}`, [`CryptoError::DuplicateKey`],
    /// [`CryptoError::BadKey`] for a key that is not 32 bytes of standard
    /// base64, [`CryptoError::UnknownKey`] if `active_key_id` is not among
    /// the keys.
    pub fn new(
        active_key_id: impl Into<String>,
        keys: impl IntoIterator<Item = (String, SecretString)>,
    ) -> Result<Keyring, CryptoError> {
        let active_key_id = active_key_id.into();
        let mut map = BTreeMap::new();
        for (id, key) in keys {
            if !valid_key_id(&id) {
                return Err(CryptoError::InvalidKeyId(id));
            }
            let key = decode_key(&id, &key)?;
            if map.contains_key(&id) {
                return Err(CryptoError::DuplicateKey(id));
            }
            map.insert(id, key);
        }
        if !map.contains_key(&active_key_id) {
            return Err(CryptoError::UnknownKey(active_key_id));
        }
        Ok(Keyring {
            active_key_id,
            keys: map,
        })
    }

    /// A fresh key: standard base64 of 32 bytes from the OS random source.
    pub fn generate_key() -> SecretString {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        rand::rngs::OsRng.fill_bytes(bytes.as_mut());
        SecretString::from(BASE64.encode(bytes.as_ref()))
    }

    /// The id of the key new seals use.
    pub fn active_key_id(&self) -> &str {
        &self.active_key_id
    }

    /// Seals `plaintext` under the active key with a fresh random nonce,
    /// binding it to `aad` (the owning row's id).
    pub fn seal(&self, plaintext: &SecretString, aad: &[u8]) -> Sealed {
        let cipher = self
            .cipher(&self.active_key_id)
            .expect("active key is held");
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let ciphertext = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext.expose_secret().as_bytes(),
                    aad,
                },
            )
            // Fails only for plaintexts over 64 GiB.
            .expect("AES-GCM seal of an in-memory secret");
        Sealed {
            key_id: self.active_key_id.clone(),
            nonce: nonce.into(),
            ciphertext,
        }
    }

    /// Opens a sealed value bound to `aad`, with the key it names (so values
    /// sealed before a rotation still open while their key is kept).
    ///
    /// Errors: [`CryptoError::UnknownKey`] if that key is not held,
    /// [`CryptoError::Unauthentic`] for a wrong key, another row's `aad` or
    /// tampered bytes.
    pub fn open(&self, sealed: &Sealed, aad: &[u8]) -> Result<SecretString, CryptoError> {
        let cipher = self.cipher(&sealed.key_id)?;
        let plaintext = Zeroizing::new(
            cipher
                .decrypt(
                    Nonce::from_slice(&sealed.nonce),
                    Payload {
                        msg: &sealed.ciphertext,
                        aad,
                    },
                )
                .map_err(|_| CryptoError::Unauthentic)?,
        );
        // Only SecretStrings are sealed, so this holds for authentic values.
        let text = std::str::from_utf8(&plaintext).map_err(|_| CryptoError::Unauthentic)?;
        // `to_owned` allocates exactly, so no unzeroized copy is left behind.
        Ok(SecretString::from(text.to_owned()))
    }

    /// A cipher for key `id`; built per call so only the zeroizing key box
    /// is long-lived (the `aes` crate's `zeroize` feature wipes round keys
    /// on drop).
    fn cipher(&self, id: &str) -> Result<Aes256Gcm, CryptoError> {
        let key = self
            .keys
            .get(id)
            .ok_or_else(|| CryptoError::UnknownKey(id.to_owned()))?;
        Ok(Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(
            key.expose_secret(),
        )))
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("active_key_id", &self.active_key_id)
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Keyed fingerprints of tokens for the audit trail: HMAC-SHA256 (RFC 2104)
/// under a key of its own, so the trail can match a token without holding
/// it, and a reader of the database alone cannot test guesses.
///
/// Holds the active fingerprint key (new fingerprints) and any older ones
/// still in the keyring, so a token fingerprinted before a rotation can
/// still be looked up ([`TokenFingerprinter::fingerprints`]).
///
/// Debug prints nothing of the keys.
pub struct TokenFingerprinter {
    active_key_id: String,
    keys: BTreeMap<String, SecretBox<[u8; KEY_LEN]>>,
}

impl TokenFingerprinter {
    /// Builds one from standard base64 of 32 bytes (as
    /// [`Keyring::generate_key`] makes), key id `default` (the single
    /// `keys.fingerprint`). Errors: [`CryptoError::BadKey`].
    pub fn new(key: SecretString) -> Result<Self, CryptoError> {
        Ok(TokenFingerprinter {
            active_key_id: crate::store::DEFAULT_KEY_ID.to_owned(),
            keys: BTreeMap::from([(
                crate::store::DEFAULT_KEY_ID.to_owned(),
                decode_key("fingerprint", &key)?,
            )]),
        })
    }

    /// Builds one from `(id, base64 of 32 bytes)` pairs, fingerprinting new
    /// tokens with `active_key_id` (`keys.fingerprint_active` +
    /// `keys.fingerprint_keys`). Errors as [`Keyring::new`]'s.
    pub fn with_keys(
        active_key_id: impl Into<String>,
        keys: impl IntoIterator<Item = (String, SecretString)>,
    ) -> Result<Self, CryptoError> {
        let active_key_id = active_key_id.into();
        let mut map = BTreeMap::new();
        for (id, key) in keys {
            if !valid_key_id(&id) {
                return Err(CryptoError::InvalidKeyId(id));
            }
            let key = decode_key(&id, &key)?;
            if map.insert(id.clone(), key).is_some() {
                return Err(CryptoError::DuplicateKey(id));
            }
        }
        if !map.contains_key(&active_key_id) {
            return Err(CryptoError::UnknownKey(active_key_id));
        }
        Ok(TokenFingerprinter {
            active_key_id,
            keys: map,
        })
    }

    /// The id of the key [`TokenFingerprinter::fingerprint`] uses.
    pub fn active_key_id(&self) -> &str {
        &self.active_key_id
    }

    /// The fingerprint of `token` under the active key: 64 lower-case hex
    /// characters.
    pub fn fingerprint(&self, token: &SecretString) -> String {
        fingerprint_with(&self.keys[&self.active_key_id], token)
    }

    /// The fingerprint of `token` under every key held, as `(key id, 64
    /// lower-case hex characters)`, ordered by key id: what a look-up by
    /// token matches stored fingerprints against.
    pub fn fingerprints(&self, token: &SecretString) -> Vec<(String, String)> {
        self.keys
            .iter()
            .map(|(id, key)| (id.clone(), fingerprint_with(key, token)))
            .collect()
    }
}

/// HMAC-SHA256 of `token` under `key`, lower-case hex.
fn fingerprint_with(key: &SecretBox<[u8; KEY_LEN]>, token: &SecretString) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.expose_secret())
        .expect("HMAC takes keys of any length");
    mac.update(token.expose_secret().as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

impl fmt::Debug for TokenFingerprinter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenFingerprinter")
            .field("active_key_id", &self.active_key_id)
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "dip55dwf4vpitomw63jzvomefmi2jluguprzwwqwuc6xq4fhocwq";

    fn keyring(active: &str, keys: &[(&str, &SecretString)]) -> Keyring {
        Keyring::new(
            active,
            keys.iter()
                .map(|(id, k)| (id.to_string(), SecretString::from(k.expose_secret()))),
        )
        .unwrap()
    }

    fn secret(s: &str) -> SecretString {
        SecretString::from(s)
    }

    /// A one-key keyring, and `TOKEN` sealed under it for `lease-1`.
    fn sealed_token() -> (Keyring, Sealed) {
        let k1 = Keyring::generate_key();
        let ring = keyring("k1", &[("k1", &k1)]);
        let sealed = ring.seal(&secret(TOKEN), b"lease-1");
        (ring, sealed)
    }

    fn is_unauthentic(opened: Result<SecretString, CryptoError>) -> bool {
        matches!(opened, Err(CryptoError::Unauthentic))
    }

    #[test]
    fn a_sealed_token_opens_to_the_same_token() {
        let (ring, sealed) = sealed_token();
        assert_eq!(sealed.key_id, "k1");
        assert!(!sealed
            .ciphertext
            .windows(8)
            .any(|w| w == &TOKEN.as_bytes()[..8]));
        let opened = ring.open(&sealed, b"lease-1").unwrap();
        assert_eq!(opened.expose_secret(), TOKEN);
    }

    #[test]
    fn each_seal_uses_a_fresh_nonce() {
        let k1 = Keyring::generate_key();
        let ring = keyring("k1", &[("k1", &k1)]);
        let a = ring.seal(&secret(TOKEN), b"lease-1");
        let b = ring.seal(&secret(TOKEN), b"lease-1");
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
    }

    #[test]
    fn the_text_form_round_trips() {
        let (ring, sealed) = sealed_token();
        let text = sealed.encode();
        assert!(text.starts_with("v1:k1:"), "{text}");
        let decoded = Sealed::decode(&text).unwrap();
        assert_eq!(decoded, sealed);
        assert_eq!(
            ring.open(&decoded, b"lease-1").unwrap().expose_secret(),
            TOKEN
        );
    }

    #[test]
    fn malformed_text_is_refused() {
        for text in [
            "",
            "v1:k1",
            "v2:k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "v1::AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "v1:k 1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "v1:k1:not base64!",
            "v1:k1:AAAA",
        ] {
            assert!(
                matches!(Sealed::decode(text), Err(CryptoError::Malformed(_))),
                "{text:?}"
            );
        }
    }

    #[test]
    fn a_wrong_key_fails_to_open() {
        let (k1, other) = (Keyring::generate_key(), Keyring::generate_key());
        let sealed = keyring("k1", &[("k1", &k1)]).seal(&secret(TOKEN), b"lease-1");
        let impostor = keyring("k1", &[("k1", &other)]);
        assert!(is_unauthentic(impostor.open(&sealed, b"lease-1")));
    }

    #[test]
    fn a_ciphertext_moved_to_another_row_fails_to_open() {
        let (ring, sealed) = sealed_token();
        assert!(is_unauthentic(ring.open(&sealed, b"lease-2")));
    }

    #[test]
    fn a_tampered_byte_fails_to_open() {
        let (ring, sealed) = sealed_token();
        for i in 0..sealed.ciphertext.len() {
            let mut bad = sealed.clone();
            bad.ciphertext[i] ^= 0x01;
            assert!(is_unauthentic(ring.open(&bad, b"lease-1")));
        }
        let mut bad = sealed.clone();
        bad.nonce[0] ^= 0x80;
        assert!(is_unauthentic(ring.open(&bad, b"lease-1")));
    }

    #[test]
    fn an_unknown_key_id_fails_to_open() {
        let (k1, k2) = (Keyring::generate_key(), Keyring::generate_key());
        let sealed = keyring("k1", &[("k1", &k1)]).seal(&secret(TOKEN), b"lease-1");
        let ring = keyring("k2", &[("k2", &k2)]);
        assert!(matches!(
            ring.open(&sealed, b"lease-1"),
            Err(CryptoError::UnknownKey(id)) if id == "k1"
        ));
    }

    #[test]
    fn after_rotation_old_values_open_and_new_seals_use_the_new_key() {
        let (k1, k2) = (Keyring::generate_key(), Keyring::generate_key());
        let old = keyring("k1", &[("k1", &k1)]).seal(&secret(TOKEN), b"lease-1");
        let rotated = keyring("k2", &[("k1", &k1), ("k2", &k2)]);
        assert_eq!(rotated.active_key_id(), "k2");
        assert_eq!(
            rotated.open(&old, b"lease-1").unwrap().expose_secret(),
            TOKEN
        );
        let new = rotated.seal(&secret("other"), b"lease-2");
        assert_eq!(new.key_id, "k2");
        assert_eq!(
            rotated.open(&new, b"lease-2").unwrap().expose_secret(),
            "other"
        );
    }

    #[test]
    fn bad_keyring_configuration_is_refused_naming_the_key() {
        let k1 = Keyring::generate_key();
        let err = Keyring::new("k9", [("k1".to_string(), secret(k1.expose_secret()))]).unwrap_err();
        assert!(
            matches!(err, CryptoError::UnknownKey(ref id) if id == "k9"),
            "{err}"
        );

        let short = secret(&BASE64.encode([7u8; 16]));
        let err = Keyring::new("k1", [("k1".to_string(), short)]).unwrap_err();
        assert!(
            matches!(err, CryptoError::BadKey(ref id) if id == "k1"),
            "{err}"
        );

        let err = Keyring::new("k1", [("k1".to_string(), secret("not base64!"))]).unwrap_err();
        assert!(matches!(err, CryptoError::BadKey(_)), "{err}");

        for id in ["", "has:colon", "has space", &"a".repeat(33)] {
            let err = Keyring::new(id, [(id.to_string(), secret(k1.expose_secret()))]).unwrap_err();
            assert!(matches!(err, CryptoError::InvalidKeyId(_)), "{id:?}: {err}");
        }

        let err = Keyring::new(
            "k1",
            [
                ("k1".to_string(), secret(k1.expose_secret())),
                ("k1".to_string(), secret(k1.expose_secret())),
            ],
        )
        .unwrap_err();
        assert!(matches!(err, CryptoError::DuplicateKey(_)), "{err}");
    }

    #[test]
    fn a_key_file_with_a_trailing_newline_is_accepted() {
        let k1 = Keyring::generate_key();
        let with_newline = secret(&format!("{}\n", k1.expose_secret()));
        let ring = Keyring::new("k1", [("k1".to_string(), with_newline)]).unwrap();
        let sealed = ring.seal(&secret(TOKEN), b"x");
        let plain = keyring("k1", &[("k1", &k1)]);
        assert_eq!(plain.open(&sealed, b"x").unwrap().expose_secret(), TOKEN);
    }

    #[test]
    fn generated_keys_are_32_random_bytes() {
        let (a, b) = (Keyring::generate_key(), Keyring::generate_key());
        assert_eq!(BASE64.decode(a.expose_secret()).unwrap().len(), 32);
        assert_ne!(a.expose_secret(), b.expose_secret());
    }

    #[test]
    fn debug_output_shows_no_key_material() {
        let (k1, k2) = (Keyring::generate_key(), Keyring::generate_key());
        let ring = keyring("k2", &[("k1", &k1), ("k2", &k2)]);
        let sealed = ring.seal(&secret(TOKEN), b"lease-1");
        let printer = TokenFingerprinter::new(secret(k1.expose_secret())).unwrap();
        let debug = format!("{ring:?} {sealed:?} {printer:?} {:?}", secret(TOKEN));
        assert_eq!(
            format!("{ring:?}"),
            r#"Keyring { active_key_id: "k2", key_ids: ["k1", "k2"] }"#
        );
        for key in [&k1, &k2] {
            let raw = BASE64.decode(key.expose_secret()).unwrap();
            assert!(!debug.contains(key.expose_secret()));
            assert!(!debug.contains(&hex::encode(raw.as_slice())));
            // The first key bytes as a `[u8]` Debug would print them.
            let bytes_debug = format!("{:?}", &raw[..4]);
            assert!(!debug.contains(bytes_debug.trim_end_matches(']')));
        }
        assert!(!debug.contains(TOKEN));
        assert!(!debug.contains(&BASE64.encode(&sealed.ciphertext)));
    }

    #[test]
    fn a_fingerprint_is_stable_and_differs_per_key_and_token() {
        let (k1, k2) = (Keyring::generate_key(), Keyring::generate_key());
        let f1 = TokenFingerprinter::new(secret(k1.expose_secret())).unwrap();
        let f1_again = TokenFingerprinter::new(secret(k1.expose_secret())).unwrap();
        let f2 = TokenFingerprinter::new(secret(k2.expose_secret())).unwrap();
        let fp = f1.fingerprint(&secret(TOKEN));
        assert_eq!(fp.len(), 64);
        assert!(fp
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(fp, f1_again.fingerprint(&secret(TOKEN)));
        assert_ne!(fp, f2.fingerprint(&secret(TOKEN)));
        assert_ne!(fp, f1.fingerprint(&secret("another-token")));
        assert!(!fp.contains(TOKEN));
    }

    #[test]
    fn a_fingerprint_keyring_fingerprints_under_the_active_key_and_every_key_for_lookups() {
        let (k1, k2) = (Keyring::generate_key(), Keyring::generate_key());
        let single = TokenFingerprinter::new(secret(k1.expose_secret())).unwrap();
        assert_eq!(single.active_key_id(), "default");
        let ring = TokenFingerprinter::with_keys(
            "k2",
            [
                ("k1".to_string(), secret(k1.expose_secret())),
                ("k2".to_string(), secret(k2.expose_secret())),
            ],
        )
        .unwrap();
        let only_k2 = TokenFingerprinter::new(secret(k2.expose_secret())).unwrap();
        assert_eq!(ring.active_key_id(), "k2");
        assert_eq!(
            ring.fingerprint(&secret(TOKEN)),
            only_k2.fingerprint(&secret(TOKEN))
        );
        assert_eq!(
            ring.fingerprints(&secret(TOKEN)),
            vec![
                ("k1".to_string(), single.fingerprint(&secret(TOKEN))),
                ("k2".to_string(), only_k2.fingerprint(&secret(TOKEN))),
            ]
        );
        assert_eq!(
            format!("{ring:?}"),
            r#"TokenFingerprinter { active_key_id: "k2", key_ids: ["k1", "k2"] }"#
        );
        let k1_only = [("k1".to_string(), secret(k1.expose_secret()))];
        assert!(matches!(
            TokenFingerprinter::with_keys("k9", k1_only.clone()),
            Err(CryptoError::UnknownKey(_))
        ));
        assert!(matches!(
            TokenFingerprinter::with_keys("k1", [k1_only[0].clone(), k1_only[0].clone()]),
            Err(CryptoError::DuplicateKey(_))
        ));
    }

    #[test]
    fn a_bad_fingerprint_key_is_refused() {
        assert!(matches!(
            TokenFingerprinter::new(secret("short")),
            Err(CryptoError::BadKey(_))
        ));
    }
}
