//! What the gRPC client commands (`lease ...`, `admin ...`, `audit list`)
//! share: where the server is and who we are ([`ClientArgs`]), the channel,
//! the authorized request and its answer, and the printing of answers as
//! text tables or the proto3 JSON mapping.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat};
use clap::{Args, ValueEnum};
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::{json, Map, Value};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};
use tonic_types::StatusExt as _;

use crate::proto::v1 as pb;

/// Where the server is and who we are.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// gRPC address of the broker: a URL (`http://…`, `https://…`), or
    /// `HOST:PORT`, taken as `http://HOST:PORT`.
    #[arg(
        long,
        env = "TOKEN_BROKER_ADDR",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub addr: String,
    /// API key (`tbk_…`), sent as `authorization: Bearer`.
    #[arg(
        long,
        env = "TOKEN_BROKER_API_KEY",
        hide_env_values = true,
        global = true
    )]
    pub api_key: Option<SecretString>,
    /// Output format: text, or the proto3 JSON mapping.
    #[arg(long, value_enum, default_value_t = Output::Text, global = true)]
    pub output: Output,
}

/// Which page of a lease listing to fetch.
#[derive(Args, Debug, Clone)]
pub struct Paging {
    /// Leases per page (default 50).
    #[arg(long, default_value_t = 0)]
    pub page_size: i32,
    /// `next_page_token` of a previous page.
    #[arg(long, default_value = "")]
    pub page_token: String,
}

/// Output format of client commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// One lease as aligned `field   value` lines; `list` as a table.
    Text,
    /// proto3 JSON mapping: lowerCamelCase names, RFC 3339 timestamps,
    /// enum names; default values omitted.
    Json,
}

impl Output {
    /// `answer` as this format asks: `text` of it, or `json` of it
    /// pretty-printed.
    pub(super) fn show<T>(
        self,
        answer: &T,
        json: impl FnOnce(&T) -> Value,
        text: impl FnOnce(&T) -> String,
    ) -> String {
        match self {
            Output::Json => format!("{:#}", json(answer)),
            Output::Text => text(answer),
        }
    }
}

/// A failed client command, printed as `error: …`.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Bad `--addr`, or the server cannot be reached.
    #[error("cannot reach the broker at {addr}: {message}")]
    Connect {
        /// The address tried.
        addr: String,
        /// Why.
        message: String,
    },
    /// Bad local input.
    #[error("{0}")]
    Usage(String),
    /// The server answered with an error.
    #[error("{}", describe(.0))]
    Rpc(Status),
}

/// `CODE: message [reason REASON] [field F] [retry after Ns]`.
fn describe(status: &Status) -> String {
    let mut out = format!("{:?}: {}", status.code(), status.message());
    let details = status.get_error_details();
    if let Some(info) = details.error_info() {
        out.push_str(&format!(" [reason {}]", info.reason));
    }
    if let Some(bad) = details.bad_request() {
        for v in &bad.field_violations {
            out.push_str(&format!(" [field {}]", v.field));
        }
    }
    if let Some(delay) = details.retry_info().and_then(|r| r.retry_delay) {
        out.push_str(&format!(
            " [retry after {}]",
            humantime::format_duration(delay)
        ));
    }
    if status.code() == Code::Unauthenticated {
        out.push_str(" (set --api-key or TOKEN_BROKER_API_KEY)");
    }
    out
}

/// `addr` as a URL: `HOST:PORT` without a scheme gets `http://`.
pub fn endpoint_url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

/// A channel to the broker at `addr` (as [`endpoint_url`] takes it), shared
/// by every client command.
pub async fn channel(addr: &str) -> Result<Channel, ClientError> {
    let url = endpoint_url(addr);
    let err = |message: String| ClientError::Connect {
        addr: url.clone(),
        message,
    };
    Endpoint::from_shared(url.clone())
        .map_err(|e| err(e.to_string()))?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| err(e.to_string()))
}

/// The `authorization: Bearer <key>` value when `args` has a key; an empty
/// key (an empty variable) means no key, not an empty credential.
pub(super) fn bearer(args: &ClientArgs) -> Result<Option<MetadataValue<Ascii>>, ClientError> {
    args.api_key
        .as_ref()
        .filter(|k| !k.expose_secret().is_empty())
        .map(|key| {
            MetadataValue::try_from(format!("Bearer {}", key.expose_secret())).map_err(|_| {
                ClientError::Usage("the API key has characters a header cannot carry".into())
            })
        })
        .transpose()
}

/// `msg` with [`bearer`]'s header when `args` has a key.
pub(super) fn request<T>(msg: T, args: &ClientArgs) -> Result<Request<T>, ClientError> {
    let mut req = Request::new(msg);
    if let Some(value) = bearer(args)? {
        req.metadata_mut().insert("authorization", value);
    }
    Ok(req)
}

/// The message of a call's answer, or the server's error.
pub(super) fn answer<T>(reply: Result<Response<T>, Status>) -> Result<T, ClientError> {
    reply.map(Response::into_inner).map_err(ClientError::Rpc)
}

/// A lease name as the API takes it: a bare uuid gets `leases/`.
pub(super) fn lease_name(name: &str) -> String {
    if name.starts_with("leases/") {
        name.to_owned()
    } else {
        format!("leases/{name}")
    }
}

/// `t` in RFC 3339 (UTC, `Z`) with `format`'s fractional digits.
pub(super) fn rfc3339(t: &prost_types::Timestamp, format: SecondsFormat) -> String {
    DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32)
        .map(|d| d.to_rfc3339_opts(format, true))
        .unwrap_or_default()
}

/// A column of a text table of `T`s: its heading, the width its cells are
/// padded to (the last column's are not), and what a row shows in it.
pub(super) struct Column<T> {
    heading: &'static str,
    width: usize,
    right_aligned: bool,
    cell: fn(&T) -> String,
}

impl<T> Column<T> {
    /// Left-aligned in `width` characters.
    pub(super) const fn left(heading: &'static str, width: usize, cell: fn(&T) -> String) -> Self {
        Column {
            heading,
            width,
            right_aligned: false,
            cell,
        }
    }

    /// Right-aligned in `width` characters.
    pub(super) const fn right(heading: &'static str, width: usize, cell: fn(&T) -> String) -> Self {
        Column {
            heading,
            width,
            right_aligned: true,
            cell,
        }
    }

    /// The last column, not padded.
    pub(super) const fn last(heading: &'static str, cell: fn(&T) -> String) -> Self {
        Column::left(heading, 0, cell)
    }
}

/// The columns the lease tables share.
pub(super) const NAME_COLUMN: Column<pb::Lease> = Column::left("NAME", 44, |l| l.name.clone());
pub(super) const STATE_COLUMN: Column<pb::Lease> =
    Column::left("STATE", 13, |l| l.state().as_str_name().to_owned());
pub(super) const ORGANIZATION_COLUMN: Column<pb::Lease> =
    Column::left("ORGANIZATION", 14, |l| l.organization.clone());
pub(super) const SCOPES_COLUMN: Column<pb::Lease> = Column::last("SCOPES", |l| l.scopes.join(" "));

/// A heading line and one line a row, cells one space apart.
pub(super) fn table<T>(columns: &[Column<T>], rows: &[T]) -> String {
    let mut lines = vec![line(columns, columns.iter().map(|c| c.heading.to_owned()))];
    lines.extend(
        rows.iter()
            .map(|row| line(columns, columns.iter().map(|c| (c.cell)(row)))),
    );
    lines.join("\n")
}

fn line<T>(columns: &[Column<T>], cells: impl Iterator<Item = String>) -> String {
    let mut out = String::new();
    for (i, (column, text)) in columns.iter().zip(cells).enumerate() {
        let width = column.width;
        match (i + 1 == columns.len(), column.right_aligned) {
            (true, _) => out.push_str(&text),
            (false, false) => out.push_str(&format!("{text:<width$} ")),
            (false, true) => out.push_str(&format!("{text:>width$} ")),
        }
    }
    out
}

/// One page of a listing as a [`table`], then how to ask for the next page
/// when there is one.
pub(super) fn page_text<T>(columns: &[Column<T>], rows: &[T], next_page_token: &str) -> String {
    let mut out = table(columns, rows);
    if !next_page_token.is_empty() {
        out.push_str(&format!("\nnext page: --page-token {next_page_token}"));
    }
    out
}

/// The proto3 JSON mapping of a page: the `items` under `key`, then
/// `nextPageToken` (each omitted when empty).
pub(super) fn page_json(key: &str, items: Vec<Value>, next_page_token: &str) -> Value {
    let mut m = Map::new();
    if !items.is_empty() {
        m.insert(key.into(), Value::Array(items));
    }
    if !next_page_token.is_empty() {
        m.insert("nextPageToken".into(), json!(next_page_token));
    }
    Value::Object(m)
}

/// The proto3 JSON mapping of a `Lease` (default values omitted).
pub fn lease_json(lease: &pb::Lease) -> Value {
    let mut m = Map::new();
    let mut put_str = |k: &str, v: &str| {
        if !v.is_empty() {
            m.insert(k.into(), json!(v));
        }
    };
    put_str("name", &lease.name);
    put_str("organization", &lease.organization);
    put_str("holder", &lease.holder);
    put_str("displayName", &lease.display_name);
    put_str("authorizationId", &lease.authorization_id);
    put_str("token", &lease.token);
    if !lease.scopes.is_empty() {
        m.insert("scopes".into(), json!(lease.scopes));
    }
    if lease.state != 0 {
        m.insert("state".into(), json!(lease.state().as_str_name()));
    }
    for (k, t) in [
        ("createTime", &lease.create_time),
        ("expireTime", &lease.expire_time),
        ("maxExpireTime", &lease.max_expire_time),
        ("revokeTime", &lease.revoke_time),
        ("nextAttemptTime", &lease.next_attempt_time),
        ("patExpireTime", &lease.pat_expire_time),
    ] {
        if let Some(t) = t {
            m.insert(k.into(), json!(rfc3339(t, SecondsFormat::AutoSi)));
        }
    }
    if lease.renewable {
        m.insert("renewable".into(), json!(true));
    }
    if lease.revocation_attempts != 0 {
        m.insert(
            "revocationAttempts".into(),
            json!(lease.revocation_attempts),
        );
    }
    if !lease.last_error.is_empty() {
        m.insert("lastError".into(), json!(lease.last_error));
    }
    Value::Object(m)
}

/// The proto3 JSON mapping of a `ListLeasesResponse`.
pub fn list_json(page: &pb::ListLeasesResponse) -> Value {
    page_json(
        "leases",
        page.leases.iter().map(lease_json).collect(),
        &page.next_page_token,
    )
}

/// One lease as aligned `field   value` lines (the admin view's fields
/// when set).
pub(super) fn lease_text(lease: &pb::Lease) -> String {
    let ts = |t: &Option<prost_types::Timestamp>| {
        t.as_ref()
            .map(|t| rfc3339(t, SecondsFormat::AutoSi))
            .unwrap_or_default()
    };
    let mut rows = vec![
        ("name", lease.name.clone()),
        ("state", lease.state().as_str_name().to_owned()),
        ("organization", lease.organization.clone()),
        ("scopes", lease.scopes.join(" ")),
        ("holder", lease.holder.clone()),
        ("create_time", ts(&lease.create_time)),
        ("expire_time", ts(&lease.expire_time)),
        ("max_expire_time", ts(&lease.max_expire_time)),
    ];
    if lease.revoke_time.is_some() {
        rows.push(("revoke_time", ts(&lease.revoke_time)));
    }
    rows.push(("renewable", lease.renewable.to_string()));
    rows.push(("display_name", lease.display_name.clone()));
    rows.push(("authorization_id", lease.authorization_id.clone()));
    if lease.pat_expire_time.is_some() {
        rows.push(("pat_expire_time", ts(&lease.pat_expire_time)));
    }
    if lease.revocation_attempts != 0 {
        rows.push(("revocation_attempts", lease.revocation_attempts.to_string()));
    }
    if lease.next_attempt_time.is_some() {
        rows.push(("next_attempt_time", ts(&lease.next_attempt_time)));
    }
    if !lease.last_error.is_empty() {
        rows.push(("last_error", lease.last_error.clone()));
    }
    if !lease.token.is_empty() {
        rows.push(("token", lease.token.clone()));
    }
    rows.iter()
        .map(|(k, v)| format!("{k:<19} {v}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_output_follows_the_proto3_json_mapping() {
        let lease = pb::Lease {
            name: "leases/0b9c7c1e-4a8e-4b71-9a43-1f0c3c7d9e10".into(),
            organization: "fabrikam".into(),
            scopes: vec!["vso.code".into()],
            holder: "apikey:dev".into(),
            state: pb::lease::State::RevokeFailed as i32,
            create_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            display_name: "token-broker:d:l".into(),
            ..Default::default()
        };
        let v = lease_json(&lease);
        assert_eq!(v["state"], "REVOKE_FAILED");
        assert_eq!(v["createTime"], "2023-11-14T22:13:20Z");
        assert_eq!(v["displayName"], "token-broker:d:l");
        assert!(v.get("token").is_none(), "empty fields are omitted");
        assert!(v.get("renewable").is_none());
        assert!(v.get("revokeTime").is_none());
        let page = pb::ListLeasesResponse {
            leases: vec![lease],
            next_page_token: "abc".into(),
        };
        assert_eq!(list_json(&page)["nextPageToken"], "abc");
    }

    #[test]
    fn an_address_without_a_scheme_is_taken_as_plain_http() {
        assert_eq!(endpoint_url("127.0.0.1:50051"), "http://127.0.0.1:50051");
        assert_eq!(endpoint_url("localhost:1"), "http://localhost:1");
        assert_eq!(endpoint_url("https://b:443"), "https://b:443");
        assert_eq!(endpoint_url("http://b:80"), "http://b:80");
    }

    #[test]
    fn a_bare_uuid_is_taken_as_a_lease_name() {
        assert_eq!(lease_name("x"), "leases/x");
        assert_eq!(lease_name("leases/x"), "leases/x");
    }

    #[test]
    fn tables_pad_every_column_but_the_last() {
        let columns: [Column<(u32, &str)>; 3] = [
            Column::right("ID", 4, |r| r.0.to_string()),
            Column::left("NAME", 6, |r| r.1.to_owned()),
            Column::last("NOTE", |_| String::new()),
        ];
        assert_eq!(
            page_text(&columns, &[(7, "x")], "t"),
            "  ID NAME   NOTE\n   7 x      \nnext page: --page-token t"
        );
    }
}
