//! The gRPC edge over real sockets: health and reflection for stock tools
//! (no credentials needed), UNAUTHENTICATED for every LeaseService call
//! without a valid key, and the `serve` and `dev` binaries as a user runs
//! them.

mod common;

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use secrecy::SecretString;
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_types::StatusExt as _;

use common::broker::{spawn_broker, BrokerSpec, Client};
use common::db::{sqlite_url, TestDatabase};
use token_broker::emulator::{self, EmulatorConfig};
use token_broker::proto::v1 as pb;

const BIN: &str = env!("CARGO_BIN_EXE_token-broker");

async fn health(channel: Channel, service: &str) -> ServingStatus {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health check answers without credentials")
        .into_inner()
        .status()
}

async fn services_v1(channel: Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .expect("reflection v1 answers without credentials")
        .into_inner();
    match stream.next().await.unwrap().unwrap().message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

async fn services_v1alpha(channel: Channel) -> Vec<String> {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .expect("reflection v1alpha answers without credentials")
        .into_inner();
    match stream.next().await.unwrap().unwrap().message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

async fn lease_service_symbol_resolves_v1(channel: Channel) {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "tokenbroker.v1.LeaseService".into(),
        )),
    };
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    match stream.next().await.unwrap().unwrap().message_response {
        Some(MessageResponse::FileDescriptorResponse(files)) => {
            assert!(!files.file_descriptor_proto.is_empty())
        }
        other => panic!("symbol not resolved: {other:?}"),
    }
}

async fn stock_tools_see_a_serving_broker(store_url: String) {
    let emu = emulator::spawn(EmulatorConfig::default()).await.unwrap();
    let broker = spawn_broker(&BrokerSpec::new(store_url, emu.url())).await;
    let channel = broker.channel().await;

    assert_eq!(health(channel.clone(), "").await, ServingStatus::Serving);
    for service in [
        "tokenbroker.v1.LeaseService",
        "tokenbroker.v1.CredentialService",
        "tokenbroker.v1.AdminService",
    ] {
        assert_eq!(
            health(channel.clone(), service).await,
            ServingStatus::Serving,
            "{service}"
        );
    }
    for services in [
        services_v1(channel.clone()).await,
        services_v1alpha(channel.clone()).await,
    ] {
        for wanted in [
            "tokenbroker.v1.LeaseService",
            "tokenbroker.v1.CredentialService",
            "tokenbroker.v1.AdminService",
            "grpc.health.v1.Health",
        ] {
            assert!(
                services.iter().any(|s| s == wanted),
                "{wanted} missing from {services:?}"
            );
        }
    }
    lease_service_symbol_resolves_v1(channel).await;
    broker.stop().await;
}

#[tokio::test]
async fn health_and_reflection_answer_stock_tools_without_credentials_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    stock_tools_see_a_serving_broker(sqlite_url(&dir)).await;
}

#[tokio::test]
async fn health_and_reflection_answer_stock_tools_without_credentials_on_postgres() {
    let db = TestDatabase::create().await;
    stock_tools_see_a_serving_broker(db.url.clone()).await;
}

/// Calls every LeaseService RPC and returns each one's status.
async fn every_rpc(client: &mut Client) -> Vec<(&'static str, tonic::Status)> {
    let name = format!("leases/{}", uuid::Uuid::new_v4());
    vec![
        (
            "CreateLease",
            client
                .create_lease(pb::CreateLeaseRequest {
                    organization: "fabrikam".into(),
                    scopes: vec!["vso.code".into()],
                    ..Default::default()
                })
                .await
                .unwrap_err(),
        ),
        (
            "GetLease",
            client
                .get_lease(pb::GetLeaseRequest { name: name.clone() })
                .await
                .unwrap_err(),
        ),
        (
            "ListLeases",
            client
                .list_leases(pb::ListLeasesRequest::default())
                .await
                .unwrap_err(),
        ),
        (
            "RenewLease",
            client
                .renew_lease(pb::RenewLeaseRequest {
                    name: name.clone(),
                    increment: None,
                })
                .await
                .unwrap_err(),
        ),
        (
            "RevokeLease",
            client
                .revoke_lease(pb::RevokeLeaseRequest { name })
                .await
                .unwrap_err(),
        ),
    ]
}

fn assert_unauthenticated(results: Vec<(&str, tonic::Status)>, secret: Option<&str>) {
    for (rpc, status) in results {
        assert_eq!(status.code(), Code::Unauthenticated, "{rpc}: {status:?}");
        let info = status
            .get_details_error_info()
            .unwrap_or_else(|| panic!("{rpc}: no ErrorInfo"));
        assert_eq!(info.reason, "UNAUTHENTICATED", "{rpc}");
        assert_eq!(info.domain, "tokenbroker", "{rpc}");
        if let Some(secret) = secret {
            assert!(!status.message().contains(secret), "{rpc} echoed the key");
        }
    }
}

#[tokio::test]
async fn every_lease_call_without_a_key_or_with_an_unknown_key_is_unauthenticated() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator::spawn(EmulatorConfig::default()).await.unwrap();
    let broker = spawn_broker(&BrokerSpec::new(sqlite_url(&dir), emu.url())).await;

    assert_unauthenticated(every_rpc(&mut broker.anonymous_client().await).await, None);

    let unknown = "tbk_this-key-was-never-configured-anywhere";
    let mut client = broker.client(&SecretString::from(unknown)).await;
    assert_unauthenticated(every_rpc(&mut client).await, Some(unknown));

    let mut client = broker.client_with_header("Basic Og==").await;
    assert_unauthenticated(every_rpc(&mut client).await, None);

    // Nothing reached the upstream: no PAT was minted.
    assert!(emu_pats(&emu.url()).await.is_empty());
    broker.stop().await;
}

#[tokio::test]
async fn a_known_key_gets_past_authentication_and_bad_input_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator::spawn(EmulatorConfig::default()).await.unwrap();
    let spec = BrokerSpec::new(sqlite_url(&dir), emu.url());
    let broker = spawn_broker(&spec).await;
    let mut client = broker.client(&spec.key("ci")).await;

    let cases: Vec<(pb::CreateLeaseRequest, &str)> = vec![
        (
            pb::CreateLeaseRequest {
                organization: String::new(),
                scopes: vec!["vso.code".into()],
                ..Default::default()
            },
            "organization",
        ),
        (
            pb::CreateLeaseRequest {
                organization: "fabrikam".into(),
                scopes: vec!["vso.unknown".into()],
                ..Default::default()
            },
            "scopes",
        ),
        (
            pb::CreateLeaseRequest {
                organization: "fabrikam".into(),
                scopes: vec!["vso.code".into()],
                ttl: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 0,
                }),
                ..Default::default()
            },
            "ttl",
        ),
        (
            pb::CreateLeaseRequest {
                organization: "fabrikam".into(),
                scopes: vec!["vso.code".into()],
                ttl: Some(prost_types::Duration {
                    seconds: 366 * 24 * 3600,
                    nanos: 0,
                }),
                ..Default::default()
            },
            "ttl",
        ),
        (
            pb::CreateLeaseRequest {
                organization: "fabrikam".into(),
                scopes: vec!["vso.code".into()],
                request_id: "not-a-uuid".into(),
                ..Default::default()
            },
            "request_id",
        ),
    ];
    for (req, field) in cases {
        let status = client.create_lease(req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        let bad = status.get_details_bad_request().expect("BadRequest");
        assert_eq!(bad.field_violations[0].field, field);
        assert_eq!(
            status.get_details_error_info().unwrap().domain,
            "tokenbroker"
        );
    }
    let status = client
        .get_lease(pb::GetLeaseRequest {
            name: "leases/nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.get_details_bad_request().unwrap().field_violations[0].field,
        "name"
    );
    let status = client
        .list_leases(pb::ListLeasesRequest {
            filter: "holder = \"someone\"".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.get_details_bad_request().unwrap().field_violations[0].field,
        "filter"
    );
    let status = client
        .list_leases(pb::ListLeasesRequest {
            page_size: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.get_details_bad_request().unwrap().field_violations[0].field,
        "page_size"
    );
    // Authenticated and valid: an empty list, not an error.
    let page = client
        .list_leases(pb::ListLeasesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(page.leases.is_empty());
    assert!(
        emu_pats(&emu.url()).await.is_empty(),
        "bad input minted nothing"
    );
    broker.stop().await;
}

/// Sends and receives message bytes as they are, so a test can send what
/// no generated client would.
#[derive(Clone, Copy, Default)]
struct RawCodec;

struct RawBytes;

impl tonic::codec::Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(buf, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use prost::bytes::Buf as _;
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBytes;
    type Decoder = RawBytes;
    fn encoder(&mut self) -> RawBytes {
        RawBytes
    }
    fn decoder(&mut self) -> RawBytes {
        RawBytes
    }
}

/// One unary call of `method` (`/package.Service/Method`) with `body` as
/// the message bytes, and `key` as bearer if given.
async fn raw_call(
    channel: Channel,
    method: &'static str,
    body: &[u8],
    key: Option<&SecretString>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("channel ready");
    let mut request = tonic::Request::new(body.to_vec());
    if let Some(key) = key {
        let value = format!("Bearer {}", secrecy::ExposeSecret::expose_secret(key));
        request
            .metadata_mut()
            .insert("authorization", value.parse().unwrap());
    }
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
    grpc.unary(request, path, RawCodec)
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn a_request_that_is_not_its_methods_message_is_invalid_argument_after_authentication() {
    use prost::Message as _;
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator::spawn(EmulatorConfig::default()).await.unwrap();
    let spec = BrokerSpec::new(sqlite_url(&dir), emu.url());
    let broker = spawn_broker(&spec).await;
    let key = spec.key("ci");
    let channel = broker.channel().await;

    let garbage: [(&str, &[u8]); 4] = [
        (
            "a key longer than a varint",
            b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
        ),
        (
            "a string cut short",
            b"\x0a\x40tbk_not-a-real-key-but-it-must-not-come-back",
        ),
        ("a number where a message or a string belongs", b"\x18\x01"),
        ("an organization that is not UTF-8", b"\x0a\x02\xff\xfe"),
    ];
    for (what, body) in garbage {
        for method in [
            "/tokenbroker.v1.LeaseService/CreateLease",
            "/tokenbroker.v1.AdminService/ListLeases",
        ] {
            let status = raw_call(channel.clone(), method, body, Some(&key))
                .await
                .unwrap_err();
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{what}, {method}: {status:?}"
            );
            let info = status.get_details_error_info().expect("ErrorInfo");
            assert_eq!(info.reason, "MALFORMED_REQUEST", "{what}");
            assert_eq!(info.domain, "tokenbroker");
            assert!(
                status
                    .message()
                    .starts_with("the request is not a valid tokenbroker.v1."),
                "{what}: {}",
                status.message()
            );
            assert!(
                !status.message().contains("tbk_"),
                "{what}: {}",
                status.message()
            );

            // Authentication comes first: without a key, the same bytes
            // are refused as unauthenticated.
            let status = raw_call(channel.clone(), method, body, None)
                .await
                .unwrap_err();
            assert_eq!(
                status.code(),
                Code::Unauthenticated,
                "{what}, {method}: {status:?}"
            );
        }
    }

    // The connection still serves well-formed calls, through the same path.
    let body = pb::ListLeasesRequest::default().encode_to_vec();
    let answer = raw_call(
        channel.clone(),
        "/tokenbroker.v1.LeaseService/ListLeases",
        &body,
        Some(&key),
    )
    .await
    .expect("a valid request is served");
    assert!(pb::ListLeasesResponse::decode(answer.as_slice())
        .unwrap()
        .leases
        .is_empty());
    assert!(emu_pats(&emu.url()).await.is_empty(), "nothing was minted");
    broker.stop().await;
}

#[tokio::test]
async fn a_restarted_broker_on_the_same_store_keeps_its_deployment_id() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator::spawn(EmulatorConfig::default()).await.unwrap();
    let spec = BrokerSpec::new(sqlite_url(&dir), emu.url());
    let first = spawn_broker(&spec).await;
    let id = first.deployment_id.clone();
    first.stop().await;
    let second = spawn_broker(&spec).await;
    assert_eq!(second.deployment_id, id);
    second.stop().await;
}

async fn emu_pats(emulator_url: &str) -> Vec<serde_json::Value> {
    reqwest::get(format!("{emulator_url}/_emulator/pats"))
        .await
        .unwrap()
        .json::<Vec<serde_json::Value>>()
        .await
        .unwrap()
}

/// A child process killed when dropped (so a failing test leaves none).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    /// SIGTERM, as Kubernetes sends, then the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.0.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        self.0.wait().expect("wait")
    }
}

/// The binary with no TOKEN_BROKER_* variable of ours leaking in.
fn broker_command(dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir);
    for (k, _) in std::env::vars() {
        if k.starts_with("TOKEN_BROKER_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Reads `reader` line by line on a thread of its own until `f` returns
/// Some, which is sent back; keeps draining afterwards (a child writing to
/// a closed pipe would fail), collecting everything into the log.
fn watch_output<R, T>(
    reader: R,
    mut f: impl FnMut(&str) -> Option<T> + Send + 'static,
) -> (
    tokio::sync::oneshot::Receiver<Option<T>>,
    Arc<Mutex<String>>,
)
where
    R: std::io::Read + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let log = Arc::new(Mutex::new(String::new()));
    let seen = log.clone();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            seen.lock().unwrap().push_str(&format!("{line}\n"));
            if tx.is_some() {
                if let Some(t) = f(&line) {
                    let _ = tx.take().unwrap().send(Some(t));
                }
            }
        }
        if let Some(tx) = tx {
            let _ = tx.send(None);
        }
    });
    (rx, log)
}

#[tokio::test]
async fn serve_with_no_configuration_runs_on_embedded_sqlite_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = broker_command(dir.path())
        .arg("serve")
        // Only the port differs from the defaults: 50051 may be taken here.
        .env("TOKEN_BROKER_GRPC__LISTEN", "127.0.0.1:0")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start token-broker serve");
    let stderr = child.stderr.take().unwrap();
    let running = Running(child);
    let (addr, log) = watch_output(stderr, |line| {
        line.contains("token-broker serving gRPC").then(|| {
            let at = line.find("addr=").expect("addr field") + 5;
            line[at..].split_whitespace().next().unwrap().to_owned()
        })
    });
    let addr = addr
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("serve did not start:\n{}", log.lock().unwrap()));

    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert_eq!(health(channel.clone(), "").await, ServingStatus::Serving);
    let status = pb::lease_service_client::LeaseServiceClient::new(channel.clone())
        .list_leases(pb::ListLeasesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    // Our open connection must not hold up the shutdown.
    drop(channel);

    assert!(
        dir.path().join("token-broker.db").exists(),
        "embedded SQLite file"
    );
    let keys = dir.path().join("token-broker.db.keys.toml");
    assert!(keys.exists(), "generated keys file");
    let log = log.lock().unwrap().clone();
    assert!(log.contains("generated a keys file"), "{log}");

    let exit = tokio::task::spawn_blocking(move || running.terminate())
        .await
        .unwrap();
    assert!(exit.success(), "graceful shutdown exits 0: {exit:?}");
}

#[tokio::test]
async fn dev_runs_the_quickstart_a_leased_token_works_until_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let key = "tbk_quickstart-dev-key-0123456789abcdef";
    let mut child = broker_command(dir.path())
        .args([
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--emulator-listen",
            "127.0.0.1:0",
        ])
        .env("TOKEN_BROKER_DEV_API_KEY", key)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start token-broker dev");
    let stdout = child.stdout.take().unwrap();
    let running = Running(child);
    let mut grpc = None;
    let mut emulator = None;
    let (found, out) = watch_output(stdout, move |line| {
        let value = || line.split_whitespace().nth(1).map(str::to_owned);
        if line.trim_start().starts_with("gRPC:") {
            grpc = value();
        }
        if line.trim_start().starts_with("emulator:") {
            emulator = value();
        }
        if line.contains("API key:") {
            return Some((grpc.clone()?, emulator.clone()?, line.contains(key)));
        }
        None
    });
    let (grpc, emulator_url, printed_key) = found
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("dev did not start:\n{}", out.lock().unwrap()));
    assert!(printed_key, "dev prints the key it uses");

    let cli = |args: &[&str]| {
        let out = broker_command(dir.path())
            .args(["lease"])
            .args(args)
            .env("TOKEN_BROKER_ADDR", &grpc)
            .env("TOKEN_BROKER_API_KEY", key)
            .output()
            .expect("run token-broker lease");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, created, err) = cli(&[
        "create",
        "--organization",
        "fabrikam",
        "--scope",
        "vso.code",
        "--ttl",
        "15m",
        "--output",
        "json",
    ]);
    assert!(ok, "{err}");
    let created: serde_json::Value = serde_json::from_str(&created).unwrap();
    let token = created["token"].as_str().unwrap().to_owned();
    let name = created["name"].as_str().unwrap().to_owned();
    assert_eq!(created["state"], "ACTIVE");
    assert_eq!(created["holder"], "apikey:dev");

    let http = reqwest::Client::new();
    let use_token = |org: &str, resource: &str| {
        http.get(format!(
            "{emulator_url}/{org}/_apis/{resource}?api-version=7.1"
        ))
        .basic_auth("", Some(&token))
        .send()
    };
    assert_eq!(
        use_token("fabrikam", "git/repositories")
            .await
            .unwrap()
            .status(),
        200
    );

    let (ok, got, _) = cli(&["get", &name, "--output", "json"]);
    assert!(ok);
    assert!(!got.contains(&token), "get never shows the token");

    let (ok, revoked, err) = cli(&["revoke", &name, "--output", "json"]);
    assert!(ok, "{err}");
    let revoked: serde_json::Value = serde_json::from_str(&revoked).unwrap();
    assert_eq!(revoked["state"], "REVOKED");
    assert_eq!(
        use_token("fabrikam", "git/repositories")
            .await
            .unwrap()
            .status(),
        401
    );

    // Outside the dev policy: refused, saying why.
    let (ok, _, err) = cli(&[
        "create",
        "--organization",
        "fabrikam",
        "--scope",
        "vso.code_full",
    ]);
    assert!(!ok);
    assert!(err.contains("SCOPE_NOT_ALLOWED"), "{err}");

    let exit = tokio::task::spawn_blocking(move || running.terminate())
        .await
        .unwrap();
    assert!(exit.success(), "dev stops cleanly: {exit:?}");
}

#[tokio::test]
async fn dev_takes_a_policy_file_so_a_managed_credential_can_be_tried_locally() {
    let dir = tempfile::tempdir().unwrap();
    let key = "tbk_dev-policy-file-key-0123456789abcdef";
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "admins: [\"apikey:dev\"]\nrules: []\ncredentials:\n  - name: mirror-feed\n    organization: fabrikam\n    scopes: [\"vso.packaging\"]\n    rotation_period: 1h\n    overlap: 10m\n    readers: [\"apikey:dev\"]\n",
    )
    .unwrap();
    let (running, grpc) = start_dev_with(
        dir.path(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--emulator-listen",
            "127.0.0.1:0",
        ],
        key,
        &[("TOKEN_BROKER_POLICY__FILE", policy.to_str().unwrap())],
    )
    .await;
    let cli = |args: &[&str]| {
        broker_command(dir.path())
            .args(args)
            .env("TOKEN_BROKER_ADDR", &grpc)
            .env("TOKEN_BROKER_API_KEY", key)
            .output()
            .expect("run token-broker")
    };
    // The first version is minted in the background: wait for it.
    let mut got = None;
    common::leases::eventually("the first version of mirror-feed", || {
        let out = cli(&["credential", "get", "mirror-feed", "--output", "json"]);
        if out.status.success() {
            got = Some(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        std::future::ready(out.status.success())
    })
    .await;
    let got: serde_json::Value = serde_json::from_str(&got.unwrap()).unwrap();
    assert_eq!(got["credential"], "credentials/mirror-feed");
    assert_eq!(got["state"], "CURRENT");
    assert!(got["token"].as_str().is_some_and(|t| !t.is_empty()));

    // The file's policy replaced the sample one: no lease rule any more.
    let out = cli(&[
        "lease",
        "create",
        "--organization",
        "fabrikam",
        "--scope",
        "vso.code",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("NO_MATCHING_RULE"), "{err}");

    let exit = tokio::task::spawn_blocking(move || running.terminate())
        .await
        .unwrap();
    assert!(exit.success(), "dev stops cleanly: {exit:?}");
}

/// Starts `token-broker dev` with `args` in `dir`; returns it with its
/// printed gRPC address.
async fn start_dev(dir: &Path, args: &[&str], key: &str) -> (Running, String) {
    start_dev_with(dir, args, key, &[]).await
}

/// [`start_dev`] with more environment variables.
async fn start_dev_with(
    dir: &Path,
    args: &[&str],
    key: &str,
    env: &[(&str, &str)],
) -> (Running, String) {
    let mut child = broker_command(dir)
        .arg("dev")
        .args(args)
        .env("TOKEN_BROKER_DEV_API_KEY", key)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start token-broker dev");
    let stdout = child.stdout.take().unwrap();
    let running = Running(child);
    let (found, out) = watch_output(stdout, |line| {
        line.trim_start()
            .starts_with("gRPC:")
            .then(|| line.split_whitespace().nth(1).unwrap().to_owned())
    });
    let grpc = found
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("dev did not start:\n{}", out.lock().unwrap()));
    (running, grpc)
}

async fn dev_display_name(grpc: &str, key: &str) -> String {
    let channel = Channel::from_shared(grpc.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = pb::lease_service_client::LeaseServiceClient::new(channel);
    let mut req = tonic::Request::new(pb::CreateLeaseRequest {
        organization: "fabrikam".into(),
        scopes: vec!["vso.packaging".into()],
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let lease = client.create_lease(req).await.unwrap().into_inner();
    assert!(!lease.token.is_empty());
    lease.display_name
}

#[tokio::test]
async fn dev_on_postgres_against_an_external_emulator_keeps_its_deployment_id_across_restarts() {
    let db = TestDatabase::create().await;
    let emu = emulator::spawn(EmulatorConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = "tbk_external-emulator-dev-key-0123456789";
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        db.url.as_str(),
        "--upstream",
        &emu.url(),
    ];
    let deployment = |display_name: &str| display_name.split(':').nth(1).unwrap().to_owned();

    let (running, grpc) = start_dev(dir.path(), &args, key).await;
    let first = dev_display_name(&grpc, key).await;
    assert!(tokio::task::spawn_blocking(move || running.terminate())
        .await
        .unwrap()
        .success());
    assert!(
        dir.path().join("token-broker-dev.keys.toml").exists(),
        "dev keeps its keys beside it on PostgreSQL"
    );

    let (running, grpc) = start_dev(dir.path(), &args, key).await;
    let second = dev_display_name(&grpc, key).await;
    assert_eq!(deployment(&first), deployment(&second));
    assert_eq!(
        emu_pats(&emu.url()).await.len(),
        2,
        "both PATs on the external emulator"
    );
    assert!(tokio::task::spawn_blocking(move || running.terminate())
        .await
        .unwrap()
        .success());
}
