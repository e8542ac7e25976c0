//! Set-up for tests of the upstream client: a real emulator on a random
//! port, clients pointed at it, and its test-only `/_emulator/` endpoints.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use token_broker::domain::Organization;
use token_broker::emulator::{self, EmulatorConfig, RunningEmulator};
use token_broker::upstream::azure_devops::{AzureDevOpsClient, AzureDevOpsConfig};
use token_broker::upstream::entra::{
    EntraConfig, RefreshTokenSink, RefreshTokenSource, StaticTokenSource, TokenSource,
};
use token_broker::upstream::UpstreamError;
use url::Url;

/// A running emulator and a plain HTTP client for its side doors.
pub struct Upstream {
    /// The emulator; stops when dropped.
    pub emulator: RunningEmulator,
    /// For `/_emulator/*`, the token endpoint and the data plane.
    pub http: reqwest::Client,
}

/// Records every refresh token handed to it.
#[derive(Default)]
pub struct RecordingSink {
    saved: Mutex<Vec<SecretString>>,
}

impl RecordingSink {
    /// The tokens saved so far, oldest first.
    pub fn saved(&self) -> Vec<SecretString> {
        self.saved.lock().unwrap().clone()
    }
}

#[async_trait]
impl RefreshTokenSink for RecordingSink {
    async fn save(&self, refresh_token: &SecretString) -> Result<(), UpstreamError> {
        self.saved.lock().unwrap().push(refresh_token.clone());
        Ok(())
    }
}

/// An organization name for tests.
pub fn org(name: &str) -> Organization {
    Organization::parse(name).unwrap()
}

impl Upstream {
    /// An emulator with its default configuration.
    pub async fn start() -> Self {
        Self::start_with(EmulatorConfig::default()).await
    }

    /// An emulator with `config`.
    pub async fn start_with(config: EmulatorConfig) -> Self {
        let emulator = emulator::spawn(config).await.expect("emulator starts");
        Upstream {
            emulator,
            http: reqwest::Client::new(),
        }
    }

    /// `http://127.0.0.1:PORT/...`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.emulator.url(), path)
    }

    /// Client settings pointed at the emulator, with short backoff so
    /// retried tests finish quickly.
    pub fn client_config(&self) -> AzureDevOpsConfig {
        AzureDevOpsConfig {
            base_url: Url::parse(&self.emulator.url()).unwrap(),
            request_timeout: Duration::from_secs(10),
            retry_min_delay: Duration::from_millis(10),
            retry_max_delay: Duration::from_millis(50),
            max_retries: 3,
            ..AzureDevOpsConfig::default()
        }
    }

    /// Entra settings pointed at the emulator.
    pub fn entra_config(&self) -> EntraConfig {
        EntraConfig {
            authority: Url::parse(&self.emulator.url()).unwrap(),
            tenant: emulator::DEFAULT_TENANT.to_owned(),
            client_id: "token-broker-tests".to_owned(),
            ..EntraConfig::default()
        }
    }

    /// A refresh-token source seeded with the emulator's default refresh
    /// token, and the sink it reports rotations to.
    pub fn refresh_source(&self) -> (Arc<RefreshTokenSource>, Arc<RecordingSink>) {
        let sink = Arc::new(RecordingSink::default());
        let source = RefreshTokenSource::new(
            self.entra_config(),
            SecretString::from(emulator::DEFAULT_REFRESH_TOKEN),
            sink.clone(),
        )
        .expect("token source");
        (Arc::new(source), sink)
    }

    /// A client authenticated as the emulated user.
    pub fn client(&self) -> AzureDevOpsClient {
        self.client_with(self.client_config())
    }

    /// A client with `config`, authenticated as the emulated user.
    pub fn client_with(&self, config: AzureDevOpsConfig) -> AzureDevOpsClient {
        let (source, _) = self.refresh_source();
        AzureDevOpsClient::new(config, source).expect("client")
    }

    /// A client that sends `bearer` as it is.
    pub fn client_with_bearer(&self, bearer: SecretString) -> AzureDevOpsClient {
        let source: Arc<dyn TokenSource> = Arc::new(StaticTokenSource::new(bearer));
        AzureDevOpsClient::new(self.client_config(), source).expect("client")
    }

    /// An app-only token from the client-credentials grant (which the PAT
    /// API refuses: docs/upstream-api.md, User-delegated Entra tokens only).
    pub async fn app_only_token(&self) -> SecretString {
        let answer: Value = self
            .http
            .post(self.url(&format!("/{}/oauth2/v2.0/token", emulator::DEFAULT_TENANT)))
            .form(&[
                ("client_id", "token-broker-tests"),
                ("client_secret", "not-checked"),
                ("grant_type", "client_credentials"),
                ("scope", "499b84ac-1321-427f-aa17-267ca6975798/.default"),
            ])
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap();
        SecretString::from(answer["access_token"].as_str().unwrap().to_owned())
    }

    /// `PUT /_emulator/faults` with `rules` (a JSON array).
    pub async fn set_faults(&self, rules: Value) {
        self.http
            .put(self.url("/_emulator/faults"))
            .json(&rules)
            .send()
            .await
            .unwrap()
            .error_for_status()
            .expect("fault rules accepted");
    }

    /// `DELETE /_emulator/faults`.
    pub async fn clear_faults(&self) {
        self.http
            .delete(self.url("/_emulator/faults"))
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap();
    }

    /// `GET /_emulator/stats`.
    pub async fn stats(&self) -> Value {
        self.http
            .get(self.url("/_emulator/stats"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Calls the emulator counted for `operation` (create, get, list, ...).
    pub async fn calls(&self, operation: &str) -> u64 {
        self.stats().await["calls"][operation].as_u64().unwrap_or(0)
    }

    /// `GET /_emulator/pats`: every PAT the emulator holds.
    pub async fn pats(&self) -> Vec<Value> {
        self.http
            .get(self.url("/_emulator/pats"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Moves the emulator's clock forward.
    pub async fn advance_clock(&self, by: Duration) {
        self.http
            .post(self.url("/_emulator/clock"))
            .json(&json!({ "advanceSeconds": by.as_secs() }))
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap();
    }

    /// The emulator's "now".
    pub async fn now(&self) -> chrono::DateTime<chrono::Utc> {
        let answer: Value = self
            .http
            .get(self.url("/_emulator/clock"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        token_broker::upstream::wire::parse_timestamp(answer["now"].as_str().unwrap()).unwrap()
    }

    /// Status of a data-plane call with `pat` as Basic auth:
    /// `resource` is `git/repositories` or `packaging/feeds`.
    pub async fn data_plane(&self, org: &str, resource: &str, pat: &SecretString) -> u16 {
        self.http
            .get(self.url(&format!("/{org}/_apis/{resource}?api-version=7.1")))
            .basic_auth("", Some(pat.expose_secret()))
            .header("X-TFS-FedAuthRedirect", "Suppress")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}
