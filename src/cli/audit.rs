//! `token-broker audit ...`: `audit list` reads the audit trail over gRPC
//! (`AdminService.ListAuditEvents`, admin identities only); `audit verify`
//! opens the store named by the server configuration and proves the audit
//! chain intact or names the first broken row (docs/audit-chain.md);
//! `audit head` prints the stored newest row's `ID:MAC`.

use std::path::{Path, PathBuf};

use chrono::SecondsFormat;
use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};

use super::admin::connect;
use super::grpc::{
    answer, page_json, page_text, request, rfc3339, ClientArgs, ClientError, Column, TokenFileArg,
};
use crate::audit::{self, VerifyError};
use crate::config::{Backend, Config};
use crate::proto::v1 as pb;

/// `token-broker audit ...`.
#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// List audit events, oldest first (gRPC client; needs an admin key).
    List {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        token_file: TokenFileArg,
        /// e.g. `identity = "apikey:ci" AND action = lease.create AND
        /// time >= "2026-01-01T00:00:00Z"`; fields: identity, action, lease,
        /// time (`>=`, `<`).
        #[arg(long, default_value = "")]
        filter: String,
        /// Events per page (default 50).
        #[arg(long, default_value_t = 0)]
        page_size: i32,
        /// `next_page_token` of a previous page.
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Prove the audit chain intact, or name the first broken row. Reads
    /// the database and keys from the server configuration. Exit 0 intact,
    /// 1 broken (or the rows could not be read: nothing proved).
    Verify(VerifyArgs),
    /// Print `ID:MAC` of the newest stored audit row, read from the
    /// database of the server configuration. Verifies nothing: record it
    /// outside the database and pass it to `audit verify --expected-head`
    /// later.
    Head {
        /// TOML configuration file of the server (settings: README.md).
        #[arg(long, env = "TOKEN_BROKER_CONFIG")]
        config: Option<PathBuf>,
    },
}

/// Arguments of `audit verify`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// TOML configuration file of the server (settings: README.md).
    #[arg(long, env = "TOKEN_BROKER_CONFIG")]
    pub config: Option<PathBuf>,
    /// A chain head recorded outside the database, `ID:MAC` (the `audit
    /// chain head` log line's `audit_id` and `mac`, or `audit head`):
    /// catches dropped or rewritten newest rows. Repeatable, and each value
    /// may be a comma-separated list: every head is checked.
    #[arg(long)]
    pub expected_head: Vec<String>,
    /// A file of chain heads, one `ID:MAC` per line (blank lines and lines
    /// starting with `#` are skipped), checked like `--expected-head`.
    #[arg(long, value_name = "FILE")]
    pub expected_heads_file: Option<PathBuf>,
    /// Verify from this recorded head (`ID:MAC`) instead of the first row:
    /// for a trail whose rows up to ID were archived and deleted. The next
    /// stored row must be ID + 1 and chain from MAC.
    #[arg(long, value_name = "ID:MAC")]
    pub from_head: Option<String>,
}

/// Runs `audit list` and returns what to print on stdout.
pub async fn list(
    client: &ClientArgs,
    filter: String,
    page_size: i32,
    page_token: String,
) -> Result<String, ClientError> {
    let output = client.output("audit list")?;
    let mut admin = connect(client).await?;
    let req = pb::ListAuditEventsRequest {
        page_size,
        page_token,
        filter,
    };
    let page = answer(admin.list_audit_events(request(req, client)?).await)?;
    Ok(output.show(&page, events_json, events_text))
}

/// Why `audit verify` did not prove the chain.
#[derive(Debug, thiserror::Error)]
pub enum AuditVerifyError {
    /// Bad configuration, keys or head argument (names the setting).
    #[error("{0}")]
    Setup(String),
    /// The chain is broken, or could not be read.
    #[error(transparent)]
    Verify(#[from] VerifyError),
}

/// Runs `audit verify` with a loaded `config`: the one-line report of an
/// intact chain, else why not. `expected_head`: one `ID:MAC`, or several
/// separated by commas (see [`verify_heads`]).
pub async fn verify(
    config: &Config,
    expected_head: Option<&str>,
) -> Result<String, AuditVerifyError> {
    let heads: Vec<String> = expected_head.into_iter().map(str::to_owned).collect();
    verify_heads(config, &heads, None, None).await
}

/// Runs `audit verify` with a loaded `config`, checking every head of
/// `expected_heads` (each `ID:MAC` or a comma-separated list of them) and
/// of `heads_file` (one `ID:MAC` per line; blank and `#` lines skipped),
/// starting after `from_head` (`ID:MAC`) when given ([`audit::verify_from`]).
/// Errors: [`AuditVerifyError::Setup`] for a head that does not parse (named
/// with its flag, or file and line) or an unreadable file; else as
/// [`verify`].
pub async fn verify_heads(
    config: &Config,
    expected_heads: &[String],
    heads_file: Option<&Path>,
    from_head: Option<&str>,
) -> Result<String, AuditVerifyError> {
    let setup = |e: &dyn std::fmt::Display| AuditVerifyError::Setup(e.to_string());
    let start = from_head
        .map(audit::parse_expected_head)
        .transpose()
        .map_err(|e| setup(&format!("--from-head: {e}")))?;
    let mut expected = Vec::new();
    for text in expected_heads.iter().flat_map(|v| v.split(',')) {
        expected.push(
            audit::parse_expected_head(text)
                .map_err(|e| setup(&format!("--expected-head: {e}")))?,
        );
    }
    if let Some(path) = heads_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            setup(&format!(
                "--expected-heads-file: cannot read {}: {e}",
                path.display()
            ))
        })?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            expected.push(audit::parse_expected_head(line).map_err(|e| {
                setup(&format!(
                    "--expected-heads-file {} line {}: {e}",
                    path.display(),
                    n + 1
                ))
            })?);
        }
    }
    let backend = config
        .database
        .backend()
        .map_err(|m| setup(&format!("database.url: {m}")))?;
    // Never create a database or keys just to check them.
    if let Backend::Sqlite(Some(db)) = &backend {
        if !db.exists() {
            return Err(setup(&format!(
                "database.url: {} does not exist",
                db.display()
            )));
        }
        if config.keys.is_unset() && !crate::config::generated_keys_path(db).exists() {
            return Err(setup(
                &"keys: no keys configured and no generated keys file beside the database",
            ));
        }
    }
    let (keys, _) = config.keys.resolve(&backend).map_err(|e| setup(&e))?;
    let chain_keys = keys.chain_keys().map_err(|e| setup(&e))?;
    let store = open_existing_store(config).await?;
    // Wrong keys would report tampering where there is none: refuse first.
    // A chain key that rows need and the keyring lacks is left to verify,
    // which names the first row that needs it.
    use crate::keycheck::{KeyCheckError, KeyProblem};
    match crate::keycheck::check_keys(store.as_ref(), &keys).await {
        Ok(()) => {}
        Err(KeyCheckError::Refused(problems)) => {
            let problems: Vec<KeyProblem> = problems
                .into_iter()
                .filter(|p| !matches!(p, KeyProblem::ChainKeyMissing { .. }))
                .collect();
            if !problems.is_empty() {
                return Err(setup(&KeyCheckError::Refused(problems)));
            }
        }
        Err(e) => return Err(setup(&e)),
    }
    let report = audit::verify_from(store.as_ref(), &chain_keys, start.clone(), &expected).await?;
    Ok(match start {
        Some((id, _)) => format!("{report} (from recorded head {id})"),
        None => report.to_string(),
    })
}

/// Runs `audit head` with a loaded `config`: `ID:MAC` of the newest stored
/// audit row. Verifies nothing. Errors: [`AuditVerifyError::Setup`] when
/// the database does not exist, has no audit row, or its newest row has no
/// MAC; [`VerifyError::Store`] when it cannot be read.
pub async fn head(config: &Config) -> Result<String, AuditVerifyError> {
    let store = open_existing_store(config).await?;
    match store.newest_audit_row().await.map_err(VerifyError::Store)? {
        Some((id, Some(mac))) => Ok(format!("{id}:{mac}")),
        Some((id, None)) => Err(AuditVerifyError::Setup(format!(
            "the newest audit row {id} has no MAC (not chained)"
        ))),
        None => Err(AuditVerifyError::Setup("no audit rows are stored".into())),
    }
}

/// Opens the store of `config` without creating a database (a missing
/// SQLite file is an error naming `database.url`).
async fn open_existing_store(
    config: &Config,
) -> Result<std::sync::Arc<dyn crate::store::Store>, AuditVerifyError> {
    let setup = |e: &dyn std::fmt::Display| AuditVerifyError::Setup(e.to_string());
    let backend = config
        .database
        .backend()
        .map_err(|m| setup(&format!("database.url: {m}")))?;
    // Never create a database just to read it.
    if let Backend::Sqlite(Some(db)) = &backend {
        if !db.exists() {
            return Err(setup(&format!(
                "database.url: {} does not exist",
                db.display()
            )));
        }
    }
    crate::store::open(secrecy::ExposeSecret::expose_secret(&config.database.url))
        .await
        .map_err(|e| AuditVerifyError::Verify(VerifyError::Store(e)))
}

/// The proto3 JSON mapping of one `AuditEvent` (default values omitted).
pub fn event_json(e: &pb::AuditEvent) -> Value {
    let mut m = Map::new();
    if e.id != 0 {
        m.insert("id".into(), json!(e.id.to_string()));
    }
    if let Some(t) = &e.time {
        m.insert("time".into(), json!(rfc3339(t, SecondsFormat::Micros)));
    }
    for (k, v) in [
        ("identity", &e.identity),
        ("peer", &e.peer),
        ("action", &e.action),
    ] {
        if !v.is_empty() {
            m.insert(k.into(), json!(v));
        }
    }
    if e.outcome != 0 {
        m.insert("outcome".into(), json!(e.outcome().as_str_name()));
    }
    for (k, v) in [
        ("reason", &e.reason),
        ("policyRule", &e.policy_rule),
        ("lease", &e.lease),
        ("organization", &e.organization),
        ("scopes", &e.scopes),
        ("tokenFingerprint", &e.token_fingerprint),
        ("callerDetail", &e.caller_detail),
    ] {
        if !v.is_empty() {
            m.insert(k.into(), json!(v));
        }
    }
    Value::Object(m)
}

/// The proto3 JSON mapping of a `ListAuditEventsResponse`.
pub fn events_json(page: &pb::ListAuditEventsResponse) -> Value {
    page_json(
        "auditEvents",
        page.audit_events.iter().map(event_json).collect(),
        &page.next_page_token,
    )
}

/// Audit events, one a row.
fn events_text(page: &pb::ListAuditEventsResponse) -> String {
    let columns: [Column<pb::AuditEvent>; 7] = [
        Column::right("ID", 6, |e| e.id.to_string()),
        Column::left("TIME", 27, |e| {
            e.time
                .as_ref()
                .map(|t| rfc3339(t, SecondsFormat::Micros))
                .unwrap_or_default()
        }),
        Column::left("IDENTITY", 30, |e| e.identity.clone()),
        Column::left("ACTION", 20, |e| e.action.clone()),
        Column::left("OUTCOME", 8, |e| outcome_text(e).to_owned()),
        Column::left("LEASE", 44, |e| or_dash(&e.lease)),
        Column::last("REASON", reason_text),
    ];
    page_text(&columns, &page.audit_events, &page.next_page_token)
}

/// The reason, then (for refused authentications, which are aggregated)
/// `peer=ADDRESS`, then `caller_detail` (a service account's claims, or a
/// refusal row's `count=N interval_start=… interval_end=…`).
fn reason_text(e: &pb::AuditEvent) -> String {
    let peer = (e.action == crate::audit::AUTHENTICATE && !e.peer.is_empty())
        .then(|| format!("peer={}", e.peer));
    [Some(e.reason.clone()), peer, Some(e.caller_detail.clone())]
        .into_iter()
        .flatten()
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn outcome_text(e: &pb::AuditEvent) -> &'static str {
    match e.outcome() {
        pb::audit_event::Outcome::Allowed => "allowed",
        pb::audit_event::Outcome::Denied => "denied",
        pb::audit_event::Outcome::Error => "error",
        pb::audit_event::Outcome::Unspecified => "-",
    }
}

fn or_dash(text: &str) -> String {
    if text.is_empty() { "-" } else { text }.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_events_print_as_proto3_json() {
        let v = event_json(&pb::AuditEvent {
            id: 7,
            action: "lease.create".into(),
            outcome: pb::audit_event::Outcome::Denied as i32,
            token_fingerprint: "ab".repeat(32),
            caller_detail: "pod=web-1 sa_uid=u1".into(),
            ..Default::default()
        });
        assert_eq!(v["callerDetail"], "pod=web-1 sa_uid=u1");
        assert_eq!(v["id"], "7");
        assert_eq!(v["outcome"], "DENIED");
        assert_eq!(v["tokenFingerprint"], "ab".repeat(32));
        assert!(v.get("lease").is_none());
    }

    #[test]
    fn an_aggregated_refusal_row_shows_its_address_and_count_in_text() {
        let detail = "count=3 interval_start=2026-01-01T00:00:00.000000Z interval_end=2026-01-01T00:00:10.000000Z";
        let e = pb::AuditEvent {
            action: "authenticate".into(),
            reason: "UNAUTHENTICATED".into(),
            peer: "10.0.0.1".into(),
            caller_detail: detail.into(),
            ..Default::default()
        };
        assert_eq!(
            reason_text(&e),
            format!("UNAUTHENTICATED peer=10.0.0.1 {detail}")
        );
        let e = pb::AuditEvent {
            action: "lease.create".into(),
            reason: "SCOPE_NOT_ALLOWED".into(),
            peer: "10.0.0.1:4000".into(),
            ..Default::default()
        };
        assert_eq!(reason_text(&e), "SCOPE_NOT_ALLOWED");
    }
}
