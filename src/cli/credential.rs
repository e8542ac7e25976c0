//! `token-broker credential ...`: a gRPC client of `CredentialService`
//! (managed credentials, docs/managed-credentials.md). `get` prints the
//! current version and its token; `watch` follows the versions as they are
//! minted, writes each token atomically to `--output-file` (mode 0600) and
//! prints one line per version, never the token; it reconnects with the
//! last version received (`after_version`) whenever the stream drops.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBuilder};
use chrono::SecondsFormat;
use clap::Subcommand;
use serde_json::{json, Map, Value};
use tonic::transport::Channel;
use tonic::Code;

use super::grpc::{
    answer, connect_error, endpoint, request, rfc3339, ClientArgs, ClientError, ClientOutput,
    Output,
};
use crate::proto::v1 as pb;
use crate::proto::v1::credential_service_client::CredentialServiceClient;

/// `token-broker credential ...`.
#[derive(Subcommand, Debug)]
pub enum CredentialCommand {
    /// Print a managed credential's current version and its token (the
    /// caller must be one of its readers); with `--output token`, the
    /// token alone.
    Get {
        /// The credential: `NAME` or `credentials/NAME`.
        #[arg(value_parser = api_name)]
        name: String,
    },
    /// Follow a managed credential: each version as it is minted, one line
    /// each on stdout (never the token); with --output-file, each token is
    /// written to that file (atomically, mode 0600) first. Reconnects with
    /// the last version received when the stream drops; runs until
    /// Ctrl-C / SIGTERM, or a refusal (not a reader: exit status 3).
    Watch {
        /// The credential: `NAME` or `credentials/NAME`.
        #[arg(value_parser = api_name)]
        name: String,
        /// Write each new token here: a temporary file in the same
        /// directory (mode 0600), then renamed over it, so a reader sees the
        /// old token or the new one, never a part. The token alone, no
        /// newline.
        #[arg(long, value_name = "PATH")]
        output_file: Option<PathBuf>,
    },
}

/// A credential argument as the API takes it: a bare name gets
/// `credentials/`.
fn api_name(name: &str) -> Result<String, std::convert::Infallible> {
    Ok(credential_name(name))
}

/// `credentials/NAME` for `NAME` or `credentials/NAME`.
pub(super) fn credential_name(name: &str) -> String {
    if name.starts_with("credentials/") {
        name.to_owned()
    } else {
        format!("credentials/{name}")
    }
}

/// Runs `credential get` and returns what to print on stdout.
pub async fn get(args: &ClientArgs, name: String) -> Result<String, ClientError> {
    let token_only = args.output == ClientOutput::Token;
    let output = if token_only {
        Output::Text
    } else {
        args.output("credential get")?
    };
    let mut client = CredentialServiceClient::new(super::grpc::channel(args).await?);
    let req = pb::GetCredentialRequest { name };
    let version = answer(client.get_credential(request(req, args)?).await)?;
    if token_only {
        return Ok(version.token);
    }
    Ok(output.show(&version, version_json, version_text))
}

/// The proto3 JSON mapping of a `CredentialVersion` (default values
/// omitted; the token only when the answer carries one).
pub fn version_json(v: &pb::CredentialVersion) -> Value {
    let mut m = Map::new();
    for (k, s) in [
        ("name", &v.name),
        ("credential", &v.credential),
        ("organization", &v.organization),
        ("authorizationId", &v.authorization_id),
        ("token", &v.token),
    ] {
        if !s.is_empty() {
            m.insert(k.into(), json!(s));
        }
    }
    if v.version != 0 {
        m.insert("version".into(), json!(v.version.to_string()));
    }
    if v.state != 0 {
        m.insert("state".into(), json!(v.state().as_str_name()));
    }
    if !v.scopes.is_empty() {
        m.insert("scopes".into(), json!(v.scopes));
    }
    for (k, t) in [
        ("validFrom", &v.valid_from),
        ("rotateTime", &v.rotate_time),
        ("expireTime", &v.expire_time),
        ("revokeTime", &v.revoke_time),
    ] {
        if let Some(t) = t {
            m.insert(k.into(), json!(rfc3339(t, SecondsFormat::AutoSi)));
        }
    }
    Value::Object(m)
}

/// One version as aligned `field   value` lines (the token last, when the
/// answer carries one).
pub fn version_text(v: &pb::CredentialVersion) -> String {
    let ts = |t: &Option<prost_types::Timestamp>| {
        t.as_ref()
            .map(|t| rfc3339(t, SecondsFormat::AutoSi))
            .unwrap_or_default()
    };
    let mut rows = vec![
        ("name", v.name.clone()),
        ("credential", v.credential.clone()),
        ("version", v.version.to_string()),
        ("state", v.state().as_str_name().to_owned()),
        ("organization", v.organization.clone()),
        ("scopes", v.scopes.join(" ")),
        ("valid_from", ts(&v.valid_from)),
        ("rotate_time", ts(&v.rotate_time)),
        ("expire_time", ts(&v.expire_time)),
    ];
    if v.revoke_time.is_some() {
        rows.push(("revoke_time", ts(&v.revoke_time)));
    }
    rows.push(("authorization_id", v.authorization_id.clone()));
    if !v.token.is_empty() {
        rows.push(("token", v.token.clone()));
    }
    rows.iter()
        .map(|(k, val)| format!("{k:<16} {val}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The line `watch` prints for a version: never the token.
fn watch_line(v: &pb::CredentialVersion, output: Output, file: Option<&Path>) -> String {
    match output {
        Output::Json => {
            let mut shown = version_json(&pb::CredentialVersion {
                token: String::new(),
                ..v.clone()
            });
            if let (Some(path), Value::Object(m)) = (file, &mut shown) {
                m.insert("outputFile".into(), json!(path.display().to_string()));
            }
            shown.to_string()
        }
        Output::Text => {
            let ts = |t: &Option<prost_types::Timestamp>| {
                t.as_ref()
                    .map(|t| rfc3339(t, SecondsFormat::Secs))
                    .unwrap_or_else(|| "-".into())
            };
            let mut line = format!(
                "{} version {} valid_from {} rotate_time {} expire_time {}",
                v.credential,
                v.version,
                ts(&v.valid_from),
                ts(&v.rotate_time),
                ts(&v.expire_time)
            );
            if let Some(path) = file {
                line.push_str(&format!(" written to {}", path.display()));
            }
            line
        }
    }
}

/// Writes `token` to `path` atomically: a new temporary file beside it
/// (mode 0600 from its creation), synced, renamed over `path`, and the
/// directory synced, so a reader of `path` sees the previous token or this
/// one whole, never a part, and never a wider mode.
pub fn write_atomically(path: &Path, token: &str) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let file_name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "names a directory, not a file",
        )
    })?;
    let temp = dir.join(format!(
        ".{}.{:016x}.tmp",
        file_name.to_string_lossy(),
        rand::random::<u64>()
    ));
    let written = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(0o600);
        }
        let mut file = options.open(&temp)?;
        file.write_all(token.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written?;
    // The rename itself survives a crash once the directory is synced.
    #[cfg(unix)]
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// How a watch attempt ended.
enum Ended {
    /// The stream or connection dropped, or the server asked to retry:
    /// reconnect after a backoff.
    Retry(ClientError),
    /// The broker stopped accepting the caller's credential after the call
    /// had started (an expired service-account token): reconnect at once,
    /// reading the credential again.
    Reauthenticate(ClientError),
    /// A refusal or a local mistake: give up.
    Fail(ClientError),
}

/// Whether a failed attempt is worth another: connection trouble and
/// UNAVAILABLE-like answers are; refusals (the caller's identity or
/// request) are not. `started`: the server had accepted the call.
fn classify(e: ClientError, started: bool) -> Ended {
    match &e {
        ClientError::Connect { .. } | ClientError::Lost(_) => Ended::Retry(e),
        ClientError::Tls(_) | ClientError::Usage(_) | ClientError::NoToken { .. } => Ended::Fail(e),
        ClientError::Rpc(status) => match status.code() {
            Code::Unauthenticated if started => Ended::Reauthenticate(e),
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Cancelled
            | Code::Unknown
            | Code::Internal
            | Code::ResourceExhausted => Ended::Retry(e),
            _ => Ended::Fail(e),
        },
    }
}

/// Longest wait between two reconnections.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Backoff between reconnections: jittered exponential from 1 s to 30 s,
/// without end (a sidecar keeps trying); started afresh after each version
/// received.
fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(MAX_BACKOFF)
        .with_jitter()
        .without_max_times()
        .build()
}

/// HTTP/2 PINGs the client sends on a silent connection, so a broker or a
/// network path that went away is noticed and the watch reconnects (the
/// broker pings too, `grpc.keepalive_interval`).
const CLIENT_KEEPALIVE: Duration = Duration::from_secs(60);
/// How long a PING may go unanswered before the connection is dropped.
const CLIENT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `credential watch` until Ctrl-C / SIGTERM (then `Ok`), or a failure
/// retrying cannot fix.
pub async fn watch(
    args: &ClientArgs,
    name: String,
    output_file: Option<PathBuf>,
) -> Result<(), ClientError> {
    let output = args.output("credential watch")?;
    if let Some(path) = &output_file {
        check_output_file(path)?;
    }
    // Checks the flags (and credential files) before anything runs.
    endpoint(args)?;
    let follow = follow(args, &name, output, output_file.as_deref());
    tokio::select! {
        failed = follow => Err(failed),
        () = super::shutdown_signal() => Ok(()),
    }
}

/// The watch loop; returns only on a failure retrying cannot fix.
async fn follow(
    args: &ClientArgs,
    name: &str,
    output: Output,
    output_file: Option<&Path>,
) -> ClientError {
    let mut last: Option<i64> = None;
    let mut delays = backoff();
    loop {
        let (ended, received) = attempt(args, name, &mut last, output, output_file).await;
        if received {
            delays = backoff();
        }
        let (error, delay) = match ended {
            Ended::Fail(e) => return e,
            // The jitter comes on top of the schedule: keep within the cap,
            // to the millisecond.
            Ended::Retry(e) => (
                e,
                Duration::from_millis(
                    delays
                        .next()
                        .unwrap_or(MAX_BACKOFF)
                        .min(MAX_BACKOFF)
                        .as_millis() as u64,
                ),
            ),
            Ended::Reauthenticate(e) => (e, Duration::ZERO),
        };
        let resume = last.map_or_else(
            || "from the current version".to_owned(),
            |v| format!("after version {v}"),
        );
        eprintln!(
            "watch of {name} interrupted: {error}; reconnecting in {} ({resume})",
            humantime::format_duration(delay)
        );
        tokio::time::sleep(delay).await;
    }
}

/// One connection and stream: prints (and writes) each version received,
/// advancing `last`. Returns how it ended and whether any version came.
async fn attempt(
    args: &ClientArgs,
    name: &str,
    last: &mut Option<i64>,
    output: Output,
    output_file: Option<&Path>,
) -> (Ended, bool) {
    let mut received = false;
    let channel = match connect(args).await {
        Ok(c) => c,
        Err(e) => return (classify(e, false), received),
    };
    let mut client = CredentialServiceClient::new(channel);
    let req = pb::WatchCredentialRequest {
        name: name.to_owned(),
        after_version: last.unwrap_or(0),
    };
    let req = match request(req, args) {
        Ok(r) => r,
        Err(e) => return (Ended::Fail(e), received),
    };
    let mut stream = match answer(client.watch_credential(req).await) {
        Ok(s) => s,
        Err(e) => return (classify(e, false), received),
    };
    loop {
        let message = match stream.message().await {
            Ok(Some(m)) => m,
            // The broker ended the stream without an error (it is shutting
            // down): reconnect.
            Ok(None) => {
                return (
                    Ended::Retry(ClientError::Lost("the broker ended the stream".into())),
                    received,
                )
            }
            Err(status) => {
                return (
                    classify(answer::<()>(Err(status)).unwrap_err(), true),
                    received,
                )
            }
        };
        if last.is_some_and(|l| message.version <= l) {
            continue;
        }
        if let Some(path) = output_file {
            if let Err(e) = write_atomically(path, &message.token) {
                return (
                    Ended::Fail(ClientError::Usage(format!(
                        "cannot write --output-file {}: {e}",
                        path.display()
                    ))),
                    received,
                );
            }
        }
        *last = Some(message.version);
        received = true;
        let line = watch_line(&message, output, output_file);
        let mut stdout = std::io::stdout().lock();
        // A reader that went away does not stop the watch (the file is
        // what matters).
        let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
    }
}

/// A channel for a long stream: as [`super::grpc::channel`], with HTTP/2
/// keepalive PINGs from this side too.
async fn connect(args: &ClientArgs) -> Result<Channel, ClientError> {
    let endpoint = endpoint(args)?
        .http2_keep_alive_interval(CLIENT_KEEPALIVE)
        .keep_alive_timeout(CLIENT_KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    let addr = endpoint.uri().to_string();
    endpoint
        .connect()
        .await
        .map_err(|e| connect_error(&addr, &e))
}

/// Refuses an `--output-file` that cannot be written before the watch
/// starts: its directory must exist, and it must not be a directory.
fn check_output_file(path: &Path) -> Result<(), ClientError> {
    if path.is_dir() {
        return Err(ClientError::Usage(format!(
            "--output-file {} is a directory; name a file",
            path.display()
        )));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(ClientError::Usage(format!(
            "--output-file {}: directory {} does not exist",
            path.display(),
            dir.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version() -> pb::CredentialVersion {
        pb::CredentialVersion {
            name: "credentials/mirror-feed/versions/3".into(),
            credential: "credentials/mirror-feed".into(),
            version: 3,
            state: pb::credential_version::State::Current as i32,
            organization: "fabrikam".into(),
            scopes: vec!["vso.packaging".into()],
            valid_from: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            token: "pat-secret-value".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_bare_name_is_taken_as_a_credential_name() {
        assert_eq!(credential_name("x"), "credentials/x");
        assert_eq!(credential_name("credentials/x"), "credentials/x");
    }

    #[test]
    fn watch_lines_never_carry_the_token() {
        let v = version();
        for output in [Output::Text, Output::Json] {
            let line = watch_line(&v, output, Some(Path::new("/run/pat")));
            assert!(!line.contains("pat-secret-value"), "{line}");
            assert!(line.contains("/run/pat") && line.contains('3'), "{line}");
            assert!(!line.contains('\n'));
        }
        let json: Value = serde_json::from_str(&watch_line(&v, Output::Json, None)).unwrap();
        assert_eq!(json["version"], "3");
        assert_eq!(json["validFrom"], "2023-11-14T22:13:20Z");
        assert!(json.get("token").is_none());
    }

    #[test]
    fn get_shows_the_token_in_text_and_json() {
        let v = version();
        assert!(version_text(&v).ends_with("token            pat-secret-value"));
        assert_eq!(version_json(&v)["token"], "pat-secret-value");
        assert_eq!(version_json(&v)["state"], "CURRENT");
    }

    #[test]
    fn refusals_end_the_watch_and_dropped_streams_reconnect() {
        let rpc = |c| ClientError::Rpc(tonic::Status::new(c, "x"));
        assert!(matches!(
            classify(rpc(Code::Unavailable), true),
            Ended::Retry(_)
        ));
        assert!(matches!(
            classify(rpc(Code::Unknown), true),
            Ended::Retry(_)
        ));
        assert!(matches!(
            classify(ClientError::Lost("reset".into()), true),
            Ended::Retry(_)
        ));
        assert!(matches!(
            classify(rpc(Code::Unauthenticated), true),
            Ended::Reauthenticate(_)
        ));
        assert!(matches!(
            classify(rpc(Code::Unauthenticated), false),
            Ended::Fail(_)
        ));
        for c in [
            Code::PermissionDenied,
            Code::NotFound,
            Code::InvalidArgument,
        ] {
            assert!(matches!(classify(rpc(c), true), Ended::Fail(_)), "{c:?}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_token_file_is_replaced_whole_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pat");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_atomically(&path, "new-token").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new-token");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file is left behind");
        assert!(check_output_file(dir.path()).is_err());
        assert!(check_output_file(&dir.path().join("nope/pat")).is_err());
        assert!(check_output_file(&path).is_ok());
    }
}
