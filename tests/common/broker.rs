//! The real broker, in-process, on 127.0.0.1:0: the same wiring as
//! `token-broker serve` (`server::Broker`), configured from a
//! [`BrokerSpec`] instead of a file. Clients reach it over a real socket.

use std::net::SocketAddr;
use std::time::Duration;

use figment::providers::{Format as _, Toml};
use figment::Figment;
use secrecy::{ExposeSecret as _, SecretString};
use tokio::net::TcpListener;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic::{Request, Status};

use token_broker::auth::kubernetes::KubernetesAuthConfig;
use token_broker::auth::tls::TlsConfig;
use token_broker::auth::GeneratedApiKey;
use token_broker::config::{ApiKeySetting, Config, DEFAULTS};
use token_broker::crypto::Keyring;
use token_broker::emulator::DEFAULT_REFRESH_TOKEN;
use token_broker::leases::RetrySchedule;
use token_broker::policy::{Policy, PolicyHandle};
use token_broker::proto::v1::lease_service_client::LeaseServiceClient;
use token_broker::server::Broker;
use token_broker::settings::Settings;

/// A policy letting `apikey:ci` lease code and packaging scopes in
/// `fabrikam` (default TTL 1 h, max 8 h).
pub const CI_POLICY: &str = r#"
rules:
  - name: ci
    identities: ["apikey:ci"]
    organizations: ["fabrikam"]
    scopes: ["vso.code_write", "vso.packaging"]
    default_ttl: 1h
    max_ttl: 8h
"#;

/// Everything a test chooses about a broker. Keep the spec to restart a
/// broker on the same store with the same keys.
#[derive(Clone)]
pub struct BrokerSpec {
    /// `postgres://…` or `sqlite://…`.
    pub store_url: String,
    /// Base URL of the emulator (PAT API and Entra endpoint).
    pub emulator_url: String,
    /// Policy YAML.
    pub policy_yaml: String,
    /// `(name, key)` pairs the broker accepts.
    pub api_keys: Vec<(String, SecretString)>,
    /// Sealing key (base64 of 32 bytes).
    pub sealing_key: SecretString,
    /// Audit fingerprint key (base64 of 32 bytes).
    pub fingerprint_key: SecretString,
    /// Audit chain key (base64 of 32 bytes).
    pub audit_chain_key: SecretString,
    /// The initial upstream refresh token.
    pub refresh_token: SecretString,
    /// `leases.reaper_interval`.
    pub reaper_interval: Duration,
    /// `leases.valid_to_skew`.
    pub valid_to_skew: Duration,
    /// `auth.kubernetes` (disabled when `None`).
    pub kubernetes: Option<KubernetesAuthConfig>,
    /// `grpc.tls` (plaintext when `None`).
    pub tls: Option<TlsConfig>,
    /// Serve the admin HTTP port (`admin.listen`) on 127.0.0.1:0.
    pub admin_port: bool,
    /// `[leases.revocation_retry]` (the defaults when `None`).
    pub revocation_retry: Option<RetrySchedule>,
    /// `upstream.azure_devops.max_retries` (the default when `None`).
    pub upstream_max_retries: Option<u32>,
}

impl BrokerSpec {
    /// A broker on `store_url` against the emulator at `emulator_url`, with
    /// [`CI_POLICY`], fresh keys, and one API key named `ci` (see
    /// [`BrokerSpec::key`]).
    pub fn new(store_url: impl Into<String>, emulator_url: impl Into<String>) -> BrokerSpec {
        let ci = GeneratedApiKey::generate("ci").expect("key");
        BrokerSpec {
            store_url: store_url.into(),
            emulator_url: emulator_url.into(),
            policy_yaml: CI_POLICY.to_owned(),
            api_keys: vec![("ci".into(), ci.key)],
            sealing_key: Keyring::generate_key(),
            fingerprint_key: Keyring::generate_key(),
            audit_chain_key: Keyring::generate_key(),
            refresh_token: SecretString::from(DEFAULT_REFRESH_TOKEN),
            reaper_interval: Duration::from_secs(15),
            valid_to_skew: Duration::from_secs(300),
            kubernetes: None,
            tls: None,
            admin_port: false,
            revocation_retry: None,
            upstream_max_retries: None,
        }
    }

    /// Retries failed upstream revokes after `min_delay` doubling to
    /// `max_delay`, gives up (REVOKE_FAILED) after `max_attempts`
    /// failures, then retries every `failed_interval`.
    pub fn with_revocation_retry(
        mut self,
        min_delay: Duration,
        max_delay: Duration,
        max_attempts: u32,
        failed_interval: Duration,
    ) -> BrokerSpec {
        self.revocation_retry = Some(RetrySchedule {
            min_delay,
            max_delay,
            max_attempts,
            failed_interval,
        });
        self
    }

    /// Makes the upstream client retry a failed call `n` times (0: one
    /// attempt, so a fault answers at once).
    pub fn with_upstream_max_retries(mut self, n: u32) -> BrokerSpec {
        self.upstream_max_retries = Some(n);
        self
    }

    /// Accepts Kubernetes service-account tokens as `config` says
    /// (`enabled` is forced on).
    pub fn with_kubernetes(mut self, config: KubernetesAuthConfig) -> BrokerSpec {
        self.kubernetes = Some(KubernetesAuthConfig {
            enabled: true,
            ..config
        });
        self
    }

    /// Serves gRPC over TLS (mTLS when `tls.client_ca_file` is set).
    pub fn with_tls(mut self, tls: TlsConfig) -> BrokerSpec {
        self.tls = Some(tls);
        self
    }

    /// Also serves the admin HTTP port (`/metrics`, `/healthz`, `/readyz`)
    /// on 127.0.0.1:0; see [`TestBroker::admin_url`].
    pub fn with_admin_port(mut self) -> BrokerSpec {
        self.admin_port = true;
        self
    }

    /// Replaces the policy.
    pub fn with_policy(mut self, yaml: &str) -> BrokerSpec {
        self.policy_yaml = yaml.to_owned();
        self
    }

    /// Adds an API key `name` (a fresh one) and returns the spec.
    pub fn with_key(mut self, name: &str) -> BrokerSpec {
        let k = GeneratedApiKey::generate(name).expect("key");
        self.api_keys.push((name.to_owned(), k.key));
        self
    }

    /// The key configured under `name`.
    pub fn key(&self, name: &str) -> SecretString {
        self.api_keys
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, k)| k.clone())
            .unwrap_or_else(|| panic!("no API key named {name}"))
    }

    /// The server configuration this spec stands for (defaults, then the
    /// spec; the process environment is not read).
    pub fn config(&self) -> Config {
        let mut config: Config = Figment::from(Toml::string(DEFAULTS))
            .extract()
            .expect("defaults");
        config.grpc.listen = "127.0.0.1:0".parse().unwrap();
        config.database.url = SecretString::from(self.store_url.clone());
        config.keys.active = Some("test".into());
        config.keys.sealing = [("test".to_owned(), self.sealing_key.clone())].into();
        config.keys.fingerprint = Some(self.fingerprint_key.clone());
        config.keys.audit_chain = Some(self.audit_chain_key.clone());
        let url = url::Url::parse(&self.emulator_url).expect("emulator URL");
        config.upstream.azure_devops.base_url = url.clone();
        config.upstream.entra.authority = url;
        config.upstream.entra.client_id = "token-broker-tests".into();
        config.upstream.refresh_token = Some(self.refresh_token.clone());
        config.leases.reaper_interval = self.reaper_interval;
        config.leases.valid_to_skew = self.valid_to_skew;
        if let Some(retry) = &self.revocation_retry {
            config.leases.revocation_retry = retry.clone();
        }
        if let Some(n) = self.upstream_max_retries {
            config.upstream.azure_devops.max_retries = n;
        }
        config.auth.api_keys = self
            .api_keys
            .iter()
            .map(|(name, key)| {
                let k = GeneratedApiKey::from_key(name, key.clone()).expect("valid key");
                ApiKeySetting {
                    name: name.clone(),
                    sha256: k.hash.to_hex(),
                }
            })
            .collect();
        if let Some(k8s) = &self.kubernetes {
            config.auth.kubernetes = k8s.clone();
        }
        config.grpc.tls = self.tls.clone();
        if self.admin_port {
            config.admin.listen = Some("127.0.0.1:0".parse().unwrap());
        }
        config
    }

    /// [`BrokerSpec::config`], checked and built.
    pub fn settings(&self) -> Settings {
        Settings::new(self.config()).expect("test configuration is valid")
    }
}

/// A running in-process broker.
pub struct TestBroker {
    /// Where it listens.
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT`, or `https://127.0.0.1:PORT` with TLS (the
    /// server certificate is checked for the name `localhost`).
    pub url: String,
    /// Its deployment id.
    pub deployment_id: String,
    /// Where its admin HTTP port listens, with [`BrokerSpec::with_admin_port`].
    pub admin_addr: Option<SocketAddr>,
    broker: Option<Broker>,
}

/// Starts the real server on 127.0.0.1:0 as `spec` says.
pub async fn spawn_broker(spec: &BrokerSpec) -> TestBroker {
    let policy = Policy::from_yaml(&spec.policy_yaml).expect("test policy is valid");
    spawn_broker_with_policy(spec, policy.into()).await
}

/// Starts the real server as `spec` says but with `policy` (e.g. a
/// file-backed handle that reloads) instead of `spec.policy_yaml`.
pub async fn spawn_broker_with_policy(spec: &BrokerSpec, policy: PolicyHandle) -> TestBroker {
    start(spec, spec.config(), policy).await
}

/// Starts the real server with `config` (typically [`BrokerSpec::config`]
/// with settings the spec does not cover changed) and the spec's policy.
pub async fn spawn_broker_with_config(spec: &BrokerSpec, config: Config) -> TestBroker {
    let policy = Policy::from_yaml(&spec.policy_yaml).expect("test policy is valid");
    start(spec, config, policy.into()).await
}

/// Starts the real server with `config` and `policy` (e.g. a file-backed
/// handle that reloads).
#[allow(dead_code)]
pub async fn spawn_broker_with_config_and_policy(
    spec: &BrokerSpec,
    config: Config,
    policy: PolicyHandle,
) -> TestBroker {
    start(spec, config, policy).await
}

async fn start(spec: &BrokerSpec, config: Config, policy: PolicyHandle) -> TestBroker {
    let settings = Settings::new(config).expect("test configuration is valid");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let broker = Broker::start(settings, policy, listener)
        .await
        .expect("broker starts");
    let addr = broker.addr();
    let url = match &spec.tls {
        Some(_) => format!("https://{addr}"),
        None => format!("http://{addr}"),
    };
    TestBroker {
        addr,
        url,
        deployment_id: broker.deployment_id().to_owned(),
        admin_addr: broker.admin_addr(),
        broker: Some(broker),
    }
}

/// Adds `authorization: Bearer <key>` to every call (or nothing).
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// A LeaseService client that authenticates with a fixed key (or none).
pub type Client = LeaseServiceClient<InterceptedService<Channel, Bearer>>;

impl TestBroker {
    /// The broker's managed-credential service (the Rust API the gRPC
    /// layer calls).
    #[allow(dead_code)]
    pub fn credentials(&self) -> token_broker::credentials::Credentials {
        self.broker.as_ref().expect("running").credentials()
    }

    /// `http://127.0.0.1:PORT{path}` on the admin HTTP port; panics
    /// without [`BrokerSpec::with_admin_port`].
    pub fn admin_url(&self, path: &str) -> String {
        let addr = self.admin_addr.expect("spec.with_admin_port()");
        format!("http://{addr}{path}")
    }

    /// A connected channel.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url.clone())
            .unwrap()
            .connect()
            .await
            .expect("connect to the broker")
    }

    /// A client sending `key` as its bearer credential.
    pub async fn client(&self, key: &SecretString) -> Client {
        let value = MetadataValue::try_from(format!("Bearer {}", key.expose_secret())).unwrap();
        LeaseServiceClient::with_interceptor(self.channel().await, Bearer(Some(value)))
    }

    /// A client that sends no credential.
    pub async fn anonymous_client(&self) -> Client {
        LeaseServiceClient::with_interceptor(self.channel().await, Bearer(None))
    }

    /// A client sending this exact `authorization` header value.
    pub async fn client_with_header(&self, header: &str) -> Client {
        let value = MetadataValue::try_from(header).unwrap();
        LeaseServiceClient::with_interceptor(self.channel().await, Bearer(Some(value)))
    }

    /// A TLS channel trusting `server_ca_pem`, presenting `identity`
    /// (certificate and key PEM) when given. Errors are the caller's to
    /// judge: a refused client certificate may fail here or on the first
    /// call (TLS 1.3 reports it after the client's handshake ends).
    pub async fn tls_channel(
        &self,
        server_ca_pem: &str,
        identity: Option<(&str, &str)>,
    ) -> Result<Channel, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(server_ca_pem))
            .domain_name("localhost");
        if let Some((cert, key)) = identity {
            tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        Channel::from_shared(self.url.clone())
            .unwrap()
            .tls_config(tls)?
            .connect()
            .await
    }

    /// A LeaseService client on `channel` sending `authorization` (the
    /// whole header value) on every call, or nothing.
    pub fn client_on(channel: Channel, authorization: Option<&str>) -> Client {
        let value = authorization.map(|h| MetadataValue::try_from(h).unwrap());
        LeaseServiceClient::with_interceptor(channel, Bearer(value))
    }

    /// Stops it gracefully (in-flight calls finish) and waits.
    pub async fn stop(mut self) {
        if let Some(b) = self.broker.take() {
            b.stop().await.expect("broker stops cleanly");
        }
    }
}
