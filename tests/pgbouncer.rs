//! The broker behind PgBouncer (Debian's `/usr/sbin/pgbouncer`, started
//! here in session pooling mode): `database.url` through PgBouncer,
//! `database.migrate_url` direct, the lease lifecycle and the reaper over
//! the pooled connections; and `database.migrate_on_start = false`
//! refusing an unmigrated database.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::broker::{spawn_broker_with_config, BrokerSpec};
use common::db::TestDatabase;
use common::leases::{eventually, start_emulator, POLICY_YAML, SKEW};
use prost_types::Duration as ProtoDuration;
use secrecy::SecretString;
use token_broker::proto::v1::{
    lease, CreateLeaseRequest, GetLeaseRequest, RenewLeaseRequest, RevokeLeaseRequest,
};
use token_broker::server::{Broker, ServeError};
use token_broker::settings::Settings;

const PGBOUNCER: &str = "/usr/sbin/pgbouncer";
/// The database name PgBouncer serves; it does not exist on the
/// PostgreSQL server, so a connection to it can only go through PgBouncer.
const POOLED_DB: &str = "broker_pooled";

/// A PgBouncer process on 127.0.0.1 (session pooling, trust auth) serving
/// [`POOLED_DB`] as the database at `direct_url`; killed on drop.
struct PgBouncer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl PgBouncer {
    fn start(direct_url: &str) -> PgBouncer {
        let direct = url::Url::parse(direct_url).expect("test database URL");
        let dbname = direct.path().trim_start_matches('/');
        let host = direct.host_str().expect("host");
        let server_port = direct.port().unwrap_or(5432);
        let port = {
            let probe = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
            probe.local_addr().unwrap().port()
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let auth_file = dir.path().join("userlist.txt");
        std::fs::write(&auth_file, "\"postgres\" \"\"\n").unwrap();
        // PgBouncer refuses to run as root; as root it switches to `user`.
        let as_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let user_line = if as_root { "user = postgres\n" } else { "" };
        let ini = format!(
            "[databases]\n\
             {POOLED_DB} = host={host} port={server_port} dbname={dbname} user=postgres\n\
             \n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {auth}\n\
             pool_mode = session\n\
             ignore_startup_parameters = extra_float_digits\n\
             max_client_conn = 200\n\
             default_pool_size = 50\n\
             {user_line}",
            auth = auth_file.display(),
        );
        let ini_path = dir.path().join("pgbouncer.ini");
        std::fs::write(&ini_path, ini).unwrap();
        if as_root {
            make_readable(dir.path());
        }
        assert!(
            Path::new(PGBOUNCER).exists(),
            "{PGBOUNCER} is missing: install Debian's pgbouncer package"
        );
        let child = Command::new(PGBOUNCER)
            .arg("-q")
            .arg(&ini_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start pgbouncer");
        let mut bouncer = PgBouncer {
            child,
            port,
            _dir: dir,
        };
        bouncer.wait_listening();
        bouncer
    }

    /// Waits (at most 10 s) until PgBouncer accepts connections.
    fn wait_listening(&mut self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("pgbouncer exited at start ({status})");
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "pgbouncer did not listen on 127.0.0.1:{} within 10 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `postgres://postgres@127.0.0.1:PORT/broker_pooled`.
    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{POOLED_DB}", self.port)
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lets the `postgres` user PgBouncer switches to read the ini and auth file.
fn make_readable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
}

/// `Broker::start` as `serve` runs it, on 127.0.0.1:0.
async fn start(config: token_broker::config::Config) -> Result<Broker, ServeError> {
    let settings = Settings::new(config).expect("valid configuration");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let policy = token_broker::policy::Policy::from_yaml(POLICY_YAML).unwrap();
    Broker::start(settings, policy, listener).await
}

fn create_request(ttl_secs: i64) -> CreateLeaseRequest {
    CreateLeaseRequest {
        organization: "fabrikam".to_owned(),
        scopes: vec!["vso.code".to_owned()],
        ttl: Some(ProtoDuration {
            seconds: ttl_secs,
            nanos: 0,
        }),
        request_id: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_live_and_expire_through_pgbouncer_with_migrations_direct() {
    let db = TestDatabase::create().await;
    let bouncer = PgBouncer::start(&db.url);
    let emulator = start_emulator().await;

    let mut spec = BrokerSpec::new(bouncer.url(), emulator.url()).with_policy(POLICY_YAML);
    spec.reaper_interval = Duration::from_millis(200);
    spec.valid_to_skew = SKEW;
    let mut config = spec.config();
    config.database.migrate_url = Some(SecretString::from(db.url.clone()));
    let broker = spawn_broker_with_config(&spec, config).await;
    let mut ci = broker.client(&spec.key("ci")).await;

    // Create, get, renew, revoke.
    let created = ci
        .create_lease(create_request(900))
        .await
        .expect("lease created through pgbouncer")
        .into_inner();
    assert_eq!(created.state(), lease::State::Active);
    assert!(!created.token.is_empty());
    let got = ci
        .get_lease(GetLeaseRequest {
            name: created.name.clone(),
        })
        .await
        .expect("lease read through pgbouncer")
        .into_inner();
    assert_eq!(got.name, created.name);
    assert_eq!(got.state(), lease::State::Active);
    let renewed = ci
        .renew_lease(RenewLeaseRequest {
            name: created.name.clone(),
            increment: Some(ProtoDuration {
                seconds: 3600,
                nanos: 0,
            }),
        })
        .await
        .expect("lease renewed through pgbouncer")
        .into_inner();
    assert!(
        renewed.expire_time.as_ref().unwrap().seconds
            > created.expire_time.as_ref().unwrap().seconds
    );
    let revoked = ci
        .revoke_lease(RevokeLeaseRequest {
            name: created.name.clone(),
        })
        .await
        .expect("lease revoked through pgbouncer")
        .into_inner();
    assert_eq!(revoked.state(), lease::State::Revoked);

    // Background work: the reaper expires a short lease.
    let short = ci
        .create_lease(create_request(1))
        .await
        .expect("short lease created")
        .into_inner();
    let name = short.name.clone();
    eventually("the reaper expires the lease through pgbouncer", || {
        let mut ci = ci.clone();
        let name = name.clone();
        async move {
            let got = ci
                .get_lease(GetLeaseRequest { name })
                .await
                .unwrap()
                .into_inner();
            got.state() == lease::State::Expired
        }
    })
    .await;

    broker.stop().await;
    drop(bouncer);
    drop((emulator, db));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_migrate_on_start_an_unmigrated_database_is_refused_until_migrated() {
    let db = TestDatabase::create().await;
    let bouncer = PgBouncer::start(&db.url);
    let emulator = start_emulator().await;
    let spec = BrokerSpec::new(bouncer.url(), emulator.url()).with_policy(POLICY_YAML);
    let mut config = spec.config();
    config.database.migrate_on_start = false;
    config.database.migrate_url = Some(SecretString::from(db.url.clone()));

    match start(config.clone()).await {
        Ok(_) => panic!("serve started on an unmigrated database with migrate_on_start = false"),
        Err(e) => {
            assert!(
                matches!(e, ServeError::MigrationsBehind { version: 1, .. }),
                "{e}"
            );
            let message = e.to_string();
            assert!(message.contains("token-broker migrate"), "{message}");
            assert!(message.contains("migration 1 "), "{message}");
            assert!(message.contains("database.migrate_on_start"), "{message}");
            assert!(!message.contains("postgres://"), "{message}");
        }
    }
    // Nothing was applied: still refused the same way.
    assert!(matches!(
        start(config.clone()).await,
        Err(ServeError::MigrationsBehind { version: 1, .. })
    ));

    // `token-broker migrate` (over migrate_url), then serve starts.
    token_broker::server::migrate(&config)
        .await
        .expect("migrate");
    let broker = start(config).await.expect("serve starts once migrated");
    broker.stop().await.expect("broker stops");

    drop(bouncer);
    drop((emulator, db));
}
