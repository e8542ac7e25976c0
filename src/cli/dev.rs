//! `token-broker dev`: the one-command local run. Starts
//! the emulator (unless `--upstream` names one already running), then the
//! broker wired to it through the Entra refresh-token grant, on an embedded
//! SQLite file (or `--database-url`), with a sample policy and a dev API
//! key, and prints how to reach both.

use std::net::SocketAddr;
use std::path::Path;

use secrecy::{ExposeSecret as _, SecretString};
use tokio::net::TcpListener;

use crate::auth::GeneratedApiKey;
use crate::config::{self, ApiKeySetting, Backend, Config};
use crate::emulator::{self, EmulatorConfig};
use crate::policy::Policy;
use crate::server::{self, Broker, ServeError};
use crate::settings::Settings;

/// SQLite file `dev` uses unless `--database-url` is given; restarting
/// `dev` in the same directory keeps its leases and deployment id.
pub const DEV_DATABASE_URL: &str = "sqlite:token-broker-dev.db";

/// Keys file `dev` uses on PostgreSQL (SQLite keeps its own beside the file).
pub const DEV_KEYS_FILE: &str = "token-broker-dev.keys.toml";

/// State file of the emulator `dev` embeds, in the working directory.
pub const DEV_EMULATOR_STATE_FILE: &str = "token-broker-dev.emulator.json";

/// Where `dev`'s embedded emulator keeps its state: beside the SQLite
/// file when the store is a SQLite file, else in the working directory.
pub fn dev_emulator_state_file(database_url: Option<&str>) -> std::path::PathBuf {
    let url = database_url.unwrap_or(DEV_DATABASE_URL);
    match config::backend_of(url) {
        Ok(Backend::Sqlite(Some(file))) => match file.parent() {
            Some(dir) => dir.join(DEV_EMULATOR_STATE_FILE),
            None => DEV_EMULATOR_STATE_FILE.into(),
        },
        _ => DEV_EMULATOR_STATE_FILE.into(),
    }
}

/// The environment variable holding a fixed dev API key (`tbk_…`).
pub const DEV_API_KEY_VAR: &str = "TOKEN_BROKER_DEV_API_KEY";

/// Name of the dev key; its identity is `apikey:dev`.
pub const DEV_KEY_NAME: &str = "dev";

/// The sample policy: `apikey:dev` may lease `vso.code_write` and
/// `vso.packaging` (and what they include) in `fabrikam`, default TTL 1 h,
/// max 8 h; it is also an admin, so `admin` and `audit list` can be tried
/// locally.
pub const DEV_POLICY: &str = r#"
admins: ["apikey:dev"]
rules:
  - name: dev
    identities: ["apikey:dev"]
    organizations: ["fabrikam"]
    scopes: ["vso.code_write", "vso.packaging"]
    default_ttl: 1h
    max_ttl: 8h
"#;

/// `token-broker dev` options.
#[derive(clap::Args, Debug, Clone)]
pub struct DevArgs {
    /// gRPC address of the broker.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Address of the local emulator.
    #[arg(long, default_value = emulator::DEFAULT_LISTEN)]
    pub emulator_listen: SocketAddr,
    /// Store URL, e.g. `postgres://postgres@127.0.0.1:5432/postgres`
    /// (default: the SQLite file token-broker-dev.db here).
    #[arg(long, hide_default_value = true)]
    pub database_url: Option<SecretString>,
    /// Use the emulator already running at this URL (started with its
    /// default refresh token) instead of starting one.
    #[arg(long)]
    pub upstream: Option<url::Url>,
    /// Let the embedded emulator serve the bare repositories
    /// `DIR/{organization}/{project}/{repo}.git` over git's smart HTTP.
    #[arg(long, value_name = "DIR", conflicts_with = "upstream")]
    pub git_root: Option<std::path::PathBuf>,
}

/// Why `dev` could not start.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// Bad flag or environment value.
    #[error("{0}")]
    Usage(String),
    /// The emulator could not listen.
    #[error("emulator: cannot listen on {addr}: {source}")]
    Emulator {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The broker failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// Configuration.
    #[error("{0}")]
    Config(String),
}

/// `dev`'s short intervals, over the built-in defaults and under any
/// `TOKEN_BROKER_*` setting: a PENDING lease is reconciled within 30 s
/// (20 s old, found by a pass every 5 s), orphans are swept every 60 s, and
/// failed revocations are retried from 1 s. `reconcile_after` must exceed
/// the upstream request timeout, so that is 10 s here.
pub const DEV_DEFAULTS: &str = r#"
[leases]
reaper_interval = "5s"
reconcile_after = "20s"
sweep_interval = "60s"

[leases.revocation_retry]
min_delay = "1s"
max_delay = "30s"
max_attempts = 10
failed_interval = "5m"

[upstream.azure_devops]
request_timeout = "10s"
"#;

/// The dev API key: `TOKEN_BROKER_DEV_API_KEY` when set, else a fresh one.
pub fn dev_key() -> Result<GeneratedApiKey, DevError> {
    match std::env::var(DEV_API_KEY_VAR) {
        Ok(k) if !k.is_empty() => GeneratedApiKey::from_key(DEV_KEY_NAME, SecretString::from(k))
            .map_err(|m| DevError::Usage(format!("{DEV_API_KEY_VAR}: {m}"))),
        _ => GeneratedApiKey::generate(DEV_KEY_NAME).map_err(DevError::Usage),
    }
}

/// The broker settings `dev` runs with: defaults (and any
/// `TOKEN_BROKER_*` server settings in the environment), then the dev
/// choices: `listen`, the store, upstream = `upstream_url` through the
/// Entra refresh-token grant with the emulator's default refresh token,
/// and the one dev API key.
pub fn dev_settings(
    args: &DevArgs,
    upstream_url: &url::Url,
    key: &GeneratedApiKey,
) -> Result<Settings, DevError> {
    let mut config =
        Config::read(Some(DEV_DEFAULTS), None).map_err(|e| DevError::Config(e.to_string()))?;
    config.grpc.listen = args.listen;
    config.database.url = args
        .database_url
        .clone()
        .unwrap_or_else(|| SecretString::from(DEV_DATABASE_URL));
    config.database.url_file = None;
    let backend = config
        .database
        .backend()
        .map_err(|m| DevError::Usage(format!("--database-url: {m}")))?;
    if backend == Backend::Postgres && config.keys.is_unset() {
        config::ensure_keys_file(Path::new(DEV_KEYS_FILE))
            .map_err(|e| DevError::Config(e.to_string()))?;
        config.keys.file = Some(DEV_KEYS_FILE.into());
    }
    config.upstream.azure_devops.base_url = upstream_url.clone();
    config.upstream.entra.authority = upstream_url.clone();
    config.upstream.entra.tenant = emulator::DEFAULT_TENANT.to_owned();
    config.upstream.entra.client_id = "token-broker-dev".to_owned();
    config.upstream.refresh_token = Some(SecretString::from(emulator::DEFAULT_REFRESH_TOKEN));
    config.upstream.refresh_token_file = None;
    config.auth.api_keys = vec![ApiKeySetting {
        name: key.name.clone(),
        sha256: key.hash.to_hex(),
    }];
    Settings::new(config).map_err(|e| DevError::Config(e.to_string()))
}

/// Runs `dev` until Ctrl-C or SIGTERM.
pub async fn run(args: DevArgs) -> Result<(), DevError> {
    let key = dev_key()?;
    // Local emulator first, so the broker's first token grant finds it.
    let (upstream_url, emulator) = match &args.upstream {
        Some(url) => (url.clone(), None),
        None => {
            let listener = TcpListener::bind(args.emulator_listen)
                .await
                .map_err(|source| DevError::Emulator {
                    addr: args.emulator_listen,
                    source,
                })?;
            let addr = listener.local_addr().map_err(|source| DevError::Emulator {
                addr: args.emulator_listen,
                source,
            })?;
            // Beside the dev database, so a restarted dev still owns (and
            // can revoke) the PATs it minted, and its rotated refresh token
            // stays valid.
            let state_file =
                dev_emulator_state_file(args.database_url.as_ref().map(|u| u.expose_secret()));
            let emu = emulator::Emulator::open(EmulatorConfig {
                state_file: Some(state_file.clone()),
                git_root: args.git_root.clone(),
                ..EmulatorConfig::default()
            })
            .map_err(|e| DevError::Config(e.to_string()))?;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(emu.serve(listener, async {
                let _ = stopped.await;
            }));
            let url = url::Url::parse(&format!("http://{addr}")).expect("socket address URL");
            (url, Some((stop, task)))
        }
    };
    let settings = dev_settings(&args, &upstream_url, &key)?;
    let log = &settings.config.log;
    let traces = crate::telemetry::init_with_traces(&log.filter, log.json)
        .map_err(|e| DevError::Config(e.to_string()))?;
    // `policy.file` (`TOKEN_BROKER_POLICY__FILE`), when set, replaces the
    // sample policy (and is reloaded as under `serve`), so rules and managed
    // credentials can be tried locally.
    let policy = match &settings.config.policy.file {
        Some(_) => server::load_policy(&settings.config)?,
        None => Policy::from_yaml(DEV_POLICY)
            .expect("the built-in dev policy is valid")
            .into(),
    };
    // What to try first: a lease while the policy has rules, else a managed
    // credential's value (a policy with `rules: []` refuses every lease).
    let current = policy.current();
    let first_step = match (current.rules().is_empty(), current.credentials().first()) {
        (false, _) => {
            "token-broker lease create --organization fabrikam --scope vso.code --ttl 15m"
                .to_owned()
        }
        (true, Some(credential)) => format!("token-broker credential get {}", credential.name()),
        (true, None) => "# the policy has `rules: []`: every lease is refused".to_owned(),
    };
    drop(current);
    let listener = server::bind(&settings.config).await?;
    let broker = Broker::start(settings, policy, listener).await?;

    let addr = format!("http://{}", broker.addr());
    let emulator_url = upstream_url.as_str().trim_end_matches('/').to_owned();
    println!(
        "token-broker dev is running (Ctrl-C to stop)\n\n  \
         gRPC:      {addr}\n  \
         emulator:  {emulator_url}{}\n  \
         database:  {}\n  \
         API key:   {}  (identity apikey:dev)\n\n\
         In another shell:\n\n  \
         export TOKEN_BROKER_ADDR={addr}\n  \
         export TOKEN_BROKER_API_KEY={}\n  \
         {first_step}\n",
        if emulator.is_some() {
            ""
        } else {
            "  (external)"
        },
        redact_url(
            args.database_url
                .as_ref()
                .map_or(DEV_DATABASE_URL, |u| u.expose_secret()),
        ),
        key.key.expose_secret(),
        key.key.expose_secret(),
    );
    let result = broker.run_until(super::shutdown_signal()).await;
    if let Some((stop, task)) = emulator {
        let _ = stop.send(());
        let _ = task.await;
    }
    traces.shutdown().await;
    result.map_err(DevError::from)
}

/// The URL without its password, for printing.
fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("****"));
            u.to_string()
        }
        _ => raw.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dev_emulator_keeps_its_state_beside_the_sqlite_file() {
        let at = |url| dev_emulator_state_file(url);
        assert_eq!(at(None), Path::new(DEV_EMULATOR_STATE_FILE));
        assert_eq!(
            at(Some("sqlite:///tmp/x/dev.db")),
            Path::new("/tmp/x").join(DEV_EMULATOR_STATE_FILE)
        );
        assert_eq!(
            at(Some("sqlite://data/dev.db?mode=rwc")),
            Path::new("data").join(DEV_EMULATOR_STATE_FILE)
        );
        assert_eq!(
            at(Some("postgres://postgres@127.0.0.1/postgres")),
            Path::new(DEV_EMULATOR_STATE_FILE)
        );
    }
}
