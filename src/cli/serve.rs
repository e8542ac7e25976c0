//! `token-broker serve` and `migrate`: the configuration argument, and the
//! calls into [`crate::server`].

use std::path::PathBuf;

use crate::server::{self, Broker};
use crate::settings::Settings;

/// The server configuration file.
#[derive(clap::Args, Debug)]
pub struct ConfigArg {
    /// TOML configuration file (settings: README.md).
    #[arg(long, env = "TOKEN_BROKER_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Loads the settings `arg` names and starts logging as they say.
pub fn load_settings(arg: &ConfigArg) -> Result<Settings, String> {
    let settings = Settings::load(arg.config.as_deref()).map_err(|e| e.to_string())?;
    let log = &settings.config.log;
    crate::telemetry::init(&log.filter, log.json).map_err(|e| e.to_string())?;
    Ok(settings)
}

/// `token-broker serve`: runs the broker until Ctrl-C or SIGTERM. Exports
/// traces when the `OTEL_*` variables ask for it
/// ([`crate::telemetry::init_with_traces`]), and sends the last spans
/// before it returns.
pub async fn serve(arg: &ConfigArg) -> Result<(), String> {
    let settings = Settings::load(arg.config.as_deref()).map_err(|e| e.to_string())?;
    let log = &settings.config.log;
    let traces =
        crate::telemetry::init_with_traces(&log.filter, log.json).map_err(|e| e.to_string())?;
    let result = run(settings).await;
    traces.shutdown().await;
    result
}

async fn run(settings: Settings) -> Result<(), String> {
    let policy = server::load_policy(&settings.config).map_err(|e| e.to_string())?;
    let listener = server::bind(&settings.config)
        .await
        .map_err(|e| e.to_string())?;
    let broker = Broker::start(settings, policy, listener)
        .await
        .map_err(|e| e.to_string())?;
    broker
        .run_until(super::shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}

/// `token-broker migrate`: applies pending migrations and exits.
pub async fn migrate(arg: &ConfigArg) -> Result<(), String> {
    let settings = load_settings(arg)?;
    server::migrate(&settings.config)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!("migrations applied");
    Ok(())
}
