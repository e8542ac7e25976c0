//! The server's settings, checked and built once: [`Settings::load`] reads
//! the layered [`Config`] (defaults < file < environment), checks every
//! value and builds what the values describe (the API key set, the
//! Kubernetes verifier, the TLS material, the store backend, inline keys),
//! collecting every error, each naming its setting. The server takes a
//! [`Settings`] and builds nothing from configuration again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::auth::kubernetes::KubernetesVerifier;
use crate::auth::tls::TlsMaterial;
use crate::auth::ApiKeysHandle;
use crate::config::{Backend, Config, ConfigError, ConfigErrors, ResolvedKeys};

/// A checked [`Config`] and what was built from it.
pub struct Settings {
    /// The values as configured.
    pub config: Config,
    /// The store `database.url` selects.
    pub backend: Backend,
    /// `auth.api_keys`, parsed; or `auth.api_keys_file`, read (and
    /// reloaded by the server with the policy).
    pub api_keys: ApiKeysHandle,
    /// The service-account verifier when `auth.kubernetes.enabled` (its CA
    /// files read; nothing fetched yet).
    pub kubernetes: Option<KubernetesVerifier>,
    /// The `grpc.tls` files, read and checked; None: plaintext.
    pub tls: Option<TlsMaterial>,
}

impl Settings {
    /// Loads the configuration (defaults < `file` < environment), checks
    /// and builds it.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigErrors> {
        Self::load_over(None, file)
    }

    /// [`Settings::load`] with `overlay` (TOML) over the built-in defaults
    /// (see [`Config::figment_over`]).
    pub fn load_over(overlay: Option<&str>, file: Option<&Path>) -> Result<Settings, ConfigErrors> {
        Settings::new(Config::read(overlay, file)?)
    }

    /// Checks every value of `config` and builds its parts; the errors
    /// name their settings, all of them at once. The `*_file` secret
    /// settings are read into their values first and every secret value is
    /// trimmed (see `Config::resolve_secrets`), so `config` in the result
    /// holds the values to use and no `*_file`.
    pub fn new(mut config: Config) -> Result<Settings, ConfigErrors> {
        // The `*_file` secrets are read (and every secret trimmed) first:
        // everything after sees one value per secret.
        let mut errors = config.resolve_secrets();
        let backend = if errors.iter().any(|e| e.setting.starts_with("database.url")) {
            None
        } else {
            keep(
                &mut errors,
                config
                    .database
                    .backend()
                    .map_err(|m| ConfigError::new("database.url", m)),
            )
        };
        if let (Some(backend), Some(migrate_url)) = (&backend, &config.database.migrate_url) {
            let migrate_backend =
                crate::config::backend_of(secrecy::ExposeSecret::expose_secret(migrate_url));
            let same = matches!(
                (backend, migrate_backend),
                (Backend::Postgres, Ok(Backend::Postgres))
                    | (Backend::Sqlite(_), Ok(Backend::Sqlite(_)))
            );
            if !same {
                errors.push(ConfigError::new(
                    "database.migrate_url",
                    "must name the same kind of database as database.url (postgres://… or sqlite:PATH)",
                ));
            }
        }
        // Inline keys are decoded again by `keys()`: keeping a copy here
        // would make two places decide where the keys come from.
        keep(&mut errors, config.keys.check());
        check_values(&config, &mut |setting, message| {
            errors.push(ConfigError::new(setting, message))
        });
        let api_keys = keep(&mut errors, config.auth.api_keys_handle());
        let kubernetes = keep(&mut errors, config.auth.kubernetes_verifier());
        let tls = keep(
            &mut errors,
            config
                .grpc
                .tls
                .as_ref()
                .map(|tls| {
                    tls.load()
                        .map_err(|e| ConfigError::new(format!("grpc.tls.{}", e.setting), e.problem))
                })
                .transpose(),
        );
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&config.log.filter) {
            errors.push(ConfigError::new("log.filter", e.to_string()));
        }
        match (backend, api_keys, kubernetes, tls) {
            (Some(backend), Some(api_keys), Some(kubernetes), Some(tls)) if errors.is_empty() => {
                Ok(Settings {
                    config,
                    backend,
                    api_keys,
                    kubernetes,
                    tls,
                })
            }
            _ => Err(ConfigErrors(errors)),
        }
    }

    /// The keys to run with: the inline ones, else `keys.file`, else
    /// generated as [`KeysConfig::resolve`](crate::config::KeysConfig::resolve)
    /// says for the backend (the path when a file was generated now).
    pub fn keys(&self) -> Result<(ResolvedKeys, Option<PathBuf>), ConfigError> {
        self.config.keys.resolve(&self.backend)
    }
}

/// The value of `result`, or None with its error kept in `errors`.
fn keep<T>(errors: &mut Vec<ConfigError>, result: Result<T, ConfigError>) -> Option<T> {
    result.map_err(|e| errors.push(e)).ok()
}

/// The checks of plain values (URLs, bounds, names); `bad` receives each
/// setting at fault and why.
fn check_values(config: &Config, bad: &mut impl FnMut(&str, String)) {
    check_grpc(&config.grpc, bad);
    let ado = &config.upstream.azure_devops;
    for (setting, url) in [
        ("upstream.azure_devops.base_url", &ado.base_url),
        ("upstream.entra.authority", &config.upstream.entra.authority),
    ] {
        if url.cannot_be_a_base() || !matches!(url.scheme(), "http" | "https") {
            bad(setting, "must be an http:// or https:// base URL".into());
        }
    }
    if ado.api_version.trim().is_empty() {
        bad(
            "upstream.azure_devops.api_version",
            "must not be empty".into(),
        );
    }
    for (setting, d) in [
        ("upstream.azure_devops.request_timeout", ado.request_timeout),
        ("upstream.azure_devops.connect_timeout", ado.connect_timeout),
        (
            "upstream.entra.request_timeout",
            config.upstream.entra.request_timeout,
        ),
    ] {
        if d.is_zero() {
            bad(setting, "must be greater than zero".into());
        }
    }
    // Upper bounds: a call (or a wait between tries) longer than these
    // would stall background work and shutdown behind it.
    let minute = Duration::from_secs(60);
    for (setting, d, max, max_text) in [
        (
            "upstream.azure_devops.request_timeout",
            ado.request_timeout,
            10 * minute,
            "10m",
        ),
        (
            "upstream.azure_devops.connect_timeout",
            ado.connect_timeout,
            5 * minute,
            "5m",
        ),
        (
            "upstream.azure_devops.retry_min_delay",
            ado.retry_min_delay,
            minute,
            "1m",
        ),
        (
            "upstream.azure_devops.retry_max_delay",
            ado.retry_max_delay,
            5 * minute,
            "5m",
        ),
        (
            "upstream.azure_devops.max_retry_after",
            ado.max_retry_after,
            10 * minute,
            "10m",
        ),
        (
            "upstream.entra.request_timeout",
            config.upstream.entra.request_timeout,
            10 * minute,
            "10m",
        ),
    ] {
        if d > max {
            bad(setting, format!("must be at most {max_text}"));
        }
    }
    if ado.retry_max_delay < ado.retry_min_delay {
        bad(
            "upstream.azure_devops.retry_max_delay",
            "must be at least upstream.azure_devops.retry_min_delay".into(),
        );
    }
    if ado.max_retries > 20 {
        bad(
            "upstream.azure_devops.max_retries",
            "must be at most 20".into(),
        );
    }
    if ado.max_concurrent_requests == 0 || ado.max_concurrent_requests > 1024 {
        bad(
            "upstream.azure_devops.max_concurrent_requests",
            "must be 1 to 1024".into(),
        );
    }
    if !(1..=crate::upstream::azure_devops::MAX_PAGE_SIZE).contains(&ado.page_size) {
        bad("upstream.azure_devops.page_size", "must be 1 to 100".into());
    }
    if ado.max_pages == 0 {
        bad(
            "upstream.azure_devops.max_pages",
            "must be at least 1".into(),
        );
    }
    if config.upstream.entra.tenant.trim().is_empty() {
        bad("upstream.entra.tenant", "must not be empty".into());
    }
    if let Some(file) = &config.policy.file {
        if !file.is_file() {
            bad(
                "policy.file",
                format!("{} is not a readable file", file.display()),
            );
        }
    }
    let prefix = &config.leases.display_name_prefix;
    if prefix.is_empty()
        || prefix.len() > 40
        || !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        bad(
            "leases.display_name_prefix",
            "1 to 40 letters, digits, '-', '_' or '.' (':' separates the display name's parts)"
                .into(),
        );
    }
    if config.leases.valid_to_skew > Duration::from_secs(3600) {
        bad("leases.valid_to_skew", "must be at most 1h".into());
    }
    let database = &config.database;
    if !(crate::store::PoolShares::MIN_CONNECTIONS..=1000).contains(&database.max_connections) {
        bad(
            "database.max_connections",
            format!(
                "must be {} to 1000 (one connection each for callers' requests, background work and audit appends at least)",
                crate::store::PoolShares::MIN_CONNECTIONS
            ),
        );
    }
    if database.acquire_timeout.is_zero() {
        bad(
            "database.acquire_timeout",
            "must be greater than zero".into(),
        );
    }
    if database.acquire_timeout > Duration::from_secs(600) {
        bad("database.acquire_timeout", "must be at most 10m".into());
    }
    if config.audit.auth_failure_interval.is_zero() {
        bad(
            "audit.auth_failure_interval",
            "must be greater than zero".into(),
        );
    }
    if config.audit.head_log_interval.is_zero() {
        bad(
            "audit.head_log_interval",
            "must be greater than zero".into(),
        );
    }
    // Shorter, and a lease would be gone before an operator looks at why
    // it closed.
    if config.leases.retention < Duration::from_secs(3600) {
        bad("leases.retention", "must be at least 1h".into());
    }
    if config.leases.reaper_interval.is_zero() {
        bad("leases.reaper_interval", "must be greater than zero".into());
    }
    if config.policy.credentials_retire_after < Duration::from_secs(1) {
        bad(
            "policy.credentials_retire_after",
            "must be at least 1s".into(),
        );
    }
    // Entra ends a refresh token unused for 90 days: the keep-alive must
    // come well before that.
    let keepalive = config.upstream.keepalive_interval;
    if keepalive < Duration::from_secs(1) || keepalive > Duration::from_secs(30 * 24 * 3600) {
        bad(
            "upstream.keepalive_interval",
            "must be at least 1s and at most 30d (Entra ends a refresh token unused for 90 days)"
                .into(),
        );
    }
    if config.leases.reconcile_after <= config.upstream.azure_devops.request_timeout {
        bad(
            "leases.reconcile_after",
            format!(
                "must be longer than upstream.azure_devops.request_timeout ({}), so a create still in flight is never reconciled",
                humantime::format_duration(config.upstream.azure_devops.request_timeout)
            ),
        );
    }
    if config.leases.sweep_interval < Duration::from_secs(1) {
        bad("leases.sweep_interval", "must be at least 1s".into());
    }
    let retry = &config.leases.revocation_retry;
    if retry.min_delay.is_zero() {
        bad(
            "leases.revocation_retry.min_delay",
            "must be greater than zero".into(),
        );
    }
    if retry.max_delay < retry.min_delay {
        bad(
            "leases.revocation_retry.max_delay",
            "must be at least leases.revocation_retry.min_delay".into(),
        );
    }
    if retry.max_attempts == 0 {
        bad(
            "leases.revocation_retry.max_attempts",
            "must be at least 1".into(),
        );
    }
    if retry.failed_interval.is_zero() {
        bad(
            "leases.revocation_retry.failed_interval",
            "must be greater than zero".into(),
        );
    }
    // Upper bounds: beyond them a schedule means "never", and the
    // arithmetic on times would leave what the stores can hold.
    let hour = Duration::from_secs(3600);
    for (setting, value, max, max_text) in [
        (
            "audit.auth_failure_interval",
            config.audit.auth_failure_interval,
            hour,
            "1h",
        ),
        (
            "audit.head_log_interval",
            config.audit.head_log_interval,
            hour,
            "1h",
        ),
        (
            "leases.reaper_interval",
            config.leases.reaper_interval,
            hour,
            "1h",
        ),
        (
            "policy.credentials_retire_after",
            config.policy.credentials_retire_after,
            365 * 24 * hour,
            "365d",
        ),
        (
            "leases.reconcile_after",
            config.leases.reconcile_after,
            24 * hour,
            "24h",
        ),
        (
            "leases.sweep_interval",
            config.leases.sweep_interval,
            7 * 24 * hour,
            "7d",
        ),
        (
            "leases.revocation_retry.min_delay",
            retry.min_delay,
            24 * hour,
            "24h",
        ),
        (
            "leases.revocation_retry.max_delay",
            retry.max_delay,
            24 * hour,
            "24h",
        ),
        (
            "leases.revocation_retry.failed_interval",
            retry.failed_interval,
            7 * 24 * hour,
            "7d",
        ),
        (
            "leases.retention",
            config.leases.retention,
            3650 * 24 * hour,
            "3650d",
        ),
    ] {
        if value > max {
            bad(setting, format!("must be at most {max_text}"));
        }
    }
    if retry.max_attempts > 1000 {
        bad(
            "leases.revocation_retry.max_attempts",
            "must be at most 1000".into(),
        );
    }
}

/// Smallest `grpc.max_header_list_size`: a bearer up to the authenticator's
/// own 16 KiB limit, with the other request headers, must reach it (and be
/// refused there, with a reason) rather than be cut off by HTTP/2.
pub const MIN_HEADER_LIST_SIZE: u32 = 20 * 1024;

/// The connection limits under `[grpc]`: none may be zero (that would serve
/// nothing or close every connection), and none so large it means "no
/// limit".
fn check_grpc(grpc: &crate::config::GrpcConfig, bad: &mut impl FnMut(&str, String)) {
    if !(1..=1_000_000).contains(&grpc.max_connections) {
        bad("grpc.max_connections", "must be 1 to 1000000".into());
    }
    if !(1..=10_000).contains(&grpc.max_concurrent_streams) {
        bad("grpc.max_concurrent_streams", "must be 1 to 10000".into());
    }
    let minute = Duration::from_secs(60);
    for (setting, value, max, max_text) in [
        (
            "grpc.handshake_timeout",
            grpc.handshake_timeout,
            5 * minute,
            "5m",
        ),
        (
            "grpc.idle_timeout",
            grpc.idle_timeout,
            24 * 60 * minute,
            "24h",
        ),
        (
            "grpc.keepalive_interval",
            grpc.keepalive_interval,
            2 * 60 * minute,
            "2h",
        ),
        (
            "grpc.keepalive_timeout",
            grpc.keepalive_timeout,
            5 * minute,
            "5m",
        ),
    ] {
        if value.is_zero() {
            bad(setting, "must be greater than zero".into());
        } else if value > max {
            bad(setting, format!("must be at most {max_text}"));
        }
    }
    // Pings more often than once a second would only load every peer.
    if !grpc.keepalive_interval.is_zero() && grpc.keepalive_interval < Duration::from_secs(1) {
        bad("grpc.keepalive_interval", "must be at least 1s".into());
    }
    if !(1024..=64 * 1024 * 1024).contains(&grpc.max_request_size) {
        bad(
            "grpc.max_request_size",
            "must be 1024 to 67108864 bytes (1 KiB to 64 MiB)".into(),
        );
    }
    if !(MIN_HEADER_LIST_SIZE..=1024 * 1024).contains(&grpc.max_header_list_size) {
        bad(
            "grpc.max_header_list_size",
            format!(
                "must be {MIN_HEADER_LIST_SIZE} to 1048576 bytes (20 KiB to 1 MiB): a bearer up to the authenticator's 16 KiB limit must reach it"
            ),
        );
    }
}
