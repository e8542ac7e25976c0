//! Server configuration: one [`Config`], layered with figment as
//! built-in defaults ([`DEFAULTS`], TOML) < a TOML file (`--config FILE` or
//! `TOKEN_BROKER_CONFIG`) < `TOKEN_BROKER_*` environment variables, nested
//! with `__` (`TOKEN_BROKER_DATABASE__URL` sets `database.url`). Unknown
//! settings are refused; [`Settings::new`](crate::settings::Settings::new)
//! then checks the values once and builds what they describe, with errors
//! that name the setting (`database.url: ...`).
//!
//! Client-side variables (`TOKEN_BROKER_ADDR`, `TOKEN_BROKER_API_KEY`,
//! `TOKEN_BROKER_API_KEY_FILE`, `TOKEN_BROKER_TOKEN_FILE`,
//! `TOKEN_BROKER_CA_FILE`, `TOKEN_BROKER_CLIENT_CERT_FILE`,
//! `TOKEN_BROKER_CLIENT_KEY_FILE`, `TOKEN_BROKER_AZURE_DEVOPS_URL`,
//! `TOKEN_BROKER_DEV_API_KEY`,
//! `TOKEN_BROKER_EMULATOR_*`, `TOKEN_BROKER_CONFIG`) are not server
//! settings: the loader skips them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use figment::providers::{Env, Format as _, Toml};
use figment::Figment;
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;

use crate::audit::ChainKeys;
use crate::auth::kubernetes::{KubernetesAuthConfig, KubernetesConfigError, KubernetesVerifier};
use crate::auth::tls::TlsConfig;
use crate::auth::{ApiKeyHash, ApiKeys, ApiKeysHandle};
use crate::crypto::{self, Keyring, TokenFingerprinter};
use crate::leases::RetrySchedule;
use crate::store::DEFAULT_KEY_ID;
use crate::upstream::azure_devops::AzureDevOpsConfig;
use crate::upstream::entra::EntraConfig;

/// Built-in defaults: with no file and no environment, `serve` runs on an
/// embedded SQLite file in the working directory and listens on
/// 127.0.0.1:50051.
pub const DEFAULTS: &str = r#"
[grpc]
listen = "127.0.0.1:50051"
max_connections = 1024
max_concurrent_streams = 100
handshake_timeout = "10s"
idle_timeout = "5m"
keepalive_interval = "1m"
keepalive_timeout = "10s"
max_request_size = 1048576
max_header_list_size = 32768

[database]
url = "sqlite:token-broker.db"
max_connections = 10
acquire_timeout = "10s"
migrate_on_start = true

[keys]

# upstream.azure_devops and upstream.entra default to the upstream client's
# own defaults: https://vssps.dev.azure.com, api-version 7.1-preview.1, and
# https://login.microsoftonline.com/organizations.
[upstream]

[policy]
credentials_retire_after = "24h"

[leases]
display_name_prefix = "token-broker"
valid_to_skew = "5m"
reaper_interval = "15s"
reconcile_after = "2m"
sweep_interval = "10m"
retention = "90d"

[leases.revocation_retry]
min_delay = "5s"
max_delay = "10m"
max_attempts = 10
failed_interval = "1h"

[auth]
api_keys = []

[audit]
auth_failure_interval = "10s"
head_log_interval = "60s"

[log]
filter = "info"
json = false
"#;

/// Prefix of every server environment variable.
pub const ENV_PREFIX: &str = "TOKEN_BROKER_";

/// Variables under [`ENV_PREFIX`] that belong to the CLI client, `dev` or
/// the emulator, lower case without the prefix. `emulator_*` is skipped too.
const CLIENT_VARIABLES: &[&str] = &[
    "addr",
    "api_key",
    "api_key_file",
    "token_file",
    "ca_file",
    "client_cert_file",
    "client_key_file",
    "azure_devops_url",
    "dev_api_key",
    "config",
];

/// The whole server configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The gRPC listener.
    pub grpc: GrpcConfig,
    /// The store.
    pub database: DatabaseConfig,
    /// Sealing keyring and audit fingerprint key.
    pub keys: KeysConfig,
    /// The Azure DevOps PAT API and the Entra token endpoint.
    pub upstream: UpstreamConfig,
    /// The policy file.
    pub policy: PolicyConfig,
    /// Lease tunables.
    pub leases: LeasesConfig,
    /// Caller authentication.
    pub auth: AuthConfig,
    /// Logging.
    pub log: LogConfig,
    /// The admin HTTP port (`/metrics`, `/healthz`, `/readyz`).
    #[serde(default)]
    pub admin: AdminConfig,
    /// The audit trail.
    #[serde(default)]
    pub audit: AuditConfig,
}

/// `[audit]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// `audit.auth_failure_interval`: refused authentications are counted
    /// in memory and written as one `authenticate` audit row per reason and
    /// client address this often (and at shutdown); a crash loses at most
    /// one interval's counts. Default `10s`; more than zero, at most `1h`.
    #[serde(
        default = "AuditConfig::default_auth_failure_interval",
        deserialize_with = "crate::duration::de_duration"
    )]
    pub auth_failure_interval: Duration,
    /// `audit.head_log_interval`: the INFO log line `audit chain head`
    /// (`audit_id`, `mac`: the newest row this replica appended) is logged
    /// at most this often, only when the head moved, and once at shutdown.
    /// Default `60s`; more than zero, at most `1h`.
    #[serde(
        default = "AuditConfig::default_head_log_interval",
        deserialize_with = "crate::duration::de_duration"
    )]
    pub head_log_interval: Duration,
}

impl AuditConfig {
    fn default_auth_failure_interval() -> Duration {
        Duration::from_secs(10)
    }

    fn default_head_log_interval() -> Duration {
        Duration::from_secs(60)
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            auth_failure_interval: Self::default_auth_failure_interval(),
            head_log_interval: Self::default_head_log_interval(),
        }
    }
}

/// `[admin]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `admin.listen`: socket address of the admin HTTP server (`GET
    /// /metrics` in the Prometheus text format, `/healthz`, `/readyz`).
    /// Unset (the default): no admin port, so two brokers on one machine
    /// (and tests) do not fight over a port; a deployment sets it.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

/// `[grpc]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcConfig {
    /// `grpc.listen`: socket address of the gRPC server. Default
    /// `127.0.0.1:50051`; port 0 picks a free port.
    pub listen: SocketAddr,
    /// `grpc.tls`: TLS, and mTLS with `client_ca_file` (`cert_file`,
    /// `key_file`, `client_ca_file`, `client_auth`). Unset: plaintext
    /// HTTP/2 (behind a mesh or on localhost).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// `grpc.max_connections`: most connections served at once; one
    /// accepted past it is closed at once. Default 1024.
    pub max_connections: usize,
    /// `grpc.max_concurrent_streams`: most calls in flight on one
    /// connection, advertised in the HTTP/2 SETTINGS. Default 100.
    pub max_concurrent_streams: u32,
    /// `grpc.handshake_timeout`: a connection that has not finished its
    /// TLS handshake (with TLS) and sent the HTTP/2 preface within it is
    /// dropped. Default `10s`.
    #[serde(deserialize_with = "crate::duration::de_duration")]
    pub handshake_timeout: Duration,
    /// `grpc.idle_timeout`: a connection with no call open for this long
    /// is closed with a GOAWAY; an open call (a long server stream) keeps
    /// it. Default `5m`.
    #[serde(deserialize_with = "crate::duration::de_duration")]
    pub idle_timeout: Duration,
    /// `grpc.keepalive_interval`: an HTTP/2 PING goes to a peer silent
    /// this long. Default `1m`.
    #[serde(deserialize_with = "crate::duration::de_duration")]
    pub keepalive_interval: Duration,
    /// `grpc.keepalive_timeout`: a PING not acknowledged within it closes
    /// the connection (a dead peer). Default `10s`.
    #[serde(deserialize_with = "crate::duration::de_duration")]
    pub keepalive_timeout: Duration,
    /// `grpc.max_request_size`: largest request message, in bytes, once
    /// decoded; a larger one is refused OUT_OF_RANGE. Default
    /// 1048576 (1 MiB).
    pub max_request_size: usize,
    /// `grpc.max_header_list_size`: largest request header block, in
    /// bytes (HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE, each field counted as
    /// name + value + 32). Default 32768 (32 KiB), so a bearer up to the
    /// authenticator's own 16 KiB limit reaches it.
    pub max_header_list_size: u32,
}

/// `[database]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `database.url`: `postgres://…` / `postgresql://…` (production) or
    /// `sqlite:PATH` (embedded; default `sqlite:token-broker.db`, in the
    /// working directory). Secret: it may hold a password. Surrounding
    /// whitespace is trimmed; empty is refused. After
    /// [`Settings::new`](crate::settings::Settings::new) it holds the value
    /// `url_file` gave, if that was set.
    pub url: SecretString,
    /// `database.url_file`: path of a file holding `database.url` (a
    /// mounted Secret), read at start; not with `database.url`. The file
    /// must not be readable by others (group is fine). In a [`Config`]
    /// built in code, leave `url` empty when setting it; `Config::read`
    /// does that for the default.
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    /// `database.max_connections`: the most connections this process
    /// opens to the database, split between callers' requests, background
    /// work and audit appends ([`crate::store::PoolShares`]); default 10, 3
    /// to 1000.
    pub max_connections: u32,
    /// `database.acquire_timeout`: how long a store call waits for a
    /// connection of its share before failing UNAVAILABLE
    /// (`STORE_UNAVAILABLE`); default `10s`, at most `10m`.
    #[serde(deserialize_with = "crate::duration::de_duration")]
    pub acquire_timeout: Duration,
    /// `database.migrate_on_start`: whether `serve` applies pending
    /// migrations at start (default true). False where a Job runs
    /// `token-broker migrate`: `serve` then applies none and refuses to
    /// start while the database lacks a migration this binary has.
    #[serde(default = "default_true")]
    pub migrate_on_start: bool,
    /// `database.migrate_url`: the database URL used only for migrations
    /// (a direct connection, e.g. past PgBouncer, whose transaction pooling
    /// breaks the session advisory lock migrations hold); unset:
    /// `database.url`. Secret like `database.url`; same backend.
    #[serde(default)]
    pub migrate_url: Option<SecretString>,
    /// `database.migrate_url_file`: path of a file holding
    /// `database.migrate_url` (a mounted Secret); not with `migrate_url`.
    #[serde(default)]
    pub migrate_url_file: Option<PathBuf>,
}

fn default_true() -> bool {
    true
}

/// Which backend a `database.url` selects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// PostgreSQL.
    Postgres,
    /// SQLite at this file (None: in memory).
    Sqlite(Option<PathBuf>),
}

impl DatabaseConfig {
    /// The backend, or an error message when the scheme is neither.
    pub fn backend(&self) -> Result<Backend, String> {
        backend_of(self.url.expose_secret())
    }

    /// The pool limits `max_connections` and `acquire_timeout` set.
    pub fn pool_options(&self) -> crate::store::PoolOptions {
        crate::store::PoolOptions {
            max_connections: self.max_connections,
            acquire_timeout: self.acquire_timeout,
        }
    }
}

/// The backend a store URL selects.
pub fn backend_of(url: &str) -> Result<Backend, String> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Backend::Postgres);
    }
    if let Some(rest) = url.strip_prefix("sqlite:") {
        let rest = rest.strip_prefix("//").unwrap_or(rest);
        let path = rest.split('?').next().unwrap_or_default();
        if path.is_empty() {
            return Err("sqlite: URL has no file path (use sqlite:PATH)".into());
        }
        if path == ":memory:" || url.contains("mode=memory") {
            return Ok(Backend::Sqlite(None));
        }
        return Ok(Backend::Sqlite(Some(PathBuf::from(path))));
    }
    Err("expected postgres://…, postgresql://… or sqlite:PATH".into())
}

/// `[keys]`: the sealing keyring, the audit fingerprint keyring and the
/// audit chain keyring, inline or in a keys file (same fields, TOML), never
/// both. The fingerprint and chain keys take either a single string
/// (`fingerprint`, `audit_chain`: key id `default`) or an active id and a
/// table of keys (`fingerprint_active` + `[fingerprint_keys]`,
/// `audit_chain_active` + `[audit_chain_keys]`), not both. With neither,
/// `serve` on SQLite generates a keys file next to the database; on
/// PostgreSQL it refuses to start.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// `keys.file`: path of a keys file (TOML with `active`, `sealing`,
    /// `fingerprint` or `fingerprint_active` + `fingerprint_keys`,
    /// `audit_chain` or `audit_chain_active` + `audit_chain_keys`).
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// `keys.active`: id of the sealing key new secrets are sealed with.
    #[serde(default)]
    pub active: Option<String>,
    /// `keys.sealing`: key id -> 32-byte AES-256-GCM key, standard base64.
    /// Older ids stay to open what they sealed.
    #[serde(default)]
    pub sealing: BTreeMap<String, SecretString>,
    /// `keys.fingerprint`: HMAC-SHA256 key (32 bytes, standard base64) for token fingerprints in the audit trail.
    /// Key id `default`; not with `fingerprint_active`/`fingerprint_keys`.
    #[serde(default)]
    pub fingerprint: Option<SecretString>,
    /// `keys.fingerprint_active`: id of the fingerprint key new audit rows
    /// use; must name a key in `keys.fingerprint_keys`.
    #[serde(default)]
    pub fingerprint_active: Option<String>,
    /// `keys.fingerprint_keys`: key id -> fingerprint key (32 bytes,
    /// standard base64). Older ids stay while `keys status` counts rows
    /// under them.
    #[serde(default)]
    pub fingerprint_keys: BTreeMap<String, SecretString>,
    /// `keys.audit_chain`: HMAC-SHA256 key (32 bytes, standard base64) that
    /// chains the audit rows (docs/audit-chain.md). Kept out of the database
    /// so write access to it alone cannot forge the chain. Key id
    /// `default`; not with `audit_chain_active`/`audit_chain_keys`.
    #[serde(default)]
    pub audit_chain: Option<SecretString>,
    /// `keys.audit_chain_active`: id of the chain key new audit rows are
    /// MAC'd with; must name a key in `keys.audit_chain_keys`. Changing it
    /// appends a switch row (docs/audit-chain.md).
    #[serde(default)]
    pub audit_chain_active: Option<String>,
    /// `keys.audit_chain_keys`: key id -> chain key (32 bytes, standard
    /// base64). Keep every id some audit row was MAC'd with: `audit verify`
    /// checks each row under its own key.
    #[serde(default)]
    pub audit_chain_keys: BTreeMap<String, SecretString>,
}

/// Keys in a keys file: the same fields as `[keys]` without `file`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    active: Option<String>,
    #[serde(default)]
    sealing: BTreeMap<String, SecretString>,
    fingerprint: Option<SecretString>,
    fingerprint_active: Option<String>,
    #[serde(default)]
    fingerprint_keys: BTreeMap<String, SecretString>,
    audit_chain: Option<SecretString>,
    audit_chain_active: Option<String>,
    #[serde(default)]
    audit_chain_keys: BTreeMap<String, SecretString>,
}

/// Keys ready to build a keyring from: validated.
#[derive(Clone)]
pub struct ResolvedKeys {
    /// Id of the active sealing key.
    pub active: String,
    /// Key id -> standard base64 of a 32-byte AES-256-GCM key (secret).
    pub sealing: BTreeMap<String, SecretString>,
    /// Id of the active fingerprint key (`default` for the single-string
    /// `fingerprint`).
    pub fingerprint_active: String,
    /// Key id -> standard base64 of a 32-byte fingerprint key (secret).
    pub fingerprint_keys: BTreeMap<String, SecretString>,
    /// Id of the active audit chain key (`default` for the single-string
    /// `audit_chain`).
    pub audit_chain_active: String,
    /// Key id -> standard base64 of a 32-byte audit chain key (secret).
    pub audit_chain_keys: BTreeMap<String, SecretString>,
    /// Where they came from, for the log: `configuration` or a file path.
    pub source: String,
}

impl ResolvedKeys {
    /// The sealing keyring and the audit fingerprinter (new fingerprints
    /// under the active fingerprint key; look-ups by token under every
    /// fingerprint key).
    pub fn build(&self) -> Result<(Keyring, TokenFingerprinter), ConfigError> {
        let keyring = Keyring::new(self.active.clone(), self.sealing.clone())
            .map_err(|e| ConfigError::new("keys.sealing", e.to_string()))?;
        if !self.fingerprint_keys.contains_key(&self.fingerprint_active) {
            return Err(ConfigError::new("keys.fingerprint_active", "names no key"));
        }
        let fingerprinter = TokenFingerprinter::with_keys(
            self.fingerprint_active.clone(),
            self.fingerprint_keys.clone(),
        )
        .map_err(|e| ConfigError::new("keys.fingerprint", e.to_string()))?;
        Ok((keyring, fingerprinter))
    }

    /// The audit chain keyring.
    pub fn chain_keys(&self) -> Result<ChainKeys, ConfigError> {
        ChainKeys::new(
            self.audit_chain_active.clone(),
            self.audit_chain_keys.clone(),
        )
        .map_err(|e| ConfigError::new("keys.audit_chain_keys", e.to_string()))
    }
}

impl std::fmt::Debug for ResolvedKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResolvedKeys")
            .field("active", &self.active)
            .field("ids", &self.sealing.keys().collect::<Vec<_>>())
            .field("fingerprint_active", &self.fingerprint_active)
            .field(
                "fingerprint_ids",
                &self.fingerprint_keys.keys().collect::<Vec<_>>(),
            )
            .field("audit_chain_active", &self.audit_chain_active)
            .field(
                "audit_chain_ids",
                &self.audit_chain_keys.keys().collect::<Vec<_>>(),
            )
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// `[upstream]`: where and how the broker mints PATs. The two sub-sections
/// are the upstream client's own settings, with its defaults (the real
/// Azure DevOps and Entra endpoints).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `upstream.azure_devops`: the PAT Lifecycle API client (`base_url`,
    /// `api_version`, `suppress_fed_auth_redirect`, `request_timeout`,
    /// `connect_timeout`, `max_retries`, `retry_min_delay`,
    /// `retry_max_delay`, `max_retry_after`, `page_size`, `max_pages`).
    #[serde(default)]
    pub azure_devops: AzureDevOpsConfig,
    /// `upstream.entra`: the Entra refresh-token grant (`authority`,
    /// `tenant`, `client_id`, `client_secret`, `client_secret_file`,
    /// `scope`, `request_timeout`).
    #[serde(default)]
    pub entra: EntraConfig,
    /// `upstream.refresh_token`: an Entra refresh token of the upstream
    /// account. Adopted at start as a new stored credential version only
    /// when it differs from the last configured value adopted (the store
    /// keeps a digest of it), so re-seeding through configuration works and
    /// an unchanged value never replaces a newer login or rotation. Secret.
    /// Surrounding whitespace is trimmed; empty is refused. After
    /// [`Settings::new`](crate::settings::Settings::new) it holds the value
    /// `refresh_token_file` gave, if that was set.
    #[serde(default)]
    pub refresh_token: Option<SecretString>,
    /// `upstream.refresh_token_file`: path of a file holding
    /// `upstream.refresh_token` (a mounted Secret), read at start; not with
    /// `upstream.refresh_token`. The file must not be readable by others
    /// (group is fine).
    #[serde(default)]
    pub refresh_token_file: Option<PathBuf>,
    /// `upstream.keepalive_interval`: the broker redeems its refresh token
    /// at least this often even when no lease needs a token, so Entra's
    /// 90-day inactivity end never arrives while a broker runs. Default
    /// `24h`; 1s to 30d.
    #[serde(
        default = "UpstreamConfig::default_keepalive_interval",
        deserialize_with = "crate::duration::de_duration"
    )]
    pub keepalive_interval: Duration,
}

impl UpstreamConfig {
    fn default_keepalive_interval() -> Duration {
        Duration::from_secs(24 * 3600)
    }
}

/// `[policy]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// `policy.file`: the YAML policy. Unset: deny every request.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// `policy.credentials_retire_after`: a managed credential absent from
    /// the policy this long is retired (no new versions; its current one
    /// revoked `overlap` later), so a ConfigMap rollout or a mistaken edit
    /// does not retire it. Default `24h`; at least `1s`, at most `365d`.
    #[serde(
        default = "PolicyConfig::default_credentials_retire_after",
        deserialize_with = "crate::duration::de_duration"
    )]
    pub credentials_retire_after: Duration,
}

impl PolicyConfig {
    fn default_credentials_retire_after() -> Duration {
        Duration::from_secs(24 * 3600)
    }
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            file: None,
            credentials_retire_after: PolicyConfig::default_credentials_retire_after(),
        }
    }
}

/// `[leases]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeasesConfig {
    /// `leases.display_name_prefix`: first part of every upstream display
    /// name `<prefix>:<deployment id>:<lease id>`; default `token-broker`.
    pub display_name_prefix: String,
    /// `leases.valid_to_skew`: added to expire_time for the PAT's validTo;
    /// default `5m`, at most `1h`.
    #[serde(deserialize_with = "crate::duration::de_duration")]
    pub valid_to_skew: Duration,
    /// `leases.reaper_interval`: how often expired leases are revoked;
    /// default `15s`.
    #[serde(deserialize_with = "crate::duration::de_duration")]
    pub reaper_interval: Duration,
    /// `leases.reconcile_after`: how old a PENDING lease must be before the
    /// reconciler resolves it (marks it FAILED, then revokes any PAT with its
    /// display name), and how long the orphan sweep leaves a PENDING lease's
    /// PAT alone; default `2m`. Must exceed
    /// `upstream.azure_devops.request_timeout`, so a create in its single
    /// send is not reconciled; one that outlives it anyway (Retry-After
    /// waits, retries before sending) is abandoned: its PAT is revoked and
    /// the caller told to retry (`CREATE_ABANDONED`).
    #[serde(deserialize_with = "crate::duration::de_duration")]
    pub reconcile_after: Duration,
    /// `leases.sweep_interval`: how often one replica of the deployment
    /// lists upstream, in every organization it has leased in, for PATs
    /// with this deployment's display-name prefix that no live lease owns,
    /// and revokes them; default `10m`.
    #[serde(deserialize_with = "crate::duration::de_duration")]
    pub sweep_interval: Duration,
    /// `leases.retention`: how long a closed lease (REVOKED, EXPIRED,
    /// FAILED) and its idempotency key, and a closed managed credential
    /// version (REVOKED, FAILED), are kept after it closed; each is deleted
    /// once this has passed and its PAT's validTo has too (never a
    /// REVOKE_FAILED or live lease, never a live version or a credential's
    /// newest one; never an audit row). Default `90d`, at least `1h`, at
    /// most `3650d`.
    #[serde(deserialize_with = "crate::duration::de_duration")]
    pub retention: Duration,
    /// `[leases.revocation_retry]`: the schedule of upstream revoke
    /// retries (`min_delay`, `max_delay`, `max_attempts`,
    /// `failed_interval`; see [`RetrySchedule`]).
    pub revocation_retry: RetrySchedule,
}

/// `[auth]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `auth.api_keys`: `[{ name = "ci", sha256 = "<hex>" }, …]`; the
    /// caller's identity is `apikey:NAME`. Make one with
    /// `token-broker apikey generate NAME`.
    pub api_keys: Vec<ApiKeySetting>,
    /// `auth.api_keys_file`: a file of the same entries (TOML
    /// `[[api_keys]]` tables, or YAML `api_keys:` when the name ends in
    /// `.yaml`/`.yml`), reloaded with the policy: on SIGHUP and when its
    /// content changes. Not together with a non-empty `auth.api_keys`.
    /// See [`crate::auth::ApiKeysHandle`].
    #[serde(default)]
    pub api_keys_file: Option<PathBuf>,
    /// `auth.kubernetes`: Kubernetes service-account callers (`enabled`,
    /// `issuer`, `jwks_url`, `audiences`, `jwks_refetch_min_interval`,
    /// `jwks_max_age`, `leeway`, `http_timeout`, `ca_file`,
    /// `jwks_token_file`, `token_review.{api_server,ca_file,token_file}`);
    /// disabled by default. See docs/kubernetes-auth.md.
    #[serde(default)]
    pub kubernetes: KubernetesAuthConfig,
}

/// One configured API key.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeySetting {
    /// Name; identity `apikey:NAME`.
    pub name: String,
    /// SHA-256 of the key, 64 hex digits.
    pub sha256: String,
}

/// `[log]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `log.filter`: a tracing `EnvFilter` directive, default `info`.
    pub filter: String,
    /// `log.json`: JSON lines instead of text.
    pub json: bool,
}

/// A configuration error that names the setting.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct ConfigError {
    /// Dotted setting path, e.g. `database.url`.
    pub setting: String,
    /// What is wrong (never the value of a secret).
    pub message: String,
}

impl ConfigError {
    /// An error about `setting`.
    pub fn new(setting: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            setting: setting.into(),
            message: message.into(),
        }
    }
}

/// Several errors, one per line.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// True if some error names `setting`.
    pub fn names(&self, setting: &str) -> bool {
        self.0.iter().any(|e| e.setting == setting)
    }
}

impl Config {
    /// The layered sources: defaults < `file` < environment.
    pub fn figment(file: Option<&Path>) -> Figment {
        Self::figment_over(None, file)
    }

    /// The layered sources with `overlay` (TOML) over the built-in
    /// defaults: defaults < overlay < `file` < environment. `dev` puts its
    /// short intervals there, so the environment still wins.
    pub fn figment_over(overlay: Option<&str>, file: Option<&Path>) -> Figment {
        let mut figment = Figment::from(Toml::string(DEFAULTS));
        if let Some(overlay) = overlay {
            figment = figment.merge(Toml::string(overlay));
        }
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        figment.merge(Self::env())
    }

    /// The `TOKEN_BROKER_*` server variables, `__` nesting.
    fn env() -> Env {
        Env::prefixed(ENV_PREFIX)
            .filter(|key| {
                let key = key.as_str().to_ascii_lowercase();
                !CLIENT_VARIABLES.contains(&key.as_str()) && !key.starts_with("emulator_")
            })
            .split("__")
    }

    /// True when a layer above the built-in defaults (`overlay`, `file`,
    /// the environment) sets `key` (dotted).
    fn given(overlay: Option<&str>, file: Option<&Path>, key: &str) -> bool {
        let mut figment = Figment::new();
        if let Some(overlay) = overlay {
            figment = figment.merge(Toml::string(overlay));
        }
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        figment.merge(Self::env()).contains(key)
    }

    /// Reads the layered sources (`overlay` as in [`Config::figment_over`])
    /// into a [`Config`] without checking values: see
    /// [`Settings::load`](crate::settings::Settings::load).
    pub fn read(overlay: Option<&str>, file: Option<&Path>) -> Result<Config, ConfigErrors> {
        if let Some(file) = file {
            if let Err(e) = std::fs::metadata(file) {
                return Err(ConfigErrors(vec![ConfigError::new(
                    "--config",
                    format!("cannot read {}: {e}", file.display()),
                )]));
            }
        }
        let mut config: Config = Self::figment_over(overlay, file)
            .extract()
            .map_err(figment_errors)?;
        // `database.url` always has a value (the default); only one given
        // above the defaults conflicts with `database.url_file`, which
        // otherwise takes its place (empty: `Settings::new` reads the file).
        if config.database.url_file.is_some() {
            if Self::given(overlay, file, "database.url") {
                return Err(ConfigErrors(vec![both_set(
                    "database.url",
                    "database.url_file",
                )]));
            }
            config.database.url = SecretString::from(String::new());
        }
        Ok(config)
    }

    /// Reads every `*_file` secret setting into its value and trims every
    /// secret value (`database.url`, `upstream.refresh_token`,
    /// `upstream.entra.client_secret`): afterwards the `*_file` settings
    /// are None and the values are what the rest of the broker uses. Errors
    /// name the setting (and the file's path), never a value: a value and
    /// its `_file` both set, an unreadable file, one readable by others, a
    /// value empty after trimming.
    pub(crate) fn resolve_secrets(&mut self) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        let database = &mut self.database;
        let url = (!database.url.expose_secret().trim().is_empty()).then(|| database.url.clone());
        match resolve_secret(
            "database.url",
            url,
            "database.url_file",
            &mut database.url_file,
        ) {
            Ok(Some(url)) => database.url = url,
            Ok(None) => errors.push(ConfigError::new("database.url", "must not be empty")),
            Err(e) => errors.push(e),
        }
        if let Err(e) = resolve_secret_in_place(
            "database.migrate_url",
            &mut database.migrate_url,
            "database.migrate_url_file",
            &mut database.migrate_url_file,
        ) {
            errors.push(e);
        }
        let upstream = &mut self.upstream;
        if let Err(e) = resolve_secret_in_place(
            "upstream.refresh_token",
            &mut upstream.refresh_token,
            "upstream.refresh_token_file",
            &mut upstream.refresh_token_file,
        ) {
            errors.push(e);
        }
        let entra = &mut upstream.entra;
        if let Err(e) = resolve_secret_in_place(
            "upstream.entra.client_secret",
            &mut entra.client_secret,
            "upstream.entra.client_secret_file",
            &mut entra.client_secret_file,
        ) {
            errors.push(e);
        }
        errors
    }
}

/// The error for a secret given both as a value and as a file.
fn both_set(value: &str, file: &str) -> ConfigError {
    ConfigError::new(file, format!("{value} and {file} are both set; set one"))
}

/// [`resolve_secret`] on an optional value, in place.
fn resolve_secret_in_place(
    setting: &str,
    value: &mut Option<SecretString>,
    file_setting: &str,
    file: &mut Option<PathBuf>,
) -> Result<(), ConfigError> {
    let resolved = resolve_secret(setting, value.take(), file_setting, file);
    *value = resolved.as_ref().ok().cloned().flatten();
    resolved.map(drop)
}

/// The secret `setting` resolves to: `value` trimmed, or the trimmed
/// contents of `file` (taken, so it resolves once), or None with neither.
/// Errors: both given, the file unreadable or readable by others, the
/// value empty after trimming.
fn resolve_secret(
    setting: &str,
    value: Option<SecretString>,
    file_setting: &str,
    file: &mut Option<PathBuf>,
) -> Result<Option<SecretString>, ConfigError> {
    match (value, file.take()) {
        (Some(_), Some(_)) => Err(both_set(setting, file_setting)),
        (Some(value), None) => trimmed_secret(setting, &value, None).map(Some),
        (None, Some(path)) => read_secret_file(file_setting, &path).map(Some),
        (None, None) => Ok(None),
    }
}

/// `value` without surrounding whitespace (spaces, tabs, `\r`, `\n`).
/// Errors (naming `setting`, and `path` when from a file): empty after
/// trimming.
fn trimmed_secret(
    setting: &str,
    value: &SecretString,
    path: Option<&Path>,
) -> Result<SecretString, ConfigError> {
    let text = value.expose_secret();
    let trimmed = text.trim();
    if trimmed.is_empty() {
        let message = match path {
            Some(path) => format!("{} is empty", path.display()),
            None => "must not be empty".to_owned(),
        };
        return Err(ConfigError::new(setting, message));
    }
    if trimmed.len() == text.len() {
        return Ok(value.clone());
    }
    Ok(SecretString::from(trimmed.to_owned()))
}

/// Reads the secret in the file at `path` (set by `setting`), trimmed.
/// Errors name `setting` and the path: unreadable, readable by others
/// ([`check_private_file`]), empty after trimming.
fn read_secret_file(setting: &str, path: &Path) -> Result<SecretString, ConfigError> {
    use std::io::Read as _;
    let cannot_read = |e: std::io::Error| {
        ConfigError::new(setting, format!("cannot read {}: {e}", path.display()))
    };
    let mut file = std::fs::File::open(path).map_err(cannot_read)?;
    check_private_file(setting, path, &file)?;
    let mut text = secrecy::zeroize::Zeroizing::new(String::new());
    file.read_to_string(&mut text).map_err(cannot_read)?;
    trimmed_secret(setting, &SecretString::from(text.as_str()), Some(path))
}

/// Refuses a secret file that others (not its owner or group) may read:
/// Kubernetes mounts Secrets 0440 under an `fsGroup`, so group-readable is
/// fine. Checked on the opened file (so on a symlink's target). Unix only.
fn check_private_file(setting: &str, path: &Path, file: &std::fs::File) -> Result<(), ConfigError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = file
            .metadata()
            .map_err(|e| ConfigError::new(setting, format!("cannot read {}: {e}", path.display())))?
            .permissions()
            .mode();
        if mode & 0o004 != 0 {
            return Err(ConfigError::new(
                setting,
                format!(
                    "{} is readable by others (mode {:04o}); chmod o-r it",
                    path.display(),
                    mode & 0o7777
                ),
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = (setting, path, file);
    Ok(())
}

impl AuthConfig {
    /// The configured keys. Errors name `auth.api_keys[N].sha256` or
    /// `auth.api_keys`.
    pub fn api_keys(&self) -> Result<ApiKeys, ConfigError> {
        let mut keys = Vec::with_capacity(self.api_keys.len());
        for (i, k) in self.api_keys.iter().enumerate() {
            let hash = ApiKeyHash::parse_hex(&k.sha256)
                .map_err(|m| ConfigError::new(format!("auth.api_keys[{i}].sha256"), m))?;
            keys.push((k.name.clone(), hash));
        }
        ApiKeys::new(keys).map_err(|m| ConfigError::new("auth.api_keys", m))
    }

    /// The keys in force: `auth.api_keys_file` read now (and reloaded
    /// later), else `auth.api_keys`. Errors name `auth.api_keys_file`
    /// (both set, or the file unreadable or invalid: its path and entry)
    /// or as [`AuthConfig::api_keys`].
    pub fn api_keys_handle(&self) -> Result<ApiKeysHandle, ConfigError> {
        let Some(file) = &self.api_keys_file else {
            return self.api_keys().map(ApiKeysHandle::from);
        };
        if !self.api_keys.is_empty() {
            return Err(ConfigError::new(
                "auth.api_keys_file",
                "auth.api_keys and auth.api_keys_file are both set; set one",
            ));
        }
        ApiKeysHandle::from_file(file)
            .map_err(|e| ConfigError::new("auth.api_keys_file", e.to_string()))
    }

    /// The service-account verifier when `auth.kubernetes.enabled` (reads
    /// its CA files; fetches nothing). Errors name
    /// `auth.kubernetes.<setting>`.
    pub fn kubernetes_verifier(&self) -> Result<Option<KubernetesVerifier>, ConfigError> {
        if !self.kubernetes.enabled {
            return Ok(None);
        }
        KubernetesVerifier::new(&self.kubernetes).map(Some).map_err(
            |KubernetesConfigError::Invalid { setting, problem }| {
                ConfigError::new(format!("auth.kubernetes.{setting}"), problem)
            },
        )
    }
}

/// Checks a key is standard base64 of exactly 32 bytes (AES-256 and the
/// HMAC key alike), without ever putting the value in the error.
fn decode_key(setting: &str, value: &SecretString) -> Result<(), ConfigError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value.expose_secret().trim())
        .map_err(|_| ConfigError::new(setting, "is not standard base64"))?;
    if bytes.len() != 32 {
        return Err(ConfigError::new(
            setting,
            format!("must decode to exactly 32 bytes, got {}", bytes.len()),
        ));
    }
    Ok(())
}

impl KeysConfig {
    fn is_inline(&self) -> bool {
        self.active.is_some()
            || !self.sealing.is_empty()
            || self.fingerprint.is_some()
            || self.fingerprint_active.is_some()
            || !self.fingerprint_keys.is_empty()
            || self.audit_chain.is_some()
            || self.audit_chain_active.is_some()
            || !self.audit_chain_keys.is_empty()
    }

    /// True when no keys are configured at all.
    pub fn is_unset(&self) -> bool {
        self.file.is_none() && !self.is_inline()
    }

    fn inline(&self) -> KeysFile {
        KeysFile {
            active: self.active.clone(),
            sealing: self.sealing.clone(),
            fingerprint: self.fingerprint.clone(),
            fingerprint_active: self.fingerprint_active.clone(),
            fingerprint_keys: self.fingerprint_keys.clone(),
            audit_chain: self.audit_chain.clone(),
            audit_chain_active: self.audit_chain_active.clone(),
            audit_chain_keys: self.audit_chain_keys.clone(),
        }
    }

    /// Checks the section without touching files: `keys.file` and inline
    /// keys are not both set, and inline keys are complete and well formed.
    /// Returns the inline keys, resolved, when there are some.
    pub fn check(&self) -> Result<Option<ResolvedKeys>, ConfigError> {
        if self.file.is_some() && self.is_inline() {
            return Err(ConfigError::new(
                "keys.file",
                "set either keys.file or inline keys (keys.active, keys.sealing, keys.fingerprint*, keys.audit_chain*), not both",
            ));
        }
        if !self.is_inline() {
            return Ok(None);
        }
        self.inline().resolve("keys", "configuration").map(Some)
    }

    /// The keys to run with. `backend` decides what happens when none are
    /// configured: SQLite generates a keys file next to the database (mode
    /// 0600) on first start and reuses it after; an in-memory SQLite uses
    /// throwaway keys; PostgreSQL is an error naming `keys`.
    /// Returns the keys and whether a file was generated now.
    pub fn resolve(
        &self,
        backend: &Backend,
    ) -> Result<(ResolvedKeys, Option<PathBuf>), ConfigError> {
        if let Some(file) = &self.file {
            let opened = std::fs::File::open(file).map_err(|e| {
                ConfigError::new(
                    "keys.file",
                    format!("cannot read keys file {}: {e}", file.display()),
                )
            })?;
            check_private_file("keys.file", file, &opened)?;
            return Ok((read_keys_file("keys.file", file)?, None));
        }
        if self.is_inline() {
            return Ok((self.inline().resolve("keys", "configuration")?, None));
        }
        match backend {
            Backend::Postgres => Err(ConfigError::new(
                "keys",
                "no keys configured: PostgreSQL needs keys.file or keys.active + keys.sealing + keys.fingerprint (or keys.fingerprint_active + keys.fingerprint_keys) + keys.audit_chain (or keys.audit_chain_active + keys.audit_chain_keys) (generated keys would be lost with the pod)",
            )),
            Backend::Sqlite(None) => {
                let parsed: KeysFile =
                    toml_parse(&crypto::generate_keys_file()).expect("generated keys parse");
                let keys = parsed.resolve("keys", "throwaway (in-memory database)")?;
                Ok((keys, None))
            }
            Backend::Sqlite(Some(db)) => {
                let path = generated_keys_path(db);
                let created = ensure_keys_file(&path)?;
                let keys = read_keys_file("keys", &path)?;
                Ok((keys, created.then_some(path)))
            }
        }
    }
}

impl KeysConfig {
    /// [`KeysConfig::resolve`] without writing anything (for `config
    /// check`): with no keys configured on a SQLite file, the generated
    /// keys file beside it is read when it exists; None when `serve` would
    /// generate it now. Errors name the setting, as `resolve`'s do.
    pub fn resolve_existing(&self, backend: &Backend) -> Result<Option<ResolvedKeys>, ConfigError> {
        match backend {
            Backend::Sqlite(Some(db)) if self.is_unset() => {
                let path = generated_keys_path(db);
                if !path.exists() {
                    return Ok(None);
                }
                read_keys_file("keys", &path).map(Some)
            }
            _ => self.resolve(backend).map(|(keys, _)| Some(keys)),
        }
    }
}

/// Creates a fresh keys file at `path` (mode 0600) unless one exists; a
/// generated file from before the audit chain gets its `audit_chain` key
/// added. Returns true if it was created now. Errors name `keys`.
pub fn ensure_keys_file(path: &Path) -> Result<bool, ConfigError> {
    let keys_error = |e: crypto::KeysFileError| ConfigError::new("keys", e.to_string());
    if !path.exists() {
        crypto::create_keys_file(path).map_err(keys_error)?;
        return Ok(true);
    }
    let text = std::fs::read_to_string(path).map_err(|source| {
        keys_error(crypto::KeysFileError::AddChainKey {
            path: path.to_owned(),
            source,
        })
    })?;
    // A file that does not parse is left alone: reading it reports why.
    if let Ok(KeysFile {
        audit_chain: None,
        audit_chain_active: None,
        audit_chain_keys,
        ..
    }) = toml_parse(&text)
    {
        if !audit_chain_keys.is_empty() {
            return Ok(false);
        }
        crypto::add_audit_chain_key(path, &text).map_err(keys_error)?;
    }
    Ok(false)
}

/// Where `serve` keeps generated keys for the SQLite file `db`:
/// `<db>.keys.toml` beside it.
pub fn generated_keys_path(db: &Path) -> PathBuf {
    let mut name = db.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".keys.toml");
    db.with_file_name(name)
}

fn toml_parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    Figment::from(Toml::string(text))
        .extract()
        .map_err(|e| figment_errors(e).to_string())
}

fn read_keys_file(setting: &str, path: &Path) -> Result<ResolvedKeys, ConfigError> {
    let parsed: KeysFile = Figment::from(Toml::file_exact(path))
        .extract()
        .map_err(|e| {
            ConfigError::new(
                setting,
                format!(
                    "cannot read keys file {}: {}",
                    path.display(),
                    figment_errors(e)
                ),
            )
        })?;
    parsed.resolve(
        &format!("{setting} ({})", path.display()),
        &path.display().to_string(),
    )
}

impl KeysFile {
    /// Checks every key and trims surrounding whitespace from it; errors
    /// name `{section}.active` and so on (an empty key: `must not be
    /// empty`).
    fn resolve(&self, section: &str, source: &str) -> Result<ResolvedKeys, ConfigError> {
        // Sealing first: its errors were reported first before the chain
        // and fingerprint keyrings existed.
        let active = self
            .active
            .clone()
            .ok_or_else(|| ConfigError::new(format!("{section}.active"), "is required"))?;
        if !self.sealing.contains_key(&active) {
            return Err(ConfigError::new(
                format!("{section}.active"),
                format!("no key {active:?} in {section}.sealing"),
            ));
        }
        let sealing = check_keys(&format!("{section}.sealing"), &self.sealing)?;
        let (fingerprint_active, fingerprint_keys) = keyring_of(
            section,
            "fingerprint",
            &self.fingerprint,
            &self.fingerprint_active,
            &self.fingerprint_keys,
        )?;
        let (audit_chain_active, audit_chain_keys) = keyring_of(
            section,
            "audit_chain",
            &self.audit_chain,
            &self.audit_chain_active,
            &self.audit_chain_keys,
        )?;
        Ok(ResolvedKeys {
            active,
            sealing,
            fingerprint_active,
            fingerprint_keys,
            audit_chain_active,
            audit_chain_keys,
            source: source.to_owned(),
        })
    }
}

/// Checks each key id (1 to 32 letters, digits, '-' or '_') and key (32
/// bytes of standard base64) of the table `setting`; returns the keys
/// trimmed of surrounding whitespace.
fn check_keys(
    setting: &str,
    keys: &BTreeMap<String, SecretString>,
) -> Result<BTreeMap<String, SecretString>, ConfigError> {
    let mut checked = BTreeMap::new();
    for (id, value) in keys {
        if id.is_empty()
            || id.len() > 32
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        {
            return Err(ConfigError::new(
                setting,
                format!("key id {id:?} must be 1 to 32 letters, digits, '-' or '_'"),
            ));
        }
        let key_setting = format!("{setting}.{id}");
        let value = trimmed_secret(&key_setting, value, None)?;
        decode_key(&key_setting, &value)?;
        checked.insert(id.clone(), value);
    }
    Ok(checked)
}

/// The keyring of purpose `name` (`fingerprint`, `audit_chain`): the
/// single string `{section}.{name}` as key id `default`, or
/// `{section}.{name}_active` naming a key of `{section}.{name}_keys`.
/// Errors: both forms set (naming both), neither, an active id naming no
/// key, a bad key id or key.
fn keyring_of(
    section: &str,
    name: &str,
    single: &Option<SecretString>,
    active: &Option<String>,
    keys: &BTreeMap<String, SecretString>,
) -> Result<(String, BTreeMap<String, SecretString>), ConfigError> {
    let (single_setting, active_setting, keys_setting) = (
        format!("{section}.{name}"),
        format!("{section}.{name}_active"),
        format!("{section}.{name}_keys"),
    );
    if let Some(single) = single {
        if active.is_some() || !keys.is_empty() {
            return Err(ConfigError::new(
                &single_setting,
                format!(
                    "set either {single_setting} (key id \"default\") or {active_setting} + {keys_setting}, not both"
                ),
            ));
        }
        let single = trimmed_secret(&single_setting, single, None)?;
        decode_key(&single_setting, &single)?;
        let keys = [(DEFAULT_KEY_ID.to_owned(), single)].into();
        return Ok((DEFAULT_KEY_ID.to_owned(), keys));
    }
    if active.is_none() && keys.is_empty() {
        return Err(ConfigError::new(
            &single_setting,
            format!("is required (or {active_setting} + {keys_setting})"),
        ));
    }
    let active = active.clone().ok_or_else(|| {
        ConfigError::new(&active_setting, format!("is required with {keys_setting}"))
    })?;
    if !keys.contains_key(&active) {
        return Err(ConfigError::new(
            &active_setting,
            format!("no key {active:?} in {keys_setting}"),
        ));
    }
    let keys = check_keys(&keys_setting, keys)?;
    Ok((active, keys))
}

/// Settings whose values are secrets and never appear in an error (nor in
/// `config check`'s output); `path` is dotted, e.g. `keys.sealing.k1`.
pub(crate) fn is_secret_setting(path: &str) -> bool {
    // A keys file's settings have no `keys.` prefix.
    let key = path.strip_prefix("keys.").unwrap_or(path);
    matches!(
        path,
        "database.url"
            | "database.migrate_url"
            | "upstream.refresh_token"
            | "upstream.entra.client_secret"
    ) || matches!(key, "fingerprint" | "audit_chain")
        || ["sealing", "fingerprint_keys", "audit_chain_keys"]
            .iter()
            .any(|table| key == *table || key.starts_with(&format!("{table}.")))
}

/// Turns figment's errors into ones naming the setting by its dotted path.
fn figment_errors(err: figment::Error) -> ConfigErrors {
    ConfigErrors(
        err.into_iter()
            .map(|e| {
                let mut path = e.path.join(".");
                let message = match &e.kind {
                    figment::error::Kind::UnknownField(name, _) => {
                        // figment's path usually ends with the field already.
                        if e.path.last() != Some(name) {
                            if !path.is_empty() {
                                path.push('.');
                            }
                            path.push_str(name);
                        }
                        "unknown setting".to_owned()
                    }
                    // Type errors quote the value: never for a secret.
                    figment::error::Kind::InvalidType(..)
                    | figment::error::Kind::InvalidValue(..)
                    | figment::error::Kind::Message(..)
                        if is_secret_setting(&path) =>
                    {
                        "invalid value (not shown: secret setting)".to_owned()
                    }
                    kind => kind.to_string().trim().replace('\n', " "),
                };
                let source = e
                    .metadata
                    .as_ref()
                    .map(|m| match &m.source {
                        Some(figment::Source::File(f)) => format!(" (in {})", f.display()),
                        _ if m.name.contains("environment") => {
                            let var = format!(
                                "{ENV_PREFIX}{}",
                                path.to_ascii_uppercase().replace('.', "__")
                            );
                            format!(" (from environment variable {var})")
                        }
                        _ => String::new(),
                    })
                    .unwrap_or_default();
                if path.is_empty() {
                    path = "config".into();
                }
                ConfigError::new(path, format!("{message}{source}"))
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::tls::ClientAuth;
    use crate::settings::Settings;

    #[test]
    fn defaults_parse_and_validate() {
        let c: Config = Figment::from(Toml::string(DEFAULTS)).extract().unwrap();
        let c = Settings::new(c).unwrap().config;
        assert_eq!(c.grpc.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(
            c.database.backend().unwrap(),
            Backend::Sqlite(Some("token-broker.db".into()))
        );
    }

    #[test]
    fn store_urls_select_a_backend() {
        assert_eq!(backend_of("postgres://u@h/db").unwrap(), Backend::Postgres);
        assert_eq!(
            backend_of("sqlite:///tmp/x.db?mode=rwc").unwrap(),
            Backend::Sqlite(Some("/tmp/x.db".into()))
        );
        assert_eq!(
            backend_of("sqlite::memory:").unwrap(),
            Backend::Sqlite(None)
        );
        assert!(backend_of("mysql://x").is_err());
    }

    #[test]
    fn inline_keys_without_an_audit_chain_key_are_refused_naming_it() {
        let key = Keyring::generate_key().expose_secret().to_owned();
        let keys = KeysConfig {
            active: Some("k1".into()),
            sealing: [("k1".to_owned(), SecretString::from(key.clone()))].into(),
            fingerprint: Some(SecretString::from(key.clone())),
            ..KeysConfig::default()
        };
        let err = keys.resolve(&Backend::Postgres).unwrap_err();
        assert_eq!(err.setting, "keys.audit_chain");
        let keys = KeysConfig {
            audit_chain: Some(SecretString::from("c2hvcnQ=")),
            ..keys
        };
        let err = keys.resolve(&Backend::Postgres).unwrap_err();
        assert_eq!(err.setting, "keys.audit_chain");
        assert!(!err.message.contains("c2hvcnQ="));
    }

    #[test]
    fn a_generated_keys_file_from_before_the_audit_chain_gets_a_chain_key_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("broker.db");
        let path = generated_keys_path(&db);
        let key = Keyring::generate_key().expose_secret().to_owned();
        let old = format!(
            "# generated\nactive = \"k1\"\nfingerprint = \"{key}\"\n\n[sealing]\nk1 = \"{key}\"\n"
        );
        std::fs::write(&path, &old).unwrap();
        let (keys, created) = KeysConfig::default()
            .resolve(&Backend::Sqlite(Some(db.clone())))
            .unwrap();
        assert!(created.is_none());
        assert_eq!(keys.active, "k1");
        assert_eq!(keys.fingerprint_active, "default");
        assert_eq!(keys.fingerprint_keys["default"].expose_secret(), key);
        assert_eq!(keys.chain_keys().unwrap().active_key_id(), "default");
        // Stable from then on.
        let (again, _) = KeysConfig::default()
            .resolve(&Backend::Sqlite(Some(db)))
            .unwrap();
        assert_eq!(
            again.audit_chain_keys["default"].expose_secret(),
            keys.audit_chain_keys["default"].expose_secret()
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn chain_and_fingerprint_keyrings_take_an_active_id_and_a_table_or_one_string() {
        let key = || Keyring::generate_key();
        let base = KeysConfig {
            active: Some("k1".into()),
            sealing: [("k1".to_owned(), key())].into(),
            ..KeysConfig::default()
        };
        // Single strings: key id `default`.
        let keys = KeysConfig {
            fingerprint: Some(key()),
            audit_chain: Some(key()),
            ..base.clone()
        }
        .resolve(&Backend::Postgres)
        .unwrap()
        .0;
        assert_eq!(keys.audit_chain_active, "default");
        assert_eq!(keys.fingerprint_active, "default");
        // Tables with an active id.
        let rings = KeysConfig {
            fingerprint_active: Some("f2".into()),
            fingerprint_keys: [("f1".to_owned(), key()), ("f2".to_owned(), key())].into(),
            audit_chain_active: Some("a2".into()),
            audit_chain_keys: [("a1".to_owned(), key()), ("a2".to_owned(), key())].into(),
            ..base.clone()
        };
        let keys = rings.resolve(&Backend::Postgres).unwrap().0;
        assert_eq!(keys.fingerprint_active, "f2");
        let chain = keys.chain_keys().unwrap();
        assert_eq!(chain.active_key_id(), "a2");
        assert_eq!(chain.key_ids().collect::<Vec<_>>(), ["a1", "a2"]);
        assert!(!format!("{keys:?}{chain:?}").contains(keys.audit_chain_keys["a1"].expose_secret()));
        // Both forms: an error naming both.
        let err = KeysConfig {
            audit_chain: Some(key()),
            ..rings.clone()
        }
        .resolve(&Backend::Postgres)
        .unwrap_err();
        assert_eq!(err.setting, "keys.audit_chain");
        assert!(err.message.contains("keys.audit_chain_active"), "{err}");
        let err = KeysConfig {
            fingerprint: Some(key()),
            ..rings.clone()
        }
        .resolve(&Backend::Postgres)
        .unwrap_err();
        assert_eq!(err.setting, "keys.fingerprint");
        assert!(err.message.contains("keys.fingerprint_keys"), "{err}");
        // The active id must name a key of the table.
        let err = KeysConfig {
            audit_chain_active: Some("a3".into()),
            ..rings.clone()
        }
        .resolve(&Backend::Postgres)
        .unwrap_err();
        assert_eq!(err.setting, "keys.audit_chain_active");
        let err = KeysConfig {
            fingerprint_active: None,
            ..rings.clone()
        }
        .resolve(&Backend::Postgres)
        .unwrap_err();
        assert_eq!(err.setting, "keys.fingerprint_active");
        let err = KeysConfig {
            audit_chain_keys: [("a 2".to_owned(), key())].into(),
            audit_chain_active: Some("a 2".into()),
            ..rings.clone()
        }
        .resolve(&Backend::Postgres)
        .unwrap_err();
        assert_eq!(err.setting, "keys.audit_chain_keys");
    }

    #[test]
    fn a_keys_file_takes_the_keyrings_in_the_same_shape() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let key = || Keyring::generate_key().expose_secret().to_owned();
        std::fs::write(
            &path,
            format!(
                "active = \"k1\"\naudit_chain_active = \"a2\"\nfingerprint_active = \"f1\"\n\
                 [sealing]\nk1 = \"{}\"\n[audit_chain_keys]\na1 = \"{}\"\na2 = \"{}\"\n\
                 [fingerprint_keys]\nf1 = \"{}\"\n",
                key(),
                key(),
                key(),
                key()
            ),
        )
        .unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let keys = KeysConfig {
            file: Some(path.clone()),
            ..KeysConfig::default()
        }
        .resolve(&Backend::Postgres)
        .unwrap()
        .0;
        assert_eq!(keys.audit_chain_active, "a2");
        assert_eq!(keys.fingerprint_active, "f1");
        // A generated-file upgrade never adds `audit_chain` beside a table.
        assert!(!ensure_keys_file(&path).unwrap());
        assert!(!std::fs::read_to_string(&path)
            .unwrap()
            .contains("audit_chain ="));
    }

    #[test]
    fn generated_keys_sit_beside_the_database() {
        assert_eq!(
            generated_keys_path(Path::new("/data/token-broker.db")),
            PathBuf::from("/data/token-broker.db.keys.toml")
        );
    }

    // figment::Error is large; it is the Jail API.
    #[allow(clippy::result_large_err)]
    fn load_in_jail(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        let mut result = None;
        figment::Jail::expect_with(|jail| {
            jail.create_file("broker.toml", toml)?;
            for (k, v) in env {
                jail.set_env(k, v);
            }
            result = Some(Settings::load(Some(Path::new("broker.toml"))).map(|s| s.config));
            Ok(())
        });
        result.unwrap()
    }

    /// A self-signed certificate and its key, PEM, for `localhost`.
    fn cert_and_key() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn kubernetes_callers_are_off_by_default_and_their_errors_name_the_setting() {
        let c = load_in_jail("", &[]).unwrap();
        assert!(!c.auth.kubernetes.enabled);
        assert!(c.auth.kubernetes_verifier().unwrap().is_none());

        let err = load_in_jail("[auth.kubernetes]\nenabled = true\n", &[]).unwrap_err();
        assert!(err.names("auth.kubernetes.issuer"), "{err}");
        let err = load_in_jail(
            "[auth.kubernetes]\nenabled = true\nissuer = \"https://k8s.example\"\nleeway = \"10m\"\n",
            &[],
        )
        .unwrap_err();
        assert!(err.names("auth.kubernetes.leeway"), "{err}");
        let err = load_in_jail("[auth.kubernetes]\nisuer = \"x\"\n", &[]).unwrap_err();
        assert!(err.names("auth.kubernetes.isuer"), "{err}");
    }

    #[test]
    fn kubernetes_callers_can_be_enabled_from_the_environment() {
        let c = load_in_jail(
            "",
            &[
                ("TOKEN_BROKER_AUTH__KUBERNETES__ENABLED", "true"),
                (
                    "TOKEN_BROKER_AUTH__KUBERNETES__ISSUER",
                    "https://kubernetes.default.svc.cluster.local",
                ),
                (
                    "TOKEN_BROKER_AUTH__KUBERNETES__AUDIENCES",
                    "[\"token-broker\", \"broker.example\"]",
                ),
                ("TOKEN_BROKER_AUTH__KUBERNETES__LEEWAY", "45s"),
            ],
        )
        .unwrap();
        assert!(c.auth.kubernetes.enabled);
        assert_eq!(c.auth.kubernetes.audiences.len(), 2);
        assert_eq!(c.auth.kubernetes.leeway, Duration::from_secs(45));
        assert!(c.auth.kubernetes_verifier().unwrap().is_some());
    }

    #[test]
    fn tls_files_are_read_and_checked_at_load_naming_the_bad_one() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = cert_and_key();
        let (_, other_key) = cert_and_key();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path.display().to_string()
        };
        let (cert, key, other_key, garbage) = (
            write("c.pem", &cert),
            write("k.pem", &key),
            write("o.pem", &other_key),
            write("g.pem", "not PEM at all"),
        );
        let tls = |cert: &str, key: &str, extra: &str| {
            format!("[grpc.tls]\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n{extra}")
        };

        let c = load_in_jail(&tls(&cert, &key, ""), &[]).unwrap();
        let material = c.grpc.tls.as_ref().unwrap().load().unwrap();
        assert_eq!(material.client_auth, None);
        assert!(!format!("{material:?}").contains("PRIVATE KEY"));

        let c = load_in_jail(
            &tls(&cert, &key, &format!("client_ca_file = \"{cert}\"")),
            &[],
        )
        .unwrap();
        let material = c.grpc.tls.as_ref().unwrap().load().unwrap();
        assert_eq!(material.client_auth, Some(ClientAuth::Required));

        for (toml, setting) in [
            (tls("/nonexistent/c.pem", &key, ""), "grpc.tls.cert_file"),
            (tls(&garbage, &key, ""), "grpc.tls.cert_file"),
            (tls(&cert, &garbage, ""), "grpc.tls.key_file"),
            (tls(&cert, &other_key, ""), "grpc.tls.key_file"),
            (
                tls(&cert, &key, &format!("client_ca_file = \"{garbage}\"")),
                "grpc.tls.client_ca_file",
            ),
            (
                tls(&cert, &key, "client_auth = \"optional\""),
                "grpc.tls.client_auth",
            ),
            (
                tls(&cert, &key, "client_auth = \"sometimes\""),
                "grpc.tls.client_auth",
            ),
        ] {
            let err = load_in_jail(&toml, &[]).unwrap_err();
            assert!(err.names(setting), "{setting}: {err}");
            assert!(!err.to_string().contains("PRIVATE KEY"), "{err}");
        }
    }

    #[test]
    fn tls_can_be_configured_from_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = cert_and_key();
        let cert_path = dir.path().join("tls.crt");
        let key_path = dir.path().join("tls.key");
        std::fs::write(&cert_path, cert).unwrap();
        std::fs::write(&key_path, key).unwrap();
        let c = load_in_jail(
            "",
            &[
                (
                    "TOKEN_BROKER_GRPC__TLS__CERT_FILE",
                    &cert_path.display().to_string(),
                ),
                (
                    "TOKEN_BROKER_GRPC__TLS__KEY_FILE",
                    &key_path.display().to_string(),
                ),
                (
                    "TOKEN_BROKER_GRPC__TLS__CLIENT_CA_FILE",
                    &cert_path.display().to_string(),
                ),
                ("TOKEN_BROKER_GRPC__TLS__CLIENT_AUTH", "optional"),
            ],
        )
        .unwrap();
        let tls = c.grpc.tls.unwrap();
        assert_eq!(tls.client_auth, Some(ClientAuth::Optional));
        assert_eq!(tls.key_file, key_path);
    }

    /// A file `name` in `dir` holding `text`, with permission bits `mode`.
    fn secret_file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        #[cfg(not(unix))]
        let _ = mode;
        path
    }

    #[test]
    fn secret_values_are_trimmed_of_whitespace_and_line_endings_and_empty_is_refused() {
        for raw in ["rt-1\r\n", "rt-1\n", " \trt-1 \t\r\n", "rt-1"] {
            let t = trimmed_secret("upstream.refresh_token", &SecretString::from(raw), None);
            assert_eq!(t.unwrap().expose_secret(), "rt-1", "{raw:?}");
        }
        for raw in ["", " ", "\r\n", "\t \n"] {
            let err = trimmed_secret("upstream.refresh_token", &SecretString::from(raw), None)
                .unwrap_err();
            assert_eq!(err.setting, "upstream.refresh_token");
            assert_eq!(err.message, "must not be empty");
        }
    }

    #[test]
    fn a_value_and_its_file_both_set_is_an_error_naming_both_and_no_value() {
        let mut file = Some(PathBuf::from("/run/secrets/rt"));
        let err = resolve_secret(
            "upstream.refresh_token",
            Some(SecretString::from("rt-secret-value")),
            "upstream.refresh_token_file",
            &mut file,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "upstream.refresh_token_file: upstream.refresh_token and upstream.refresh_token_file are both set; set one"
        );
        assert!(!err.to_string().contains("rt-secret-value"));
    }

    #[test]
    fn a_secret_file_is_read_trimmed_and_taken_so_resolving_again_keeps_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = secret_file(dir.path(), "rt", "rt-from-file\r\n", 0o600);
        let mut value = None;
        let mut file = Some(path);
        for _ in 0..2 {
            resolve_secret_in_place(
                "upstream.refresh_token",
                &mut value,
                "upstream.refresh_token_file",
                &mut file,
            )
            .unwrap();
            assert_eq!(value.as_ref().unwrap().expose_secret(), "rt-from-file");
            assert!(file.is_none());
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_secret_file_readable_by_others_is_refused_with_its_path_and_mode_group_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o604, 0o444, 0o666] {
            let path = secret_file(dir.path(), &format!("s{mode:o}"), "secret-in-file\n", mode);
            let err = read_secret_file("upstream.refresh_token_file", &path).unwrap_err();
            assert_eq!(err.setting, "upstream.refresh_token_file");
            assert_eq!(
                err.message,
                format!(
                    "{} is readable by others (mode {mode:04o}); chmod o-r it",
                    path.display()
                )
            );
            assert!(!err.to_string().contains("secret-in-file"));
        }
        for mode in [0o400, 0o440, 0o600, 0o640, 0o660] {
            let path = secret_file(dir.path(), &format!("ok{mode:o}"), "secret-in-file\n", mode);
            let value = read_secret_file("upstream.refresh_token_file", &path).unwrap();
            assert_eq!(value.expose_secret(), "secret-in-file", "{mode:o}");
        }
    }

    #[test]
    fn a_missing_or_empty_secret_file_is_an_error_naming_the_setting_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = read_secret_file("database.url_file", &missing).unwrap_err();
        assert_eq!(err.setting, "database.url_file");
        assert!(
            err.message
                .starts_with(&format!("cannot read {}: ", missing.display())),
            "{err}"
        );
        let empty = secret_file(dir.path(), "empty", " \r\n", 0o600);
        let err = read_secret_file("database.url_file", &empty).unwrap_err();
        assert_eq!(err.setting, "database.url_file");
        assert_eq!(err.message, format!("{} is empty", empty.display()));
    }

    fn keys_toml(key: &str, line_end: &str) -> String {
        format!(
            "active = \"k1\"\nfingerprint = \"{key}{line_end}\"\naudit_chain = \" {key}\\t\"\n[sealing]\nk1 = \"{key}{line_end}\"\n"
        )
    }

    #[test]
    fn keys_are_trimmed_inline_and_from_a_file_and_an_empty_key_is_refused_naming_it() {
        let key = Keyring::generate_key().expose_secret().to_owned();
        let keys = KeysConfig {
            active: Some("k1".into()),
            sealing: [("k1".to_owned(), SecretString::from(format!("{key}\r\n")))].into(),
            fingerprint: Some(SecretString::from(format!("{key}\n"))),
            audit_chain: Some(SecretString::from(format!("\t{key} "))),
            ..KeysConfig::default()
        };
        let (resolved, _) = keys.resolve(&Backend::Postgres).unwrap();
        assert_eq!(resolved.sealing["k1"].expose_secret(), key);
        assert_eq!(resolved.fingerprint_keys["default"].expose_secret(), key);
        assert_eq!(resolved.audit_chain_keys["default"].expose_secret(), key);

        let dir = tempfile::tempdir().unwrap();
        let path = secret_file(dir.path(), "keys.toml", &keys_toml(&key, "\\r\\n"), 0o440);
        let keys = KeysConfig {
            file: Some(path),
            ..KeysConfig::default()
        };
        let (resolved, _) = keys.resolve(&Backend::Postgres).unwrap();
        assert_eq!(resolved.sealing["k1"].expose_secret(), key);
        assert_eq!(resolved.fingerprint_keys["default"].expose_secret(), key);
        assert_eq!(resolved.audit_chain_keys["default"].expose_secret(), key);

        let keys = KeysConfig {
            fingerprint: Some(SecretString::from(" \r\n")),
            ..keys_inline(&key)
        };
        let err = keys.resolve(&Backend::Postgres).unwrap_err();
        assert_eq!(err.to_string(), "keys.fingerprint: must not be empty");
    }

    fn keys_inline(key: &str) -> KeysConfig {
        KeysConfig {
            active: Some("k1".into()),
            sealing: [("k1".to_owned(), SecretString::from(key.to_owned()))].into(),
            fingerprint: Some(SecretString::from(key.to_owned())),
            audit_chain: Some(SecretString::from(key.to_owned())),
            ..KeysConfig::default()
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_keys_file_readable_by_others_is_refused_with_its_path_and_mode() {
        let key = Keyring::generate_key().expose_secret().to_owned();
        let dir = tempfile::tempdir().unwrap();
        let path = secret_file(dir.path(), "keys.toml", &keys_toml(&key, ""), 0o644);
        let keys = KeysConfig {
            file: Some(path.clone()),
            ..KeysConfig::default()
        };
        let err = keys.resolve(&Backend::Postgres).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "keys.file: {} is readable by others (mode 0644); chmod o-r it",
                path.display()
            )
        );
        assert!(!err.to_string().contains(&key));
    }
}
