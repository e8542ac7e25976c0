//! `token-broker keys status | rewrap`: the keyrings against the database,
//! with the server configuration (straight to the database, like
//! `upstream`). Both check the keys first, as `serve` does
//! ([`crate::keycheck::check_keys`]).

use clap::Subcommand;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use secrecy::ExposeSecret as _;
use serde_json::{json, Map, Value};

use super::grpc::Output;
use super::serve::ConfigArg;
use crate::config::{Config, ResolvedKeys};
use crate::keycheck::{self, Purpose, PurposeStatus, DEFAULT_REWRAP_BATCH};
use crate::store::Store;

/// `token-broker keys …`.
#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Per purpose (sealing, audit chain, fingerprint): the active key id
    /// and how many stored secrets or audit rows each key id protects.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Re-seal every stored secret not under the active sealing key with
    /// it, in batches (compare-and-set per row: safe beside live brokers;
    /// rerun after an interruption to carry on).
    Rewrap {
        #[command(flatten)]
        config: ConfigArg,
        /// Secrets re-sealed per transaction.
        #[arg(long, default_value_t = DEFAULT_REWRAP_BATCH, value_parser = clap::value_parser!(u32).range(1..))]
        batch_size: u32,
    },
}

/// Runs one `keys` command; its answer goes to stdout.
pub async fn run(command: KeysCommand) -> Result<String, String> {
    match command {
        KeysCommand::Status { config, output } => {
            let (store, keys) = open(&load(&config)?).await?;
            let status = keycheck::status(store.as_ref(), &keys)
                .await
                .map_err(|e| format!("database: {e}"))?;
            Ok(output.show(&status, |s| status_json(s), |s| status_text(s)))
        }
        KeysCommand::Rewrap { config, batch_size } => rewrap(&load(&config)?, batch_size).await,
    }
}

fn load(arg: &ConfigArg) -> Result<Config, String> {
    super::serve::load_settings(arg).map(|s| s.config)
}

/// The store (migrated) and the keys, checked against it.
async fn open(config: &Config) -> Result<(std::sync::Arc<dyn Store>, ResolvedKeys), String> {
    let backend = config
        .database
        .backend()
        .map_err(|m| format!("database.url: {m}"))?;
    let (keys, _) = config.keys.resolve(&backend).map_err(|e| e.to_string())?;
    let store = crate::store::open(config.database.url.expose_secret())
        .await
        .map_err(|e| format!("database: {e}"))?;
    crate::server::apply_migrations(&config.database, store.as_ref())
        .await
        .map_err(|e| format!("database: {e}"))?;
    keycheck::check_keys(store.as_ref(), &keys)
        .await
        .map_err(|e| e.to_string())?;
    Ok((store, keys))
}

fn json_name(purpose: Purpose) -> &'static str {
    match purpose {
        Purpose::Sealing => "sealing",
        Purpose::AuditChain => "auditChain",
        Purpose::Fingerprint => "fingerprint",
    }
}

/// `{"sealing": {"active": "k2", "keys": {"k1": 0, "k2": 12}},
/// "auditChain": {…}, "fingerprint": {…}}`.
fn status_json(status: &[PurposeStatus]) -> Value {
    let mut out = Map::new();
    for s in status {
        let keys: Map<String, Value> = s
            .keys
            .iter()
            .map(|(id, (count, _))| (id.clone(), json!(count)))
            .collect();
        out.insert(
            json_name(s.purpose).into(),
            json!({"active": s.active, "keys": keys}),
        );
    }
    Value::Object(out)
}

fn status_text(status: &[PurposeStatus]) -> String {
    let mut lines = Vec::new();
    for s in status {
        let what = match s.purpose {
            Purpose::Sealing => "stored secrets",
            Purpose::AuditChain => "audit rows",
            Purpose::Fingerprint => "audit rows with a token fingerprint",
        };
        lines.push(format!("{} (active {}):", s.purpose.describe(), s.active));
        for (id, (count, configured)) in &s.keys {
            let mut line = format!("  {id:<12} {count:>10} {what}");
            if *id == s.active {
                line.push_str("  (active)");
            }
            if !configured {
                line.push_str("  (not configured: in the database only)");
            }
            lines.push(line);
        }
    }
    lines.join("\n")
}

async fn rewrap(config: &Config, batch_size: u32) -> Result<String, String> {
    let (store, keys) = open(config).await?;
    let (keyring, _) = keys.build().map_err(|e| e.to_string())?;
    let todo = keycheck::count_not_under(store.as_ref(), keyring.active_key_id())
        .await
        .map_err(|e| format!("database: {e}"))?;
    // Hidden when stderr is not a terminal.
    let bar = ProgressBar::with_draw_target(Some(todo), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("rewrap [{elapsed_precise}] {wide_bar} {pos}/{len} secrets")
    {
        bar.set_style(style);
    }
    let report = keycheck::rewrap(store.as_ref(), &keyring, batch_size, &mut |n| bar.inc(n)).await;
    bar.finish_and_clear();
    let report = report.map_err(|e| e.to_string())?;
    let line = format!(
        "rewrapped {} secrets; {} remain under other keys",
        report.rewrapped, report.remaining
    );
    if report.remaining > 0 {
        return Err(format!(
            "{line}: a replica still seals under another active key? Give every replica keys.active = {} and run keys rewrap again",
            keyring.active_key_id()
        ));
    }
    Ok(line)
}
