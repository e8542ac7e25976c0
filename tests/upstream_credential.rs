//! The broker's upstream credential as an operator meets it, with the real
//! binary: `token-broker upstream login` (device code, approved or declined
//! through the emulator's test endpoints), `upstream status`,
//! `upstream set-refresh-token`, a configured refresh token adopted once,
//! replicas sharing one rotating credential, and the keep-alive.

mod common;

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use secrecy::SecretString;
use serde_json::{json, Value};
use tonic::Code;
use tonic_types::StatusExt as _;

use common::broker::BrokerSpec;
use common::db::{sqlite_url, TestDatabase};
use common::emulator::Emu;
use common::process::{write_config, ServeProcess, BIN};
use common::wait::poll;
use token_broker::emulator::EmulatorConfig;
use token_broker::proto::v1 as pb;

/// The emulator's seeded refresh token (what `BrokerSpec` configures).
const SEEDED: &str = "emulator-default-refresh-token";

fn emulator_config() -> EmulatorConfig {
    EmulatorConfig {
        device_code_interval: Duration::from_secs(1),
        ..EmulatorConfig::default()
    }
}

fn request() -> pb::CreateLeaseRequest {
    pb::CreateLeaseRequest {
        organization: "fabrikam".into(),
        scopes: vec!["vso.code".into()],
        ..Default::default()
    }
}

/// `token-broker upstream status --output json` for `config`.
fn status(config: &Path) -> Value {
    let out = Command::new(BIN)
        .args(["upstream", "status", "--output", "json", "--config"])
        .arg(config)
        .output()
        .expect("run upstream status");
    assert!(
        out.status.success(),
        "upstream status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status is JSON")
}

/// `token-broker upstream set-refresh-token` with `stdin` as its input.
fn set_refresh_token(config: &Path, stdin: &str, extra: &[&str]) -> std::process::Output {
    let mut child = Command::new(BIN)
        .args(["upstream", "set-refresh-token", "--config"])
        .arg(config)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run set-refresh-token");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// A running `token-broker upstream login`, once it has printed its code.
struct Login {
    child: std::process::Child,
    user_code: String,
    stderr: String,
    rest: std::thread::JoinHandle<String>,
}

impl Login {
    /// Starts the login and reads stderr until Microsoft's message names
    /// the code.
    fn start(config: &Path) -> Login {
        let mut child = Command::new(BIN)
            .args(["upstream", "login", "--config"])
            .arg(config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run upstream login");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut stderr = String::new();
        let user_code = loop {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("login ended before printing a code:\n{stderr}"))
                .unwrap();
            stderr.push_str(&line);
            stderr.push('\n');
            if let Some(rest) = line.split("enter the code ").nth(1) {
                break rest.split_whitespace().next().unwrap().to_owned();
            }
        };
        // Keep draining stderr so the child never blocks on it.
        let rest =
            std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>().join("\n"));
        Login {
            child,
            user_code,
            stderr,
            rest,
        }
    }

    /// Waits for the exit: success, stdout and stderr.
    async fn finish(self) -> (bool, String, String) {
        let Login {
            child,
            mut stderr,
            rest,
            ..
        } = self;
        let (out, rest) = tokio::task::spawn_blocking(move || {
            (child.wait_with_output().unwrap(), rest.join().unwrap())
        })
        .await
        .unwrap();
        stderr.push_str(&rest);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr,
        )
    }
}

async fn control(emu: &Emu, path: &str, body: Value) -> u16 {
    reqwest::Client::new()
        .post(emu.url(path))
        .json(&body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn approve(emu: &Emu, user_code: &str, account: &str) {
    let status = control(
        emu,
        "/_emulator/device-codes/approve",
        json!({"userCode": user_code, "account": account}),
    )
    .await;
    assert_eq!(status, 200);
}

/// A sign-in approved as `account`; panics unless it stores a credential.
async fn login_as(emu: &Emu, config: &Path, account: &str) -> String {
    let login = Login::start(config);
    approve(emu, &login.user_code, account).await;
    let (ok, stdout, stderr) = login.finish().await;
    assert!(ok, "login failed: {stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("signed in as {account}")),
        "{stdout}"
    );
    stdout
}

fn assert_unavailable_auth(status: &tonic::Status) {
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status.get_details_error_info().unwrap().reason,
        "UPSTREAM_AUTHENTICATION_FAILED"
    );
    assert!(
        status.message().contains("token-broker upstream login"),
        "{}",
        status.message()
    );
}

/// Two replicas on one PostgreSQL database: each refresh is stored and is
/// what the other redeems next; once Entra refuses every refresh token,
/// both answer UNAVAILABLE and say FAILING, and a login heals both with no
/// restart, which a restart with the old configured token does not undo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_one_rotating_credential_and_a_login_heals_both_without_a_restart() {
    let emu = Emu::start(emulator_config()).await;
    let db = TestDatabase::create().await;
    let mut spec = BrokerSpec::new(db.url.clone(), emu.running.url());
    spec.admin_port = true;
    let mut a = ServeProcess::start(&spec, &[]).await;
    let config = a.config_path();

    // The configured token is adopted (version 1) and, never redeemed,
    // redeemed at once by A's keep-alive, which stores Entra's rotation.
    let s = poll("A's first refresh", Duration::from_secs(30), || async {
        let s = status(&config);
        if s["lastRefreshTime"].is_string() {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
    .await;
    assert_eq!(s["version"], 2, "{s}");
    assert_eq!(s["source"], "rotated");
    assert_eq!(s["state"], "OK");
    assert_eq!(s["account"], "emulated.user@fabrikam.example");

    // B redeems what A stored: the configured token is revoked now, and
    // B's start neither re-adopts it nor refreshes (A just did).
    let revoked = control(
        &emu,
        "/_emulator/refresh-tokens/revoke",
        json!({"refreshToken": SEEDED}),
    )
    .await;
    assert_eq!(revoked, 200);
    let b = ServeProcess::start(&spec, &[]).await;
    let mut client_b = b.client(&spec.key("ci")).await;
    client_b
        .create_lease(request())
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", b.log_tail()));
    assert_eq!(status(&config)["version"], 3);
    let mut client_a = a.client(&spec.key("ci")).await;
    client_a.create_lease(request()).await.unwrap();

    // Every refresh token revoked, every access token expired.
    assert_eq!(
        control(&emu, "/_emulator/refresh-tokens/revoke", json!({})).await,
        200
    );
    emu.advance_clock(2 * 3600).await;
    for client in [&mut client_a, &mut client_b] {
        let err = client.create_lease(request()).await.unwrap_err();
        assert_unavailable_auth(&err);
    }
    let s = status(&config);
    assert_eq!(s["state"], "FAILING", "{s}");
    let error = s["lastError"].as_str().unwrap();
    assert!(error.contains("invalid_grant (AADSTS50173)"), "{error}");
    for broker in [&a, &b] {
        assert_eq!(
            broker.metric("token_broker_upstream_credential_ok").await,
            0
        );
        let (code, body) = broker.readyz().await;
        assert_eq!(code, 200, "an upstream failure keeps the replica ready");
        assert!(body.contains("upstream credential: FAILING"), "{body}");
    }
    let leases_before = emu.pats().await.len();
    // Back to the brokers' time, so new PATs' validTo is in the future.
    emu.advance_clock(-2 * 3600).await;

    login_as(&emu, &config, "ops@contoso.com").await;
    for client in [&mut client_a, &mut client_b] {
        client
            .create_lease(request())
            .await
            .unwrap_or_else(|e| panic!("after login: {e:?}"));
    }
    assert_eq!(emu.pats().await.len(), leases_before + 2);
    let s = status(&config);
    assert_eq!(
        (&s["state"], &s["account"]),
        (&json!("OK"), &json!("ops@contoso.com")),
        "{s}"
    );
    for broker in [&a, &b] {
        assert_eq!(
            broker.metric("token_broker_upstream_credential_ok").await,
            1
        );
    }
    let version = s["version"].as_i64().unwrap();

    // A restart with the same (now revoked) configured token keeps the
    // login's credential.
    assert!(a.sigterm().await.success(), "{}", a.log_tail());
    let a = ServeProcess::start(&spec, &[]).await;
    assert_eq!(status(&config)["version"], version);
    a.client(&spec.key("ci"))
        .await
        .create_lease(request())
        .await
        .unwrap_or_else(|e| panic!("after restart: {e:?}\n{}", a.log_tail()));

    // Audited, with the account and never a token.
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let rows: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT action, caller_detail FROM audit_events WHERE action LIKE 'upstream.%' ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        rows.iter()
            .any(|(action, detail)| action == "upstream.login"
                && detail
                    .as_deref()
                    .unwrap_or("")
                    .contains("account=ops@contoso.com")),
        "{rows:?}"
    );
    assert!(
        rows.iter()
            .filter(|(action, _)| action == "upstream.adopt_configured")
            .count()
            == 1,
        "{rows:?}"
    );
}

/// A declined or expired sign-in stores nothing and says why; an approved
/// one (after a slow_down) stores a credential a broker then leases with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_declined_or_expired_stores_nothing_and_an_approved_one_serves() {
    let emu = Emu::start(emulator_config()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut spec = BrokerSpec::new(sqlite_url(&dir), emu.running.url());
    spec.refresh_token = SecretString::from(String::new());
    let config = write_config(&spec, dir.path());

    let login = Login::start(&config);
    assert_eq!(
        control(
            &emu,
            "/_emulator/device-codes/decline",
            json!({"userCode": login.user_code})
        )
        .await,
        200
    );
    let (ok, stdout, stderr) = login.finish().await;
    assert!(!ok, "a declined login fails: {stdout}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("declined"), "{stderr}");
    assert!(stderr.contains("nothing was stored"), "{stderr}");
    assert_eq!(status(&config)["state"], "MISSING");

    // Ctrl-C while waiting: nothing stored.
    let login = Login::start(&config);
    let interrupted = Command::new("kill")
        .args(["-INT", &login.child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let (ok, stdout, _) = login.finish().await;
    assert!(!ok, "an interrupted login fails: {stdout}");
    assert_eq!(status(&config)["state"], "MISSING");

    let login = Login::start(&config);
    emu.advance_clock(901).await;
    let (ok, _, stderr) = login.finish().await;
    assert!(!ok, "an expired code fails");
    assert!(stderr.contains("expired"), "{stderr}");
    assert_eq!(status(&config)["state"], "MISSING");

    // slow_down, then approval: still signs in.
    let login = Login::start(&config);
    assert_eq!(
        control(
            &emu,
            "/_emulator/device-codes/slow-down",
            json!({"userCode": login.user_code})
        )
        .await,
        200
    );
    approve(&emu, &login.user_code, "ops@contoso.com").await;
    let (ok, stdout, stderr) = login.finish().await;
    assert!(ok, "{stdout}\n{stderr}");
    assert!(!stdout.contains("0.AEmu") && !stderr.contains("0.AEmu"));
    let s = status(&config);
    assert_eq!(
        (&s["source"], &s["version"], &s["account"]),
        (&json!("login"), &json!(1), &json!("ops@contoso.com"))
    );

    let broker = ServeProcess::start(&spec, &[]).await;
    broker
        .client(&spec.key("ci"))
        .await
        .create_lease(request())
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", broker.log_tail()));
}

/// `set-refresh-token` takes the token from stdin (trailing CRLF and all),
/// checks it at Entra first, and refuses one Entra refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_refresh_token_reads_stdin_and_refuses_a_token_entra_refuses() {
    let emu = Emu::start(emulator_config()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut spec = BrokerSpec::new(sqlite_url(&dir), emu.running.url());
    spec.refresh_token = SecretString::from(String::new());
    let config = write_config(&spec, dir.path());

    let out = set_refresh_token(&config, "never-issued-by-entra\n", &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid_grant"), "{stderr}");
    assert!(!stderr.contains("never-issued"), "{stderr}");
    assert_eq!(status(&config)["state"], "MISSING");

    let out = set_refresh_token(&config, &format!("{SEEDED}\r\n"), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = status(&config);
    assert_eq!(
        (&s["source"], &s["version"], &s["state"]),
        (&json!("stdin"), &json!(1), &json!("OK"))
    );
    let broker = ServeProcess::start(&spec, &[]).await;
    broker
        .client(&spec.key("ci"))
        .await
        .create_lease(request())
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", broker.log_tail()));
    let text = Command::new(BIN)
        .args(["upstream", "status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("state             OK"), "{text}");
    assert!(!text.contains(SEEDED), "{text}");
}

/// With no lease at all, the keep-alive redeems the credential every
/// `upstream.keepalive_interval`, and the metrics show it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keep_alive_refreshes_an_idle_credential() {
    let emu = Emu::start(emulator_config()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut spec = BrokerSpec::new(sqlite_url(&dir), emu.running.url());
    spec.admin_port = true;
    let broker = ServeProcess::start(&spec, &[("upstream.keepalive_interval", "2s")]).await;
    let config = broker.config_path();
    let first = poll("a keep-alive refresh", Duration::from_secs(30), || async {
        let s = status(&config);
        s["lastRefreshTime"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| s.to_string())
    })
    .await;
    let later = poll(
        "a second keep-alive refresh",
        Duration::from_secs(30),
        || async {
            let s = status(&config);
            s["lastRefreshTime"]
                .as_str()
                .filter(|t| *t != first)
                .map(str::to_owned)
                .ok_or_else(|| s.to_string())
        },
    )
    .await;
    assert!(later > first);
    assert!(
        broker
            .metric("token_broker_upstream_last_refresh_timestamp_seconds")
            .await
            > 0
    );
    assert_eq!(
        broker.metric("token_broker_upstream_credential_ok").await,
        1
    );
}
