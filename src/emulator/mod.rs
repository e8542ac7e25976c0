//! A faithful local emulator of the Azure DevOps PAT Lifecycle API, the
//! Entra token endpoint and a small data plane, with fault injection
//! (docs/upstream-api.md, "What the emulator models"). One axum app serves all three on
//! one address; the broker reaches it only over HTTP.
//!
//! Facts come from docs/upstream-api.md; where a fact is inferred ([I]) or
//! unknown ([U]) the chosen behaviour carries a comment naming, in quotes,
//! the heading of that page it rests on.
//! Test-only endpoints live under `/_emulator/` (see the README, "The Azure DevOps emulator"). No
//! token, PAT or refresh token is ever logged: the state keeps only their
//! SHA-256 digests.

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::SecretString;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

mod control;
mod dataplane;
mod entra;
mod faults;
mod git;
mod pats;
mod server;
mod state;
mod wire;

pub use faults::{FaultRule, LatencyWhen, Operation};

/// The refresh token the emulator accepts when started without
/// `--refresh-token`; `token-broker dev` seeds the broker with it too.
/// Not a secret: it only opens a local emulator.
pub const DEFAULT_REFRESH_TOKEN: &str = "emulator-default-refresh-token";

/// A tenant name for the Entra endpoint; the emulator accepts any.
pub const DEFAULT_TENANT: &str = "organizations";

/// Default listen address of `token-broker emulator`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8081";

/// What the max-lifespan policy does with a `validTo` past the maximum
/// (docs/upstream-api.md, "validTo clamping").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LifespanMode {
    /// Cut `validTo` to the maximum (the service since RN-236).
    #[default]
    Clamp,
    /// Refuse with `patLifespanPolicyViolation` (the service before RN-236).
    Reject,
}

/// Emulator settings. `Default` is a tenant without policies, 84-character
/// tokens, global PAT creation blocked (RN-270) and [`DEFAULT_REFRESH_TOKEN`].
#[derive(Clone, Debug)]
pub struct EmulatorConfig {
    /// The refresh token accepted at start (more are issued on each grant).
    pub refresh_token: SecretString,
    /// "Enforce maximum PAT lifespan" in days (tenant policy); None = off.
    pub max_lifespan_days: Option<u32>,
    /// Clamp or reject a `validTo` past the maximum.
    pub lifespan_mode: LifespanMode,
    /// "Restrict full-scoped PAT creation": `app_token` → `fullScopePatPolicyViolation`.
    pub restrict_full_scope: bool,
    /// "Restrict global PAT creation": `allOrgs` → `globalPatPolicyViolation`.
    pub restrict_global: bool,
    /// "Restrict PAT creation" (organization policy; the emulated user is
    /// not allow-listed): create → `disablePatCreationPolicyViolation`.
    pub restrict_creation: bool,
    /// With `restrict_creation`: "Allow creation of PAT with packaging scope only".
    pub allow_packaging_only: bool,
    /// RN-270 (since 2026-03-15): `allOrgs: true` → `globalPATCreationBlocked`.
    /// Turn off to replay the 2020 examples, which predate it.
    pub block_global_creation: bool,
    /// Issue legacy 52-character tokens instead of 84-character ones.
    pub legacy_tokens: bool,
    /// Lifetime of issued access tokens (`expires_in`; Entra: ~1 h).
    pub access_token_lifetime: Duration,
    /// Lifetime of issued refresh tokens (Entra default: 90 days).
    pub refresh_token_lifetime: Duration,
    /// Where PATs, Entra tokens (as SHA-256 digests) and the clock offset
    /// are kept across restarts: loaded at start if present, rewritten
    /// (temporary file + rename) after each call that changes them and at
    /// shutdown. None: memory only.
    pub state_file: Option<std::path::PathBuf>,
    /// `interval` of a device code (seconds a client waits between polls
    /// of the device-code grant; RFC 8628 default 5 s).
    pub device_code_interval: Duration,
    /// Where the bare repositories served over git's smart HTTP live:
    /// `{git_root}/{organization}/{project}/{repo}.git` at
    /// `/{organization}/{project}/_git/{repo}`. None: no git.
    pub git_root: Option<std::path::PathBuf>,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            refresh_token: SecretString::from(DEFAULT_REFRESH_TOKEN),
            max_lifespan_days: None,
            lifespan_mode: LifespanMode::Clamp,
            restrict_full_scope: false,
            restrict_global: false,
            restrict_creation: false,
            allow_packaging_only: false,
            block_global_creation: true,
            legacy_tokens: false,
            access_token_lifetime: Duration::from_secs(3599),
            refresh_token_lifetime: Duration::from_secs(90 * 24 * 3600),
            state_file: None,
            device_code_interval: Duration::from_secs(5),
            git_root: None,
        }
    }
}

/// `token-broker emulator` options.
#[derive(Clone, Debug, clap::Args)]
pub struct EmulatorArgs {
    /// Address to listen on.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Refresh token the Entra endpoint accepts at start.
    #[arg(
        long,
        env = "TOKEN_BROKER_EMULATOR_REFRESH_TOKEN",
        default_value = DEFAULT_REFRESH_TOKEN,
        hide_env_values = true,
        hide_default_value = true
    )]
    pub refresh_token: SecretString,
    /// Maximum PAT lifespan in days (tenant policy); off when absent.
    #[arg(long)]
    pub max_lifespan_days: Option<u32>,
    /// What to do with a validTo past the maximum lifespan.
    #[arg(long, value_enum, default_value_t = LifespanMode::Clamp)]
    pub lifespan_mode: LifespanMode,
    /// Refuse full-scoped (`app_token`) PATs.
    #[arg(long)]
    pub restrict_full_scope: bool,
    /// Refuse global (`allOrgs`) PATs with globalPatPolicyViolation.
    #[arg(long)]
    pub restrict_global: bool,
    /// Refuse PAT creation (organization policy "Restrict PAT creation").
    #[arg(long)]
    pub restrict_creation: bool,
    /// With --restrict-creation, still allow packaging-only PATs.
    #[arg(long, requires = "restrict_creation")]
    pub allow_packaging_only: bool,
    /// Issue legacy 52-character tokens.
    #[arg(long)]
    pub legacy_tokens: bool,
    /// Keep PATs and Entra tokens (as digests) in this JSON file across
    /// restarts; memory only when absent.
    #[arg(long, value_name = "PATH")]
    pub state_file: Option<std::path::PathBuf>,
    /// `interval` the device-code endpoint tells clients to wait between
    /// polls, in seconds.
    #[arg(
        long,
        env = "TOKEN_BROKER_EMULATOR_DEVICE_CODE_INTERVAL",
        value_name = "SECONDS",
        default_value_t = 5,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub device_code_interval: u64,
    /// Serve the bare repositories `DIR/{organization}/{project}/{repo}.git`
    /// over git's smart HTTP at `/{organization}/{project}/_git/{repo}`
    /// (runs `git http-backend`).
    #[arg(long, value_name = "DIR")]
    pub git_root: Option<std::path::PathBuf>,
}

impl From<EmulatorArgs> for EmulatorConfig {
    fn from(a: EmulatorArgs) -> Self {
        EmulatorConfig {
            refresh_token: a.refresh_token,
            max_lifespan_days: a.max_lifespan_days,
            lifespan_mode: a.lifespan_mode,
            restrict_full_scope: a.restrict_full_scope,
            restrict_global: a.restrict_global,
            restrict_creation: a.restrict_creation,
            allow_packaging_only: a.allow_packaging_only,
            legacy_tokens: a.legacy_tokens,
            state_file: a.state_file,
            device_code_interval: Duration::from_secs(a.device_code_interval),
            git_root: a.git_root,
            ..EmulatorConfig::default()
        }
    }
}

/// An emulator whose state (and state file, if configured) is loaded,
/// ready to serve. Opening first lets a caller report a bad state file
/// before it serves anything.
pub struct Emulator(state::Emulator);

impl Emulator {
    /// Loads `config.state_file` when set and present.
    ///
    /// Errors: the state file cannot be read or parsed; the git root is
    /// not a directory.
    pub fn open(mut config: EmulatorConfig) -> std::io::Result<Self> {
        if let Some(root) = &config.git_root {
            // `git http-backend` wants an absolute GIT_PROJECT_ROOT.
            let absolute = std::fs::canonicalize(root)
                .ok()
                .filter(|p| p.is_dir())
                .ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("--git-root {}: not a directory", root.display()),
                    )
                })?;
            config.git_root = Some(absolute);
        }
        Ok(Emulator(state::Emulator::open(config)?))
    }

    /// Serves on `listener` until `shutdown` completes, then writes the
    /// state file one last time.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        let emu = self.0;
        let result = server::serve_listener(listener, server::router(emu.clone()), shutdown).await;
        emu.persist();
        result
    }
}

/// Serves the emulator on `listener` until `shutdown` completes.
///
/// Errors: a bad state file (see [`Emulator::open`]), or the listener.
pub async fn serve(
    listener: TcpListener,
    config: EmulatorConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    Emulator::open(config)?.serve(listener, shutdown).await
}

/// Runs `token-broker emulator` until Ctrl-C, logging its URL.
pub async fn run(args: EmulatorArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!(url = %format!("http://{addr}"), "azure devops emulator listening");
    serve(listener, args.into(), async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}

/// An emulator serving on 127.0.0.1 with a random port; stops when dropped.
pub struct RunningEmulator {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

impl RunningEmulator {
    /// Base URL of every endpoint: `http://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl std::fmt::Debug for RunningEmulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningEmulator")
            .field("addr", &self.addr)
            .finish()
    }
}

/// Starts an emulator on 127.0.0.1:0 in the current tokio runtime.
pub async fn spawn(config: EmulatorConfig) -> std::io::Result<RunningEmulator> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = serve(listener, config, async {
            let _ = stopped.await;
        })
        .await;
    });
    Ok(RunningEmulator { addr, _stop: stop })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: EmulatorArgs,
    }

    #[test]
    fn emulator_args_default_to_the_documented_values() {
        let cli = Cli::try_parse_from(["emulator"]).unwrap();
        assert_eq!(cli.args.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(cli.args.lifespan_mode, LifespanMode::Clamp);
        let config = EmulatorConfig::from(cli.args);
        use secrecy::ExposeSecret;
        assert_eq!(config.refresh_token.expose_secret(), DEFAULT_REFRESH_TOKEN);
        assert!(config.block_global_creation);
        assert_eq!(config.state_file, None);
        assert_eq!(config.device_code_interval, Duration::from_secs(5));
        let cli = Cli::try_parse_from([
            "emulator",
            "--state-file",
            "emu.json",
            "--device-code-interval",
            "1",
        ])
        .unwrap();
        let config = EmulatorConfig::from(cli.args);
        assert_eq!(config.state_file, Some("emu.json".into()));
        assert_eq!(config.device_code_interval, Duration::from_secs(1));
        assert!(Cli::try_parse_from(["emulator", "--device-code-interval", "0"]).is_err());
    }

    #[test]
    fn emulator_args_take_the_policy_knobs_and_never_print_the_refresh_token() {
        let cli = Cli::try_parse_from([
            "emulator",
            "--listen",
            "127.0.0.1:9000",
            "--refresh-token",
            "seed-value-123",
            "--max-lifespan-days",
            "7",
            "--lifespan-mode",
            "reject",
            "--restrict-full-scope",
            "--restrict-global",
        ])
        .unwrap();
        assert!(!format!("{:?}", cli.args).contains("seed-value-123"));
        let config = EmulatorConfig::from(cli.args);
        assert!(!format!("{config:?}").contains("seed-value-123"));
        assert_eq!(config.max_lifespan_days, Some(7));
        assert_eq!(config.lifespan_mode, LifespanMode::Reject);
        assert!(config.restrict_full_scope && config.restrict_global);
        assert!(Cli::try_parse_from(["emulator", "--allow-packaging-only"]).is_err());
    }
}
