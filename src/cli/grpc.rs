//! What the gRPC client commands (`lease ...`, `admin ...`, `audit list`)
//! share: where the server is and who we are ([`ClientArgs`]), the channel
//! (plaintext, TLS or mTLS), the authorized request and its answer, the exit
//! status of a failure ([`ClientError::exit_code`]), and the printing of
//! answers as text tables or the proto3 JSON mapping.

use std::error::Error as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat};
use clap::{Args, ValueEnum};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::{json, Map, Value};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Response, Status};
use tonic_types::StatusExt as _;

use crate::proto::v1 as pb;

/// Variable naming the file of a Kubernetes projected service-account token
/// (`--token-file` of `lease` and `audit list`; `admin` reads only the
/// variable, its `--token-file` names the PAT to look up).
pub const TOKEN_FILE_VAR: &str = "TOKEN_BROKER_TOKEN_FILE";

/// The token file [`TOKEN_FILE_VAR`] names, if set and not empty (for
/// commands whose `--token-file` means something else, or that have none).
pub fn token_file_from_env() -> Option<PathBuf> {
    std::env::var_os(TOKEN_FILE_VAR)
        .filter(|v| !v.is_empty())
        .map(Into::into)
}

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
    /// File holding the API key (surrounding whitespace ignored), read on
    /// each call. Not with --api-key or a token file.
    #[arg(
        long,
        env = "TOKEN_BROKER_API_KEY_FILE",
        value_name = "FILE",
        global = true
    )]
    pub api_key_file: Option<PathBuf>,
    /// CA certificates (PEM) to verify an `https://` broker with, instead
    /// of the system's roots (which honour `SSL_CERT_FILE`/`SSL_CERT_DIR`).
    #[arg(long, env = "TOKEN_BROKER_CA_FILE", value_name = "FILE", global = true)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) for mTLS; needs --client-key-file.
    #[arg(
        long,
        env = "TOKEN_BROKER_CLIENT_CERT_FILE",
        value_name = "FILE",
        global = true
    )]
    pub client_cert_file: Option<PathBuf>,
    /// Private key (PEM) of --client-cert-file.
    #[arg(
        long,
        env = "TOKEN_BROKER_CLIENT_KEY_FILE",
        value_name = "FILE",
        global = true
    )]
    pub client_key_file: Option<PathBuf>,
    /// Output format: text, the proto3 JSON mapping, or (`lease create`
    /// and `credential get` only) the token alone.
    #[arg(long, value_enum, default_value_t = ClientOutput::Text, global = true)]
    pub output: ClientOutput,
    /// A Kubernetes projected service-account token file, sent as
    /// `authorization: Bearer` and re-read on each call (the kubelet
    /// rotates it). Set from [`TokenFileArg`] or [`TOKEN_FILE_VAR`].
    #[arg(skip)]
    pub token_file: Option<PathBuf>,
}

/// `--token-file` of the commands that have no `--token-file` of their own.
#[derive(Args, Debug, Clone)]
pub struct TokenFileArg {
    /// Kubernetes projected service-account token file, sent as
    /// `authorization: Bearer` and re-read on each call. Not with an API key.
    #[arg(long, env = TOKEN_FILE_VAR, value_name = "FILE", global = true)]
    pub token_file: Option<PathBuf>,
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

/// `--output` of the gRPC client commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ClientOutput {
    /// One lease as aligned `field   value` lines; `list` as a table.
    Text,
    /// proto3 JSON mapping: lowerCamelCase names, RFC 3339 timestamps,
    /// enum names; default values omitted.
    Json,
    /// The token alone and a newline, for `$(…)` (`lease create` and
    /// `credential get` only).
    Token,
}

/// Output format of client commands that show a whole answer.
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

impl ClientArgs {
    /// `--output` for a command that shows a whole answer; `token` is a
    /// usage error naming `command`.
    pub fn output(&self, command: &str) -> Result<Output, ClientError> {
        match self.output {
            ClientOutput::Text => Ok(Output::Text),
            ClientOutput::Json => Ok(Output::Json),
            ClientOutput::Token => Err(ClientError::Usage(format!(
                "--output token is only for `lease create` and `credential get`, not `{command}` (use text or json)"
            ))),
        }
    }
}

/// A failed client command, printed as `error: …`; its exit status is
/// [`ClientError::exit_code`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Bad `--addr`, or the server cannot be reached (connection refused,
    /// no route, DNS, timeout).
    #[error("cannot reach the broker at {addr}: {message}")]
    Connect {
        /// The address tried.
        addr: String,
        /// Why.
        message: String,
    },
    /// The TLS handshake failed on a certificate: the broker's is not
    /// trusted, or the broker refused ours (or wanted one).
    #[error(
        "TLS handshake with the broker failed: {0} (check --ca-file, --client-cert-file, \
         --client-key-file)"
    )]
    Tls(String),
    /// The connection failed during a call, before any answer. (A broker
    /// refusing our client certificate closes it too: the commands turn
    /// that case into [`ClientError::Tls`] with `tls_probe::diagnose`.)
    #[error("the connection to the broker failed during the call: {0}")]
    Lost(String),
    /// Bad local input: arguments, files the flags name.
    #[error("{0}")]
    Usage(String),
    /// `lease create --output token` answered with a lease that no longer
    /// has its token: a replayed `--request-id` of a lease no longer ACTIVE.
    #[error(
        "{name} is {state}: its token is gone (a --request-id of a lease no longer ACTIVE); \
         give a new --request-id for a new lease"
    )]
    NoToken {
        /// The lease answered.
        name: String,
        /// Its state's name, e.g. `REVOKED`.
        state: String,
    },
    /// The server answered with an error.
    #[error("{}", describe(.0))]
    Rpc(Status),
}

impl ClientError {
    /// The process exit status for this failure (README, "Exit codes"):
    /// 2 the caller's own mistake, 3 refused, 4 not found, 5 retry later,
    /// 1 anything else. A broker that cannot be reached is 5, as gRPC
    /// itself reports a failed connection as UNAVAILABLE; a certificate
    /// either side rejects is 3 (retrying cannot help), and so is a lease
    /// answered without the token `--output token` wants.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Usage(_) => 2,
            ClientError::Tls(_) | ClientError::NoToken { .. } => 3,
            ClientError::Connect { .. } | ClientError::Lost(_) => 5,
            ClientError::Rpc(status) => status_exit_code(status),
        }
    }
}

/// The exit status for a server's answer `status` (see
/// [`ClientError::exit_code`]). RESOURCE_EXHAUSTED is "retry later" only
/// when the server says when (RetryInfo), else a refusal (e.g. a quota).
pub fn status_exit_code(status: &Status) -> u8 {
    match status.code() {
        Code::Ok => 0,
        Code::InvalidArgument | Code::AlreadyExists | Code::OutOfRange => 2,
        Code::Unauthenticated | Code::PermissionDenied | Code::FailedPrecondition => 3,
        Code::ResourceExhausted if status.get_error_details().retry_info().is_some() => 5,
        Code::ResourceExhausted => 3,
        Code::NotFound => 4,
        Code::Unavailable | Code::DeadlineExceeded | Code::Aborted => 5,
        _ => 1,
    }
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
        out.push_str(" (the caller's credential: --api-key, --api-key-file or --token-file)");
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

/// Silence on a connection with a call in flight before the client sends an
/// HTTP/2 PING.
const CALL_KEEPALIVE: Duration = Duration::from_secs(15);

/// How long the client waits for that PING's answer before it closes the
/// connection and fails the call with UNAVAILABLE.
const CALL_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(15);

/// The endpoint `args` describe, not yet connected: `--addr` (as
/// [`endpoint_url`] takes it), with TLS for `https://` (`--ca-file` or the
/// system roots; `--client-cert-file`/`--client-key-file` for mTLS). Also
/// checks the credential flags, so a usage mistake is reported before any
/// connection. Errors name the flag and file, never their contents.
pub fn endpoint(args: &ClientArgs) -> Result<Endpoint, ClientError> {
    authorization(args)?;
    let url = endpoint_url(&args.addr);
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| ClientError::Usage(format!("--addr {url}: {e}")))?
        .connect_timeout(Duration::from_secs(10))
        // A broker that accepted the connection but stopped answering
        // (frozen, a black-holing proxy) fails the call as UNAVAILABLE
        // (exit 5) after about 30 s instead of hanging the command.
        .http2_keep_alive_interval(CALL_KEEPALIVE)
        .keep_alive_timeout(CALL_KEEPALIVE_TIMEOUT);
    let https = url.starts_with("https://");
    let tls_flags = [
        ("--ca-file", args.ca_file.is_some()),
        ("--client-cert-file", args.client_cert_file.is_some()),
        ("--client-key-file", args.client_key_file.is_some()),
    ];
    if !https {
        if let Some((flag, _)) = tls_flags.iter().find(|(_, given)| *given) {
            return Err(ClientError::Usage(format!(
                "{flag} needs an https:// --addr (got {url}): plain http would ignore it"
            )));
        }
        return Ok(endpoint);
    }
    let mut tls = ClientTlsConfig::new();
    tls = match &args.ca_file {
        Some(path) => {
            let pem = read_pem("--ca-file", path)?;
            let certs = CertificateDer::pem_slice_iter(&pem).count();
            if certs == 0 || CertificateDer::pem_slice_iter(&pem).any(|c| c.is_err()) {
                return Err(ClientError::Usage(format!(
                    "--ca-file {}: no PEM certificate in it",
                    path.display()
                )));
            }
            tls.ca_certificate(Certificate::from_pem(pem))
        }
        None => tls.with_native_roots(),
    };
    // Checked here, not with clap's `requires`: that misses a global flag
    // given after the subcommand.
    match (&args.client_cert_file, &args.client_key_file) {
        (Some(_), None) => {
            return Err(ClientError::Usage(
                "--client-cert-file needs --client-key-file (TOKEN_BROKER_CLIENT_KEY_FILE)".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(ClientError::Usage(
                "--client-key-file needs --client-cert-file (TOKEN_BROKER_CLIENT_CERT_FILE)".into(),
            ))
        }
        _ => {}
    }
    if let (Some(cert), Some(key)) = (&args.client_cert_file, &args.client_key_file) {
        let cert_pem = read_pem("--client-cert-file", cert)?;
        if CertificateDer::pem_slice_iter(&cert_pem).next().is_none() {
            return Err(ClientError::Usage(format!(
                "--client-cert-file {}: no PEM certificate in it",
                cert.display()
            )));
        }
        let key_pem = Zeroizing::new(read_pem("--client-key-file", key)?);
        if PrivateKeyDer::from_pem_slice(&key_pem).is_err() {
            return Err(ClientError::Usage(format!(
                "--client-key-file {}: no PEM private key in it",
                key.display()
            )));
        }
        tls = tls.identity(Identity::from_pem(cert_pem, &*key_pem));
    }
    endpoint.tls_config(tls).map_err(|e| {
        let message = chain(&e);
        if message.contains("no native certs found") {
            ClientError::Usage(format!(
                "no system CA certificates found to verify {url}: give --ca-file \
                 (TOKEN_BROKER_CA_FILE) or SSL_CERT_FILE"
            ))
        } else {
            ClientError::Usage(format!("TLS settings for {url}: {message}"))
        }
    })
}

/// The contents of the PEM file `flag` names; errors name both.
pub(super) fn read_pem(flag: &str, path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path)
        .map_err(|e| ClientError::Usage(format!("cannot read {flag} {}: {e}", path.display())))
}

/// A channel to the broker as `args` say (see [`endpoint`]), shared by
/// every client command.
pub async fn channel(args: &ClientArgs) -> Result<Channel, ClientError> {
    let endpoint = endpoint(args)?;
    let addr = endpoint.uri().to_string();
    endpoint
        .connect()
        .await
        .map_err(|e| connect_error(&addr, &e))
}

/// A failed connection as [`ClientError::Tls`] when a certificate was
/// rejected (by us or the broker), else [`ClientError::Connect`]; the
/// message is the whole chain of causes, not tonic's bare "transport error".
pub fn connect_error(addr: &str, e: &(dyn std::error::Error + 'static)) -> ClientError {
    match tls_failure(e) {
        Some(message) => ClientError::Tls(message),
        None => ClientError::Connect {
            addr: addr.to_owned(),
            message: chain(e),
        },
    }
}

/// `e` and its causes, `: `-separated, repeats dropped.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}

/// rustls' words when `e` or a cause is a TLS failure. `io::Error` hides
/// its inner error from `source()`, so that is looked into too: on a TLS
/// stream an `InvalidData` one is rustls' (a received alert comes as text).
pub(super) fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if inner.downcast_ref::<rustls::Error>().is_some()
                    || io.kind() == std::io::ErrorKind::InvalidData
                {
                    return Some(inner.to_string());
                }
            }
        }
        next = err.source();
    }
    None
}

/// Largest credential file read (a projected token is ~1 KiB).
const MAX_CREDENTIAL_BYTES: u64 = 64 * 1024;

/// The `authorization: Bearer …` value `args` ask for, read now (so a
/// rotated token file is picked up on each call): `--api-key`,
/// `--api-key-file` or the token file, at most one of them; none is no
/// header. An empty `--api-key` (an empty variable) means no key. Errors
/// name the flag and file, never the credential.
pub fn authorization(args: &ClientArgs) -> Result<Option<MetadataValue<Ascii>>, ClientError> {
    let key = args
        .api_key
        .as_ref()
        .filter(|k| !k.expose_secret().is_empty());
    let given: Vec<&str> = [
        (key.is_some(), "--api-key (TOKEN_BROKER_API_KEY)"),
        (
            args.api_key_file.is_some(),
            "--api-key-file (TOKEN_BROKER_API_KEY_FILE)",
        ),
        (
            args.token_file.is_some(),
            "--token-file (TOKEN_BROKER_TOKEN_FILE)",
        ),
    ]
    .into_iter()
    .filter_map(|(set, name)| set.then_some(name))
    .collect();
    if given.len() > 1 {
        return Err(ClientError::Usage(format!(
            "give one credential, not {}",
            given.join(" and ")
        )));
    }
    let (flag, secret) = match (key, &args.api_key_file, &args.token_file) {
        (Some(key), _, _) => ("--api-key", key.clone()),
        (_, Some(path), _) => ("--api-key-file", read_credential("--api-key-file", path)?),
        (_, _, Some(path)) => ("--token-file", read_credential("--token-file", path)?),
        _ => return Ok(None),
    };
    let header = Zeroizing::new(format!("Bearer {}", secret.expose_secret()));
    MetadataValue::try_from(header.as_str())
        .map(|mut v| {
            v.set_sensitive(true);
            Some(v)
        })
        .map_err(|_| {
            ClientError::Usage(format!(
                "the {flag} credential has characters a header cannot carry"
            ))
        })
}

/// The credential in `path` without surrounding whitespace; `flag` names
/// it in errors. Empty, unreadable, not UTF-8 or over
/// [`MAX_CREDENTIAL_BYTES`]: a usage error.
fn read_credential(flag: &str, path: &Path) -> Result<SecretString, ClientError> {
    let shown = path.display();
    let mut bytes = Zeroizing::new(Vec::new());
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CREDENTIAL_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| ClientError::Usage(format!("cannot read {flag} {shown}: {e}")))?;
    if bytes.len() as u64 > MAX_CREDENTIAL_BYTES {
        return Err(ClientError::Usage(format!(
            "{flag} {shown} is larger than {MAX_CREDENTIAL_BYTES} bytes"
        )));
    }
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ClientError::Usage(format!("{flag} {shown} does not hold UTF-8 text")))?;
    let value = text.trim();
    if value.is_empty() {
        return Err(ClientError::Usage(format!("{flag} {shown} is empty")));
    }
    Ok(SecretString::from(value.to_owned()))
}

/// `msg` with [`authorization`]'s header when `args` have a credential.
pub(super) fn request<T>(msg: T, args: &ClientArgs) -> Result<Request<T>, ClientError> {
    let mut req = Request::new(msg);
    if let Some(value) = authorization(args)? {
        req.metadata_mut().insert("authorization", value);
    }
    Ok(req)
}

/// The message of a call's answer, or the server's error.
/// A call that got no answer because its connection failed under it
/// (tonic reports that as UNKNOWN or CANCELLED with a transport error as
/// the source) is not the server's word: a TLS alert (TLS 1.3 reports a
/// refused client certificate after the client's handshake ends) is
/// [`ClientError::Tls`], anything else [`ClientError::Lost`].
pub(super) fn answer<T>(reply: Result<Response<T>, Status>) -> Result<T, ClientError> {
    reply.map(Response::into_inner).map_err(|status| {
        let Some(source) = status
            .source()
            .filter(|s| s.downcast_ref::<tonic::transport::Error>().is_some())
        else {
            return ClientError::Rpc(status);
        };
        match tls_failure(source) {
            Some(message) => ClientError::Tls(message),
            None => ClientError::Lost(chain(source)),
        }
    })
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
    fn each_status_code_has_its_documented_exit_code() {
        let code = |c: Code| status_exit_code(&Status::new(c, "x"));
        for c in [Code::InvalidArgument, Code::AlreadyExists, Code::OutOfRange] {
            assert_eq!(code(c), 2, "{c:?}");
        }
        for c in [
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::FailedPrecondition,
            Code::ResourceExhausted,
        ] {
            assert_eq!(code(c), 3, "{c:?}");
        }
        assert_eq!(code(Code::NotFound), 4);
        for c in [Code::Unavailable, Code::DeadlineExceeded, Code::Aborted] {
            assert_eq!(code(c), 5, "{c:?}");
        }
        for c in [
            Code::Unknown,
            Code::Internal,
            Code::Cancelled,
            Code::DataLoss,
        ] {
            assert_eq!(code(c), 1, "{c:?}");
        }
        let with_retry = Status::with_error_details(
            Code::ResourceExhausted,
            "quota",
            tonic_types::ErrorDetails::with_retry_info(Some(Duration::from_secs(3))),
        );
        assert_eq!(status_exit_code(&with_retry), 5);
        assert_eq!(ClientError::Usage("x".into()).exit_code(), 2);
        assert_eq!(ClientError::Tls("x".into()).exit_code(), 3);
        assert_eq!(ClientError::Lost("x".into()).exit_code(), 5);
        let down = ClientError::Connect {
            addr: "a".into(),
            message: "refused".into(),
        };
        assert_eq!(down.exit_code(), 5);
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
