//! `token-broker upstream login | status | set-refresh-token`: the broker's
//! own upstream credential, handled with the server configuration (they
//! reach the database directly, from a workstation or inside the
//! container). docs/upstream-sign-in.md walks through them.

use std::io::{IsTerminal as _, Read as _};
use std::sync::Arc;

use clap::Subcommand;
use secrecy::{ExposeSecret as _, SecretString};

use super::serve::ConfigArg;
use crate::audit::{self, AuditEvent, AuditLog, Outcome};
use crate::config::{Backend, Config};
use crate::crypto::Keyring;
use crate::store::{CredentialSource, Store};
use crate::upstream::credential::{self, CredentialStatus};
use crate::upstream::device_code::{self, DeviceCodeError};
use crate::upstream::entra::EntraClient;

/// `token-broker upstream …`.
#[derive(Subcommand, Debug)]
pub enum UpstreamCommand {
    /// Sign the broker in to Azure DevOps (Entra device-code flow) and store
    /// the refresh token as its upstream credential.
    Login(ConfigArg),
    /// Show the stored upstream credential: account, version, source,
    /// refresh times, state and last error (never a token).
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Output format.
        #[arg(long, value_enum, default_value_t = StatusOutput::Text)]
        output: StatusOutput,
    },
    /// Store a refresh token read from stdin (never from an argument) as
    /// the upstream credential, after redeeming it once at Entra.
    SetRefreshToken {
        #[command(flatten)]
        config: ConfigArg,
        /// Store the token without redeeming it first (when this machine
        /// cannot reach Entra, or Conditional Access refuses it from here).
        #[arg(long)]
        no_verify: bool,
    },
}

/// Output format of `upstream status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StatusOutput {
    /// Aligned `field  value` lines, then any warning.
    Text,
    /// One JSON object: `account`, `version`, `source`, `storeTime`,
    /// `lastRefreshTime`, `state`, `lastError`, `warning` (null when unknown).
    Json,
}

/// Runs one `upstream` command; its answer goes to stdout.
pub async fn run(command: UpstreamCommand) -> Result<String, String> {
    match command {
        UpstreamCommand::Login(arg) => login(&load(&arg)?).await,
        UpstreamCommand::Status { config, output } => status(&load(&config)?, output).await,
        UpstreamCommand::SetRefreshToken { config, no_verify } => {
            set_refresh_token(&load(&config)?, no_verify).await
        }
    }
}

/// The server configuration; logs only warnings and errors (an operator
/// at a prompt wants the command's words, not the server's; `RUST_LOG`
/// still wins).
fn load(arg: &ConfigArg) -> Result<Config, String> {
    let settings =
        crate::settings::Settings::load(arg.config.as_deref()).map_err(|e| e.to_string())?;
    crate::telemetry::init("warn", settings.config.log.json).map_err(|e| e.to_string())?;
    Ok(settings.config)
}

/// The store (migrated), the keyring and the audit log, as the server
/// opens them.
async fn open(config: &Config) -> Result<(Arc<dyn Store>, Keyring, AuditLog), String> {
    let backend = config
        .database
        .backend()
        .map_err(|m| format!("database.url: {m}"))?;
    let (keys, generated) = config.keys.resolve(&backend).map_err(|e| e.to_string())?;
    if let Some(path) = generated {
        eprintln!(
            "no keys configured: generated a keys file (mode 0600) at {}; back it up with the database",
            path.display()
        );
    }
    let (keyring, _) = keys.build().map_err(|e| e.to_string())?;
    let chain_keys = keys.chain_keys().map_err(|e| e.to_string())?;
    let store = crate::store::open(config.database.url.expose_secret())
        .await
        .map_err(|e| format!("database: {e}"))?;
    crate::server::apply_migrations(&config.database, store.as_ref())
        .await
        .map_err(|e| format!("database: {e}"))?;
    crate::keycheck::check_keys(store.as_ref(), &keys)
        .await
        .map_err(|e| e.to_string())?;
    let audit = AuditLog::with_keys(store.clone(), chain_keys, keys.fingerprint_active.clone());
    Ok((store, keyring, audit))
}

/// Who ran the command, for the audit row: `operator:$USER`, and the host
/// as its peer (a pod's name inside the container).
fn operator() -> (String, Option<String>) {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = std::env::var("HOSTNAME").ok().or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
    });
    (format!("operator:{user}"), host.filter(|h| !h.is_empty()))
}

async fn audit_event(
    audit: &AuditLog,
    action: &str,
    outcome: Outcome,
    reason: Option<&str>,
    detail: String,
) {
    let (identity, peer) = operator();
    let event = AuditEvent {
        peer,
        reason: reason.map(str::to_owned),
        caller_detail: Some(detail),
        ..AuditEvent::new(chrono::Utc::now(), identity, action, outcome)
    };
    if let Err(e) = audit.append(&event).await {
        eprintln!("warning: could not write the audit row: {e}");
    }
}

fn require_client_id(config: &Config) -> Result<(), String> {
    if config.upstream.entra.client_id.trim().is_empty() {
        return Err(
            "upstream.entra.client_id is not set: set it to the app registration's client id (docs/upstream-sign-in.md)"
                .into(),
        );
    }
    Ok(())
}

async fn login(config: &Config) -> Result<String, String> {
    require_client_id(config)?;
    let (store, keyring, audit) = open(config).await?;
    let signed_in = tokio::select! {
        result = device_code::sign_in(&config.upstream.entra, |prompt| {
            eprintln!("{}", prompt.message);
        }) => result,
        _ = tokio::signal::ctrl_c() => {
            return Err("interrupted: nothing was stored".into());
        }
    };
    let signed_in = match signed_in {
        Ok(s) => s,
        Err(e) => {
            let (outcome, reason) = match &e {
                DeviceCodeError::Declined => (Outcome::Denied, "LOGIN_DECLINED"),
                DeviceCodeError::Expired => (Outcome::Denied, "LOGIN_EXPIRED"),
                DeviceCodeError::Refused(_) => (Outcome::Denied, "LOGIN_REFUSED"),
                DeviceCodeError::NoRefreshToken => (Outcome::Error, "NO_REFRESH_TOKEN"),
                DeviceCodeError::Unavailable(_) | DeviceCodeError::Protocol(_) => {
                    (Outcome::Error, "ENTRA_UNAVAILABLE")
                }
            };
            audit_event(
                &audit,
                audit::UPSTREAM_LOGIN,
                outcome,
                Some(reason),
                String::new(),
            )
            .await;
            return Err(format!("sign-in failed: {e}; nothing was stored"));
        }
    };
    let account = signed_in.account.clone();
    let version = credential::store_refresh_token(
        store.as_ref(),
        &keyring,
        &signed_in.refresh_token,
        account.clone(),
        CredentialSource::Login,
        true,
    )
    .await
    .map_err(|e| format!("signed in, but the credential could not be stored: {e}"))?;
    let shown = account
        .as_deref()
        .unwrap_or("an account Entra did not name");
    audit_event(
        &audit,
        audit::UPSTREAM_LOGIN,
        Outcome::Allowed,
        None,
        format!(
            "account={} version={version}",
            account.as_deref().unwrap_or("-")
        ),
    )
    .await;
    Ok(format!(
        "signed in as {shown}; stored as upstream credential version {version} (running brokers use it at their next refresh)"
    ))
}

async fn status(config: &Config, output: StatusOutput) -> Result<String, String> {
    // Never create a database just to report on it.
    if let Ok(Backend::Sqlite(Some(db))) = config.database.backend() {
        if !db.exists() {
            return Err(format!("database.url: {} does not exist", db.display()));
        }
    }
    let store = crate::store::open(config.database.url.expose_secret())
        .await
        .map_err(|e| format!("database: {e}"))?;
    let status = CredentialStatus::read(store.as_ref())
        .await
        .map_err(|e| format!("database: {e} (has `token-broker migrate` run?)"))?;
    Ok(match output {
        StatusOutput::Json => format!("{:#}", status.json()),
        StatusOutput::Text => status.text(),
    })
}

/// Reads the token from stdin, trimmed: the whole input from a pipe, or
/// one line typed at a terminal with echo off (never in scrollback).
fn read_token() -> Result<SecretString, String> {
    let stdin = std::io::stdin();
    let text = if stdin.is_terminal() {
        rpassword::prompt_password("Refresh token (not echoed): ")
            .map_err(|e| format!("cannot read the refresh token from the terminal: {e}"))?
    } else {
        let mut text = String::new();
        stdin
            .lock()
            .read_to_string(&mut text)
            .map_err(|e| format!("cannot read the refresh token from stdin: {e}"))?;
        text
    };
    let text = secrecy::zeroize::Zeroizing::new(text);
    let token = text.trim();
    if token.is_empty() {
        return Err(
            "no refresh token on stdin (it is read from stdin, never from an argument)".into(),
        );
    }
    Ok(SecretString::from(token.to_owned()))
}

async fn set_refresh_token(config: &Config, no_verify: bool) -> Result<String, String> {
    let token = read_token()?;
    let (store, keyring, audit) = open(config).await?;
    // Redeemed once first: a token Entra refuses is never stored, and the
    // rotated one it answers (and the account) are what is kept.
    let (token, account) = if no_verify {
        (token, None)
    } else {
        require_client_id(config)?;
        let entra = EntraClient::new(config.upstream.entra.clone()).map_err(|e| e.to_string())?;
        let grant = match entra.redeem_refresh_token(&token).await {
            Ok(grant) => grant,
            Err(e) => {
                audit_event(
                    &audit,
                    audit::UPSTREAM_SET_REFRESH_TOKEN,
                    Outcome::Denied,
                    Some("TOKEN_REFUSED"),
                    String::new(),
                )
                .await;
                return Err(format!(
                    "{e}; nothing was stored (--no-verify stores it unchecked)"
                ));
            }
        };
        (grant.refresh_token.unwrap_or(token), grant.account)
    };
    let version = credential::store_refresh_token(
        store.as_ref(),
        &keyring,
        &token,
        account.clone(),
        CredentialSource::Stdin,
        !no_verify,
    )
    .await
    .map_err(|e| format!("the credential could not be stored: {e}"))?;
    audit_event(
        &audit,
        audit::UPSTREAM_SET_REFRESH_TOKEN,
        Outcome::Allowed,
        None,
        format!(
            "account={} version={version}",
            account.as_deref().unwrap_or("-")
        ),
    )
    .await;
    let who = account.map(|a| format!(" for {a}")).unwrap_or_default();
    Ok(format!(
        "stored the refresh token{who} as upstream credential version {version} (running brokers use it at their next refresh)"
    ))
}
