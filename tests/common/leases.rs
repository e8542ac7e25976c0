//! Set-up for the lease tests: a fresh database (PostgreSQL or SQLite), the
//! emulator on a real socket, and the lease service wired to both through
//! the real store and the real upstream client (Entra refresh-token grant
//! included). Also helpers that look at the emulator from outside: its
//! data plane (a PAT as Basic auth) and its test endpoints.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use tempfile::TempDir;
use token_broker::audit::{AuditLog, ChainKey};
use token_broker::auth::Caller;
use token_broker::crypto::{Keyring, TokenFingerprinter};
use token_broker::domain::{Identity, LeaseId, Organization, ScopeSet};
use token_broker::emulator::{self, EmulatorConfig, RunningEmulator};
use token_broker::leases::{CreateLease, LeaseDeps, LeaseSettings, Leases, RetrySchedule};
use token_broker::policy::Policy;
use token_broker::store::{self, LeaseRecord, Store};
use token_broker::upstream::azure_devops::{AzureDevOpsClient, AzureDevOpsConfig};
use token_broker::upstream::entra::{EntraConfig, RefreshTokenSink, RefreshTokenSource};
use token_broker::upstream::{PatClient, UpstreamError};
use uuid::Uuid;

use super::db::TestDatabase;

/// Which store a test runs on.
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    /// A fresh PostgreSQL database through `DATABASE_URL`.
    Postgres,
    /// A SQLite file in a temporary directory.
    Sqlite,
}

/// The policy of the lease tests: `apikey:ci` and `apikey:other` may lease
/// `vso.code_write` and `vso.packaging` (and what they include) in
/// `fabrikam`, default TTL 1 h, max 8 h; `apikey:long` may lease for up to
/// 30 days (to meet the emulator's max-lifespan clamp), also with full
/// access (`app_token`, to meet the emulator's full-scope restriction).
pub const POLICY_YAML: &str = r#"
rules:
  - name: ci-code
    identities: ["apikey:ci", "apikey:other"]
    organizations: ["fabrikam"]
    scopes: ["vso.code_write", "vso.packaging"]
    default_ttl: 1h
    max_ttl: 8h
  - name: long-lived
    identities: ["apikey:long"]
    organizations: ["fabrikam"]
    scopes: ["vso.code", "app_token"]
    default_ttl: 1h
    max_ttl: 30d
"#;

/// The skew added to validTo upstream in these tests.
pub const SKEW: Duration = Duration::from_secs(300);

/// A database that outlives broker restarts within one test.
pub struct TestDb {
    /// Store URL.
    pub url: String,
    _postgres: Option<TestDatabase>,
    _dir: Option<TempDir>,
}

impl TestDb {
    /// A fresh, empty database on `backend`.
    pub async fn new(backend: Backend) -> TestDb {
        match backend {
            Backend::Postgres => {
                let db = TestDatabase::create().await;
                TestDb {
                    url: db.url.clone(),
                    _postgres: Some(db),
                    _dir: None,
                }
            }
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temporary directory");
                TestDb {
                    url: super::db::sqlite_url(&dir),
                    _postgres: None,
                    _dir: Some(dir),
                }
            }
        }
    }
}

/// Keeps the latest rotated refresh token in memory, as the broker keeps it
/// sealed in its store.
#[derive(Default)]
pub struct KeepRefreshToken(Mutex<Option<SecretString>>);

impl KeepRefreshToken {
    /// The latest rotated refresh token, if a grant happened.
    pub fn latest(&self) -> Option<SecretString> {
        self.0.lock().unwrap().clone()
    }
}

#[async_trait]
impl RefreshTokenSink for KeepRefreshToken {
    async fn save(&self, refresh_token: &SecretString) -> Result<(), UpstreamError> {
        *self.0.lock().unwrap() = Some(refresh_token.clone());
        Ok(())
    }
}

/// Keys that stay the same across broker restarts within a test.
pub struct TestKeys {
    /// Sealing key (base64).
    pub sealing: SecretString,
    /// Audit fingerprint key (base64).
    pub fingerprint: SecretString,
    /// Audit chain key (base64).
    pub audit_chain: SecretString,
}

impl TestKeys {
    /// Fresh random keys.
    pub fn new() -> TestKeys {
        TestKeys {
            sealing: Keyring::generate_key(),
            fingerprint: Keyring::generate_key(),
            audit_chain: Keyring::generate_key(),
        }
    }
}

/// The lease service, in-process, on a real store and the emulator.
pub struct Broker {
    /// The service.
    pub leases: Arc<Leases>,
    /// Its store, for looking at rows.
    pub store: Arc<dyn Store>,
    /// The latest refresh token the Entra grant rotated to.
    pub refresh_tokens: Arc<KeepRefreshToken>,
    /// The same upstream client the service uses (to act as a crashed
    /// broker would have).
    pub upstream: Arc<dyn PatClient>,
}

/// Options of [`start_broker`].
pub struct BrokerOptions {
    /// Upstream client retries (0 makes fault tests fast).
    pub upstream_max_retries: u32,
    /// How often the reaper runs (when a test runs it).
    pub reaper_interval: Duration,
    /// How old a PENDING lease must be for the reconciler.
    pub reconcile_after: Duration,
    /// The revocation retry schedule.
    pub revocation_retry: RetrySchedule,
    /// How often one replica sweeps for orphan PATs.
    pub sweep_interval: Duration,
    /// How long closed leases are kept (`leases.retention`).
    pub retention: Duration,
    /// `$top` of each upstream list page (the emulator's default is 100).
    pub upstream_page_size: u32,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions {
            upstream_max_retries: 0,
            reaper_interval: Duration::from_millis(100),
            reconcile_after: Duration::from_secs(120),
            revocation_retry: RetrySchedule::default(),
            sweep_interval: Duration::from_secs(600),
            retention: Duration::from_secs(90 * 24 * 3600),
            upstream_page_size: 100,
        }
    }
}

/// Starts the lease service on `db` against `emulator_url` with
/// [`POLICY_YAML`], deployment id `test-deployment`.
pub async fn start_broker(
    db: &TestDb,
    emulator_url: &str,
    keys: &TestKeys,
    options: BrokerOptions,
) -> Broker {
    let store = store::open(&db.url).await.expect("open the store");
    store.migrate().await.expect("migrate the store");
    let keyring =
        Keyring::new("k1".to_owned(), [("k1".to_owned(), keys.sealing.clone())]).expect("keyring");
    let fingerprinter = TokenFingerprinter::new(keys.fingerprint.clone()).expect("fingerprinter");
    let entra = EntraConfig {
        authority: url::Url::parse(emulator_url).expect("emulator URL"),
        client_id: "token-broker-tests".to_owned(),
        ..EntraConfig::default()
    };
    let refresh_tokens = Arc::new(KeepRefreshToken::default());
    let tokens = RefreshTokenSource::new(
        entra,
        SecretString::from(emulator::DEFAULT_REFRESH_TOKEN),
        refresh_tokens.clone(),
    )
    .expect("token source");
    let upstream = AzureDevOpsClient::new(
        AzureDevOpsConfig {
            base_url: url::Url::parse(emulator_url).expect("emulator URL"),
            max_retries: options.upstream_max_retries,
            request_timeout: Duration::from_secs(10),
            page_size: options.upstream_page_size,
            ..AzureDevOpsConfig::default()
        },
        Arc::new(tokens),
    )
    .expect("upstream client");
    let upstream: Arc<dyn PatClient> = Arc::new(upstream);
    let leases = Leases::new(LeaseDeps {
        store: store.clone(),
        upstream: upstream.clone(),
        keyring: Arc::new(keyring),
        policy: Policy::from_yaml(POLICY_YAML).expect("test policy").into(),
        fingerprinter: Arc::new(fingerprinter),
        audit: Arc::new(AuditLog::new(
            store.clone(),
            ChainKey::new(&keys.audit_chain).expect("chain key"),
        )),
        settings: LeaseSettings {
            display_name_prefix: "token-broker".to_owned(),
            deployment_id: "test-deployment".to_owned(),
            valid_to_skew: SKEW,
            reaper_interval: options.reaper_interval,
            replica_id: format!("replica-{}", Uuid::new_v4().simple()),
            reconcile_after: options.reconcile_after,
            sweep_interval: options.sweep_interval,
            retention: options.retention,
            revocation_retry: options.revocation_retry.clone(),
            background_workers: 8,
        },
    });
    Broker {
        leases: Arc::new(leases),
        store,
        refresh_tokens,
        upstream,
    }
}

/// The emulator with its default configuration on 127.0.0.1:0.
pub async fn start_emulator() -> RunningEmulator {
    start_emulator_with(EmulatorConfig::default()).await
}

/// The emulator with `config` on 127.0.0.1:0.
pub async fn start_emulator_with(config: EmulatorConfig) -> RunningEmulator {
    emulator::spawn(config).await.expect("start the emulator")
}

/// A caller with API-key identity `apikey:NAME`.
pub fn caller(name: &str) -> Caller {
    Caller {
        identity: format!("apikey:{name}").parse::<Identity>().unwrap(),
        peer: Some("127.0.0.1:40000".to_owned()),
        service_account: None,
    }
}

/// A CreateLease for `fabrikam`.
pub fn request(scopes: &[&str], ttl: Option<Duration>, request_id: Option<Uuid>) -> CreateLease {
    request_in("fabrikam", scopes, ttl, request_id)
}

/// A CreateLease for `organization`.
pub fn request_in(
    organization: &str,
    scopes: &[&str],
    ttl: Option<Duration>,
    request_id: Option<Uuid>,
) -> CreateLease {
    CreateLease {
        organization: Organization::parse(organization).unwrap(),
        scopes: ScopeSet::parse(scopes).unwrap(),
        ttl,
        request_id,
    }
}

/// `GET {emulator}/{org}/{path}` with the PAT as Basic auth (empty user
/// name: docs/upstream-api.md, Data plane); the HTTP status.
pub async fn data_plane(
    emulator_url: &str,
    organization: &str,
    path: &str,
    token: &SecretString,
) -> u16 {
    let basic = STANDARD.encode(format!(":{}", token.expose_secret()));
    reqwest::Client::new()
        .get(format!("{emulator_url}/{organization}/{path}"))
        .header("authorization", format!("Basic {basic}"))
        .send()
        .await
        .expect("data plane answers")
        .status()
        .as_u16()
}

/// Git repositories of `organization` (needs a scope covering `vso.code`).
pub async fn list_repositories(
    emulator_url: &str,
    organization: &str,
    token: &SecretString,
) -> u16 {
    data_plane(emulator_url, organization, "_apis/git/repositories", token).await
}

/// Package feeds of `organization` (needs a scope covering `vso.packaging`).
pub async fn list_feeds(emulator_url: &str, organization: &str, token: &SecretString) -> u16 {
    data_plane(emulator_url, organization, "_apis/packaging/feeds", token).await
}

/// Every PAT the emulator holds (`GET /_emulator/pats`).
pub async fn emulator_pats(emulator_url: &str) -> Vec<Value> {
    reqwest::get(format!("{emulator_url}/_emulator/pats"))
        .await
        .expect("emulator answers")
        .json()
        .await
        .expect("a JSON array")
}

/// The emulator's PAT whose displayName ends with the lease id.
pub async fn emulator_pat_of(emulator_url: &str, lease: &LeaseRecord) -> Value {
    let pats = emulator_pats(emulator_url).await;
    let mut matching: Vec<Value> = pats
        .into_iter()
        .filter(|p| p["displayName"] == lease.display_name.as_str())
        .collect();
    assert_eq!(matching.len(), 1, "exactly one PAT for lease {}", lease.id);
    matching.remove(0)
}

/// The emulator's call counters (`GET /_emulator/stats`).
pub async fn emulator_stats(emulator_url: &str) -> Value {
    reqwest::get(format!("{emulator_url}/_emulator/stats"))
        .await
        .expect("emulator answers")
        .json()
        .await
        .expect("a JSON object")
}

/// Installs emulator fault rules (`PUT /_emulator/faults`).
pub async fn set_faults(emulator_url: &str, rules: Value) {
    let status = reqwest::Client::new()
        .put(format!("{emulator_url}/_emulator/faults"))
        .json(&rules)
        .send()
        .await
        .expect("emulator answers")
        .status();
    assert!(status.is_success(), "faults accepted: {status}");
}

/// Clears emulator fault rules.
pub async fn clear_faults(emulator_url: &str) {
    reqwest::Client::new()
        .delete(format!("{emulator_url}/_emulator/faults"))
        .send()
        .await
        .expect("emulator answers");
}

/// Polls `get` until `done` holds (at most 60 s; the bound only stops a
/// hung test, it asserts nothing about speed).
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    super::wait::poll(what, Duration::from_secs(60), || {
        let done = check();
        async move {
            if done.await {
                Ok(())
            } else {
                Err("not yet".to_owned())
            }
        }
    })
    .await
}

/// How many DELETEs the emulator saw for `authorization_id`
/// (`/_emulator/stats` `deletes`).
pub async fn deletes_of(emulator_url: &str, authorization_id: &str) -> u64 {
    emulator_stats(emulator_url).await["deletes"][authorization_id]
        .as_u64()
        .unwrap_or(0)
}

/// The emulator's state (`active`, `revoked`, `expired`) of the PAT with
/// `authorization_id`.
pub async fn emulator_pat_state(emulator_url: &str, authorization_id: &str) -> String {
    emulator_pats(emulator_url)
        .await
        .into_iter()
        .find(|p| p["authorizationId"] == authorization_id)
        .unwrap_or_else(|| panic!("the emulator holds PAT {authorization_id}"))["state"]
        .as_str()
        .expect("a state")
        .to_owned()
}

/// The lease as stored.
pub async fn stored(store: &Arc<dyn Store>, id: LeaseId) -> LeaseRecord {
    store
        .get_lease(id)
        .await
        .unwrap()
        .expect("lease row exists")
}
