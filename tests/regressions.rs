//! What a new user found when trying to break the broker, each over real
//! sockets: the in-process broker (`serve`'s wiring) or the real binary,
//! the emulator on a socket, a SQLite store in a temporary directory.

mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use tonic::{Code, Request};
use tonic_types::StatusExt as _;
use uuid::Uuid;

use common::broker::{spawn_broker, BrokerSpec};
use common::db::sqlite_url;
use common::emulator::Emu;
use common::leases::eventually;
use token_broker::emulator::EmulatorConfig;
use token_broker::proto::v1 as pb;

/// The lease's PAT as `/_emulator/pats` shows it.
async fn pat_of(emu: &Emu, authorization_id: &str) -> serde_json::Value {
    emu.pats()
        .await
        .into_iter()
        .find(|p| p["authorizationId"] == authorization_id)
        .unwrap_or_else(|| panic!("no PAT {authorization_id} upstream"))
}

fn time(t: &prost_types::Timestamp) -> DateTime<Utc> {
    DateTime::from_timestamp(t.seconds, t.nanos as u32).unwrap()
}

fn parse_time(v: &serde_json::Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().expect("a time string"))
        .expect("RFC 3339")
        .with_timezone(&Utc)
}

fn create_request(request_id: &str) -> pb::CreateLeaseRequest {
    pb::CreateLeaseRequest {
        organization: "fabrikam".into(),
        scopes: vec!["vso.code".into()],
        ttl: Some(prost_types::Duration {
            seconds: 600,
            nanos: 0,
        }),
        request_id: request_id.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_whose_client_gave_up_still_finishes_and_its_retry_gets_the_same_lease_and_pat() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emu::start(EmulatorConfig::default()).await;
    let spec = BrokerSpec::new(sqlite_url(&dir), emu.running.url());
    let broker = spawn_broker(&spec).await;
    let mut client = broker.client(&spec.key("ci")).await;

    // Upstream mints the PAT, then takes 3 s to answer; the client waits 1 s.
    emu.set_faults(json!([{"operation": "create", "latencyMs": 3000,
        "latencyWhen": "after", "times": 1}]))
        .await;
    let request_id = Uuid::new_v4().to_string();
    let mut first = Request::new(create_request(&request_id));
    first.set_timeout(Duration::from_secs(1));
    let err = client.create_lease(first).await.unwrap_err();
    gave_up(&err);

    // The retry with the same request_id gets the first attempt's lease.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let retry = client
        .create_lease(create_request(&request_id))
        .await
        .expect("the retry is answered")
        .into_inner();
    assert_eq!(retry.state(), pb::lease::State::Active);
    let again = client
        .create_lease(create_request(&request_id))
        .await
        .expect("a second retry is answered")
        .into_inner();
    assert_eq!(again.name, retry.name);
    assert_eq!(again.token, retry.token);
    assert!(!retry.token.is_empty());

    let pats = emu.pats().await;
    assert_eq!(pats.len(), 1, "one PAT upstream: {pats:?}");
    assert_eq!(pats[0]["authorizationId"], retry.authorization_id.as_str());
    assert_eq!(
        emu.use_pat("fabrikam", "git/repositories", &retry.token)
            .await,
        200
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renew_whose_client_gave_up_still_records_the_pat_valid_to_it_moved() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emu::start(EmulatorConfig::default()).await;
    let spec = BrokerSpec::new(sqlite_url(&dir), emu.running.url());
    let skew = chrono::Duration::from_std(spec.valid_to_skew).unwrap();
    let broker = spawn_broker(&spec).await;
    let mut client = broker.client(&spec.key("ci")).await;
    let lease = client
        .create_lease(create_request(""))
        .await
        .unwrap()
        .into_inner();
    let before = time(lease.expire_time.as_ref().unwrap());

    emu.set_faults(json!([{"operation": "update", "latencyMs": 3000,
        "latencyWhen": "after", "times": 1}]))
        .await;
    let mut renew = Request::new(pb::RenewLeaseRequest {
        name: lease.name.clone(),
        increment: Some(prost_types::Duration {
            seconds: 7200,
            nanos: 0,
        }),
    });
    renew.set_timeout(Duration::from_secs(1));
    let err = client.renew_lease(renew).await.unwrap_err();
    gave_up(&err);

    // The PAT's validTo moved upstream; the lease follows it.
    let get = pb::GetLeaseRequest {
        name: lease.name.clone(),
    };
    let mut c = client.clone();
    eventually("the renewal is recorded", || {
        let mut c = c.clone();
        let get = get.clone();
        async move {
            let l = c.get_lease(get).await.unwrap().into_inner();
            time(l.expire_time.as_ref().unwrap()) > before
        }
    })
    .await;
    let renewed = c.get_lease(get).await.unwrap().into_inner();
    let valid_to = parse_time(&pat_of(&emu, &lease.authorization_id).await["validTo"]);
    let expire = time(renewed.expire_time.as_ref().unwrap());
    assert!(
        ((expire + skew) - valid_to).num_milliseconds().abs() <= 1000,
        "lease expires {expire}, PAT validTo {valid_to}"
    );
    assert_eq!(renewed.state(), pb::lease::State::Active);
    broker.stop().await;
}

/// The client's own deadline ended the call (tonic reports CANCELLED
/// "Timeout expired" when it enforces the deadline before the server does).
fn gave_up(err: &tonic::Status) {
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
}

/// The details of an INVALID_ARGUMENT status: (first violated field, reason).
fn violation(status: &tonic::Status) -> (String, String) {
    let field = status
        .get_details_bad_request()
        .and_then(|b| b.field_violations.first().map(|v| v.field.clone()))
        .unwrap_or_default();
    let reason = status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default();
    (field, reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_fields_are_refused_as_invalid_argument_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emu::start(EmulatorConfig::default()).await;
    let spec = BrokerSpec::new(sqlite_url(&dir), emu.running.url());
    let broker = spawn_broker(&spec).await;
    let mut client = broker.client(&spec.key("ci")).await;
    let huge = "a".repeat(9000);

    let creates = [
        (
            pb::CreateLeaseRequest {
                organization: huge.clone(),
                ..create_request("")
            },
            "organization",
        ),
        (
            pb::CreateLeaseRequest {
                scopes: vec![huge.clone()],
                ..create_request("")
            },
            "scopes",
        ),
        (create_request(&huge), "request_id"),
    ];
    for (req, field) in creates {
        let status = client.create_lease(req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert_eq!(violation(&status).0, field);
        assert!(status.message().len() < 1000, "{field}: message bounded");
    }

    let name = format!("leases/{huge}");
    let status = client
        .get_lease(pb::GetLeaseRequest { name: name.clone() })
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), violation(&status).0.as_str()),
        (Code::InvalidArgument, "name")
    );
    let status = client
        .renew_lease(pb::RenewLeaseRequest {
            name: name.clone(),
            increment: None,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), violation(&status).0.as_str()),
        (Code::InvalidArgument, "name")
    );
    let status = client
        .revoke_lease(pb::RevokeLeaseRequest { name })
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), violation(&status).0.as_str()),
        (Code::InvalidArgument, "name")
    );
    let status = client
        .list_leases(pb::ListLeasesRequest {
            filter: format!("organization = \"{huge}\""),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), violation(&status).0.as_str()),
        (Code::InvalidArgument, "filter")
    );
    assert!(emu.pats().await.is_empty(), "nothing reached upstream");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_second_ttls_and_non_canonical_request_ids_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emu::start(EmulatorConfig::default()).await;
    let spec = BrokerSpec::new(sqlite_url(&dir), emu.running.url());
    let broker = spawn_broker(&spec).await;
    let mut client = broker.client(&spec.key("ci")).await;
    let half_a_second = prost_types::Duration {
        seconds: 0,
        nanos: 500_000_000,
    };

    let status = client
        .create_lease(pb::CreateLeaseRequest {
            ttl: Some(half_a_second),
            ..create_request("")
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violation(&status).0, "ttl");
    assert!(
        status.message().contains("ttl: must be at least 1s"),
        "{}",
        status.message()
    );

    let id = Uuid::new_v4();
    for bad in [
        id.simple().to_string(),
        id.braced().to_string(),
        id.urn().to_string(),
        Uuid::nil().to_string(),
    ] {
        let status = client.create_lease(create_request(&bad)).await.unwrap_err();
        assert_eq!(
            (status.code(), violation(&status).0.as_str()),
            (Code::InvalidArgument, "request_id"),
            "{bad}"
        );
    }
    // Upper case is the same request id as lower case: one lease.
    let upper = client
        .create_lease(create_request(&id.to_string().to_uppercase()))
        .await
        .unwrap()
        .into_inner();
    let lower = client
        .create_lease(create_request(&id.to_string()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(upper.name, lower.name);

    let status = client
        .renew_lease(pb::RenewLeaseRequest {
            name: lower.name.clone(),
            increment: Some(half_a_second),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), violation(&status).0.as_str()),
        (Code::InvalidArgument, "increment")
    );
    assert!(status.message().contains("increment: must be at least 1s"));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upstream_credential_is_unavailable_and_tells_operators_to_re_seed_it() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emu::start(EmulatorConfig::default()).await;
    let mut spec = BrokerSpec::new(sqlite_url(&dir), emu.running.url());
    spec.refresh_token = "a-refresh-token-entra-never-issued".to_owned().into();
    let broker = spawn_broker(&spec).await;
    let mut client = broker.client(&spec.key("ci")).await;

    let status = client.create_lease(create_request("")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status.get_details_error_info().unwrap().reason,
        "UPSTREAM_AUTHENTICATION_FAILED"
    );
    assert!(status.message().contains("re-seed"), "{}", status.message());
    assert!(!status.message().contains("a-refresh-token"));
    broker.stop().await;
}

#[tokio::test]
async fn emulator_stats_list_every_operation_even_before_any_call() {
    let emu = Emu::start(EmulatorConfig::default()).await;
    let stats = emu.stats().await;
    let calls = stats["calls"].as_object().expect("calls is an object");
    let mut keys: Vec<&str> = calls.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "create",
            "dataplane",
            "get",
            "list",
            "revoke",
            "token",
            "update"
        ]
    );
    assert!(calls.values().all(|n| n == 0), "{stats}");
    assert_eq!(stats["deletes"], json!({}));

    // A call moves only its own counter.
    emu.use_pat("fabrikam", "git/repositories", "not-a-pat")
        .await;
    let stats = emu.stats().await;
    assert_eq!(stats["calls"]["dataplane"], 1);
    assert_eq!(stats["calls"]["create"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewing_a_lease_already_at_its_max_expire_time_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emu::start(EmulatorConfig::default()).await;
    let spec = BrokerSpec::new(sqlite_url(&dir), emu.running.url());
    let broker = spawn_broker(&spec).await;
    let mut client = broker.client(&spec.key("ci")).await;
    // The policy's max TTL is 8 h: this lease starts at its max_expire_time.
    let lease = client
        .create_lease(pb::CreateLeaseRequest {
            ttl: Some(prost_types::Duration {
                seconds: 8 * 3600,
                nanos: 0,
            }),
            ..create_request("")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lease.expire_time, lease.max_expire_time);

    let status = client
        .renew_lease(pb::RenewLeaseRequest {
            name: lease.name.clone(),
            increment: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(
        status.get_details_error_info().unwrap().reason,
        "LEASE_NOT_RENEWABLE"
    );
    assert!(
        status.message().contains("max_expire_time"),
        "{}",
        status.message()
    );
    assert!(!status.message().contains("state ACTIVE"));
    broker.stop().await;
}

const BIN: &str = env!("CARGO_BIN_EXE_token-broker");

/// The real binary in `dir`, with no `TOKEN_BROKER_*` or `RUST_LOG` from
/// the test's own environment.
fn broker_command(dir: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(BIN);
    cmd.current_dir(dir);
    for (k, _) in std::env::vars() {
        if k.starts_with("TOKEN_BROKER_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_takes_an_address_without_a_scheme_as_plain_http() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emu::start(EmulatorConfig::default()).await;
    let spec = BrokerSpec::new(sqlite_url(&dir), emu.running.url());
    let broker = spawn_broker(&spec).await;
    let key = secrecy::ExposeSecret::expose_secret(&spec.key("ci")).to_owned();
    let addr = broker.addr.to_string();
    assert!(!addr.contains("://"));

    let cwd = dir.path().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        broker_command(&cwd)
            .args(["lease", "create", "--organization", "fabrikam"])
            .args(["--scope", "vso.code", "--addr", &addr])
            .env("TOKEN_BROKER_API_KEY", key)
            .output()
            .expect("run token-broker lease create")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    // Text output is aligned `field   value` lines, as `--help` says.
    let state = stdout
        .lines()
        .find(|l| l.starts_with("state "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert_eq!(state.split_whitespace().nth(1), Some("ACTIVE"));
    assert_eq!(emu.pats().await.len(), 1);

    // The admin commands take the same bare address: this key is no admin,
    // so reaching the broker shows as ADMIN_REQUIRED, not a transport error.
    let cwd = dir.path().to_owned();
    let addr = broker.addr.to_string();
    let key = secrecy::ExposeSecret::expose_secret(&spec.key("ci")).to_owned();
    let out = tokio::task::spawn_blocking(move || {
        broker_command(&cwd)
            .args(["admin", "list", "--addr", &addr])
            .env("TOKEN_BROKER_API_KEY", key)
            .output()
            .expect("run token-broker admin list")
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("ADMIN_REQUIRED"), "stderr:\n{stderr}");
    broker.stop().await;
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_database_and_its_wal_files_are_readable_by_their_owner_only() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let emu = Emu::start(EmulatorConfig::default()).await;
    let spec = BrokerSpec::new(sqlite_url(&dir), emu.running.url());
    let broker = spawn_broker(&spec).await;
    let mut client = broker.client(&spec.key("ci")).await;
    // A lease makes sure the WAL files exist.
    client.create_lease(create_request("")).await.unwrap();

    for name in ["broker.db", "broker.db-wal", "broker.db-shm"] {
        let path = dir.path().join(name);
        let mode = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name} has mode {:o}", mode & 0o777);
    }
    broker.stop().await;
}

/// A `token-broker dev` process; killed if the test ends early.
struct Dev {
    child: std::process::Child,
    grpc: String,
    emulator: String,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Dev {
    /// Starts `dev` in `dir` on free ports with `key`; returns once it
    /// printed its addresses.
    async fn start(dir: &std::path::Path, key: &str) -> Dev {
        use std::io::BufRead as _;
        let mut child = broker_command(dir)
            .args(["dev", "--listen", "127.0.0.1:0"])
            .args(["--emulator-listen", "127.0.0.1:0"])
            .env("TOKEN_BROKER_DEV_API_KEY", key)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start token-broker dev");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let (mut grpc, mut emulator, mut tx) = (None, None, Some(tx));
            // Keep draining after the addresses: a closed pipe would fail dev.
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value = || line.split_whitespace().nth(1).map(str::to_owned);
                if line.trim_start().starts_with("gRPC:") {
                    grpc = value();
                }
                if line.trim_start().starts_with("emulator:") {
                    emulator = value();
                }
                if line.contains("API key:") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send((grpc.clone().unwrap(), emulator.clone().unwrap()));
                    }
                }
            }
        });
        let (grpc, emulator) = rx.await.expect("dev printed its addresses");
        Dev {
            child,
            grpc,
            emulator,
        }
    }

    async fn client(&self, key: &str) -> common::broker::Client {
        let channel = tonic::transport::Channel::from_shared(self.grpc.clone())
            .unwrap()
            .connect()
            .await
            .expect("connect to dev");
        common::broker::TestBroker::client_on(channel, Some(&format!("Bearer {key}")))
    }

    async fn use_token(&self, token: &str) -> u16 {
        reqwest::Client::new()
            .get(format!(
                "{}/fabrikam/_apis/git/repositories?api-version=7.1",
                self.emulator
            ))
            .basic_auth("", Some(token))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// SIGTERM, then waits for a clean exit.
    async fn stop(mut self) {
        let pid = self.child.id().to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(status.success());
        let child = &mut self.child;
        let exit = tokio::task::block_in_place(|| child.wait()).expect("wait");
        assert!(exit.success(), "dev stops cleanly: {exit:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_dev_still_owns_the_pats_it_minted_before() {
    let dir = tempfile::tempdir().unwrap();
    let key = "tbk_restart-dev-key-0123456789abcdef";

    let dev = Dev::start(dir.path(), key).await;
    let old = dev
        .client(key)
        .await
        .create_lease(create_request(""))
        .await
        .expect("lease before the restart")
        .into_inner();
    assert_eq!(dev.use_token(&old.token).await, 200);
    dev.stop().await;
    assert!(dir.path().join("token-broker-dev.emulator.json").exists());

    let dev = Dev::start(dir.path(), key).await;
    let mut client = dev.client(key).await;
    // The PAT minted before still works, and so does the broker's rotated
    // refresh token: a new lease is minted.
    assert_eq!(dev.use_token(&old.token).await, 200);
    let new = client
        .create_lease(create_request(""))
        .await
        .expect("lease after the restart")
        .into_inner();
    assert_eq!(dev.use_token(&new.token).await, 200);

    // Revoking the old lease revokes its PAT upstream.
    let revoked = client
        .revoke_lease(pb::RevokeLeaseRequest {
            name: old.name.clone(),
        })
        .await
        .expect("revoke the old lease")
        .into_inner();
    assert_eq!(revoked.state(), pb::lease::State::Revoked);
    assert_eq!(dev.use_token(&old.token).await, 401);
    assert_eq!(dev.use_token(&new.token).await, 200);
    dev.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emulator_with_a_state_file_remembers_pats_tokens_and_its_clock_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("emulator.json");
    let config = || EmulatorConfig {
        state_file: Some(state_file.clone()),
        ..EmulatorConfig::default()
    };

    let emu = Emu::start(config()).await;
    let grant: serde_json::Value = emu
        .refresh_grant(token_broker::emulator::DEFAULT_REFRESH_TOKEN)
        .await
        .json()
        .await
        .unwrap();
    let bearer = grant["access_token"].as_str().unwrap().to_owned();
    let rotated = grant["refresh_token"].as_str().unwrap().to_owned();
    let (kept_id, kept) = emu
        .create_pat(&bearer, "fabrikam", "kept", "vso.code", 7)
        .await;
    let (_, revoked) = emu
        .create_pat(&bearer, "fabrikam", "revoked", "vso.code", 7)
        .await;
    let revoked_id = emu.pats().await[1]["authorizationId"]
        .as_str()
        .unwrap()
        .to_owned();
    let resp = emu
        .http
        .delete(emu.pats_url(
            "fabrikam",
            &format!("authorizationId={revoked_id}&api-version=7.1-preview.1"),
        ))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    emu.advance_clock(60).await;
    let pats_before = emu.pats().await;
    drop(emu);

    // The file holds digests, never a secret.
    let text = std::fs::read_to_string(&state_file).expect("state file written");
    for secret in [&kept, &revoked, &bearer, &rotated] {
        assert!(!text.contains(secret.as_str()));
    }

    let emu = Emu::start(config()).await;
    assert_eq!(emu.pats().await, pats_before);
    assert_eq!(
        emu.use_pat("fabrikam", "git/repositories", &kept).await,
        200
    );
    assert_eq!(
        emu.use_pat("fabrikam", "git/repositories", &revoked).await,
        401
    );
    // The access token and the rotated refresh token it issued still work.
    let listed = emu
        .http
        .get(emu.pats_url(
            "fabrikam",
            &format!("authorizationId={kept_id}&api-version=7.1-preview.1"),
        ))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200);
    assert_eq!(emu.refresh_grant(&rotated).await.status(), 200);
    // And its clock is still 60 s ahead.
    let clock: serde_json::Value = emu
        .http
        .get(emu.url("/_emulator/clock"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ahead = parse_time(&clock["now"]) - Utc::now();
    assert!(ahead > chrono::Duration::seconds(30), "{ahead}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_goes_away_ends_cli_output_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emu::start(EmulatorConfig::default()).await;
    let spec = BrokerSpec::new(sqlite_url(&dir), emu.running.url());
    let broker = spawn_broker(&spec).await;
    let key = secrecy::ExposeSecret::expose_secret(&spec.key("ci")).to_owned();
    let addr = broker.addr.to_string();
    let cwd = dir.path().to_owned();
    // `token-broker lease list | head` where head has already exited: the
    // pipe's read end is closed before the command writes.
    let status = tokio::task::spawn_blocking(move || {
        let mut child = broker_command(&cwd)
            .args(["lease", "list", "--addr", &addr])
            .env("TOKEN_BROKER_API_KEY", key)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run token-broker lease list");
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("wait for token-broker");
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap();
    assert!(status.0.success(), "stderr:\n{}", status.1);
    assert!(!status.1.contains("panicked"), "stderr:\n{}", status.1);
    broker.stop().await;
}
