//! No secret reaches the logs: with a global tracing subscriber at TRACE
//! for every crate (ours, h2, hyper, reqwest, sqlx, tonic, ...), the whole
//! lease lifecycle runs through the real gRPC server on SQLite and on
//! PostgreSQL, and the captured output holds neither a PAT, nor its
//! Basic-auth form, nor an API key, nor a refresh token, nor a key.
//!
//! Its own test binary, because the subscriber is process-global.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use common::broker::{spawn_broker, BrokerSpec};
use common::leases::*;
use secrecy::{ExposeSecret, SecretString};
use token_broker::crypto::Keyring;
use token_broker::proto::v1::admin_service_client::AdminServiceClient;
use token_broker::proto::v1::{
    lease, CreateLeaseRequest, GetLeaseRequest, ListLeasesRequest, LookupTokenRequest,
    RenewLeaseRequest, RevokeLeaseRequest,
};
use token_broker::store::UpstreamCredential;
use tracing_subscriber::fmt::MakeWriter;

/// Everything the subscriber wrote.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Installs the process-wide subscriber at TRACE for every target (also
/// bridging the `log` crate) through the broker's own telemetry set-up, so
/// any cap it puts on a leaky target is what is tested.
fn capture_everything() -> Captured {
    // RUST_LOG would override the level under test.
    std::env::remove_var(token_broker::telemetry::RUST_LOG);
    let captured = Captured::default();
    token_broker::telemetry::init_with_writer("trace", false, false, captured.clone())
        .expect("a valid filter");
    captured
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_lease_lifecycle_at_trace_level_logs_no_secret() {
    let captured = capture_everything();
    let mut secrets = Vec::new();
    for backend in [Backend::Sqlite, Backend::Postgres] {
        secrets.extend(run_lifecycle_over_grpc(backend).await);
    }

    let log = captured.text();
    assert!(
        log.contains("lease issued") && log.contains("h2") && log.contains("sqlx"),
        "the subscriber captured our code and our dependencies at TRACE"
    );
    for (what, secret) in secrets {
        assert!(!secret.is_empty(), "{what} is known");
        assert!(
            !log.contains(&secret),
            "the captured output contains the {what}"
        );
    }
}

/// Runs create (and its replay), use, renew, get, list, revoke, expiry by
/// the reaper and a refused call through the real server; returns every
/// secret that took part, named.
async fn run_lifecycle_over_grpc(backend: Backend) -> Vec<(&'static str, String)> {
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    // `ci` is also an admin here, to look a PAT up (AdminService.LookupToken).
    // `ci` also reads a managed credential (CredentialService).
    let policy = format!(
        "admins: [\"apikey:ci\"]\n{POLICY_YAML}\ncredentials:\n  - name: mirror-feed\n    \
         organization: fabrikam\n    scopes: [\"vso.packaging\"]\n    rotation_period: 1h\n    \
         overlap: 10m\n    readers: [\"apikey:ci\"]\n"
    );
    let mut spec = BrokerSpec::new(db.url.clone(), url.clone()).with_policy(&policy);
    spec.reaper_interval = Duration::from_millis(200);
    let broker = spawn_broker(&spec).await;
    let api_key = spec.key("ci");
    let mut ci = broker.client(&api_key).await;
    let request = |ttl_secs: i64, request_id: &str| CreateLeaseRequest {
        organization: "fabrikam".into(),
        scopes: vec!["vso.code".into()],
        ttl: Some(prost_types::Duration {
            seconds: ttl_secs,
            nanos: 0,
        }),
        request_id: request_id.into(),
    };

    let request_id = uuid::Uuid::new_v4().to_string();
    let lease = ci
        .create_lease(request(900, &request_id))
        .await
        .expect("lease created")
        .into_inner();
    ci.create_lease(request(900, &request_id))
        .await
        .expect("replayed");
    let token = SecretString::from(lease.token.clone());
    assert_eq!(list_repositories(&url, "fabrikam", &token).await, 200);
    ci.renew_lease(RenewLeaseRequest {
        name: lease.name.clone(),
        increment: Some(prost_types::Duration {
            seconds: 7200,
            nanos: 0,
        }),
    })
    .await
    .expect("renewed");
    ci.get_lease(GetLeaseRequest {
        name: lease.name.clone(),
    })
    .await
    .unwrap();
    ci.list_leases(ListLeasesRequest::default()).await.unwrap();
    // Whose token is this? Found by the PAT; an unknown one is not.
    let mut admin = AdminServiceClient::with_interceptor(broker.channel().await, {
        let bearer = format!("Bearer {}", api_key.expose_secret());
        move |mut req: tonic::Request<()>| {
            req.metadata_mut()
                .insert("authorization", bearer.parse().unwrap());
            Ok(req)
        }
    });
    let found = admin
        .lookup_token(LookupTokenRequest {
            token: lease.token.clone(),
        })
        .await
        .expect("looked up")
        .into_inner();
    assert_eq!(found.name, lease.name);
    let unknown_token = format!("pat{}", uuid::Uuid::new_v4().simple());
    let missing = admin
        .lookup_token(LookupTokenRequest {
            token: unknown_token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let managed = managed_credential_reads(&broker, &api_key).await;
    let revoked = ci
        .revoke_lease(RevokeLeaseRequest {
            name: lease.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.state(), lease::State::Revoked);
    assert_ne!(list_repositories(&url, "fabrikam", &token).await, 200);

    // A short lease the reaper expires.
    let short = ci.create_lease(request(1, "")).await.unwrap().into_inner();
    let name = short.name.clone();
    eventually("the reaper expires the short lease", || {
        let mut ci = ci.clone();
        let name = name.clone();
        async move {
            let got = ci.get_lease(GetLeaseRequest { name }).await.unwrap();
            got.into_inner().state() == lease::State::Expired
        }
    })
    .await;

    // A caller with a wrong key is refused (and its key is not logged either).
    let wrong_key = SecretString::from(format!("tbk_{}", uuid::Uuid::new_v4().simple()));
    let refused = broker
        .client(&wrong_key)
        .await
        .list_leases(ListLeasesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    broker.stop().await;

    // The refresh token the broker rotated to, sealed in its store.
    let store = token_broker::store::open(&db.url).await.unwrap();
    let credential = store
        .load_upstream_credential()
        .await
        .unwrap()
        .expect("the broker saved its rotated refresh token");
    let keyring = Keyring::new(
        "test".to_owned(),
        [("test".to_owned(), spec.sealing_key.clone())],
    )
    .unwrap();
    let rotated = keyring
        .open(&credential.sealed, UpstreamCredential::AAD)
        .expect("sealed under the test key");

    let mut secrets = Vec::new();
    for t in [&lease.token, &short.token].into_iter().chain(&managed) {
        secrets.push(("PAT", t.clone()));
        secrets.push(("PAT in Basic-auth form", STANDARD.encode(format!(":{t}"))));
    }
    secrets.push(("looked-up unknown token", unknown_token));
    secrets.push(("API key", api_key.expose_secret().to_owned()));
    secrets.push(("refused API key", wrong_key.expose_secret().to_owned()));
    secrets.push((
        "initial refresh token",
        token_broker::emulator::DEFAULT_REFRESH_TOKEN.to_owned(),
    ));
    secrets.push(("rotated refresh token", rotated.expose_secret().to_owned()));
    secrets.push(("sealing key", spec.sealing_key.expose_secret().to_owned()));
    secrets.push((
        "fingerprint key",
        spec.fingerprint_key.expose_secret().to_owned(),
    ));
    secrets
}

/// A managed credential read through CredentialService (get, watch) and
/// rotated NOW through AdminService, its versions listed; returns the
/// tokens handed out.
async fn managed_credential_reads(
    broker: &common::broker::TestBroker,
    key: &SecretString,
) -> Vec<String> {
    use token_broker::proto::v1::credential_service_client::CredentialServiceClient;
    use token_broker::proto::v1::{
        GetCredentialRequest, ListCredentialsRequest, RotateCredentialRequest,
        WatchCredentialRequest,
    };
    fn with_key<T>(msg: T, key: &SecretString) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", key.expose_secret()).parse().unwrap(),
        );
        req
    }
    let mut reader = CredentialServiceClient::new(broker.channel().await);
    let mut admin = AdminServiceClient::new(broker.channel().await);
    eventually("the first version is minted", || {
        let mut reader = reader.clone();
        let req = with_key(
            GetCredentialRequest {
                name: "credentials/mirror-feed".into(),
            },
            key,
        );
        async move { reader.get_credential(req).await.is_ok() }
    })
    .await;
    let first = reader
        .get_credential(with_key(
            GetCredentialRequest {
                name: "credentials/mirror-feed".into(),
            },
            key,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut stream = reader
        .watch_credential(with_key(
            WatchCredentialRequest {
                name: "credentials/mirror-feed".into(),
                after_version: 0,
            },
            key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().version, 1);
    admin
        .rotate_credential(with_key(
            RotateCredentialRequest {
                name: "credentials/mirror-feed".into(),
                revoke_previous: 2,
            },
            key,
        ))
        .await
        .unwrap();
    let second = stream.message().await.unwrap().unwrap();
    assert_eq!(second.version, 2);
    admin
        .list_credentials(with_key(ListCredentialsRequest::default(), key))
        .await
        .unwrap();
    vec![first.token, second.token]
}
