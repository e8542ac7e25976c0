//! `token-broker config check`: loads and checks everything `serve` would
//! (settings, keys, policy file, TLS files, API keys file) without opening
//! the database, generating a keys file or listening, and prints the
//! effective settings with every secret redacted (for CI and the manifests'
//! ConfigMap).

use std::path::Path;

use clap::Subcommand;

use super::serve::ConfigArg;
use crate::config::{is_secret_setting, Config, ConfigError, ConfigErrors};
use crate::server::{self, ServeError};
use crate::settings::Settings;

/// What a secret's value is replaced with in the printed settings.
pub const REDACTED: &str = "[REDACTED]";

/// `token-broker config` subcommands.
#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Load and check everything `serve` would (settings, keys, policy
    /// file, TLS files, API keys file) without opening the database or
    /// listening: prints the effective settings as TOML, secrets redacted,
    /// or names each problem and fails.
    Check(ConfigArg),
}

/// Runs a `config` subcommand: the text for stdout, or every problem found
/// ([`ConfigErrors`], one a line, each naming its setting).
pub fn run(command: ConfigCommand) -> Result<String, ConfigErrors> {
    match command {
        ConfigCommand::Check(arg) => check(arg.config.as_deref()).map(|s| s.trim_end().to_owned()),
    }
}

/// `config check` on the configuration `file` (over the defaults, under
/// the environment): the effective settings as TOML with every secret
/// replaced by [`REDACTED`] (the database URL keeps its scheme, host and
/// database), or every problem found. Writes nothing: no database, no keys
/// file.
pub fn check(file: Option<&Path>) -> Result<String, ConfigErrors> {
    let settings = Settings::load(file)?;
    let mut errors = Vec::new();
    if let Err(e) = check_keys(&settings) {
        errors.push(e);
    }
    if let Err(e) = server::load_policy(&settings.config) {
        errors.push(match e {
            ServeError::Policy(e) => ConfigError::new("policy.file", e.to_string()),
            other => ConfigError::new("policy.file", other.to_string()),
        });
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    let mut table: toml::Table = Config::figment(file).extract().map_err(|e| {
        ConfigErrors(vec![ConfigError::new(
            "config",
            format!("cannot read the settings back: {e}"),
        )])
    })?;
    // With `database.url_file`, the figment still holds the default
    // `database.url`: print the URL the broker will use (redacted below).
    if let Some(toml::Value::Table(database)) = table.get_mut("database") {
        if database.contains_key("url_file") {
            let url = secrecy::ExposeSecret::expose_secret(&settings.config.database.url);
            database.insert("url".into(), toml::Value::String(url.to_owned()));
        }
    }
    redact_table(&mut table, "");
    toml::to_string(&table).map_err(|e| {
        ConfigErrors(vec![ConfigError::new(
            "config",
            format!("cannot print the settings: {e}"),
        )])
    })
}

/// The keys as `serve` would resolve and build them, reading a generated
/// keys file only if it already exists (none is written).
fn check_keys(settings: &Settings) -> Result<(), ConfigError> {
    if let Some(keys) = settings.config.keys.resolve_existing(&settings.backend)? {
        keys.build()?;
        keys.chain_keys()?;
    }
    Ok(())
}

/// Replaces every secret under `table` (at dotted `prefix`) in place.
fn redact_table(table: &mut toml::Table, prefix: &str) {
    for (key, value) in table.iter_mut() {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        redact_value(value, &path);
    }
}

fn redact_value(value: &mut toml::Value, path: &str) {
    match value {
        toml::Value::Table(table) => redact_table(table, path),
        toml::Value::Array(items) => items.iter_mut().for_each(|v| redact_value(v, path)),
        toml::Value::String(url) if path == "database.url" => *url = redact_url(url),
        other if is_secret_setting(path) => *other = toml::Value::String(REDACTED.into()),
        _ => {}
    }
}

/// `raw` with its password (and any `*password*` query parameter) replaced
/// by [`REDACTED`]; an unparsable URL is redacted whole.
fn redact_url(raw: &str) -> String {
    let Ok(mut url) = url::Url::parse(raw.trim()) else {
        return REDACTED.into();
    };
    let marker = "REDACTEDPASSWORD";
    if url.password().is_some() && url.set_password(Some(marker)).is_err() {
        return REDACTED.into();
    }
    if url.query().is_some() {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let secret = k.to_ascii_lowercase().contains("password");
                let v = if secret {
                    marker.into()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string().replace(marker, REDACTED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_url_keeps_its_host_and_database_but_not_its_password() {
        let shown = redact_url(
            "postgres://broker:hunter2@db.internal:5432/tb?sslmode=require&password=hunter3",
        );
        assert!(!shown.contains("hunter"), "{shown}");
        assert!(
            shown.starts_with("postgres://broker:[REDACTED]@db.internal:5432/tb?"),
            "{shown}"
        );
        assert!(shown.contains("sslmode=require"), "{shown}");
        assert_eq!(
            redact_url("sqlite:token-broker.db"),
            "sqlite:token-broker.db"
        );
        assert_eq!(redact_url("not a url"), REDACTED);
    }
}
