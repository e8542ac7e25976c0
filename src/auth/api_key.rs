//! API keys: `tbk_` + 43 characters of unpadded base64url (32 random bytes).
//! Configuration holds only their SHA-256 (hex); a presented key is hashed
//! and compared with every configured hash in constant time.

use std::fmt;

use base64::Engine as _;
use rand::RngCore as _;
use secrecy::{ExposeSecret as _, SecretString};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use crate::domain::Identity;

/// Every API key starts with this, so secret scanners can spot a leaked one.
pub const API_KEY_PREFIX: &str = "tbk_";

/// SHA-256 of an API key, as configured (`auth.api_keys[].sha256`, 64 hex
/// digits). Not secret on its own, but kept out of logs anyway.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKeyHash([u8; 32]);

impl ApiKeyHash {
    /// Hashes a presented key.
    pub fn of(key: &str) -> Self {
        ApiKeyHash(Sha256::digest(key.as_bytes()).into())
    }

    /// Parses 64 hex digits (either case).
    pub fn parse_hex(hex_digest: &str) -> Result<Self, &'static str> {
        let bytes = hex::decode(hex_digest).map_err(|_| "expected 64 hexadecimal digits")?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "expected 64 hexadecimal digits (a SHA-256)")?;
        Ok(ApiKeyHash(bytes))
    }

    /// Lower-case hex, as written in configuration.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for ApiKeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKeyHash(..)")
    }
}

/// The configured API keys: name -> hash. Names are unique.
#[derive(Clone, Debug, Default)]
pub struct ApiKeys {
    keys: Vec<(Identity, ApiKeyHash)>,
}

impl ApiKeys {
    /// Builds the set; fails naming the first bad or duplicate name.
    pub fn new(keys: Vec<(String, ApiKeyHash)>) -> Result<Self, String> {
        Self::from_entries(keys).map_err(|(_, message)| message)
    }

    /// [`ApiKeys::new`], the error also giving the index in `keys` of the
    /// first bad or duplicate entry.
    pub fn from_entries(keys: Vec<(String, ApiKeyHash)>) -> Result<Self, (usize, String)> {
        let mut out: Vec<(Identity, ApiKeyHash)> = Vec::with_capacity(keys.len());
        for (index, (name, hash)) in keys.into_iter().enumerate() {
            let identity: Identity = format!("apikey:{name}")
                .parse()
                .map_err(|e| (index, format!("{e}")))?;
            if out.iter().any(|(i, _)| *i == identity) {
                return Err((index, format!("duplicate API key name {name:?}")));
            }
            if out.iter().any(|(_, h)| *h == hash) {
                return Err((
                    index,
                    format!("API key {name:?} has the same hash as another key"),
                ));
            }
            out.push((identity, hash));
        }
        Ok(ApiKeys { keys: out })
    }

    /// How many keys are configured.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when no key is configured (every caller is refused).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The identity whose hash matches `presented`. Compares against every
    /// configured hash in constant time, so timing tells nothing about
    /// which key, or how much of one, matched.
    pub fn verify(&self, presented: &str) -> Option<Identity> {
        let hash = ApiKeyHash::of(presented);
        let mut found = None;
        for (identity, configured) in &self.keys {
            if bool::from(configured.0.ct_eq(&hash.0)) {
                found = Some(identity.clone());
            }
        }
        found
    }
}

/// A freshly generated key: shown to the user once, configured by hash.
pub struct GeneratedApiKey {
    /// The key's name; its identity is `apikey:NAME`.
    pub name: String,
    /// The key itself (`tbk_…`).
    pub key: SecretString,
    /// Its SHA-256, for configuration.
    pub hash: ApiKeyHash,
}

impl GeneratedApiKey {
    /// Generates a key from the OS random source. Fails if `name` is not a
    /// valid API key name (letters, digits, `-`, `_`, `.`).
    pub fn generate(name: &str) -> Result<Self, String> {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let key = format!(
            "{API_KEY_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        );
        Self::from_key(name, SecretString::from(key))
    }

    /// Wraps a key the user supplied (e.g. `TOKEN_BROKER_DEV_API_KEY`);
    /// it must start with `tbk_` and be at least 20 printable characters.
    pub fn from_key(name: &str, key: SecretString) -> Result<Self, String> {
        format!("apikey:{name}")
            .parse::<Identity>()
            .map_err(|e| e.to_string())?;
        let k = key.expose_secret();
        if !k.starts_with(API_KEY_PREFIX) {
            return Err(format!("an API key must start with {API_KEY_PREFIX:?}"));
        }
        if k.len() < 20 || !k.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("an API key must be at least 20 printable ASCII characters".into());
        }
        let hash = ApiKeyHash::of(k);
        Ok(GeneratedApiKey {
            name: name.to_owned(),
            key,
            hash,
        })
    }

    /// The TOML entry for `[auth] api_keys = [...]`.
    pub fn config_entry(&self) -> String {
        format!(
            "{{ name = \"{}\", sha256 = \"{}\" }}",
            self.name,
            self.hash.to_hex()
        )
    }
}

impl fmt::Debug for GeneratedApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratedApiKey")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_prefixed_random_and_verify_against_their_hash() {
        let a = GeneratedApiKey::generate("ci").unwrap();
        let b = GeneratedApiKey::generate("ci").unwrap();
        assert!(a.key.expose_secret().starts_with("tbk_"));
        assert_eq!(a.key.expose_secret().len(), 4 + 43);
        assert_ne!(a.key.expose_secret(), b.key.expose_secret());
        let parsed = ApiKeyHash::parse_hex(&a.hash.to_hex()).unwrap();
        assert!(parsed == a.hash);
        assert!(a.config_entry().contains(&a.hash.to_hex()));
        assert!(!a.config_entry().contains(a.key.expose_secret()));
        assert!(!format!("{a:?}").contains(a.key.expose_secret()));
    }

    #[test]
    fn key_names_must_be_valid_and_unique() {
        let h = ApiKeyHash::of("tbk_x");
        assert!(ApiKeys::new(vec![("has space".into(), h.clone())]).is_err());
        let dup = ApiKeys::new(vec![
            ("a".into(), h.clone()),
            ("a".into(), ApiKeyHash::of("tbk_y")),
        ]);
        assert!(dup.unwrap_err().contains("duplicate"));
        assert!(ApiKeyHash::parse_hex("abc").is_err());
        assert!(GeneratedApiKey::from_key("dev", "not-a-broker-key-at-all".into()).is_err());
    }

    #[test]
    fn a_name_shaped_like_a_service_account_is_still_an_api_key() {
        let key = GeneratedApiKey::generate("system.serviceaccount.ns.sa").unwrap();
        let keys = ApiKeys::new(vec![(key.name.clone(), key.hash.clone())]).unwrap();
        let id = keys.verify(key.key.expose_secret()).unwrap();
        assert_eq!(id.kind(), "apikey");
    }
}
