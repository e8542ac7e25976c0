//! Who may call, over real sockets through the real server: Kubernetes
//! service accounts with projected tokens checked against a JWKS served by
//! the test, mTLS clients with certificates from a CA the test makes, plain
//! TLS with API keys, and identity kinds that never pose as one another.

mod common;

use serde_json::json;
use tonic::{Code, Status};
use tonic_types::StatusExt as _;

use common::broker::{spawn_broker, BrokerSpec, Client, TestBroker};
use common::db::{sqlite_url, TestDatabase};
use common::k8s::{
    authenticated_status, claims, now, token_file, unsigned_token, FakeApiServer, FakeIssuer,
    SigningKey,
};
use common::mtls::{dns, uri, ServerTls, TestAuthority};
use secrecy::ExposeSecret as _;
use token_broker::audit::AUTHENTICATE as AUTHENTICATE_ACTION;
use token_broker::audit::{AuditEvent, Outcome};
use token_broker::auth::kubernetes::{KubernetesAuthConfig, TokenReviewConfig};
use token_broker::auth::tls::ClientAuth;
use token_broker::emulator::{self, EmulatorConfig, RunningEmulator};
use token_broker::proto::v1 as pb;

const RESTORER: &str = "k8s:system:serviceaccount:build:restorer";
const SPIFFE_RESTORER: &str = "spiffe://example.org/ns/build/sa/restorer";

/// Rules for one identity of each kind; `apikey:ci` keeps its own.
fn policy() -> String {
    format!(
        r#"
rules:
  - name: ci
    identities: ["apikey:ci"]
    organizations: ["fabrikam"]
    scopes: ["vso.code_write", "vso.packaging"]
    default_ttl: 1h
    max_ttl: 8h
  - name: restorer
    identities: ["{RESTORER}"]
    organizations: ["fabrikam"]
    scopes: ["vso.packaging"]
    default_ttl: 1h
    max_ttl: 2h
  - name: build-namespace
    identities: ["k8s:system:serviceaccount:build:*"]
    organizations: ["contoso"]
    scopes: ["vso.packaging"]
    default_ttl: 1h
    max_ttl: 2h
  - name: spiffe-restorer
    identities: ["{SPIFFE_RESTORER}"]
    organizations: ["fabrikam"]
    scopes: ["vso.packaging"]
    default_ttl: 1h
    max_ttl: 2h
"#
    )
}

/// What a test's broker runs on; dropped with the test.
struct World {
    broker: TestBroker,
    spec: BrokerSpec,
    _emulator: RunningEmulator,
    _db: Option<TestDatabase>,
    _dir: tempfile::TempDir,
}

/// A broker on SQLite (or PostgreSQL) against a fresh emulator, with
/// [`policy`] and whatever `configure` adds.
async fn world(postgres: bool, configure: impl FnOnce(BrokerSpec) -> BrokerSpec) -> World {
    let dir = tempfile::tempdir().unwrap();
    let db = if postgres {
        Some(TestDatabase::create().await)
    } else {
        None
    };
    let store_url = match &db {
        Some(db) => db.url.clone(),
        None => sqlite_url(&dir),
    };
    let emulator = emulator::spawn(EmulatorConfig::default()).await.unwrap();
    let spec = configure(BrokerSpec::new(store_url, emulator.url()).with_policy(&policy()));
    let broker = spawn_broker(&spec).await;
    World {
        broker,
        spec,
        _emulator: emulator,
        _db: db,
        _dir: dir,
    }
}

fn packaging_in(organization: &str) -> pb::CreateLeaseRequest {
    pb::CreateLeaseRequest {
        organization: organization.into(),
        scopes: vec!["vso.packaging".into()],
        ..Default::default()
    }
}

fn reason(status: &Status) -> String {
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

#[track_caller]
fn assert_refused(status: &Status, code: Code, expected_reason: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(reason(status), expected_reason, "{status:?}");
}

/// The message and details of `status` do not hold `token` or a part of it.
#[track_caller]
fn assert_no_token_in(status: &Status, token: &str) {
    let shown = format!("{} {:?}", status.message(), status.details());
    for part in token.split('.').filter(|p| p.len() >= 8) {
        assert!(!shown.contains(part), "token part echoed: {shown}");
    }
}

async fn bearer_client(broker: &TestBroker, credential: &str) -> Client {
    broker
        .client_with_header(&format!("Bearer {credential}"))
        .await
}

// ---- Kubernetes service accounts -------------------------------------------

struct Cluster {
    issuer: FakeIssuer,
    key: SigningKey,
}

async fn cluster() -> Cluster {
    let key = SigningKey::es256("cluster-key-1");
    let issuer = FakeIssuer::start(&[&key]).await;
    Cluster { issuer, key }
}

impl Cluster {
    fn token(&self, namespace: &str, name: &str) -> String {
        self.key
            .sign(&claims(&self.issuer.issuer(), namespace, name))
    }
}

async fn service_account_lease_is_granted_to_a_valid_projected_token(postgres: bool) {
    let cluster = cluster().await;
    let w = world(postgres, |s| s.with_kubernetes(cluster.issuer.config())).await;
    let token = cluster.token("build", "restorer");
    let mut client = bearer_client(&w.broker, &token).await;

    let lease = client
        .create_lease(packaging_in("fabrikam"))
        .await
        .expect("the service account's rule grants the lease")
        .into_inner();
    assert_eq!(lease.holder, RESTORER);
    assert!(!lease.token.is_empty());
    // The same token reads its own lease back: the holder matches.
    let again = client
        .get_lease(pb::GetLeaseRequest {
            name: lease.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.holder, RESTORER);
    // The keys were fetched at start-up, not by the first caller.
    assert_eq!(cluster.issuer.jwks_fetches(), 1);
    w.broker.stop().await;
}

#[tokio::test]
async fn a_pod_with_a_valid_service_account_token_gets_the_lease_its_rule_allows_on_sqlite() {
    service_account_lease_is_granted_to_a_valid_projected_token(false).await;
}

#[tokio::test]
async fn a_pod_with_a_valid_service_account_token_gets_the_lease_its_rule_allows_on_postgres() {
    service_account_lease_is_granted_to_a_valid_projected_token(true).await;
}

/// Runs `sql` on the broker's database through a connection of its own,
/// as someone with write access to the database (but not the chain key).
async fn exec_sql(w: &World, sql: &str) {
    use sqlx::Connection as _;
    let url = &w.spec.store_url;
    if url.starts_with("postgres") {
        let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
        sqlx::raw_sql(sql).execute(&mut conn).await.expect(sql);
    } else {
        let mut conn = sqlx::SqliteConnection::connect(url).await.expect("connect");
        sqlx::raw_sql(sql).execute(&mut conn).await.expect(sql);
    }
}

async fn a_service_account_lease_is_audited_with_its_pod_and_uid_claims(postgres: bool) {
    let cluster = cluster().await;
    let w = world(postgres, |s| s.with_kubernetes(cluster.issuer.config())).await;
    let token = cluster.token("build", "restorer");
    let mut client = bearer_client(&w.broker, &token).await;
    let lease = client
        .create_lease(packaging_in("fabrikam"))
        .await
        .expect("granted")
        .into_inner();
    client
        .revoke_lease(pb::RevokeLeaseRequest {
            name: lease.name.clone(),
        })
        .await
        .expect("revoked");

    // Claims of `common::k8s::claims` for build/restorer.
    let detail = "pod=restorer-7d9c5b6f4-x2x9q pod_uid=8f1e5b8a-3c2d-4e6f-9a0b-1c2d3e4f5a6b \
                  sa_uid=b1f3c0a2-77e4-4d51-8e9a-2f6d5c4b3a21 jti=5a3e1c52-8d0e-4c35-a5bb-1d1b6f7c9a10";
    let store = token_broker::store::open(&w.spec.store_url).await.unwrap();
    let events = store.list_audit(0, 1000).await.unwrap();
    let of_caller: Vec<&AuditEvent> = events.iter().filter(|e| e.identity == RESTORER).collect();
    let actions: Vec<&str> = of_caller.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["lease.create", "lease.revoke"], "{events:?}");
    for e in &of_caller {
        assert_eq!(e.caller_detail.as_deref(), Some(detail), "{e:?}");
    }
    let created = of_caller[0].id;

    // The claims are covered by the chain.
    let config = w.spec.config();
    token_broker::cli::audit::verify(&config, None)
        .await
        .expect("the chain with caller details verifies");
    exec_sql(
        &w,
        &format!("UPDATE audit_events SET caller_detail = 'pod=innocent' WHERE id = {created}"),
    )
    .await;
    let broken = token_broker::cli::audit::verify(&config, None)
        .await
        .expect_err("an edited caller_detail breaks the chain")
        .to_string();
    assert!(
        broken.contains(&format!("audit chain broken at row {created}:")),
        "{broken}"
    );
    w.broker.stop().await;
}

#[tokio::test]
async fn a_pods_lease_is_audited_with_its_pod_and_service_account_uids_and_the_chain_covers_them_on_sqlite(
) {
    a_service_account_lease_is_audited_with_its_pod_and_uid_claims(false).await;
}

#[tokio::test]
async fn a_pods_lease_is_audited_with_its_pod_and_service_account_uids_and_the_chain_covers_them_on_postgres(
) {
    a_service_account_lease_is_audited_with_its_pod_and_uid_claims(true).await;
}

#[tokio::test]
async fn a_service_account_without_a_rule_for_the_request_is_denied_by_policy() {
    let cluster = cluster().await;
    let w = world(false, |s| s.with_kubernetes(cluster.issuer.config())).await;

    // No rule at all names build:deployer for fabrikam ...
    let token = cluster.token("build", "deployer");
    let mut client = bearer_client(&w.broker, &token).await;
    let status = client
        .create_lease(packaging_in("fabrikam"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // ... while the namespace glob covers it in contoso.
    let lease = client
        .create_lease(packaging_in("contoso"))
        .await
        .expect("the build namespace rule covers contoso")
        .into_inner();
    assert_eq!(lease.holder, "k8s:system:serviceaccount:build:deployer");

    // A service account of another namespace matches no rule.
    let token = cluster.token("web", "restorer");
    let status = bearer_client(&w.broker, &token)
        .await
        .create_lease(packaging_in("fabrikam"))
        .await
        .unwrap_err();
    assert_refused(&status, Code::PermissionDenied, "NO_MATCHING_RULE");
    w.broker.stop().await;
}

#[tokio::test]
async fn expired_misaddressed_foreign_unsigned_and_tampered_tokens_are_unauthenticated_with_their_reasons_and_audited(
) {
    let cluster = cluster().await;
    let w = world(false, |s| s.with_kubernetes(cluster.issuer.config())).await;
    let issuer = cluster.issuer.issuer();
    let good = claims(&issuer, "build", "restorer");

    let mut expired = good.clone();
    expired["exp"] = json!(now() - 3600);
    expired["iat"] = json!(now() - 7200);
    expired["nbf"] = json!(now() - 7200);
    let mut wrong_audience = good.clone();
    wrong_audience["aud"] = json!(["vault"]);
    let mut wrong_issuer = good.clone();
    wrong_issuer["iss"] = json!("https://evil.example.org");
    let stranger = SigningKey::es256("stranger-key");
    let valid = cluster.key.sign(&good);
    let tampered = {
        // Change one character in the middle of the signature.
        let (head, signature) = valid.rsplit_once('.').unwrap();
        let mut sig: Vec<char> = signature.chars().collect();
        let i = sig.len() / 2;
        sig[i] = if sig[i] == 'A' { 'B' } else { 'A' };
        format!("{head}.{}", sig.into_iter().collect::<String>())
    };

    let cases = [
        ("expired", cluster.key.sign(&expired), "TOKEN_EXPIRED"),
        (
            "wrong audience",
            cluster.key.sign(&wrong_audience),
            "TOKEN_AUDIENCE_MISMATCH",
        ),
        (
            "wrong issuer",
            cluster.key.sign(&wrong_issuer),
            "TOKEN_ISSUER_MISMATCH",
        ),
        ("unknown key", stranger.sign(&good), "TOKEN_KEY_UNKNOWN"),
        (
            "alg none",
            unsigned_token(&cluster.key.kid, &good),
            "TOKEN_ALGORITHM_UNSUPPORTED",
        ),
        ("tampered", tampered, "TOKEN_SIGNATURE_INVALID"),
    ];
    for (what, token, expected) in cases {
        let status = bearer_client(&w.broker, &token)
            .await
            .create_lease(packaging_in("fabrikam"))
            .await
            .expect_err(what);
        assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
        assert_eq!(reason(&status), expected, "{what}: {status:?}");
        assert_no_token_in(&status, &token);
    }
    // The genuine token still works after the burst of bad ones.
    bearer_client(&w.broker, &valid)
        .await
        .create_lease(packaging_in("fabrikam"))
        .await
        .expect("valid token");

    // Each refusal is counted in an audit event with its reason, and no
    // token: written aggregated (one row per reason and address), at the
    // latest when the broker stops.
    w.broker.stop().await;
    let refusals = refused_authentications(&w.spec).await;
    let mut reasons: Vec<&str> = refusals
        .iter()
        .map(|e| e.reason.as_deref().unwrap_or(""))
        .collect();
    reasons.sort_unstable();
    assert_eq!(
        reasons,
        [
            "TOKEN_ALGORITHM_UNSUPPORTED",
            "TOKEN_AUDIENCE_MISMATCH",
            "TOKEN_EXPIRED",
            "TOKEN_ISSUER_MISMATCH",
            "TOKEN_KEY_UNKNOWN",
            "TOKEN_SIGNATURE_INVALID",
        ]
    );
    for event in &refusals {
        assert_eq!(event.identity, "-");
        assert_eq!(event.outcome, Outcome::Denied);
        assert_eq!(
            event.peer.as_deref(),
            Some("127.0.0.1"),
            "the address, no port"
        );
        assert!(
            event
                .caller_detail
                .as_deref()
                .is_some_and(|d| d.starts_with("count=1 interval_start=")),
            "{event:?}"
        );
        assert_eq!(event.token_fingerprint, None);
    }
}

/// The audit events of refused authentications, oldest first, read from
/// the broker's store.
async fn refused_authentications(spec: &BrokerSpec) -> Vec<AuditEvent> {
    let store = token_broker::store::open(&spec.store_url)
        .await
        .expect("open the broker's store");
    store
        .list_audit(0, 1000)
        .await
        .expect("list audit events")
        .into_iter()
        .filter(|e| e.action == AUTHENTICATE_ACTION)
        .collect()
}

#[tokio::test]
async fn a_service_account_token_is_refused_when_kubernetes_callers_are_not_enabled() {
    let cluster = cluster().await;
    let w = world(false, |s| s).await;
    let status = bearer_client(&w.broker, &cluster.token("build", "restorer"))
        .await
        .create_lease(packaging_in("fabrikam"))
        .await
        .unwrap_err();
    assert_refused(&status, Code::Unauthenticated, "UNAUTHENTICATED");
    assert_eq!(cluster.issuer.jwks_fetches(), 0);
    w.broker.stop().await;
}

#[tokio::test]
async fn a_broker_whose_cluster_keys_are_down_at_start_still_serves_and_recovers() {
    let cluster = cluster().await;
    cluster.issuer.set_failing(true);
    let config = KubernetesAuthConfig {
        jwks_refetch_min_interval: std::time::Duration::ZERO,
        ..cluster.issuer.config()
    };
    let w = world(false, |s| s.with_kubernetes(config)).await;
    let token = cluster.token("build", "restorer");

    // API keys are unaffected.
    w.broker
        .client(&w.spec.key("ci"))
        .await
        .create_lease(packaging_in("fabrikam"))
        .await
        .expect("API keys work while the cluster's keys are down");
    let status = bearer_client(&w.broker, &token)
        .await
        .create_lease(packaging_in("fabrikam"))
        .await
        .unwrap_err();
    assert_refused(&status, Code::Unavailable, "JWKS_UNAVAILABLE");

    cluster.issuer.set_failing(false);
    bearer_client(&w.broker, &token)
        .await
        .create_lease(packaging_in("fabrikam"))
        .await
        .expect("accepted once the keys can be fetched");
    w.broker.stop().await;
    // Counted as an error, not a denial, in the row written at shutdown.
    let refusals = refused_authentications(&w.spec).await;
    assert_eq!(refusals.len(), 1);
    assert_eq!(refusals[0].outcome, Outcome::Error);
    assert_eq!(refusals[0].reason.as_deref(), Some("JWKS_UNAVAILABLE"));
}

#[tokio::test]
async fn a_pod_verified_through_token_review_gets_its_lease_and_a_deleted_pods_token_is_refused() {
    let api = FakeApiServer::start("broker-own-token").await;
    let (_token_dir, token_path) = token_file("broker-own-token\n");
    let config = KubernetesAuthConfig {
        token_review: Some(TokenReviewConfig {
            api_server: api.url().parse().unwrap(),
            ca_file: None,
            token_file: token_path,
        }),
        ..Default::default()
    };
    let w = world(false, |s| s.with_kubernetes(config)).await;
    // Opaque to the broker in this mode: the API server decides.
    let cluster = cluster().await;
    let live = cluster.token("build", "restorer");
    api.answer(
        &live,
        authenticated_status("build", "restorer", &["token-broker"]),
    );
    let lease = bearer_client(&w.broker, &live)
        .await
        .create_lease(packaging_in("fabrikam"))
        .await
        .expect("the API server vouches for the pod")
        .into_inner();
    assert_eq!(lease.holder, RESTORER);

    // The API server knows nothing of this one (its pod was deleted).
    let deleted = cluster.token("build", "deployer");
    let status = bearer_client(&w.broker, &deleted)
        .await
        .create_lease(packaging_in("contoso"))
        .await
        .unwrap_err();
    assert_refused(&status, Code::Unauthenticated, "TOKEN_REVIEW_REFUSED");
    assert_no_token_in(&status, &deleted);
    assert_eq!(
        api.requests().len(),
        2,
        "one review per call, nothing cached"
    );
    w.broker.stop().await;
}

// ---- TLS and mTLS -----------------------------------------------------------

/// The broker's TLS files and the CAs behind them.
struct Pki {
    server_ca: TestAuthority,
    clients_ca: TestAuthority,
}

fn pki() -> Pki {
    Pki {
        server_ca: TestAuthority::new("token-broker test server CA"),
        clients_ca: TestAuthority::new("token-broker test clients CA"),
    }
}

async fn mtls_world(pki: &Pki, client_auth: Option<ClientAuth>) -> (World, ServerTls) {
    let tls = ServerTls::new(&pki.server_ca, Some(&pki.clients_ca), client_auth);
    let config = tls.config.clone();
    (world(false, |s| s.with_tls(config)).await, tls)
}

/// The outcome of one CreateLease over a fresh TLS connection presenting
/// `client` (or no certificate) and `authorization` (or none). A failed
/// connection is `Err(None)`.
async fn create_over_tls(
    w: &World,
    pki: &Pki,
    client: Option<&common::mtls::Issued>,
    authorization: Option<&str>,
    organization: &str,
) -> Result<pb::Lease, Option<Status>> {
    let channel = w
        .broker
        .tls_channel(pki.server_ca.ca_pem(), client.map(|c| c.pair()))
        .await
        .map_err(|_| None)?;
    TestBroker::client_on(channel, authorization)
        .create_lease(packaging_in(organization))
        .await
        .map(|r| r.into_inner())
        .map_err(Some)
}

/// A connection the handshake refused: it fails to connect, or its first
/// call fails at the transport (TLS 1.3 reports a refused client
/// certificate after the client's side of the handshake is done).
#[track_caller]
fn assert_refused_at_handshake(result: Result<pb::Lease, Option<Status>>) {
    match result {
        Err(None) => {}
        Err(Some(status)) => assert!(
            matches!(status.code(), Code::Unavailable | Code::Unknown),
            "refused at the TLS layer, not by the service: {status:?}"
        ),
        Ok(lease) => panic!("a lease was granted: {}", lease.name),
    }
}

#[tokio::test]
async fn a_client_certificate_from_the_configured_ca_authenticates_as_its_spiffe_id() {
    let pki = pki();
    let (w, _tls) = mtls_world(&pki, None).await;
    let client = pki.clients_ca.client(vec![
        uri(SPIFFE_RESTORER),
        dns("restorer.build.example.org"),
    ]);

    let lease = create_over_tls(&w, &pki, Some(&client), None, "fabrikam")
        .await
        .expect("the SPIFFE ID's rule grants the lease");
    assert_eq!(lease.holder, SPIFFE_RESTORER);
    w.broker.stop().await;
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused() {
    let pki = pki();
    let (w, _tls) = mtls_world(&pki, None).await;
    let rogue_ca = TestAuthority::new("somebody else's CA");
    let rogue = rogue_ca.client(vec![uri(SPIFFE_RESTORER)]);
    assert_refused_at_handshake(create_over_tls(&w, &pki, Some(&rogue), None, "fabrikam").await);
    // With a required client certificate, none at all is refused too, even
    // with a valid API key.
    let key = format!("Bearer {}", w.spec.key("ci").expose_secret());
    assert_refused_at_handshake(create_over_tls(&w, &pki, None, Some(&key), "fabrikam").await);
    w.broker.stop().await;
}

#[tokio::test]
async fn with_optional_client_certificates_an_api_key_connects_without_one_but_a_foreign_certificate_is_still_refused(
) {
    let pki = pki();
    let (w, _tls) = mtls_world(&pki, Some(ClientAuth::Optional)).await;
    let key = format!("Bearer {}", w.spec.key("ci").expose_secret());
    let lease = create_over_tls(&w, &pki, None, Some(&key), "fabrikam")
        .await
        .expect("API key over TLS without a client certificate");
    assert_eq!(lease.holder, "apikey:ci");

    let status = create_over_tls(&w, &pki, None, None, "fabrikam")
        .await
        .unwrap_err()
        .expect("the call reaches the service");
    assert_refused(&status, Code::Unauthenticated, "UNAUTHENTICATED");

    let rogue = TestAuthority::new("somebody else's CA").client(vec![uri(SPIFFE_RESTORER)]);
    assert_refused_at_handshake(create_over_tls(&w, &pki, Some(&rogue), None, "fabrikam").await);
    w.broker.stop().await;
}

#[tokio::test]
async fn plain_tls_without_client_certificates_serves_api_key_callers() {
    let pki = pki();
    let tls = ServerTls::new(&pki.server_ca, None, None);
    let config = tls.config.clone();
    let w = world(false, |s| s.with_tls(config)).await;
    let key = format!("Bearer {}", w.spec.key("ci").expose_secret());

    let lease = create_over_tls(&w, &pki, None, Some(&key), "fabrikam")
        .await
        .expect("API key over plain TLS");
    assert_eq!(lease.holder, "apikey:ci");
    // A client certificate is not asked for, so it proves nothing here.
    let client = pki.clients_ca.client(vec![uri(SPIFFE_RESTORER)]);
    let status = create_over_tls(&w, &pki, Some(&client), None, "fabrikam")
        .await
        .unwrap_err()
        .expect("the call reaches the service");
    assert_refused(&status, Code::Unauthenticated, "UNAUTHENTICATED");
    // And a plaintext client cannot talk to the TLS port.
    let plaintext = tonic::transport::Channel::from_shared(format!("http://{}", w.broker.addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plaintext {
        let status = TestBroker::client_on(channel, Some(&key))
            .create_lease(packaging_in("fabrikam"))
            .await
            .unwrap_err();
        assert_ne!(status.code(), Code::Ok);
    }
    w.broker.stop().await;
}

#[tokio::test]
async fn a_certificate_identity_without_a_rule_is_denied_by_policy() {
    let pki = pki();
    let (w, _tls) = mtls_world(&pki, None).await;
    let agent = pki
        .clients_ca
        .client(vec![dns("agent-7.build.example.org")]);
    let status = create_over_tls(&w, &pki, Some(&agent), None, "fabrikam")
        .await
        .unwrap_err()
        .expect("the call reaches the service");
    assert_refused(&status, Code::PermissionDenied, "NO_MATCHING_RULE");

    let other = pki
        .clients_ca
        .client(vec![uri("spiffe://example.org/ns/web/sa/frontend")]);
    let status = create_over_tls(&w, &pki, Some(&other), None, "fabrikam")
        .await
        .unwrap_err()
        .expect("the call reaches the service");
    assert_refused(&status, Code::PermissionDenied, "NO_MATCHING_RULE");
    w.broker.stop().await;
}

#[tokio::test]
async fn with_both_a_bearer_and_a_client_certificate_the_bearer_names_the_caller() {
    let pki = pki();
    let cluster = cluster().await;
    let tls = ServerTls::new(&pki.server_ca, Some(&pki.clients_ca), None);
    let config = tls.config.clone();
    let w = world(false, |s| {
        s.with_tls(config).with_kubernetes(cluster.issuer.config())
    })
    .await;
    let cert = pki.clients_ca.client(vec![uri(SPIFFE_RESTORER)]);
    let key = format!("Bearer {}", w.spec.key("ci").expose_secret());

    let lease = create_over_tls(&w, &pki, Some(&cert), Some(&key), "fabrikam")
        .await
        .expect("the API key's rule");
    assert_eq!(lease.holder, "apikey:ci");
    let token = format!("Bearer {}", cluster.token("build", "restorer"));
    let lease = create_over_tls(&w, &pki, Some(&cert), Some(&token), "fabrikam")
        .await
        .expect("the service account's rule");
    assert_eq!(lease.holder, RESTORER);
    // A refused bearer is not rescued by the (valid) certificate.
    let status = create_over_tls(&w, &pki, Some(&cert), Some("Bearer tbk_wrong"), "fabrikam")
        .await
        .unwrap_err()
        .expect("the call reaches the service");
    assert_refused(&status, Code::Unauthenticated, "UNAUTHENTICATED");
    w.broker.stop().await;
}

#[tokio::test]
async fn an_api_key_or_a_certificate_named_like_a_service_account_gets_only_its_own_kinds_rules() {
    let pki = pki();
    let cluster = cluster().await;
    let tls = ServerTls::new(&pki.server_ca, Some(&pki.clients_ca), None);
    let config = tls.config.clone();
    let w = world(false, |s| {
        s.with_tls(config)
            .with_kubernetes(cluster.issuer.config())
            .with_key("system.serviceaccount.build.restorer")
    })
    .await;

    // The genuine service account gets its rule (over the same TLS port).
    let token = format!("Bearer {}", cluster.token("build", "restorer"));
    let genuine = pki.clients_ca.client(vec![dns("genuine.example.org")]);
    let lease = create_over_tls(&w, &pki, Some(&genuine), Some(&token), "fabrikam")
        .await
        .expect("the service account's own rule");
    assert_eq!(lease.holder, RESTORER);

    // An API key whose name spells the service account is an API key.
    let key = w.spec.key("system.serviceaccount.build.restorer");
    let key = format!("Bearer {}", key.expose_secret());
    let status = create_over_tls(&w, &pki, Some(&genuine), Some(&key), "fabrikam")
        .await
        .unwrap_err()
        .expect("the call reaches the service");
    assert_refused(&status, Code::PermissionDenied, "NO_MATCHING_RULE");

    // A certificate whose DNS SAN is the service account's name proves no
    // identity at all ...
    let posing = pki
        .clients_ca
        .client(vec![dns("system:serviceaccount:build:restorer")]);
    let status = create_over_tls(&w, &pki, Some(&posing), None, "fabrikam")
        .await
        .unwrap_err()
        .expect("the call reaches the service");
    assert_refused(
        &status,
        Code::Unauthenticated,
        "CERTIFICATE_IDENTITY_INVALID",
    );
    // ... nor does a URI SAN in the policy's k8s: spelling ...
    let posing = pki.clients_ca.client(vec![uri(RESTORER)]);
    let status = create_over_tls(&w, &pki, Some(&posing), None, "fabrikam")
        .await
        .unwrap_err()
        .expect("the call reaches the service");
    assert_refused(
        &status,
        Code::Unauthenticated,
        "CERTIFICATE_IDENTITY_INVALID",
    );
    // ... and a DNS name made of its words is an x509: identity, with no rule.
    let posing = pki
        .clients_ca
        .client(vec![dns("system.serviceaccount.build.restorer")]);
    let status = create_over_tls(&w, &pki, Some(&posing), None, "contoso")
        .await
        .unwrap_err()
        .expect("the call reaches the service");
    assert_refused(&status, Code::PermissionDenied, "NO_MATCHING_RULE");
    w.broker.stop().await;
}

// ---- No secret in the logs ---------------------------------------------------

/// Everything the process-wide subscriber wrote.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

/// The base64 lines of a PEM block: its secret body.
fn pem_body(pem: &str) -> Vec<String> {
    pem.lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_tokens_api_keys_and_tls_keys_never_reach_the_logs_even_at_trace_level() {
    // Process-wide, through the broker's own telemetry set-up (other tests
    // of this file then log at TRACE too; none of their secrets are checked).
    std::env::remove_var(token_broker::telemetry::RUST_LOG);
    let captured = Captured::default();
    token_broker::telemetry::init_with_writer("trace", false, false, captured.clone())
        .expect("a valid filter");

    let pki = pki();
    let cluster = cluster().await;
    let tls = ServerTls::new(
        &pki.server_ca,
        Some(&pki.clients_ca),
        Some(ClientAuth::Optional),
    );
    let server_key = std::fs::read_to_string(&tls.config.key_file).unwrap();
    let config = tls.config.clone();
    let w = world(false, |s| {
        s.with_tls(config).with_kubernetes(cluster.issuer.config())
    })
    .await;
    let token = cluster.token("build", "restorer");
    let tampered = format!("{}AAAA", &token[..token.len() - 4]);
    let api_key = w.spec.key("ci").expose_secret().to_owned();
    let client = pki.clients_ca.client(vec![uri(SPIFFE_RESTORER)]);

    let by_token = create_over_tls(&w, &pki, None, Some(&format!("Bearer {token}")), "fabrikam")
        .await
        .expect("service account");
    let status = create_over_tls(
        &w,
        &pki,
        None,
        Some(&format!("Bearer {tampered}")),
        "fabrikam",
    )
    .await
    .unwrap_err()
    .expect("reaches the service");
    assert_eq!(status.code(), Code::Unauthenticated);
    let by_key = create_over_tls(
        &w,
        &pki,
        None,
        Some(&format!("Bearer {api_key}")),
        "fabrikam",
    )
    .await
    .expect("API key");
    let by_cert = create_over_tls(&w, &pki, Some(&client), None, "fabrikam")
        .await
        .expect("client certificate");
    w.broker.stop().await;

    let log = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(
        log.contains("caller not authenticated") && log.contains("rustls"),
        "the subscriber captured our code and the TLS stack at TRACE"
    );
    let mut secrets: Vec<(&str, String)> = vec![
        ("API key", api_key),
        ("lease token (service account)", by_token.token),
        ("lease token (API key)", by_key.token),
        ("lease token (certificate)", by_cert.token),
    ];
    for t in [&token, &tampered] {
        for part in t.split('.').filter(|p| p.len() >= 8) {
            secrets.push(("service-account token part", part.to_owned()));
        }
    }
    for line in pem_body(&server_key) {
        secrets.push(("server TLS key", line));
    }
    for line in pem_body(&client.key_pem) {
        secrets.push(("client TLS key", line));
    }
    for (what, secret) in secrets {
        assert!(!secret.is_empty(), "{what} is known");
        assert!(
            !log.contains(&secret),
            "the captured output contains the {what}"
        );
    }
}
