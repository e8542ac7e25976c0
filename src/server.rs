//! The composition root: builds a running broker from [`Settings`] (store,
//! migrations, keys, deployment id, upstream client and its refresh token,
//! policy, leases and their background work, the gRPC server and the admin
//! HTTP port). `serve`, `dev` and the integration tests all start the
//! broker here, so all three run the same code.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin_http::{self, Metrics};
use crate::api::{self, ApiError};
use crate::audit::{AuditEvent, AuditLog, Outcome, RefusalCounter};
use crate::auth::Authenticator;
use crate::config::{Config, ConfigError};
use crate::credential_access::CredentialAccess;
use crate::credentials::{CredentialDeps, CredentialMetrics, CredentialSettings, Credentials};
use crate::leases::{LeaseDeps, LeaseSettings, Leases};
use crate::policy::{PolicyError, PolicyHandle, DEFAULT_POLL_INTERVAL};
use crate::settings::Settings;
use crate::store::{self, StoreError};
use crate::upstream::azure_devops::AzureDevOpsClient;
use crate::upstream::credential::{self, BrokerCredential};
use crate::upstream::UpstreamError;

/// How long a shutdown waits for in-flight calls before cutting them off
/// (below Kubernetes' default 30 s termination grace period).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Time the last refusal counts get to be written at shutdown when the
/// in-flight calls and background work used up [`SHUTDOWN_GRACE`]: one
/// small transaction; still within Kubernetes' default 30 s grace period.
pub const REFUSAL_FLUSH_GRACE: Duration = Duration::from_secs(5);

/// How often the managed-credential engine runs: each replica reads the
/// versions this often, so a version minted elsewhere reaches its watchers
/// within about this long.
pub const CREDENTIAL_TICK: Duration = Duration::from_secs(1);

/// Meta key of the deployment id (second part of every display name).
pub const DEPLOYMENT_ID_META: &str = "deployment_id";

/// Why the broker could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Bad configuration (names the setting).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The policy file is invalid.
    #[error("policy.file: {0}")]
    Policy(#[from] PolicyError),
    /// The store could not be opened or migrated.
    #[error("database: {0}")]
    Store(#[from] StoreError),
    /// The upstream client could not be built.
    #[error("upstream: {0}")]
    Upstream(#[from] UpstreamError),
    /// The listener could not be bound.
    #[error("grpc.listen: cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The admin listener could not be bound.
    #[error("admin.listen: cannot listen on {addr}: {source}")]
    AdminBind {
        /// The configured address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The keys do not fit the database (names purpose and key id).
    #[error(transparent)]
    Keys(#[from] crate::keycheck::KeyCheckError),
    /// The gRPC server failed.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// A background task panicked.
    #[error("broker task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    /// `database.migrate_on_start` is false and the database lacks
    /// migrations this binary has (`version`: the oldest missing one).
    #[error(
        "database.migrate_on_start: migrations are off at start and the database lacks \
         migration {version} ({pending} pending); run `token-broker migrate` first"
    )]
    MigrationsBehind {
        /// The oldest migration version not applied.
        version: i64,
        /// How many migrations are not applied.
        pending: usize,
    },
}

/// Loads the policy named by `policy.file` (the broker then reloads it on
/// change and on SIGHUP); without one, a policy with no rules, which denies
/// every request (deny by default).
pub fn load_policy(config: &Config) -> Result<PolicyHandle, ServeError> {
    match &config.policy.file {
        Some(path) => {
            let policy = PolicyHandle::from_file(path)?;
            tracing::info!(file = %path.display(), rules = policy.current().rules().len(), "policy loaded");
            Ok(policy)
        }
        None => {
            tracing::warn!("no policy.file configured: every lease request will be denied");
            Ok(PolicyHandle::fixed(Default::default()))
        }
    }
}

/// Binds `grpc.listen`.
pub async fn bind(config: &Config) -> Result<TcpListener, ServeError> {
    let addr = config.grpc.listen;
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

/// A running broker: the gRPC server and the lease background work.
pub struct Broker {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    deployment_id: String,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<Result<(), ApiError>>,
    background: JoinHandle<()>,
    /// Refused authentications counted in memory, written every
    /// `audit.auth_failure_interval` by `refusal_flusher` and once more
    /// when the server has stopped.
    refusals: Arc<RefusalCounter>,
    refusal_flusher: JoinHandle<()>,
    /// Logs the `audit chain head` line every `audit.head_log_interval`
    /// while serving, and once more when everything else has stopped.
    audit: Arc<AuditLog>,
    /// The managed-credential service (its engine runs with the lease
    /// background work).
    credentials: Credentials,
}

impl Broker {
    /// Opens and migrates the store, resolves keys, builds the upstream
    /// client and the lease service, and starts serving on `listener` with
    /// `policy` (a file-backed [`PolicyHandle`] is watched and reloaded
    /// until the broker stops). Returns once the server accepts calls.
    pub async fn start(
        settings: Settings,
        policy: impl Into<PolicyHandle>,
        listener: TcpListener,
    ) -> Result<Broker, ServeError> {
        let policy: PolicyHandle = policy.into();
        let (keys, generated) = settings.keys()?;
        if let Some(path) = generated {
            tracing::warn!(
                file = %path.display(),
                "no keys configured: generated a keys file (mode 0600) beside the SQLite database; back it up with the database, without it sealed tokens cannot be opened"
            );
        }
        let (keyring, fingerprinter) = keys.build()?;
        let chain_keys = keys.chain_keys()?;
        let keyring = Arc::new(keyring);
        let Settings {
            config,
            api_keys,
            kubernetes,
            tls,
            ..
        } = settings;

        // One handle per kind of work, each over its own share of
        // `database.max_connections`.
        let stores = open_store(&config, config.database.migrate_on_start).await?;
        let store = stores.requests.clone();
        // Keys that match, or no start: before anything is sealed, opened,
        // chained or fingerprinted.
        crate::keycheck::check_keys(store.as_ref(), &keys).await?;
        let deployment_id = store
            .put_meta_if_absent(
                DEPLOYMENT_ID_META,
                &uuid::Uuid::new_v4().simple().to_string(),
            )
            .await?;

        // Every replica reads the one stored credential at each refresh.
        let credential = Arc::new(BrokerCredential::new(
            config.upstream.entra.clone(),
            store.clone(),
            keyring.clone(),
        ));
        // One registry per broker: the gRPC server, the upstream client and
        // the database pools report on it too.
        let metrics = Arc::new(Metrics::new());
        metrics.watch_pools(vec![
            ("requests", stores.requests.clone()),
            ("background", stores.background.clone()),
            ("audit", stores.audit.clone()),
        ]);
        let rpc_metrics = Arc::new(
            api::observe::RpcMetrics::register(metrics.registry(), &api::SERVED_DESCRIPTOR_SETS)
                .expect("gRPC metric names are unique"),
        );
        let upstream =
            AzureDevOpsClient::new(config.upstream.azure_devops.clone(), credential.clone())?
                .with_metrics(
                    crate::upstream::metrics::UpstreamMetrics::register(metrics.registry())
                        .expect("upstream metric names are unique"),
                );

        // One chained audit trail for every audit row this process writes;
        // every append also moves the exported chain head (and counters),
        // and a detected truncation counts.
        let audit = {
            let (metrics, tamper_metrics) = (metrics.clone(), metrics.clone());
            Arc::new(
                AuditLog::with_keys(
                    stores.audit.clone(),
                    chain_keys,
                    keys.fingerprint_active.clone(),
                )
                .with_observer(Box::new(move |event, appended| {
                    metrics.observe_append(event, appended)
                }))
                .with_tamper_observer(Box::new(move || tamper_metrics.observe_tamper())),
            )
        };
        if let Some(configured) = &config.upstream.refresh_token {
            adopt_configured_refresh_token(&audit, store.as_ref(), &keyring, configured).await?;
        }
        // Bound before anything is served, so a taken port fails the start.
        let admin_listener = match config.admin.listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServeError::AdminBind { addr, source })?,
            ),
            None => None,
        };
        // Refusals are counted in memory on the request path and written
        // aggregated, so a flood of them never queues on the database.
        let refusals = {
            let metrics = metrics.clone();
            Arc::new(
                RefusalCounter::new(audit.clone())
                    .with_observer(Box::new(move |reason| metrics.observe_refusal(reason))),
            )
        };
        let auth = authenticator(api_keys.clone(), kubernetes)
            .await
            .with_refusal_audit(refusals.clone());
        if auth.accepts_no_bearer() && tls.as_ref().is_none_or(|t| t.client_ca_pem.is_none()) {
            tracing::warn!(
                "no auth.api_keys, auth.api_keys_file, auth.kubernetes or grpc.tls.client_ca_file configured: every LeaseService call will be refused"
            );
        }

        let upstream: Arc<dyn crate::upstream::PatClient> = Arc::new(upstream);
        let replica_id = replica_id();
        // Managed credentials (issue 17): the API layer reads through this
        // handle; its engine runs beside the lease background work.
        let credentials = Credentials::new(CredentialDeps::new(
            store.clone(),
            upstream.clone(),
            keyring.clone(),
            policy.clone(),
            CredentialSettings {
                display_name_prefix: config.leases.display_name_prefix.clone(),
                deployment_id: deployment_id.clone(),
                valid_to_skew: config.leases.valid_to_skew,
                replica_id: replica_id.clone(),
                mint_claim: config.leases.reconcile_after,
                retire_after: config.policy.credentials_retire_after,
                tick: CREDENTIAL_TICK,
                sweep_interval: config.leases.sweep_interval,
                revocation_retry: config.leases.revocation_retry.clone(),
            },
            CredentialMetrics::register(metrics.registry())
                .expect("credential metric names are unique"),
            audit.clone(),
        ))
        .with_background_store(stores.background.clone());
        let leases = Leases::new(LeaseDeps {
            store: store.clone(),
            upstream,
            keyring,
            policy: policy.clone(),
            fingerprinter: Arc::new(fingerprinter),
            audit: audit.clone(),
            settings: LeaseSettings {
                display_name_prefix: config.leases.display_name_prefix.clone(),
                deployment_id: deployment_id.clone(),
                valid_to_skew: config.leases.valid_to_skew,
                reaper_interval: config.leases.reaper_interval,
                replica_id,
                reconcile_after: config.leases.reconcile_after,
                sweep_interval: config.leases.sweep_interval,
                retention: config.leases.retention,
                revocation_retry: config.leases.revocation_retry.clone(),
                background_workers: LeaseSettings::background_workers_for(
                    config.upstream.azure_devops.max_concurrent_requests,
                ),
            },
        });
        let leases = Arc::new(leases.with_background_store(stores.background));

        let (shutdown, rx) = watch::channel(false);
        // Ends with the broker; its outcomes are logged (and audited by
        // subscribers of `PolicyHandle::subscribe`).
        {
            // Every reload attempt becomes a `policy.reload` audit event,
            // until the broker stops.
            let leases = leases.clone();
            let outcomes = policy.subscribe();
            let stop = stopped(rx.clone());
            tokio::spawn(async move {
                tokio::select! {
                    () = leases.audit_policy_reloads(outcomes) => {}
                    () = stop => {}
                }
            });
        }
        if api_keys.file().is_some() {
            // `auth.api_keys_file` reloads with the policy, on the policy
            // watcher's triggers (one SIGHUP reloads both); every attempt
            // becomes an `auth.api_keys_reload` audit event. Both end with
            // the broker.
            let leases = leases.clone();
            let outcomes = api_keys.subscribe();
            let stop = stopped(rx.clone());
            tokio::spawn(async move {
                tokio::select! {
                    () = leases.audit_api_key_reloads(outcomes) => {}
                    () = stop => {}
                }
            });
            drop(api_keys.spawn_reloader(policy.triggers(), stopped(rx.clone())));
        }
        // Detached: the watcher ends with the broker's shutdown signal.
        drop(policy.spawn_watcher(DEFAULT_POLL_INTERVAL, stopped(rx.clone())));
        if matches!(
            config.database.backend(),
            Ok(crate::config::Backend::Postgres)
        ) {
            // Other replicas' new versions reach this one's watchers at
            // once; a direct connection (`migrate_url` when set: past
            // PgBouncer, whose transaction pooling drops a LISTEN).
            let url = config
                .database
                .migrate_url
                .clone()
                .unwrap_or_else(|| config.database.url.clone());
            let credentials = credentials.clone();
            let stop = stopped(rx.clone());
            tokio::spawn(async move { credentials.listen_postgres(url, stop).await });
        }
        let background = {
            let leases = leases.clone();
            let credentials = credentials.clone();
            let rx = rx.clone();
            tokio::spawn(async move {
                tokio::join!(
                    leases.run_background(stopped(rx.clone())),
                    credentials.run_background(stopped(rx)),
                );
            })
        };
        {
            // Detached: ends with the broker's shutdown signal (the head at
            // shutdown is logged by `finish`, after the last rows).
            let audit = audit.clone();
            let interval = config.audit.head_log_interval;
            let stop = stopped(rx.clone());
            tokio::spawn(async move { audit.run_head_log(interval, stop).await });
        }
        let refusal_flusher = {
            let refusals = refusals.clone();
            let interval = config.audit.auth_failure_interval;
            let stop = stopped(rx.clone());
            tokio::spawn(async move { refusals.run(interval, stop).await })
        };
        {
            // Detached: ends with the broker's shutdown signal.
            let credential = credential.clone();
            let interval = config.upstream.keepalive_interval;
            let stop = stopped(rx.clone());
            tokio::spawn(async move { credential.keep_alive(interval, stop).await });
        }
        let addr = listener.local_addr().map_err(|source| ServeError::Bind {
            addr: config.grpc.listen,
            source,
        })?;
        let admin_addr = match admin_listener {
            Some(listener) => {
                let addr = listener
                    .local_addr()
                    .map_err(|source| ServeError::AdminBind {
                        addr: config.admin.listen.unwrap_or(addr),
                        source,
                    })?;
                let store = store.clone();
                let stop = stopped(rx.clone());
                tokio::spawn(async move {
                    if let Err(e) = admin_http::serve(listener, metrics, store, stop).await {
                        tracing::error!(error = %e, "admin HTTP server failed");
                    }
                });
                Some(addr)
            }
            None => None,
        };
        // The managed-credential service the API layer reads through
        // (`CredentialService`, `AdminService`'s credential calls), with
        // the reader and admin rules and their audit.
        let credential_access =
            CredentialAccess::new(credentials.clone(), policy.clone(), audit.clone());
        let server = tokio::spawn(api::serve(
            listener,
            leases,
            credential_access,
            Arc::new(auth),
            tls,
            config.grpc.clone(),
            store,
            rpc_metrics,
            stopped(rx),
        ));
        tracing::info!(
            %addr,
            deployment_id = %deployment_id,
            tls = tls_mode(&config),
            "token-broker serving gRPC"
        );
        Ok(Broker {
            addr,
            admin_addr,
            deployment_id,
            shutdown,
            server,
            background,
            refusals,
            refusal_flusher,
            audit,
            credentials,
        })
    }

    /// The managed-credential service this broker runs (the handle the API
    /// layer reads through).
    pub fn credentials(&self) -> Credentials {
        self.credentials.clone()
    }

    /// The address the gRPC server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address the admin HTTP server listens on, when `admin.listen`
    /// is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// This deployment's id, stable across restarts on one store.
    pub fn deployment_id(&self) -> &str {
        &self.deployment_id
    }

    /// Stops accepting calls, lets in-flight ones finish, stops background
    /// work, and waits for all of it.
    pub async fn stop(self) -> Result<(), ServeError> {
        let _ = self.shutdown.send(true);
        self.finish().await
    }

    /// Runs until `signal` resolves (or the server fails), then stops.
    pub async fn run_until(
        mut self,
        signal: impl std::future::Future<Output = ()>,
    ) -> Result<(), ServeError> {
        tokio::select! {
            () = signal => {
                tracing::info!("shutting down: finishing in-flight calls");
                self.stop().await
            }
            result = &mut self.server => {
                let _ = self.shutdown.send(true);
                let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
                if tokio::time::timeout_at(deadline, &mut self.background).await.is_err() {
                    self.background.abort();
                }
                self.flush_refusals(deadline).await;
                self.audit.log_head();
                result??;
                Ok(())
            }
        }
    }

    /// Waits for in-flight calls, then background work, both within one
    /// [`SHUTDOWN_GRACE`]; what is still running then is cut off (a
    /// background revoke cut off mid-call leaves its claim to lapse, and
    /// another replica or the next start finishes it; a repeated revoke is
    /// harmless, upstream "not found" counts as revoked).
    async fn finish(mut self) -> Result<(), ServeError> {
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        let server = match tokio::time::timeout_at(deadline, &mut self.server).await {
            Ok(joined) => joined,
            Err(_) => {
                tracing::warn!(
                    grace_secs = SHUTDOWN_GRACE.as_secs(),
                    "in-flight calls did not finish within the grace period; stopping anyway"
                );
                self.server.abort();
                Ok(Ok(()))
            }
        };
        if tokio::time::timeout_at(deadline, &mut self.background)
            .await
            .is_err()
        {
            tracing::warn!(
                grace_secs = SHUTDOWN_GRACE.as_secs(),
                "background work did not finish within the grace period; stopping anyway (its claims lapse)"
            );
            self.background.abort();
        }
        self.flush_refusals(deadline).await;
        self.audit.log_head();
        server??;
        Ok(())
    }

    /// Writes the refusals counted since the last flush, once the server
    /// takes no more calls: the periodic flusher ends first (a flush under
    /// way completes), then one last flush, both by `deadline` (or within
    /// [`REFUSAL_FLUSH_GRACE`] if that is later). What cannot be written by
    /// then is logged as lost.
    async fn flush_refusals(&mut self, deadline: tokio::time::Instant) {
        let deadline = deadline.max(tokio::time::Instant::now() + REFUSAL_FLUSH_GRACE);
        if tokio::time::timeout_at(deadline, &mut self.refusal_flusher)
            .await
            .is_err()
        {
            self.refusal_flusher.abort();
        }
        let refusals = self.refusals.clone();
        if tokio::time::timeout_at(deadline, refusals.flush())
            .await
            .is_err()
            || self.refusals.pending() > 0
        {
            tracing::error!(
                refusals = self.refusals.pending(),
                "refused authentications of the last interval could not be written to the audit trail before shutdown"
            );
        }
    }
}

/// The caller authenticator: API keys, plus service accounts when
/// `auth.kubernetes.enabled`. Their keys are fetched once now, so the first
/// caller does not wait; a failure is logged, not fatal (the verifier
/// fetches again on use).
async fn authenticator(
    api_keys: crate::auth::ApiKeysHandle,
    kubernetes: Option<crate::auth::kubernetes::KubernetesVerifier>,
) -> Authenticator {
    let mut auth = Authenticator::new(api_keys);
    if let Some(verifier) = kubernetes {
        match verifier.prefetch_keys().await {
            Ok(()) => tracing::info!(
                "auth.kubernetes: service-account callers accepted; signing keys fetched"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                "auth.kubernetes: cannot fetch the cluster's signing keys yet; service-account callers are refused as UNAVAILABLE until they can be fetched"
            ),
        }
        auth = auth.with_kubernetes(verifier);
    }
    auth
}

/// `plaintext`, `tls` or `mtls (optional|required)`, for the start-up log.
fn tls_mode(config: &Config) -> &'static str {
    use crate::auth::tls::ClientAuth;
    match &config.grpc.tls {
        None => "plaintext",
        Some(t) if t.client_ca_file.is_none() => "tls",
        Some(t) if t.client_auth == Some(ClientAuth::Optional) => {
            "mtls (client certificate optional)"
        }
        Some(_) => "mtls (client certificate required)",
    }
}

/// Resolves once `rx` turns true (or its sender is gone).
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// `claimed_by` of this process: host name (when known), pid and a random
/// suffix, so two replicas never share one.
fn replica_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &suffix[..8])
}

/// Opens the store as `[database]` says (one handle per kind of work).
/// With `migrate`, applies pending migrations first, over
/// `database.migrate_url` when set (a direct connection: migrations hold a
/// session advisory lock, which PgBouncer's transaction pooling breaks).
/// Without, refuses ([`ServeError::MigrationsBehind`]) a database that
/// lacks a migration this binary has.
async fn open_store(config: &Config, migrate: bool) -> Result<store::Stores, ServeError> {
    let database = &config.database;
    let stores = store::Stores::open(
        secrecy::ExposeSecret::expose_secret(&database.url),
        &database.pool_options(),
    )
    .await?;
    if migrate {
        apply_migrations(database, stores.requests.as_ref()).await?;
    } else {
        let pending = stores.requests.pending_migrations().await?;
        if let Some(&version) = pending.first() {
            return Err(ServeError::MigrationsBehind {
                version,
                pending: pending.len(),
            });
        }
    }
    Ok(stores)
}

/// Applies pending migrations over `database.migrate_url` when set (a
/// connection opened for them and dropped after), else over `store`
/// (opened on `database.url`).
///
/// Errors: the migration URL unreachable, a migration failing.
pub async fn apply_migrations(
    database: &crate::config::DatabaseConfig,
    store: &dyn store::Store,
) -> Result<(), StoreError> {
    match &database.migrate_url {
        Some(url) => {
            store::open(secrecy::ExposeSecret::expose_secret(url))
                .await?
                .migrate()
                .await
        }
        None => store.migrate().await,
    }
}

/// Adopts `configured` (`upstream.refresh_token`) as a new credential
/// version when it differs from the last configured value adopted, and
/// audits it (`upstream.adopt_configured`). Unchanged: nothing happens, so
/// a restart never replaces a newer login or rotation with an old Secret.
async fn adopt_configured_refresh_token(
    audit: &AuditLog,
    store: &dyn store::Store,
    keyring: &crate::crypto::Keyring,
    configured: &secrecy::SecretString,
) -> Result<(), ServeError> {
    let Some(version) = credential::adopt_configured(store, keyring, configured).await? else {
        tracing::debug!("upstream.refresh_token was adopted before; the stored credential stands");
        return Ok(());
    };
    tracing::info!(
        version,
        "adopted upstream.refresh_token as the upstream credential"
    );
    let event = AuditEvent {
        caller_detail: Some(format!("version={version}")),
        ..AuditEvent::new(
            chrono::Utc::now(),
            crate::audit::SYSTEM_IDENTITY,
            crate::audit::UPSTREAM_ADOPT_CONFIGURED,
            Outcome::Allowed,
        )
    };
    if let Err(e) = audit.append(&event).await {
        tracing::warn!(error = %e, "could not audit the adopted upstream.refresh_token");
    }
    Ok(())
}

/// `token-broker migrate`: applies pending migrations, then checks the
/// keys (resolved as `serve` resolves them) against the database
/// ([`crate::keycheck::check_keys`]), recording new ones.
pub async fn migrate(config: &Config) -> Result<(), ServeError> {
    let backend = config
        .database
        .backend()
        .map_err(|m| ConfigError::new("database.url", m))?;
    let (keys, _) = config.keys.resolve(&backend)?;
    let stores = open_store(config, true).await?;
    crate::keycheck::check_keys(stores.requests.as_ref(), &keys).await?;
    Ok(())
}
