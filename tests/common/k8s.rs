//! Test set-up for Kubernetes service-account callers: signing keys made
//! here, tokens shaped like the kubelet's projected ones, a fake OIDC issuer
//! (discovery document + JWKS, counting fetches) and a fake API server
//! TokenReview endpoint. All served by axum on 127.0.0.1:0.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, KeyPair, RsaKeyPair, RsaPublicKeyComponents, ECDSA_P256_SHA256_FIXED_SIGNING,
};
use serde_json::{json, Value};
use token_broker::auth::kubernetes::KubernetesAuthConfig;

/// The audience the broker accepts by default.
pub const AUDIENCE: &str = "token-broker";

/// A test-only 2048-bit RSA key (PKCS#1), made with `openssl genrsa`: ring
/// cannot generate RSA keys.
const RSA_TEST_KEY_PEM: &str = include_str!("../fixtures/k8s/rs256-test-key.pem");

/// A key pair that signs service-account tokens, as the API server's
/// `--service-account-signing-key-file` would.
pub struct SigningKey {
    pub kid: String,
    pub alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
    /// Public key bytes, for "HS256 keyed with the public key" forgeries.
    pub public_bytes: Vec<u8>,
}

impl SigningKey {
    /// A fresh ECDSA P-256 key (ES256).
    pub fn es256(kid: &str) -> SigningKey {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("generate P-256 key");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("read P-256 key");
        // Uncompressed point: 0x04 || x (32 bytes) || y (32 bytes).
        let point = pair.public_key().as_ref().to_vec();
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        });
        SigningKey {
            kid: kid.to_owned(),
            alg: Algorithm::ES256,
            encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
            jwk,
            public_bytes: point,
        }
    }

    /// The fixture RSA key (RS256), the algorithm Kubernetes uses by default.
    pub fn rs256(kid: &str) -> SigningKey {
        let body: String = RSA_TEST_KEY_PEM
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let der = STANDARD.decode(body).expect("fixture key is base64");
        let pair = RsaKeyPair::from_der(&der).expect("fixture key is PKCS#1 RSA");
        let public: RsaPublicKeyComponents<Vec<u8>> = pair.public().into();
        let jwk = json!({
            "kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
            "n": URL_SAFE_NO_PAD.encode(&public.n),
            "e": URL_SAFE_NO_PAD.encode(&public.e),
        });
        SigningKey {
            kid: kid.to_owned(),
            alg: Algorithm::RS256,
            encoding: EncodingKey::from_rsa_der(&der),
            jwk,
            public_bytes: pair.public().as_ref().to_vec(),
        }
    }

    /// The public JWK (RFC 7517) as served in the JWKS.
    pub fn jwk(&self) -> Value {
        self.jwk.clone()
    }

    /// Signs `claims` with this key, header `{alg, kid}`.
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_with_kid(Some(&self.kid), claims)
    }

    /// Signs `claims` with this key but names `kid` (or none) in the header.
    pub fn sign_with_kid(&self, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("sign token")
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// Claims of a projected token for `namespace/name`, valid for ten minutes
/// from now, bound to a pod (as the kubelet requests them).
pub fn claims(issuer: &str, namespace: &str, name: &str) -> Value {
    let now = now();
    json!({
        "aud": [AUDIENCE],
        "exp": now + 600,
        "iat": now,
        "nbf": now,
        "iss": issuer,
        "jti": "5a3e1c52-8d0e-4c35-a5bb-1d1b6f7c9a10",
        "sub": format!("system:serviceaccount:{namespace}:{name}"),
        "kubernetes.io": {
            "namespace": namespace,
            "node": {"name": "worker-1", "uid": "0c7f3a0e-6a55-4c53-9f2b-7b4ad3e1a001"},
            "pod": {"name": format!("{name}-7d9c5b6f4-x2x9q"), "uid": "8f1e5b8a-3c2d-4e6f-9a0b-1c2d3e4f5a6b"},
            "serviceaccount": {"name": name, "uid": "b1f3c0a2-77e4-4d51-8e9a-2f6d5c4b3a21"},
            "warnafter": now + 300,
        },
    })
}

/// `header.claims.` with an `alg: none` header and no signature.
pub fn unsigned_token(kid: &str, claims: &Value) -> String {
    let header = json!({"alg": "none", "kid": kid, "typ": "JWT"});
    format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

/// HS256 keyed with `secret` (for example a public key), naming `kid`.
pub fn hs256_token(kid: &str, secret: &[u8], claims: &Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret)).expect("sign HS256")
}

/// Aborts a spawned server when dropped.
struct ServerGuard(tokio::task::JoinHandle<()>);

impl Drop for ServerGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn serve(router: Router) -> (String, ServerGuard) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let url = format!("http://{}", listener.local_addr().expect("local addr"));
    let task = tokio::spawn(async move {
        axum::serve(listener, router).await.expect("serve");
    });
    (url, ServerGuard(task))
}

/// A test certificate authority, and an HTTPS certificate for 127.0.0.1
/// signed by it (as a cluster CA signs the API server's).
pub struct TestCa {
    ca_pem: String,
    server: Arc<tokio_rustls::rustls::ServerConfig>,
}

impl TestCa {
    pub fn new() -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().expect("server key");
        let server_cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .expect("server params")
            .signed_by(&server_key, &issuer)
            .expect("server certificate");

        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let server = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(server_cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
            )
            .expect("server TLS config");
        TestCa {
            ca_pem: ca_cert.pem(),
            server: Arc::new(server),
        }
    }

    /// The CA certificate, PEM, in a fresh temporary file (a `ca.crt`).
    pub fn ca_file(&self) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("ca.crt");
        std::fs::write(&path, &self.ca_pem).expect("write CA file");
        (dir, path)
    }
}

impl Default for TestCa {
    fn default() -> Self {
        TestCa::new()
    }
}

async fn serve_tls(
    router: Router,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
) -> (String, ServerGuard) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::service::TowerToHyperService;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let url = format!("https://{}", listener.local_addr().expect("local addr"));
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let router = router.clone();
            tokio::spawn(async move {
                // A client that refuses our certificate ends here.
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), TowerToHyperService::new(router))
                    .await;
            });
        }
    });
    (url, ServerGuard(task))
}

#[derive(Default)]
struct IssuerState {
    issuer: Mutex<String>,
    /// `issuer` the discovery document claims, when it lies.
    claimed_issuer: Mutex<Option<String>>,
    jwks: Mutex<Value>,
    jwks_fetches: AtomicUsize,
    discovery_fetches: AtomicUsize,
    failing: AtomicBool,
    jwks_delay: Mutex<Duration>,
    authorizations: Mutex<Vec<Option<String>>>,
}

/// A fake cluster OIDC issuer: `/.well-known/openid-configuration` and
/// `/openid/v1/jwks` (the API server's paths).
pub struct FakeIssuer {
    url: String,
    state: Arc<IssuerState>,
    _server: ServerGuard,
}

impl FakeIssuer {
    /// Serves a JWKS holding `keys` over plain HTTP.
    pub async fn start(keys: &[&SigningKey]) -> FakeIssuer {
        FakeIssuer::start_with(keys, None).await
    }

    /// Serves a JWKS holding `keys` over HTTPS with `ca`'s certificate.
    pub async fn start_https(keys: &[&SigningKey], ca: &TestCa) -> FakeIssuer {
        FakeIssuer::start_with(keys, Some(ca.server.clone())).await
    }

    async fn start_with(
        keys: &[&SigningKey],
        tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    ) -> FakeIssuer {
        let state = Arc::new(IssuerState::default());
        let router = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/openid/v1/jwks", get(jwks))
            .with_state(state.clone());
        let (url, server) = match tls {
            Some(tls) => serve_tls(router, tls).await,
            None => serve(router).await,
        };
        *state.issuer.lock().unwrap() = url.clone();
        let issuer = FakeIssuer {
            url,
            state,
            _server: server,
        };
        issuer.publish(keys);
        issuer
    }

    /// The issuer URL, as the tokens' `iss`.
    pub fn issuer(&self) -> String {
        self.url.clone()
    }

    /// The JWKS URL (what discovery points at).
    pub fn jwks_url(&self) -> String {
        format!("{}/openid/v1/jwks", self.url)
    }

    /// Replaces the served key set.
    pub fn publish(&self, keys: &[&SigningKey]) {
        let keys: Vec<Value> = keys.iter().map(|k| k.jwk()).collect();
        *self.state.jwks.lock().unwrap() = json!({ "keys": keys });
    }

    /// Serves exactly `jwks` (for odd key sets).
    pub fn publish_raw(&self, jwks: Value) {
        *self.state.jwks.lock().unwrap() = jwks;
    }

    /// Makes discovery name another issuer than the one it serves.
    pub fn claim_issuer(&self, issuer: &str) {
        *self.state.claimed_issuer.lock().unwrap() = Some(issuer.to_owned());
    }

    /// Answers 503 to every request while `failing`.
    pub fn set_failing(&self, failing: bool) {
        self.state.failing.store(failing, Ordering::SeqCst);
    }

    /// Holds each JWKS answer back this long (so concurrent callers overlap).
    pub fn set_jwks_delay(&self, delay: Duration) {
        *self.state.jwks_delay.lock().unwrap() = delay;
    }

    /// JWKS requests answered so far (successful or not).
    pub fn jwks_fetches(&self) -> usize {
        self.state.jwks_fetches.load(Ordering::SeqCst)
    }

    /// Discovery requests answered so far.
    pub fn discovery_fetches(&self) -> usize {
        self.state.discovery_fetches.load(Ordering::SeqCst)
    }

    /// `authorization` headers of every request, in order.
    pub fn authorizations(&self) -> Vec<Option<String>> {
        self.state.authorizations.lock().unwrap().clone()
    }

    /// A verifier configuration for this issuer, keys found by discovery.
    pub fn config(&self) -> KubernetesAuthConfig {
        KubernetesAuthConfig {
            enabled: true,
            issuer: Some(self.issuer()),
            ..Default::default()
        }
    }
}

fn record(state: &IssuerState, headers: &HeaderMap) {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    state.authorizations.lock().unwrap().push(auth);
}

async fn discovery(State(state): State<Arc<IssuerState>>, headers: HeaderMap) -> Response {
    state.discovery_fetches.fetch_add(1, Ordering::SeqCst);
    record(&state, &headers);
    if state.failing.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let served = state.issuer.lock().unwrap().clone();
    let claimed = state
        .claimed_issuer
        .lock()
        .unwrap()
        .clone()
        .unwrap_or_else(|| served.clone());
    Json(json!({
        "issuer": claimed,
        "jwks_uri": format!("{served}/openid/v1/jwks"),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256", "ES256"],
    }))
    .into_response()
}

async fn jwks(State(state): State<Arc<IssuerState>>, headers: HeaderMap) -> Response {
    state.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    record(&state, &headers);
    let delay = *state.jwks_delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if state.failing.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let body = state.jwks.lock().unwrap().clone();
    Json(body).into_response()
}

#[derive(Default)]
struct ApiServerState {
    /// The bearer the fake accepts (the broker's own service-account token).
    accepted_bearer: Mutex<String>,
    /// Reviewed token → `status` to answer.
    answers: Mutex<HashMap<String, Value>>,
    /// Status code forced on every answer, if any.
    forced_status: Mutex<Option<StatusCode>>,
    requests: Mutex<Vec<ReviewRequest>>,
}

/// One TokenReview request the fake received.
#[derive(Clone, Debug)]
pub struct ReviewRequest {
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub body: Value,
}

/// A fake API server serving only
/// `POST /apis/authentication.k8s.io/v1/tokenreviews`, with the answer
/// shape of Kubernetes' TokenReview (`authentication.k8s.io/v1`).
pub struct FakeApiServer {
    url: String,
    state: Arc<ApiServerState>,
    _server: ServerGuard,
}

impl FakeApiServer {
    /// Accepts requests carrying `Bearer {accepted_bearer}`; 401 otherwise.
    pub async fn start(accepted_bearer: &str) -> FakeApiServer {
        FakeApiServer::start_with(accepted_bearer, None).await
    }

    /// As [`FakeApiServer::start`], over HTTPS with `ca`'s certificate.
    pub async fn start_https(accepted_bearer: &str, ca: &TestCa) -> FakeApiServer {
        FakeApiServer::start_with(accepted_bearer, Some(ca.server.clone())).await
    }

    async fn start_with(
        accepted_bearer: &str,
        tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    ) -> FakeApiServer {
        let state = Arc::new(ApiServerState::default());
        *state.accepted_bearer.lock().unwrap() = accepted_bearer.to_owned();
        let router = Router::new()
            .route(
                "/apis/authentication.k8s.io/v1/tokenreviews",
                post(token_review),
            )
            .with_state(state.clone());
        let (url, server) = match tls {
            Some(tls) => serve_tls(router, tls).await,
            None => serve(router).await,
        };
        FakeApiServer {
            url,
            state,
            _server: server,
        }
    }

    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Changes the accepted bearer (the broker's token was rotated).
    pub fn accept_bearer(&self, bearer: &str) {
        *self.state.accepted_bearer.lock().unwrap() = bearer.to_owned();
    }

    /// Answers reviews of `token` with `status`.
    pub fn answer(&self, token: &str, status: Value) {
        self.state
            .answers
            .lock()
            .unwrap()
            .insert(token.to_owned(), status);
    }

    /// Answers every review with this HTTP status and a Status body.
    pub fn force_status(&self, status: StatusCode) {
        *self.state.forced_status.lock().unwrap() = Some(status);
    }

    /// Requests received so far.
    pub fn requests(&self) -> Vec<ReviewRequest> {
        self.state.requests.lock().unwrap().clone()
    }
}

/// The `status` the API server gives a valid pod-bound token of
/// `namespace/name`.
pub fn authenticated_status(namespace: &str, name: &str, audiences: &[&str]) -> Value {
    json!({
        "authenticated": true,
        "user": {
            "username": format!("system:serviceaccount:{namespace}:{name}"),
            "uid": "b1f3c0a2-77e4-4d51-8e9a-2f6d5c4b3a21",
            "groups": [
                "system:serviceaccounts",
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated"
            ],
            "extra": {
                "authentication.kubernetes.io/credential-id": ["JTI=5a3e1c52-8d0e-4c35-a5bb-1d1b6f7c9a10"],
                "authentication.kubernetes.io/node-name": ["worker-1"],
                "authentication.kubernetes.io/node-uid": ["0c7f3a0e-6a55-4c53-9f2b-7b4ad3e1a001"],
                "authentication.kubernetes.io/pod-name": [format!("{name}-7d9c5b6f4-x2x9q")],
                "authentication.kubernetes.io/pod-uid": ["8f1e5b8a-3c2d-4e6f-9a0b-1c2d3e4f5a6b"]
            }
        },
        "audiences": audiences,
    })
}

async fn token_review(
    State(state): State<Arc<ApiServerState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let authorization = header("authorization");
    state.requests.lock().unwrap().push(ReviewRequest {
        authorization: authorization.clone(),
        content_type: header("content-type"),
        body: body.clone(),
    });
    let status_body = |code: StatusCode, reason: &str| {
        (
            code,
            Json(json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": reason, "code": code.as_u16(),
            })),
        )
            .into_response()
    };
    if let Some(code) = *state.forced_status.lock().unwrap() {
        return status_body(code, "Forbidden");
    }
    let expected = format!("Bearer {}", state.accepted_bearer.lock().unwrap());
    if authorization.as_deref() != Some(expected.as_str()) {
        return status_body(StatusCode::UNAUTHORIZED, "Unauthorized");
    }
    let token = body["spec"]["token"].as_str().unwrap_or_default();
    let status = state
        .answers
        .lock()
        .unwrap()
        .get(token)
        .cloned()
        .unwrap_or_else(|| {
            json!({
                "authenticated": false,
                "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]",
                "user": {}
            })
        });
    (
        StatusCode::CREATED,
        Json(json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": body["spec"].clone(),
            "status": status,
        })),
    )
        .into_response()
}

/// Writes `token` to a fresh temporary file (a projected token volume).
pub fn token_file(token: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("token");
    std::fs::write(&path, token).expect("write token file");
    (dir, path)
}
