//! AdminService set-up: a broker whose policy names `apikey:ops` as an admin
//! (and lets `apikey:ci` and `apikey:other` lease in fabrikam), on either
//! store, against its own emulator; admin clients over real sockets.

use secrecy::{ExposeSecret as _, SecretString};
use tempfile::TempDir;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Request, Status};

use token_broker::emulator::{self, EmulatorConfig, RunningEmulator};
use token_broker::proto::v1::admin_service_client::AdminServiceClient;

use super::broker::{spawn_broker, BrokerSpec, Client, TestBroker};
use super::db::{sqlite_url, TestDatabase};

/// `apikey:ops` is the admin; `ci` and `other` may lease code and packaging
/// scopes in fabrikam (`ops` may lease nothing).
pub const ADMIN_POLICY: &str = r#"
admins: ["apikey:ops"]
rules:
  - name: ci
    identities: ["apikey:ci", "apikey:other"]
    organizations: ["fabrikam", "contoso"]
    scopes: ["vso.code_write", "vso.packaging"]
    default_ttl: 1h
    max_ttl: 8h
"#;

/// Which store a test runs on.
#[derive(Clone, Copy, Debug)]
pub enum Store {
    /// A fresh PostgreSQL database.
    Postgres,
    /// A fresh SQLite file.
    Sqlite,
}

/// Keeps a test's database alive.
pub enum DbKeep {
    /// PostgreSQL database, dropped at the end.
    Postgres(TestDatabase),
    /// SQLite file's directory.
    Sqlite(TempDir),
}

/// A running broker with an admin, its emulator and its database.
pub struct AdminSetup {
    /// The emulator (PAT API, data plane, `/_emulator/pats`).
    pub emulator: RunningEmulator,
    /// The broker's configuration (keys, store URL).
    pub spec: BrokerSpec,
    /// The broker.
    pub broker: TestBroker,
    /// The database.
    pub db: DbKeep,
}

/// Starts the emulator and a broker with [`ADMIN_POLICY`] and keys `ci`,
/// `other` and `ops`.
pub async fn admin_setup(store: Store) -> AdminSetup {
    admin_setup_with(store, |spec| spec).await
}

/// [`admin_setup`] with the broker's spec changed by `customize` (e.g.
/// a short revocation retry schedule, the admin HTTP port).
pub async fn admin_setup_with(
    store: Store,
    customize: impl FnOnce(BrokerSpec) -> BrokerSpec,
) -> AdminSetup {
    let emulator = emulator::spawn(EmulatorConfig::default())
        .await
        .expect("start the emulator");
    let (url, db) = match store {
        Store::Postgres => {
            let db = TestDatabase::create().await;
            (db.url.clone(), DbKeep::Postgres(db))
        }
        Store::Sqlite => {
            let dir = tempfile::tempdir().expect("temp dir");
            (sqlite_url(&dir), DbKeep::Sqlite(dir))
        }
    };
    let spec = customize(
        BrokerSpec::new(url, emulator.url())
            .with_policy(ADMIN_POLICY)
            .with_key("other")
            .with_key("ops"),
    );
    let broker = spawn_broker(&spec).await;
    AdminSetup {
        emulator,
        spec,
        broker,
        db,
    }
}

/// Adds `authorization: Bearer <key>` to every call (or nothing).
#[derive(Clone)]
pub struct AdminBearer(Option<MetadataValue<Ascii>>);

impl AdminBearer {
    /// `authorization: Bearer <key>` on every call.
    pub fn new(key: &SecretString) -> Self {
        AdminBearer(Some(
            MetadataValue::try_from(format!("Bearer {}", key.expose_secret())).unwrap(),
        ))
    }
}

impl Interceptor for AdminBearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// An AdminService client with a fixed credential (or none).
pub type AdminClient = AdminServiceClient<InterceptedService<Channel, AdminBearer>>;

impl AdminSetup {
    /// A LeaseService client for key `name`.
    pub async fn lease_client(&self, name: &str) -> Client {
        self.broker.client(&self.spec.key(name)).await
    }

    /// An AdminService client for key `name` (None: no credential).
    pub async fn admin_client(&self, name: Option<&str>) -> AdminClient {
        let bearer = name.map(|n| {
            let key: SecretString = self.spec.key(n);
            MetadataValue::try_from(format!("Bearer {}", key.expose_secret())).unwrap()
        });
        AdminServiceClient::with_interceptor(self.broker.channel().await, AdminBearer(bearer))
    }

    /// `GET /_emulator/pats` of the emulator.
    pub async fn emulator_pats(&self) -> Vec<serde_json::Value> {
        reqwest::get(format!("{}/_emulator/pats", self.emulator.url()))
            .await
            .expect("emulator answers")
            .json()
            .await
            .expect("JSON")
    }

    /// The store URL.
    pub fn store_url(&self) -> &str {
        &self.spec.store_url
    }
}
