//! Managed credentials through the surface a user sees (issue 17): the
//! real broker against the emulator, `CredentialService` and the credential
//! calls of `AdminService` with the generated tonic client over a real
//! socket, and the compiled `token-broker credential …` / `admin …`
//! commands. Tokens are checked on the emulator's data plane.

mod common;

use std::path::Path;
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};
use tonic_types::StatusExt as _;

use common::broker::{
    spawn_broker, spawn_broker_with_config_and_policy, spawn_broker_with_policy, BrokerSpec,
    TestBroker,
};
use common::db::sqlite_url;
use common::emulator::Emu;
use common::k8s::{claims, FakeIssuer, SigningKey};
use common::wait::poll;
use token_broker::auth::kubernetes::KubernetesAuthConfig;
use token_broker::policy::{PolicyHandle, ReloadTrigger};
use token_broker::proto::v1 as pb;
use token_broker::proto::v1::admin_service_client::AdminServiceClient;
use token_broker::proto::v1::credential_service_client::CredentialServiceClient;

const BIN: &str = env!("CARGO_BIN_EXE_token-broker");
/// The data-plane resource `vso.packaging` opens.
const FEEDS: &str = "packaging/feeds";
const NAME: &str = "credentials/mirror-feed";
const SYNC: &str = "k8s:system:serviceaccount:mirror:sync";

/// `apikey:ops` is the admin; `apikey:ci` may lease; `mirror-feed` is read
/// by `readers` and rotates every hour with ten minutes of overlap (so
/// only the tests' own rotations make versions).
fn policy(readers: &[&str]) -> String {
    let readers = readers
        .iter()
        .map(|r| format!("{r:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"
admins: ["apikey:ops"]
rules:
  - name: ci
    identities: ["apikey:ci"]
    organizations: ["fabrikam"]
    scopes: ["vso.code_write", "vso.packaging"]
    default_ttl: 1h
    max_ttl: 8h
credentials:
  - name: mirror-feed
    organization: fabrikam
    scopes: ["vso.packaging"]
    rotation_period: 1h
    overlap: 10m
    readers: [{readers}]
"#
    )
}

/// A broker on SQLite with keys `ci`, `mirror` and `ops`.
fn spec(dir: &tempfile::TempDir, emu: &Emu, readers: &[&str]) -> BrokerSpec {
    BrokerSpec::new(sqlite_url(dir), emu.url(""))
        .with_policy(&policy(readers))
        .with_key("mirror")
        .with_key("ops")
}

/// `msg` with `authorization: Bearer <key>`.
fn authed<T>(msg: T, key: &str) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    req
}

fn reason(status: &Status) -> String {
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

async fn credentials(broker: &TestBroker) -> CredentialServiceClient<Channel> {
    CredentialServiceClient::new(broker.channel().await)
}

async fn admin(broker: &TestBroker) -> AdminServiceClient<Channel> {
    AdminServiceClient::new(broker.channel().await)
}

/// The current version through GetCredential, once the first is minted.
async fn current(broker: &TestBroker, key: &str) -> pb::CredentialVersion {
    let mut client = credentials(broker).await;
    poll("a CURRENT version", Duration::from_secs(60), || {
        let mut client = client.clone();
        async move {
            let req = pb::GetCredentialRequest { name: NAME.into() };
            client
                .get_credential(authed(req, key))
                .await
                .map(|r| r.into_inner())
                .map_err(|s| format!("{:?} {}", s.code(), reason(&s)))
        }
    })
    .await;
    let req = pb::GetCredentialRequest { name: NAME.into() };
    client
        .get_credential(authed(req, key))
        .await
        .unwrap()
        .into_inner()
}

async fn rotate(broker: &TestBroker, ops: &str, now: bool) -> pb::CredentialVersion {
    use pb::rotate_credential_request::RevokePrevious as P;
    let req = pb::RotateCredentialRequest {
        name: NAME.into(),
        revoke_previous: if now { P::Now } else { P::AfterOverlap } as i32,
    };
    admin(broker)
        .await
        .rotate_credential(authed(req, ops))
        .await
        .expect("rotate")
        .into_inner()
}

async fn watch(
    broker: &TestBroker,
    key: &str,
    after_version: i64,
) -> Result<Streaming<pb::CredentialVersion>, Status> {
    let req = pb::WatchCredentialRequest {
        name: NAME.into(),
        after_version,
    };
    credentials(broker)
        .await
        .watch_credential(authed(req, key))
        .await
        .map(|r| r.into_inner())
}

/// The next message of `stream` (a version, or the status that ended it).
async fn next(
    stream: &mut Streaming<pb::CredentialVersion>,
) -> Result<pb::CredentialVersion, Status> {
    tokio::time::timeout(Duration::from_secs(60), stream.message())
        .await
        .expect("the stream answered")
        .map(|m| m.expect("the stream goes on"))
}

/// The audit rows of `action`.
async fn audit_rows(broker: &TestBroker, ops: &str, action: &str) -> Vec<pb::AuditEvent> {
    let req = pb::ListAuditEventsRequest {
        filter: format!("action = {action:?}"),
        page_size: 1000,
        ..Default::default()
    };
    admin(broker)
        .await
        .list_audit_events(authed(req, ops))
        .await
        .unwrap()
        .into_inner()
        .audit_events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_gets_the_current_token_and_anyone_else_is_refused() {
    let emu = Emu::start_default().await;
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(&dir, &emu, &["apikey:mirror"]);
    let broker = spawn_broker(&spec).await;
    let mirror = spec.key("mirror");
    let v = current(&broker, mirror.expose_secret()).await;
    assert_eq!(v.name, "credentials/mirror-feed/versions/1");
    assert_eq!(v.credential, NAME);
    assert_eq!(
        (v.version, v.state()),
        (1, pb::credential_version::State::Current)
    );
    assert_eq!(
        (v.organization.as_str(), v.scopes.clone()),
        ("fabrikam", vec!["vso.packaging".to_owned()])
    );
    let (from, rotate, expire) = (
        v.valid_from.unwrap().seconds,
        v.rotate_time.unwrap().seconds,
        v.expire_time.unwrap().seconds,
    );
    assert_eq!(
        rotate - from,
        3600,
        "rotate_time is valid_from + rotation_period"
    );
    assert!(expire >= rotate + 600, "expire_time covers the overlap");
    assert!(!v.authorization_id.is_empty());
    assert_eq!(emu.use_pat("fabrikam", FEEDS, &v.token).await, 200);

    // Not a reader (a lease holder, the admin), or no such credential:
    // PERMISSION_DENIED alike; a malformed name names the field.
    let mut client = credentials(&broker).await;
    for (key, name) in [("ci", NAME), ("ops", NAME), ("mirror", "credentials/nope")] {
        let req = pb::GetCredentialRequest { name: name.into() };
        let s = client
            .get_credential(authed(req, spec.key(key).expose_secret()))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::PermissionDenied, "{key} {name}");
        assert_eq!(reason(&s), "CREDENTIAL_READER_REQUIRED");
        let s = watch(&broker, spec.key(key).expose_secret(), 0).await;
        if name == NAME {
            assert_eq!(s.unwrap_err().code(), Code::PermissionDenied, "{key} watch");
        }
    }
    let req = pb::GetCredentialRequest {
        name: "mirror-feed".into(),
    };
    let s = client
        .get_credential(authed(req, mirror.expose_secret()))
        .await
        .unwrap_err();
    assert_eq!(
        (s.code(), reason(&s).as_str()),
        (Code::InvalidArgument, "NAME_INVALID")
    );
    let req = pb::GetCredentialRequest { name: NAME.into() };
    let s = client.get_credential(req).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);

    // Every read is audited with the version, never the token; refusals too.
    let ops = spec.key("ops");
    let rows = audit_rows(&broker, ops.expose_secret(), "credential.get").await;
    let allowed: Vec<_> = rows
        .iter()
        .filter(|r| r.outcome() == pb::audit_event::Outcome::Allowed)
        .collect();
    assert!(!allowed.is_empty());
    for row in &allowed {
        assert_eq!(row.identity, "apikey:mirror");
        assert_eq!(row.policy_rule, "credential:mirror-feed");
        assert_eq!(row.caller_detail, "version=1");
        assert_eq!(row.organization, "fabrikam");
    }
    let denied: Vec<_> = rows
        .iter()
        .filter(|r| r.outcome() == pb::audit_event::Outcome::Denied)
        .map(|r| {
            (
                r.identity.as_str(),
                r.policy_rule.as_str(),
                r.reason.as_str(),
            )
        })
        .collect();
    for (who, what) in [
        ("apikey:ci", "credential:mirror-feed"),
        ("apikey:mirror", "credential:nope"),
    ] {
        assert!(
            denied.contains(&(who, what, "CREDENTIAL_READER_REQUIRED")),
            "{denied:?}"
        );
    }
    for row in rows {
        assert!(!format!("{row:?}").contains(&v.token));
    }

    // Only an admin rotates or lists, and is audited.
    let mut a = admin(&broker).await;
    let req = pb::ListCredentialsRequest::default();
    let s = a
        .list_credentials(authed(req, mirror.expose_secret()))
        .await
        .unwrap_err();
    assert_eq!(
        (s.code(), reason(&s).as_str()),
        (Code::PermissionDenied, "ADMIN_REQUIRED")
    );
    let req = pb::RotateCredentialRequest {
        name: NAME.into(),
        revoke_previous: 0,
    };
    let s = a
        .rotate_credential(authed(req, mirror.expose_secret()))
        .await
        .unwrap_err();
    assert_eq!(
        (s.code(), reason(&s).as_str()),
        (Code::PermissionDenied, "ADMIN_REQUIRED")
    );
    let req = pb::RotateCredentialRequest {
        name: "credentials/nope".into(),
        revoke_previous: 0,
    };
    let s = a
        .rotate_credential(authed(req, ops.expose_secret()))
        .await
        .unwrap_err();
    assert_eq!(
        (s.code(), reason(&s).as_str()),
        (Code::NotFound, "CREDENTIAL_NOT_FOUND")
    );
    let rows = audit_rows(&broker, ops.expose_secret(), "credential.rotate").await;
    let outcomes: Vec<_> = rows
        .iter()
        .map(|r| (r.identity.as_str(), r.outcome()))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("apikey:mirror", pb::audit_event::Outcome::Denied),
            ("apikey:ops", pb::audit_event::Outcome::Error)
        ]
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_gets_every_version_in_order_and_resumes_after_the_last_one_received() {
    let emu = Emu::start_default().await;
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(&dir, &emu, &["apikey:mirror"]);
    let broker = spawn_broker(&spec).await;
    let mirror = spec.key("mirror");
    let ops = spec.key("ops");
    current(&broker, mirror.expose_secret()).await;

    let mut stream = watch(&broker, mirror.expose_secret(), 0).await.unwrap();
    let first = next(&mut stream).await.unwrap();
    assert_eq!(first.version, 1, "the current version at once");
    assert_eq!(rotate(&broker, ops.expose_secret(), false).await.version, 2);
    assert_eq!(rotate(&broker, ops.expose_secret(), false).await.version, 3);
    let mut tokens = vec![first.token.clone()];
    for want in [2, 3] {
        let v = next(&mut stream).await.unwrap();
        assert_eq!(v.version, want);
        assert_eq!(v.state(), pb::credential_version::State::Current);
        assert_eq!(emu.use_pat("fabrikam", FEEDS, &v.token).await, 200);
        tokens.push(v.token);
    }
    drop(stream);

    // Two versions minted while disconnected: a reconnect after version 3
    // gets 4 then 5, nothing before.
    rotate(&broker, ops.expose_secret(), false).await;
    rotate(&broker, ops.expose_secret(), false).await;
    let mut stream = watch(&broker, mirror.expose_secret(), 3).await.unwrap();
    let four = next(&mut stream).await.unwrap();
    let five = next(&mut stream).await.unwrap();
    assert_eq!((four.version, five.version), (4, 5));
    assert_eq!(
        four.state(),
        pb::credential_version::State::Previous,
        "still in its overlap"
    );
    assert_eq!(emu.use_pat("fabrikam", FEEDS, &four.token).await, 200);
    // Already up to date: nothing until a new version exists.
    let mut idle = watch(&broker, mirror.expose_secret(), 5).await.unwrap();
    assert_eq!(rotate(&broker, ops.expose_secret(), false).await.version, 6);
    assert_eq!(next(&mut idle).await.unwrap().version, 6);
    assert_eq!(next(&mut stream).await.unwrap().version, 6);
    // A negative after_version is the caller's mistake.
    let s = watch(&broker, mirror.expose_secret(), -1)
        .await
        .unwrap_err();
    assert_eq!(
        (s.code(), reason(&s).as_str()),
        (Code::InvalidArgument, "AFTER_VERSION_INVALID")
    );

    // One audit row per version sent, with its number.
    let rows = audit_rows(&broker, ops.expose_secret(), "credential.watch").await;
    let sent: Vec<&str> = rows.iter().map(|r| r.caller_detail.as_str()).collect();
    for v in 1..=6 {
        assert!(sent.contains(&format!("version={v}").as_str()), "{sent:?}");
    }
    assert!(rows
        .iter()
        .all(|r| r.policy_rule == "credential:mirror-feed"));
    for row in &rows {
        for token in &tokens {
            assert!(!format!("{row:?}").contains(token.as_str()));
        }
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_removed_from_the_policy_loses_its_stream_with_permission_denied() {
    let emu = Emu::start_default().await;
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(&dir, &emu, &["apikey:mirror", "apikey:ci"]);
    let file = dir.path().join("policy.yaml");
    std::fs::write(&file, &spec.policy_yaml).unwrap();
    let handle = PolicyHandle::from_file(&file).unwrap();
    let broker = spawn_broker_with_policy(&spec, handle.clone()).await;
    let mirror = spec.key("mirror");
    let ci = spec.key("ci");
    current(&broker, mirror.expose_secret()).await;
    let mut removed = watch(&broker, mirror.expose_secret(), 0).await.unwrap();
    let mut kept = watch(&broker, ci.expose_secret(), 0).await.unwrap();
    assert_eq!(next(&mut removed).await.unwrap().version, 1);
    assert_eq!(next(&mut kept).await.unwrap().version, 1);

    // The reload alone ends the removed reader's stream: no version needed.
    std::fs::write(&file, policy(&["apikey:ci"])).unwrap();
    assert!(handle
        .reload(ReloadTrigger::Signal)
        .await
        .unwrap()
        .is_applied());
    let s = next(&mut removed).await.unwrap_err();
    assert_eq!(
        (s.code(), reason(&s).as_str()),
        (Code::PermissionDenied, "CREDENTIAL_READER_REQUIRED")
    );
    let s = watch(&broker, mirror.expose_secret(), 1).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);

    // The remaining reader goes on.
    let ops = spec.key("ops");
    rotate(&broker, ops.expose_secret(), false).await;
    assert_eq!(next(&mut kept).await.unwrap().version, 2);
    let rows = audit_rows(&broker, ops.expose_secret(), "credential.watch").await;
    assert!(rows.iter().any(|r| r.identity == "apikey:mirror"
        && r.outcome() == pb::audit_event::Outcome::Denied
        && r.policy_rule == "credential:mirror-feed"
        && r.reason == "CREDENTIAL_READER_REQUIRED"));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_service_account_token_expired_ends_unauthenticated() {
    let emu = Emu::start_default().await;
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::es256("k1");
    let issuer = FakeIssuer::start(&[&key]).await;
    let spec = spec(&dir, &emu, &[SYNC]).with_kubernetes(KubernetesAuthConfig {
        // Expiry exactly at `exp`, so the test need not wait out a leeway.
        leeway: Duration::ZERO,
        ..issuer.config()
    });
    let broker = spawn_broker(&spec).await;
    let mut c = claims(&issuer.issuer(), "mirror", "sync");
    let exp = common::k8s::now() + 3;
    c["exp"] = exp.into();
    let jwt = key.sign(&c);

    let mut stream = watch(&broker, &jwt, 0)
        .await
        .unwrap_or_else(|s| panic!("{s:?}"));
    // (The first version may still be minting: the stream waits for it.)
    assert_eq!(next(&mut stream).await.unwrap().version, 1);
    // Let the token expire; the next version is not sent to it.
    poll("the token expired", Duration::from_secs(30), || async {
        (common::k8s::now() > exp)
            .then_some(())
            .ok_or_else(|| "not yet".to_owned())
    })
    .await;
    let ops = spec.key("ops");
    rotate(&broker, ops.expose_secret(), false).await;
    let s = next(&mut stream).await.unwrap_err();
    assert_eq!(
        (s.code(), reason(&s).as_str()),
        (Code::Unauthenticated, "TOKEN_EXPIRED")
    );
    // A fresh token resumes after the last version received.
    let jwt = key.sign(&claims(&issuer.issuer(), "mirror", "sync"));
    let mut stream = watch(&broker, &jwt, 1).await.unwrap();
    assert_eq!(next(&mut stream).await.unwrap().version, 2);
    broker.stop().await;
}

/// What a run of the binary did.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// The binary with `args` against `broker` with API key `key`, nothing of
/// the test's own `TOKEN_BROKER_*` environment.
fn command(broker: &TestBroker, key: &SecretString, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(BIN);
    for (name, _) in std::env::vars() {
        if name.starts_with("TOKEN_BROKER_") {
            command.env_remove(name);
        }
    }
    command
        .env("TOKEN_BROKER_ADDR", &broker.url)
        .env("TOKEN_BROKER_API_KEY", key.expose_secret())
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    command
}

async fn cli(broker: &TestBroker, key: &SecretString, args: &[&str]) -> Run {
    let out = command(broker, key, args)
        .output()
        .await
        .expect("run token-broker");
    Run {
        code: out.status.code().expect("exited"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The next line the watcher prints.
async fn next_line(lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> String {
    tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("a line within a minute")
        .unwrap()
        .expect("the watch goes on")
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_watches_into_a_0600_file_rotates_now_and_lists_without_tokens() {
    let emu = Emu::start_default().await;
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(&dir, &emu, &["apikey:mirror"]);
    let broker = spawn_broker(&spec).await;
    let mirror = spec.key("mirror");
    let ops = spec.key("ops");
    let first = current(&broker, mirror.expose_secret()).await;

    // credential get: text and JSON with the token, or the token alone.
    let run = cli(&broker, &mirror, &["credential", "get", "mirror-feed"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout
            .contains(&format!("token            {}", first.token)),
        "{}",
        run.stdout
    );
    let run = cli(
        &broker,
        &mirror,
        &["credential", "get", NAME, "--output", "json"],
    )
    .await;
    let json: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(
        (json["version"].as_str(), json["token"].as_str()),
        (Some("1"), Some(first.token.as_str()))
    );
    let run = cli(
        &broker,
        &mirror,
        &["credential", "get", "mirror-feed", "--output", "token"],
    )
    .await;
    assert_eq!(run.stdout, format!("{}\n", first.token));
    let run = cli(
        &broker,
        &spec.key("ci"),
        &["credential", "get", "mirror-feed"],
    )
    .await;
    assert_eq!(run.code, 3, "not a reader: refused; {run:?}");
    assert!(
        run.stderr.contains("CREDENTIAL_READER_REQUIRED"),
        "{}",
        run.stderr
    );

    // credential watch --output-file: the token lands in a 0600 file; the
    // lines printed carry the version, never the token.
    let out = dir.path().join("run").join("pat");
    std::fs::create_dir(out.parent().unwrap()).unwrap();
    let mut watcher = command(
        &broker,
        &mirror,
        &[
            "credential",
            "watch",
            "mirror-feed",
            "--output-file",
            out.to_str().unwrap(),
        ],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(watcher.stdout.take().unwrap()).lines();
    let l1 = next_line(&mut lines).await;
    assert!(
        l1.starts_with("credentials/mirror-feed version 1 valid_from "),
        "{l1}"
    );
    assert!(
        l1.ends_with(&format!("written to {}", out.display())),
        "{l1}"
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), first.token);
    assert_eq!(mode(&out), 0o600);

    // A leak: rotate-credential --revoke-previous now. The previous token
    // fails on the data plane at once; the watcher writes the new one.
    let run = cli(
        &broker,
        &mirror,
        &[
            "admin",
            "rotate-credential",
            "mirror-feed",
            "--revoke-previous",
            "now",
        ],
    )
    .await;
    assert_eq!(run.code, 3, "only an admin rotates; {run:?}");
    let run = cli(
        &broker,
        &ops,
        &[
            "admin",
            "rotate-credential",
            "mirror-feed",
            "--revoke-previous",
            "now",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("credentials/mirror-feed/versions/2"),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains("token "), "{}", run.stdout);
    assert_eq!(emu.use_pat("fabrikam", FEEDS, &first.token).await, 401);
    let l2 = next_line(&mut lines).await;
    assert!(l2.starts_with("credentials/mirror-feed version 2 "), "{l2}");
    let second = std::fs::read_to_string(&out).unwrap();
    assert_ne!(second, first.token);
    assert_eq!(emu.use_pat("fabrikam", FEEDS, &second).await, 200);
    assert_eq!(mode(&out), 0o600);
    let entries: Vec<_> = std::fs::read_dir(out.parent().unwrap()).unwrap().collect();
    assert_eq!(entries.len(), 1, "no temporary file left beside it");

    // list-credentials: every version with its state, never a token.
    let run = cli(&broker, &ops, &["admin", "list-credentials"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let rows: Vec<&str> = run.stdout.lines().collect();
    assert!(rows[0].starts_with("CREDENTIAL"), "{}", run.stdout);
    assert!(
        rows[1].starts_with("mirror-feed") && rows[1].contains(" 2 CURRENT "),
        "{}",
        run.stdout
    );
    assert!(rows[2].contains(" 1 REVOK"), "{}", run.stdout);
    let json = cli(
        &broker,
        &ops,
        &["admin", "list-credentials", "--output", "json"],
    )
    .await;
    let listed: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(listed["versions"].as_array().unwrap().len(), 2);
    for text in [&run.stdout, &run.stderr, &json.stdout, &json.stderr] {
        for token in [&first.token, &second] {
            assert!(
                !text.contains(token.as_str()),
                "a token was printed: {text}"
            );
        }
    }
    let run = cli(&broker, &mirror, &["admin", "list-credentials"]).await;
    assert_eq!(run.code, 3, "{run:?}");

    watcher.kill().await.unwrap();
    let mut err = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut watcher.stderr.take().unwrap(), &mut err)
        .await
        .unwrap();
    for token in [&first.token, &second] {
        assert!(!err.contains(token.as_str()), "{err}");
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_watch_survives_a_broker_restart_and_resumes_after_its_last_version() {
    let emu = Emu::start_default().await;
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(&dir, &emu, &["apikey:mirror"]);
    let broker = spawn_broker(&spec).await;
    let mirror = spec.key("mirror");
    let ops = spec.key("ops");
    current(&broker, mirror.expose_secret()).await;
    let mut watcher = command(&broker, &mirror, &["credential", "watch", "mirror-feed"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watcher.stdout.take().unwrap()).lines();
    let l1 = next_line(&mut lines).await;
    assert!(l1.starts_with("credentials/mirror-feed version 1 "), "{l1}");
    assert!(
        !l1.contains("written to"),
        "no file without --output-file: {l1}"
    );

    // The broker goes away (its open stream is ended, UNAVAILABLE) and
    // comes back on the same address and database; two versions are
    // minted meanwhile or after: the watch prints 2 then 3, nothing twice.
    let (addr, url) = (broker.addr, broker.url.clone());
    broker.stop().await;
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let policy = token_broker::policy::Policy::from_yaml(&spec.policy_yaml).unwrap();
    let broker = token_broker::server::Broker::start(spec.settings(), policy, listener)
        .await
        .unwrap();
    let mut admin = AdminServiceClient::connect(url).await.unwrap();
    for _ in 0..2 {
        let req = pb::RotateCredentialRequest {
            name: NAME.into(),
            revoke_previous: 0,
        };
        admin
            .rotate_credential(authed(req, ops.expose_secret()))
            .await
            .unwrap();
    }
    let l2 = next_line(&mut lines).await;
    let l3 = next_line(&mut lines).await;
    assert!(l2.starts_with("credentials/mirror-feed version 2 "), "{l2}");
    assert!(l3.starts_with("credentials/mirror-feed version 3 "), "{l3}");

    watcher.kill().await.unwrap();
    let mut err = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut watcher.stderr.take().unwrap(), &mut err)
        .await
        .unwrap();
    assert!(
        err.contains("reconnecting in") && err.contains("after version 1"),
        "{err}"
    );
    broker.stop().await.unwrap();
}

/// A TCP relay to `to` (plaintext HTTP/2) that counts the PING frames the
/// server initiates (type 6 without the ACK flag, RFC 9113 section 6.7).
async fn counting_relay(
    to: std::net::SocketAddr,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let back = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = back.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let server = tokio::net::TcpStream::connect(to).await.unwrap();
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = tokio::io::copy(&mut cr, &mut sw);
                let down = async {
                    let mut buf = [0u8; 4096];
                    // Server-to-client frames: 9-byte headers, then payloads.
                    let mut pending: Vec<u8> = Vec::new();
                    loop {
                        let n = tokio::io::AsyncReadExt::read(&mut sr, &mut buf).await?;
                        if n == 0 {
                            return Ok::<_, std::io::Error>(());
                        }
                        pending.extend_from_slice(&buf[..n]);
                        while pending.len() >= 9 {
                            let len = usize::from(pending[0]) << 16
                                | usize::from(pending[1]) << 8
                                | usize::from(pending[2]);
                            if pending.len() < 9 + len {
                                break;
                            }
                            if pending[3] == 6 && pending[4] & 1 == 0 {
                                counted.fetch_add(1, Ordering::SeqCst);
                            }
                            pending.drain(..9 + len);
                        }
                        tokio::io::AsyncWriteExt::write_all(&mut cw, &buf[..n]).await?;
                    }
                };
                let _ = tokio::join!(up, down);
            });
        }
    });
    (url, back)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_watch_stream_keeps_its_connection_busy_with_the_servers_pings() {
    use std::sync::atomic::Ordering;
    let emu = Emu::start_default().await;
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(&dir, &emu, &["apikey:mirror"]);
    let mut config = spec.config();
    config.grpc.keepalive_interval = Duration::from_secs(1);
    let broker = common::broker::spawn_broker_with_config(&spec, config).await;
    let mirror = spec.key("mirror");
    current(&broker, mirror.expose_secret()).await;

    let (url, pings) = counting_relay(broker.addr).await;
    let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
    let req = pb::WatchCredentialRequest {
        name: NAME.into(),
        after_version: 0,
    };
    let mut stream = CredentialServiceClient::new(channel)
        .watch_credential(authed(req, mirror.expose_secret()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut stream).await.unwrap().version, 1);
    let after_first = pings.load(Ordering::SeqCst);
    poll(
        "PINGs on the idle stream",
        Duration::from_secs(30),
        || async {
            let now = pings.load(Ordering::SeqCst);
            (now >= after_first + 2)
                .then_some(())
                .ok_or_else(|| format!("{now} PINGs from the server"))
        },
    )
    .await;
    // The stream is still open and gets the next version.
    rotate(&broker, spec.key("ops").expose_secret(), false).await;
    assert_eq!(next(&mut stream).await.unwrap().version, 2);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_now_warns_of_unconfirmed_revocations_and_revokes_a_removed_credential_at_once() {
    let emu = Emu::start_default().await;
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(&dir, &emu, &["apikey:mirror"]);
    let file = dir.path().join("policy.yaml");
    std::fs::write(&file, &spec.policy_yaml).unwrap();
    let handle = PolicyHandle::from_file(&file).unwrap();
    let broker = spawn_broker_with_policy(&spec, handle.clone()).await;
    let mirror = spec.key("mirror");
    let ops = spec.key("ops");
    let first = current(&broker, mirror.expose_secret()).await;
    let rotate_now = [
        "admin",
        "rotate-credential",
        "mirror-feed",
        "--revoke-previous",
        "now",
    ];

    // Azure DevOps does not confirm the revocation: the rotation succeeds
    // and says the previous token may still work.
    emu.set_faults(serde_json::json!([{"operation": "revoke", "status": 503}]))
        .await;
    let run = cli(&broker, &ops, &rotate_now).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("version 1 is "), "{run:?}");
    assert!(run.stderr.contains("did not confirm"), "{run:?}");
    assert!(!run.stderr.contains(&first.token));
    assert_eq!(emu.use_pat("fabrikam", FEEDS, &first.token).await, 200);
    emu.clear_faults().await;
    let second = current(&broker, mirror.expose_secret()).await;
    assert_eq!(second.version, 2);

    // The entry is removed from the policy (not retired for a day): NOW
    // still cuts its tokens off, minting nothing.
    let without = policy(&["apikey:mirror"]);
    let without = without.split("credentials:").next().unwrap().to_owned();
    std::fs::write(&file, without).unwrap();
    assert!(handle
        .reload(ReloadTrigger::Signal)
        .await
        .unwrap()
        .is_applied());
    let run = cli(&broker, &ops, &rotate_now).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(!run.stdout.contains("versions/3"), "{run:?}");
    assert_eq!(emu.use_pat("fabrikam", FEEDS, &second.token).await, 401);
    poll(
        "version 1 revoked by its retries",
        Duration::from_secs(60),
        || {
            let emu = &emu;
            let token = first.token.clone();
            async move {
                match emu.use_pat("fabrikam", FEEDS, &token).await {
                    401 => Ok(()),
                    other => Err(format!("data plane answers {other}")),
                }
            }
        },
    )
    .await;
    broker.stop().await;
}

/// The versions ListCredentials shows (as an admin), newest first.
async fn listed_versions(
    broker: &TestBroker,
    ops: &str,
) -> Vec<(i64, pb::credential_version::State)> {
    let req = pb::ListCredentialsRequest::default();
    admin(broker)
        .await
        .list_credentials(authed(req, ops))
        .await
        .unwrap()
        .into_inner()
        .versions
        .iter()
        .map(|v| (v.version, v.state()))
        .collect()
}

/// Retention (`leases.retention`, here its shortest, 1h) deletes closed
/// versions, REVOKED and FAILED, once they closed longer ago than that and
/// their PAT is past its validTo, in the same run as closed leases; the
/// credential's newest version stays even when closed, so when the entry
/// comes back the next version gets the next number (never a reused one),
/// a watcher resumes after it, and the audit trail keeps every mint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_closed_versions_but_the_newest_and_numbering_goes_on() {
    use pb::credential_version::State;
    let emu = Emu::start_default().await;
    let dir = tempfile::tempdir().unwrap();
    let mut spec = spec(&dir, &emu, &["apikey:mirror"]);
    spec.reaper_interval = Duration::from_secs(1);
    let file = dir.path().join("policy.yaml");
    std::fs::write(&file, &spec.policy_yaml).unwrap();
    let handle = PolicyHandle::from_file(&file).unwrap();
    let mut config = spec.config();
    config.leases.retention = Duration::from_secs(3600);
    let broker = spawn_broker_with_config_and_policy(&spec, config, handle.clone()).await;
    let mirror = spec.key("mirror");
    let ops = spec.key("ops");
    let (mirror, ops) = (mirror.expose_secret(), ops.expose_secret());

    // History: 1 and 2 REVOKED, 3 FAILED (upstream refused it), 4 the newest.
    assert_eq!(current(&broker, mirror).await.version, 1);
    assert_eq!(rotate(&broker, ops, true).await.version, 2);
    emu.set_faults(serde_json::json!([{ "operation": "create", "status": 400, "times": 1 }]))
        .await;
    let req = pb::RotateCredentialRequest {
        name: NAME.into(),
        revoke_previous: pb::rotate_credential_request::RevokePrevious::Now as i32,
    };
    assert!(admin(&broker)
        .await
        .rotate_credential(authed(req, ops))
        .await
        .is_err());
    assert_eq!(rotate(&broker, ops, true).await.version, 4);
    // The entry leaves the policy and is cut off at once: 4 is REVOKED too.
    std::fs::write(&file, "admins: [\"apikey:ops\"]\nrules: []\n").unwrap();
    assert!(handle
        .reload(ReloadTrigger::Signal)
        .await
        .unwrap()
        .is_applied());
    assert_eq!(rotate(&broker, ops, true).await.version, 4);
    assert_eq!(
        listed_versions(&broker, ops).await,
        [
            (4, State::Revoked),
            (3, State::Failed),
            (2, State::Revoked),
            (1, State::Revoked)
        ]
    );
    let mints = audit_rows(&broker, ops, "credential.mint").await.len();
    assert_eq!(mints, 4, "three mints and one failed mint");

    // As if every version had closed two hours ago and its PAT's validTo
    // (or, for the FAILED one, the validTo asked for) had passed two days
    // ago; and as if retention last ran two hours ago.
    let store = token_broker::store::open(&sqlite_url(&dir)).await.unwrap();
    let now = token_broker::domain::Timestamp::now();
    for v in store
        .list_credential_versions(Some("mirror-feed"))
        .await
        .unwrap()
    {
        let aged = token_broker::store::CredentialVersionRecord {
            update_time: now - chrono::Duration::hours(2),
            expire_time: now - chrono::Duration::days(2),
            ..v.clone()
        };
        assert!(store
            .update_credential_version(&aged, v.state, None)
            .await
            .unwrap());
    }
    poll("the retention job claimed", Duration::from_secs(30), || {
        let store = store.clone();
        async move {
            let claimed = store
                .claim_job(
                    "lease_retention",
                    now,
                    "test",
                    Duration::from_secs(60),
                    Duration::ZERO,
                )
                .await
                .map_err(|e| e.to_string())?;
            claimed.then_some(()).ok_or_else(|| "held".to_owned())
        }
    })
    .await;
    store
        .finish_job("lease_retention", "test", now - chrono::Duration::hours(2))
        .await
        .unwrap();

    // The broker's own retention run (every reaper_interval it checks its
    // turn) deletes 1, 2 and 3; 4, the newest, stays.
    poll("old versions deleted", Duration::from_secs(60), || async {
        match listed_versions(&broker, ops).await.as_slice() {
            [(4, State::Revoked)] => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let run = cli(&broker, &spec.key("ops"), &["admin", "list-credentials"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let rows: Vec<&str> = run.stdout.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{}", run.stdout);
    assert!(
        rows[0].starts_with("mirror-feed") && rows[0].contains(" 4 REVOKED "),
        "{}",
        run.stdout
    );
    assert_eq!(
        audit_rows(&broker, ops, "credential.mint").await.len(),
        mints,
        "audit rows are never deleted"
    );

    // The entry comes back: the next version is 5, a new PAT upstream;
    // a watcher that last got 4 resumes with 5.
    std::fs::write(&file, &spec.policy_yaml).unwrap();
    assert!(handle
        .reload(ReloadTrigger::Signal)
        .await
        .unwrap()
        .is_applied());
    let fifth = current(&broker, mirror).await;
    assert_eq!(fifth.version, 5);
    assert_eq!(emu.use_pat("fabrikam", FEEDS, &fifth.token).await, 200);
    let mut stream = watch(&broker, mirror, 4).await.unwrap();
    assert_eq!(next(&mut stream).await.unwrap().version, 5);
    assert_eq!(rotate(&broker, ops, false).await.version, 6);
    assert_eq!(next(&mut stream).await.unwrap().version, 6);
    assert_eq!(
        listed_versions(&broker, ops).await,
        [
            (6, State::Current),
            (5, State::Previous),
            (4, State::Revoked)
        ]
    );
    // Each display name was used once upstream.
    let mut names: Vec<String> = emu
        .pats()
        .await
        .iter()
        .filter_map(|p| p["displayName"].as_str().map(str::to_owned))
        .filter(|n| n.contains(":credential:mirror-feed:"))
        .collect();
    let all = names.len();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), all, "a display name reused: {names:?}");
    broker.stop().await;
}
