//! Writing keys files: the TOML file `serve` generates beside a SQLite
//! database (and `dev` beside a PostgreSQL run) when no keys are
//! configured. Reading one, and deciding when to write, is the
//! configuration's job (`config::KeysConfig::resolve`).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use secrecy::ExposeSecret as _;

use super::Keyring;

/// A keys file that could not be written.
#[derive(Debug, thiserror::Error)]
pub enum KeysFileError {
    /// A new file could not be created.
    #[error("cannot create keys file {}: {source}", path.display())]
    Create {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// An old generated file could not be given its audit chain key.
    #[error("cannot add audit_chain to keys file {}: {source}", path.display())]
    AddChainKey {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A fresh keys file: one sealing key (id = today's date), a fingerprint
/// key and an audit chain key, from the OS random source.
pub fn generate_keys_file() -> String {
    let id = format!("k{}", chrono::Utc::now().format("%Y%m%d"));
    let key = || Keyring::generate_key().expose_secret().to_owned();
    format!(
        "# token-broker keys: generated; keep secret, back up with the database.\n\
         active = \"{id}\"\n\
         fingerprint = \"{}\"\n\
         audit_chain = \"{}\"\n\n\
         [sealing]\n\
         {id} = \"{}\"\n",
        key(),
        key(),
        key()
    )
}

/// Writes a fresh keys file ([`generate_keys_file`]) at `path`, which
/// must not exist, mode 0600.
pub fn create_keys_file(path: &Path) -> Result<(), KeysFileError> {
    write_private_file(path, &generate_keys_file()).map_err(|source| KeysFileError::Create {
        path: path.to_owned(),
        source,
    })
}

/// Adds a fresh `audit_chain` key to the generated keys file at `path`
/// whose contents are `text`, written before the audit chain existed
/// (top-level keys must precede `[sealing]`, so the line goes first). The
/// file is replaced atomically, mode 0600.
pub fn add_audit_chain_key(path: &Path, text: &str) -> Result<(), KeysFileError> {
    let fail = |source| KeysFileError::AddChainKey {
        path: path.to_owned(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    write_private_file(
        &tmp,
        &format!(
            "# audit_chain added by token-broker (audit chain key; keep secret).\n\
             audit_chain = \"{}\"\n{text}",
            Keyring::generate_key().expose_secret()
        ),
    )
    .map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)?;
    tracing::warn!(file = %path.display(), "added an audit chain key to the generated keys file");
    Ok(())
}

/// Creates `path` (it must not exist) with mode 0600 and writes `text`.
fn write_private_file(path: &Path, text: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}
