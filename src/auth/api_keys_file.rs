//! `auth.api_keys_file`: the API keys in a file of their own, reloaded with
//! the policy (on SIGHUP and when the file's content changes; the policy
//! watcher's triggers, see [`PolicyHandle::triggers`]).
//!
//! The file holds the same entries as `auth.api_keys`, under `api_keys`.
//! TOML (any name not ending in `.yaml`/`.yml`):
//!
//! ```toml
//! [[api_keys]]
//! name = "ci"
//! sha256 = "<64 hex digits>"
//! ```
//!
//! YAML (`.yaml` or `.yml`):
//!
//! ```yaml
//! api_keys:
//!   - name: ci
//!     sha256: "<64 hex digits>"
//! ```
//!
//! `api_keys` must be present (`api_keys = []` / `api_keys: []` for none),
//! so an empty or truncated file is refused instead of refusing every
//! caller. A call takes the key set in force when it is authenticated
//! ([`ApiKeysHandle::current`], an `Arc` swap under a lock: no file I/O on
//! the request path); a reload swaps the whole set at once. A file that
//! cannot be read or has a bad entry is refused (logged, naming the file
//! and the entry, and reported to subscribers) and the previous keys stay
//! in force.
//!
//! [`PolicyHandle::triggers`]: crate::policy::PolicyHandle::triggers

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use figment::providers::{Format as _, Toml};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tokio::sync::{broadcast, Mutex};
use tokio::task::JoinHandle;

use super::{ApiKeyHash, ApiKeys};
use crate::config::ApiKeySetting;
use crate::policy::ReloadTrigger;

/// How many reload outcomes a slow subscriber may fall behind (reloads are
/// rare; this is ample).
const OUTCOME_BUFFER: usize = 64;

/// Why an API keys file was refused. Names the file and, for a bad entry,
/// its index and name; never holds a key (the file holds none) nor a hash.
#[derive(Debug, thiserror::Error)]
pub enum ApiKeysFileError {
    /// The file could not be read.
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not a valid document, or an entry is bad: `message` names the
    /// entry (`api_keys[2] ("ci").sha256: …`).
    #[error("{}: {message}", file.display())]
    Invalid {
        /// The file.
        file: PathBuf,
        /// What is wrong, and where.
        message: String,
    },
}

/// The document: `api_keys`, the entries of `auth.api_keys`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeysDocument {
    api_keys: Vec<ApiKeySetting>,
}

/// True when `file` is read as YAML (`.yaml`/`.yml`, any case); else TOML.
fn is_yaml(file: &Path) -> bool {
    file.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"))
}

/// Parses the file's `bytes` (read from `file`, whose extension picks the
/// format) into the key set.
///
/// Errors: [`ApiKeysFileError::Invalid`] naming the entry at fault.
pub fn parse_api_keys_file(file: &Path, bytes: &[u8]) -> Result<ApiKeys, ApiKeysFileError> {
    let invalid = |message: String| ApiKeysFileError::Invalid {
        file: file.to_owned(),
        message,
    };
    let text = std::str::from_utf8(bytes).map_err(|e| invalid(format!("not UTF-8: {e}")))?;
    let document: ApiKeysDocument = if is_yaml(file) {
        serde_norway::from_str(text).map_err(|e| invalid(e.to_string()))?
    } else {
        figment::Figment::from(Toml::string(text))
            .extract()
            .map_err(|e| invalid(toml_errors(e)))?
    };
    let entry = |i: usize| match document.api_keys.get(i) {
        Some(k) => format!("api_keys[{i}] ({:?})", k.name),
        None => format!("api_keys[{i}]"),
    };
    let mut keys = Vec::with_capacity(document.api_keys.len());
    for (i, k) in document.api_keys.iter().enumerate() {
        let hash = ApiKeyHash::parse_hex(&k.sha256)
            .map_err(|m| invalid(format!("{}.sha256: {m}", entry(i))))?;
        keys.push((k.name.clone(), hash));
    }
    ApiKeys::from_entries(keys).map_err(|(i, m)| invalid(format!("{}: {m}", entry(i))))
}

/// figment's errors, one per `; `, each with its path as
/// `api_keys[1].sha256`.
fn toml_errors(err: figment::Error) -> String {
    err.into_iter()
        .map(|e| {
            let mut path = String::new();
            for part in &e.path {
                if part.bytes().all(|b| b.is_ascii_digit()) {
                    path.push_str(&format!("[{part}]"));
                } else {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(part);
                }
            }
            let message = e.kind.to_string().trim().replace('\n', " ");
            if path.is_empty() {
                message
            } else {
                format!("{path}: {message}")
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The outcome of one reload attempt of the API keys file (audited as an
/// `auth.api_keys_reload` event).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiKeysReloadOutcome {
    /// The file's keys are in force for every call authenticated from now.
    Applied {
        /// What started the attempt.
        trigger: ReloadTrigger,
        /// The API keys file.
        file: PathBuf,
        /// How many keys are now in force.
        keys: usize,
        /// SHA-256 of the file's bytes, lower-case hex.
        sha256: String,
    },
    /// The file was refused; the previous keys stay in force.
    Refused {
        /// What started the attempt.
        trigger: ReloadTrigger,
        /// The API keys file.
        file: PathBuf,
        /// Why ([`ApiKeysFileError`]: the file and the entry).
        error: String,
    },
}

impl ApiKeysReloadOutcome {
    /// True for [`ApiKeysReloadOutcome::Applied`].
    pub fn is_applied(&self) -> bool {
        matches!(self, ApiKeysReloadOutcome::Applied { .. })
    }
}

/// The API keys in force: fixed (`auth.api_keys`) or from
/// `auth.api_keys_file`, reloaded. Cheap to clone (clones share the set).
#[derive(Clone)]
pub struct ApiKeysHandle {
    inner: Arc<Inner>,
}

struct Inner {
    current: RwLock<Arc<ApiKeys>>,
    /// The file they came from; None for fixed keys (never reloaded).
    file: Option<PathBuf>,
    /// SHA-256 of the last content tried (applied or refused), so a poll
    /// retries only new content and a bad file is reported once. Held
    /// across an attempt: attempts never interleave.
    last_seen: Mutex<Option<[u8; 32]>>,
    outcomes: broadcast::Sender<ApiKeysReloadOutcome>,
}

impl fmt::Debug for ApiKeysHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeysHandle")
            .field("file", &self.inner.file)
            .field("keys", &self.current().len())
            .finish()
    }
}

impl Default for ApiKeysHandle {
    fn default() -> Self {
        ApiKeysHandle::from(ApiKeys::default())
    }
}

impl From<ApiKeys> for ApiKeysHandle {
    fn from(keys: ApiKeys) -> Self {
        ApiKeysHandle::new(keys, None, None)
    }
}

impl ApiKeysHandle {
    fn new(keys: ApiKeys, file: Option<PathBuf>, seen: Option<[u8; 32]>) -> Self {
        ApiKeysHandle {
            inner: Arc::new(Inner {
                current: RwLock::new(Arc::new(keys)),
                file,
                last_seen: Mutex::new(seen),
                outcomes: broadcast::channel(OUTCOME_BUFFER).0,
            }),
        }
    }

    /// Loads the API keys file at `path`; [`ApiKeysHandle::reload`] re-reads
    /// it later.
    ///
    /// Errors: as [`parse_api_keys_file`], or unreadable (at start-up
    /// either is fatal).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ApiKeysFileError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| ApiKeysFileError::Read {
            file: path.to_owned(),
            source,
        })?;
        let keys = parse_api_keys_file(path, &bytes)?;
        Ok(ApiKeysHandle::new(
            keys,
            Some(path.to_owned()),
            Some(Sha256::digest(&bytes).into()),
        ))
    }

    /// The keys in force now: one read lock and an `Arc` clone.
    pub fn current(&self) -> Arc<ApiKeys> {
        // A poisoned lock still holds a whole Arc: the swap cannot tear.
        self.inner
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The API keys file, if these keys reload from one.
    pub fn file(&self) -> Option<&Path> {
        self.inner.file.as_deref()
    }

    /// Every reload attempt's outcome from now on (for the audit trail).
    pub fn subscribe(&self) -> broadcast::Receiver<ApiKeysReloadOutcome> {
        self.inner.outcomes.subscribe()
    }

    /// Re-reads the file and puts its keys in force if valid; logs and
    /// reports the outcome. With [`ReloadTrigger::FileChanged`], does
    /// nothing (None) when the content is the same as at the last attempt;
    /// with [`ReloadTrigger::Signal`] it always tries. None for fixed keys.
    pub async fn reload(&self, trigger: ReloadTrigger) -> Option<ApiKeysReloadOutcome> {
        let file = self.inner.file.as_ref()?;
        let mut last_seen = self.inner.last_seen.lock().await;
        let read = tokio::fs::read(file).await;
        // The hash of what was read, or of the read error, so an unreadable
        // file is reported once, not on every poll.
        let seen: [u8; 32] = match &read {
            Ok(bytes) => Sha256::digest(bytes).into(),
            Err(e) => Sha256::digest(format!("unreadable: {e}")).into(),
        };
        if trigger == ReloadTrigger::FileChanged && *last_seen == Some(seen) {
            return None;
        }
        *last_seen = Some(seen);
        let result = read
            .map_err(|source| ApiKeysFileError::Read {
                file: file.clone(),
                source,
            })
            .and_then(|bytes| parse_api_keys_file(file, &bytes));
        let outcome = match result {
            Ok(keys) => {
                let count = keys.len();
                *self
                    .inner
                    .current
                    .write()
                    .unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
                let sha256 = hex::encode(seen);
                tracing::info!(file = %file.display(), %trigger, keys = count, %sha256, "API keys reloaded");
                ApiKeysReloadOutcome::Applied {
                    trigger,
                    file: file.clone(),
                    keys: count,
                    sha256,
                }
            }
            Err(e) => {
                tracing::error!(
                    file = %file.display(),
                    %trigger,
                    error = %e,
                    "API keys reload refused; the previous keys stay in force"
                );
                ApiKeysReloadOutcome::Refused {
                    trigger,
                    file: file.clone(),
                    error: e.to_string(),
                }
            }
        };
        // No subscriber is fine: the log line above is the record.
        let _ = self.inner.outcomes.send(outcome.clone());
        Some(outcome)
    }

    /// Reloads on every trigger from `triggers` (the policy watcher's:
    /// SIGHUP and its poll ticks, see
    /// [`PolicyHandle::triggers`](crate::policy::PolicyHandle::triggers))
    /// until `shutdown` resolves or the triggers end. Fixed keys: returns
    /// at once. Must be called inside a Tokio runtime.
    pub fn spawn_reloader(
        &self,
        mut triggers: broadcast::Receiver<ReloadTrigger>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> JoinHandle<()> {
        let handle = self.clone();
        tokio::spawn(async move {
            if handle.inner.file.is_none() {
                return;
            }
            tokio::pin!(shutdown);
            loop {
                let trigger = tokio::select! {
                    () = &mut shutdown => return,
                    received = triggers.recv() => match received {
                        Ok(trigger) => trigger,
                        // A SIGHUP may be among those missed: re-read.
                        Err(broadcast::error::RecvError::Lagged(_)) => ReloadTrigger::Signal,
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                };
                handle.reload(trigger).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret as _;

    use super::*;
    use crate::auth::GeneratedApiKey;

    fn toml_entry(key: &GeneratedApiKey) -> String {
        format!(
            "[[api_keys]]\nname = \"{}\"\nsha256 = \"{}\"\n",
            key.name,
            key.hash.to_hex()
        )
    }

    #[test]
    fn toml_and_yaml_files_hold_the_same_entries() {
        let a = GeneratedApiKey::generate("a").unwrap();
        let b = GeneratedApiKey::generate("b").unwrap();
        let toml = format!("{}{}", toml_entry(&a), toml_entry(&b));
        let keys = parse_api_keys_file(Path::new("keys.toml"), toml.as_bytes()).unwrap();
        assert_eq!(keys.len(), 2);
        assert!(keys.verify(b.key.expose_secret()).is_some());
        let yaml = format!(
            "api_keys:\n  - name: a\n    sha256: \"{}\"\n",
            a.hash.to_hex()
        );
        for name in ["keys.yaml", "keys.YML"] {
            let keys = parse_api_keys_file(Path::new(name), yaml.as_bytes()).unwrap();
            assert_eq!(keys.len(), 1, "{name}");
            assert!(keys.verify(a.key.expose_secret()).is_some());
        }
        let none = parse_api_keys_file(Path::new("k"), b"api_keys = []").unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn errors_name_the_file_and_the_entry() {
        let a = GeneratedApiKey::generate("a").unwrap();
        let bad_hash = format!(
            "{}[[api_keys]]\nname = \"b\"\nsha256 = \"abc\"\n",
            toml_entry(&a)
        );
        let e = parse_api_keys_file(Path::new("/etc/k.toml"), bad_hash.as_bytes()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/etc/k.toml: api_keys[1] (\"b\").sha256: expected 64 hexadecimal digits"
        );
        let dup = format!("{}{}", toml_entry(&a), toml_entry(&a));
        let e = parse_api_keys_file(Path::new("k.toml"), dup.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("api_keys[1] (\"a\")"), "{e}");
        let missing = "[[api_keys]]\nname = \"x\"\n\n[[api_keys]]\nname = \"y\"\n";
        let e = parse_api_keys_file(Path::new("k.toml"), missing.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("api_keys[0]"), "{e}");
        assert!(e.to_string().contains("sha256"), "{e}");
        let unknown = format!("{}role = \"admin\"\n", toml_entry(&a));
        let e = parse_api_keys_file(Path::new("k.toml"), unknown.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("role"), "{e}");
        let e = parse_api_keys_file(Path::new("k.yaml"), b"api_keys:\n  - name: x\n").unwrap_err();
        assert!(e.to_string().starts_with("k.yaml: "), "{e}");
        assert!(e.to_string().contains("sha256"), "{e}");
        for empty in ["k.toml", "k.yaml"] {
            assert!(
                parse_api_keys_file(Path::new(empty), b"").is_err(),
                "{empty}"
            );
        }
    }

    #[tokio::test]
    async fn a_reload_swaps_the_whole_set_and_a_bad_file_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let a = GeneratedApiKey::generate("a").unwrap();
        let b = GeneratedApiKey::generate("b").unwrap();
        std::fs::write(&path, toml_entry(&a)).unwrap();
        let handle = ApiKeysHandle::from_file(&path).unwrap();
        let mut outcomes = handle.subscribe();
        let in_flight = handle.current();
        assert_eq!(handle.reload(ReloadTrigger::FileChanged).await, None);

        std::fs::write(&path, toml_entry(&b)).unwrap();
        let outcome = handle.reload(ReloadTrigger::FileChanged).await.unwrap();
        assert!(
            matches!(outcome, ApiKeysReloadOutcome::Applied { keys: 1, .. }),
            "{outcome:?}"
        );
        assert_eq!(outcomes.recv().await.unwrap(), outcome);
        assert!(handle.current().verify(a.key.expose_secret()).is_none());
        assert!(handle.current().verify(b.key.expose_secret()).is_some());
        assert!(in_flight.verify(a.key.expose_secret()).is_some());

        std::fs::write(&path, "[[api_keys]]\nname = \"c\"\nsha256 = \"00\"\n").unwrap();
        let refused = handle.reload(ReloadTrigger::Signal).await.unwrap();
        match &refused {
            ApiKeysReloadOutcome::Refused { error, .. } => {
                assert!(error.contains("keys.toml: api_keys[0] (\"c\")"), "{error}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(handle.current().verify(b.key.expose_secret()).is_some());
        assert_eq!(handle.reload(ReloadTrigger::FileChanged).await, None);

        std::fs::remove_file(&path).unwrap();
        let gone = handle.reload(ReloadTrigger::FileChanged).await.unwrap();
        assert!(!gone.is_applied());
        assert!(handle.current().verify(b.key.expose_secret()).is_some());
    }

    #[tokio::test]
    async fn fixed_keys_never_reload() {
        let handle = ApiKeysHandle::default();
        assert_eq!(handle.reload(ReloadTrigger::Signal).await, None);
        assert!(handle.file().is_none());
        let (_tx, rx) = broadcast::channel(1);
        handle
            .spawn_reloader(rx, std::future::pending())
            .await
            .unwrap();
    }
}
