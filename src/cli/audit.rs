//! `token-broker audit ...`: `audit list` reads the audit trail over gRPC
//! (`AdminService.ListAuditEvents`, admin identities only); `audit verify`
//! opens the store named by the server configuration and proves the audit
//! chain intact or names the first broken row (docs/audit-chain.md).

use std::path::PathBuf;

use chrono::{DateTime, SecondsFormat};
use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};

use super::admin::{connect, request};
use super::client::{ClientArgs, ClientError, Output};
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
}

/// Arguments of `audit verify`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// TOML configuration file of the server (settings: README.md).
    #[arg(long, env = "TOKEN_BROKER_CONFIG")]
    pub config: Option<PathBuf>,
    /// The last chain head recorded outside the database, `ID:MAC` (the
    /// `audit chain head` log line's `audit_id` and `mac`): catches dropped
    /// newest rows.
    #[arg(long)]
    pub expected_head: Option<String>,
}

/// Runs `audit list` and returns what to print on stdout.
pub async fn list(
    client: &ClientArgs,
    filter: String,
    page_size: i32,
    page_token: String,
) -> Result<String, ClientError> {
    let mut admin = connect(&client.addr).await?;
    let page = admin
        .list_audit_events(request(
            pb::ListAuditEventsRequest {
                page_size,
                page_token,
                filter,
            },
            client,
        )?)
        .await
        .map_err(ClientError::Rpc)?
        .into_inner();
    Ok(match client.output {
        Output::Json => format!("{:#}", page_json(&page)),
        Output::Text => page_text(&page),
    })
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
/// intact chain, else why not.
pub async fn verify(
    config: &Config,
    expected_head: Option<&str>,
) -> Result<String, AuditVerifyError> {
    let setup = |e: &dyn std::fmt::Display| AuditVerifyError::Setup(e.to_string());
    let expected = expected_head
        .map(audit::parse_expected_head)
        .transpose()
        .map_err(|e| setup(&format!("--expected-head: {e}")))?;
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
    let chain_key = keys.chain_key().map_err(|e| setup(&e))?;
    let store = crate::store::open(secrecy::ExposeSecret::expose_secret(&config.database.url))
        .await
        .map_err(|e| AuditVerifyError::Verify(VerifyError::Store(e)))?;
    let report = audit::verify(store.as_ref(), &chain_key, expected).await?;
    Ok(report.to_string())
}

fn rfc3339(t: &prost_types::Timestamp) -> String {
    DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32)
        .map(|d| d.to_rfc3339_opts(SecondsFormat::Micros, true))
        .unwrap_or_default()
}

/// The proto3 JSON mapping of one `AuditEvent` (default values omitted).
pub fn event_json(e: &pb::AuditEvent) -> Value {
    let mut m = Map::new();
    if e.id != 0 {
        m.insert("id".into(), json!(e.id.to_string()));
    }
    if let Some(t) = &e.time {
        m.insert("time".into(), json!(rfc3339(t)));
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
pub fn page_json(page: &pb::ListAuditEventsResponse) -> Value {
    let mut m = Map::new();
    if !page.audit_events.is_empty() {
        m.insert(
            "auditEvents".into(),
            Value::Array(page.audit_events.iter().map(event_json).collect()),
        );
    }
    if !page.next_page_token.is_empty() {
        m.insert("nextPageToken".into(), json!(page.next_page_token));
    }
    Value::Object(m)
}

fn page_text(page: &pb::ListAuditEventsResponse) -> String {
    let mut out = format!(
        "{:>6} {:<27} {:<30} {:<20} {:<8} {:<44} {}",
        "ID", "TIME", "IDENTITY", "ACTION", "OUTCOME", "LEASE", "REASON"
    );
    for e in &page.audit_events {
        let outcome = match e.outcome() {
            pb::audit_event::Outcome::Allowed => "allowed",
            pb::audit_event::Outcome::Denied => "denied",
            pb::audit_event::Outcome::Error => "error",
            pb::audit_event::Outcome::Unspecified => "-",
        };
        out.push_str(&format!(
            "\n{:>6} {:<27} {:<30} {:<20} {:<8} {:<44} {}",
            e.id,
            e.time.as_ref().map(rfc3339).unwrap_or_default(),
            e.identity,
            e.action,
            outcome,
            if e.lease.is_empty() { "-" } else { &e.lease },
            e.reason
        ));
    }
    if !page.next_page_token.is_empty() {
        out.push_str(&format!(
            "\nnext page: --page-token {}",
            page.next_page_token
        ));
    }
    out
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
}
