//! Managed credentials (issue 17): long-lived PATs declared in the policy's
//! `credentials:` section that rotate themselves every `rotation_period`
//! with an `overlap` during which the previous version stays valid.
//!
//! Knows no SQL and no HTTP: it speaks to [`crate::store::Store`] and
//! [`crate::upstream::PatClient`], like `leases`. [`Credentials`] is the
//! handle the API layer holds; the engine (rotation, revocation, retirement)
//! runs as background work started by `server`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use secrecy::SecretString;
use tokio::sync::watch;

use crate::audit::{AuditError, AuditLog};
use crate::crypto::{CryptoError, Keyring};
use crate::domain::{Identity, Timestamp};
use crate::error::{ErrorCode, ServiceError};
use crate::leases::RetrySchedule;
use crate::policy::PolicyHandle;
use crate::store::{CredentialVersionRecord, Store, StoreError};
use crate::upstream::{PatClient, UpstreamError};

mod engine;
mod metrics;

pub use metrics::CredentialMetrics;

pub use crate::domain::VersionState;

/// When the previous version is revoked after a manual rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RevokePrevious {
    /// Routine: the previous version stays valid for the overlap.
    #[default]
    AfterOverlap,
    /// A leak: the previous version goes on the revocation queue at once.
    Now,
}

/// One version of a managed credential, without its token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialVersion {
    /// The credential's name in the policy.
    pub credential: String,
    /// 1, 2, ... per credential, in minting order.
    pub version: i64,
    /// Where it is in its life.
    pub state: VersionState,
    /// Its organization.
    pub organization: String,
    /// Its scopes, as upstream spells them.
    pub scopes: Vec<String>,
    /// Upstream's authorizationId, once minted.
    pub authorization_id: Option<uuid::Uuid>,
    /// When it was (or is to be) minted, i.e. became CURRENT.
    pub valid_from: Timestamp,
    /// When the next version is minted (this one turns PREVIOUS).
    pub rotate_time: Timestamp,
    /// The PAT's validTo upstream.
    pub expire_time: Timestamp,
    /// When revocation began, if it did.
    pub revoke_time: Option<Timestamp>,
    /// Why the last attempt on it failed (a FAILED mint, a REVOKING
    /// retry); never a token.
    pub last_error: Option<String>,
}

/// A version with its token. Debug redacts the token.
#[derive(Clone, Debug)]
pub struct CredentialToken {
    /// The version.
    pub version: CredentialVersion,
    /// The PAT.
    pub token: SecretString,
}

/// Why a managed-credential operation failed. `reason()` values are stable
/// API.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// No credential of that name in the policy (nor a stored one).
    #[error("credential {name:?} not found")]
    NotFound {
        /// The name asked for.
        name: String,
    },
    /// The credential was removed from the policy (retired, or to be at
    /// `policy.credentials_retire_after`): no new versions.
    #[error("credential {name:?} is not in the policy (removed or retired): no new versions")]
    Retired {
        /// The name asked for.
        name: String,
    },
    /// The credential has no CURRENT version yet (or its rotation keeps
    /// failing); retry shortly.
    #[error("credential {name:?} has no valid version yet")]
    NoValidVersion {
        /// The name asked for.
        name: String,
    },
    /// Another replica is minting the next version right now; retry shortly.
    #[error("credential {name:?} is being rotated; retry shortly")]
    Busy {
        /// The name asked for.
        name: String,
    },
    /// Upstream failed.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A sealed token could not be opened.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// An audit row could not be written (fail closed: nothing was read).
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// A sealed token could not be opened, or a state the rules do not
    /// expect; the text is for logs and carries no secret.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServiceError for CredentialError {
    fn code(&self) -> ErrorCode {
        match self {
            CredentialError::NotFound { .. } => ErrorCode::NotFound,
            CredentialError::Retired { .. } => ErrorCode::FailedPrecondition,
            CredentialError::NoValidVersion { .. } | CredentialError::Busy { .. } => {
                ErrorCode::Unavailable
            }
            CredentialError::Upstream(e) => e.code(),
            CredentialError::Store(e) => e.code(),
            CredentialError::Audit(e) => e.code(),
            CredentialError::Crypto(_) | CredentialError::Internal(_) => ErrorCode::Internal,
        }
    }
    fn reason(&self) -> &'static str {
        match self {
            CredentialError::NotFound { .. } => "CREDENTIAL_NOT_FOUND",
            CredentialError::Retired { .. } => "CREDENTIAL_RETIRED",
            CredentialError::NoValidVersion { .. } => "CREDENTIAL_NO_VALID_VERSION",
            CredentialError::Busy { .. } => "CREDENTIAL_BUSY",
            CredentialError::Upstream(e) => e.reason(),
            CredentialError::Store(e) => e.reason(),
            CredentialError::Audit(e) => e.reason(),
            CredentialError::Crypto(_) | CredentialError::Internal(_) => "INTERNAL",
        }
    }
    fn retry_after(&self) -> Option<Duration> {
        match self {
            CredentialError::NoValidVersion { .. } | CredentialError::Busy { .. } => {
                Some(Duration::from_secs(1))
            }
            CredentialError::Upstream(e) => e.retry_after(),
            CredentialError::Store(e) => e.retry_after(),
            CredentialError::Audit(e) => e.retry_after(),
            _ => None,
        }
    }
}

/// A stream of versions ([`Credentials::watch`]).
pub type VersionStream =
    Pin<Box<dyn Stream<Item = Result<CredentialToken, CredentialError>> + Send + 'static>>;

/// Tunables of the credential engine, from configuration.
#[derive(Clone, Debug)]
pub struct CredentialSettings {
    /// First part of every upstream display name (`leases.display_name_prefix`).
    pub display_name_prefix: String,
    /// This deployment's id, the second part of every display name.
    pub deployment_id: String,
    /// Added to a version's validTo upstream (`leases.valid_to_skew`).
    pub valid_to_skew: Duration,
    /// This replica's name in `claimed_by`.
    pub replica_id: String,
    /// How long the minting replica's claim on a PENDING version lasts
    /// before the reconciler may settle it (`leases.reconcile_after`).
    pub mint_claim: Duration,
    /// A credential absent from the policy this long is retired
    /// (`policy.credentials_retire_after`).
    pub retire_after: Duration,
    /// How often the engine runs (and a replica that did not mint a
    /// version learns of it, where no notification is pushed): 1 s in
    /// `serve`.
    pub tick: Duration,
    /// How often the credential orphan sweep runs (`leases.sweep_interval`).
    pub sweep_interval: Duration,
    /// Backoff of failed upstream revocations (`leases.revocation_retry`).
    pub revocation_retry: RetrySchedule,
}

/// What the credential service is built from.
#[derive(Clone)]
pub struct CredentialDeps {
    /// Persistence.
    pub store: Arc<dyn Store>,
    /// Upstream PAT API.
    pub upstream: Arc<dyn PatClient>,
    /// Seals tokens at rest.
    pub keyring: Arc<Keyring>,
    /// The policy in force (reloaded live).
    pub policy: PolicyHandle,
    /// Tunables.
    pub settings: CredentialSettings,
    /// Prometheus handles.
    pub metrics: CredentialMetrics,
    /// The chained audit trail.
    pub audit: Arc<AuditLog>,
    /// Bumped whenever this process sees versions change; watchers wait on it.
    changes: Arc<watch::Sender<u64>>,
}

impl CredentialDeps {
    /// Dependencies with a fresh change channel.
    pub fn new(
        store: Arc<dyn Store>,
        upstream: Arc<dyn PatClient>,
        keyring: Arc<Keyring>,
        policy: PolicyHandle,
        settings: CredentialSettings,
        metrics: CredentialMetrics,
        audit: Arc<AuditLog>,
    ) -> Self {
        CredentialDeps {
            store,
            upstream,
            keyring,
            policy,
            settings,
            metrics,
            audit,
            changes: Arc::new(watch::channel(0).0),
        }
    }

    /// Wakes this process's watchers to read their credential again.
    fn notify(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// The managed-credential service: a cheap `Clone` handle built at server
/// start and held by the API layer.
#[derive(Clone)]
pub struct Credentials {
    inner: Arc<Inner>,
}

struct Inner {
    deps: CredentialDeps,
    /// `deps` with the store background work uses.
    background: CredentialDeps,
}

impl Credentials {
    /// Builds the service.
    pub fn new(deps: CredentialDeps) -> Self {
        Credentials {
            inner: Arc::new(Inner {
                background: deps.clone(),
                deps,
            }),
        }
    }

    /// Runs background work on `store` (connections of its own, as
    /// `Leases::with_background_store`).
    pub fn with_background_store(self, store: Arc<dyn Store>) -> Self {
        let inner = Arc::try_unwrap(self.inner).unwrap_or_else(|arc| Inner {
            deps: arc.deps.clone(),
            background: arc.background.clone(),
        });
        let mut background = inner.background;
        background.store = store;
        Credentials {
            inner: Arc::new(Inner {
                deps: inner.deps,
                background,
            }),
        }
    }

    /// Runs the engine every `settings.tick` until `shutdown` resolves:
    /// mints due versions, revokes versions past their overlap, reconciles
    /// stale PENDING ones, retires credentials absent from the policy, and
    /// sweeps for orphan credential PATs when that is due. A pass that saw
    /// versions change wakes this process's watchers.
    pub async fn run_background(&self, shutdown: impl std::future::Future<Output = ()> + Send) {
        let deps = &self.inner.background;
        let mut seen: Option<engine::Snapshot> = None;
        let work = async {
            let mut ticker = tokio::time::interval(deps.settings.tick);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut idle_ticks = 0u32;
            loop {
                ticker.tick().await;
                // Without credentials in the policy or the store, look
                // only every IDLE_EVERY ticks (a credential absent from
                // the policy but stored keeps the engine at every tick).
                let idle = deps.policy.current().credentials().is_empty()
                    && seen.as_ref().is_some_and(|s| s.is_empty());
                if idle {
                    idle_ticks += 1;
                    if idle_ticks < IDLE_EVERY {
                        continue;
                    }
                }
                idle_ticks = 0;
                match engine::run_once(deps).await {
                    Ok(snapshot) => {
                        if seen.as_ref() != Some(&snapshot) {
                            seen = Some(snapshot);
                            deps.notify();
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "credential background pass failed"),
                }
                if let Err(e) = engine::sweep_if_due(deps).await {
                    tracing::warn!(error = %e, "credential sweep failed");
                }
            }
        };
        tokio::select! {
            () = work => {}
            () = shutdown => {}
        }
    }

    /// Listens for other replicas' changes (PostgreSQL `LISTEN` on
    /// [`crate::store::CREDENTIALS_CHANNEL`] over its own connection to
    /// `url`, which must be a direct one: PgBouncer's transaction pooling
    /// does not keep a LISTEN; `serve` uses `database.migrate_url` when set)
    /// and wakes this process's watchers at each, until `shutdown`
    /// resolves. The connection is opened once the policy declares a
    /// credential (it is one beyond `database.max_connections`). A lost connection is reopened after a few seconds; the
    /// engine's reads every tick cover the gap.
    pub async fn listen_postgres(
        &self,
        url: secrecy::SecretString,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) {
        use secrecy::ExposeSecret as _;
        let deps = &self.inner.deps;
        let work = async {
            loop {
                // The connection is one beyond `database.max_connections`:
                // opened only once the policy declares a credential.
                while deps.policy.current().credentials().is_empty() {
                    tokio::time::sleep(LISTEN_RETRY).await;
                }
                let listener = async {
                    let mut listener: sqlx::postgres::PgListener =
                        sqlx::postgres::PgListener::connect(url.expose_secret()).await?;
                    listener.listen(crate::store::CREDENTIALS_CHANNEL).await?;
                    tracing::debug!("listening for managed credential changes");
                    loop {
                        let _ = listener.recv().await?;
                        deps.notify();
                    }
                };
                let failed: Result<std::convert::Infallible, sqlx::Error> = listener.await;
                let Err(e) = failed;
                // sqlx never puts the URL's password in its errors.
                tracing::warn!(error = %e, "credential change listener failed; polling until it reconnects");
                tokio::time::sleep(LISTEN_RETRY).await;
            }
        };
        tokio::select! {
            () = work => {}
            () = shutdown => {}
        }
    }

    /// One pass of background work (what `run_background` does each tick,
    /// without the sweep).
    pub async fn run_background_once(&self) -> Result<(), CredentialError> {
        engine::run_once(&self.inner.background).await?;
        self.inner.background.notify();
        Ok(())
    }

    /// The CURRENT version of credential `name` with its token.
    ///
    /// Errors: `NotFound` (not in the policy and never stored), `Retired`
    /// (removed from the policy and retired), `NoValidVersion` (not minted
    /// yet), `Store`, `Crypto`.
    pub async fn current(&self, name: &str) -> Result<CredentialToken, CredentialError> {
        let deps = &self.inner.deps;
        let versions = deps.store.list_credential_versions(Some(name)).await?;
        match versions.iter().find(|v| v.state == VersionState::Current) {
            Some(v) => with_token(deps, v),
            None => Err(missing(deps, name, versions.is_empty())),
        }
    }

    /// The versions of `name` as they become CURRENT: the current one at
    /// once (unless `after_version` is it or newer), then every newer
    /// version in order, learnt across replicas (this process's engine
    /// reads the database every `settings.tick`). Reconnecting with the
    /// last version received as `after_version` resumes without gaps: each
    /// newer version still valid (CURRENT or PREVIOUS) is sent, oldest
    /// first; versions that never became CURRENT (FAILED) and ones already
    /// revoked are skipped. An error item ends the stream (`NotFound`,
    /// `Retired` once the credential is retired, `Store`, `Crypto`).
    pub fn watch(&self, name: &str, after_version: Option<i64>) -> VersionStream {
        struct State {
            deps: CredentialDeps,
            name: String,
            last: Option<i64>,
            changes: watch::Receiver<u64>,
            done: bool,
        }
        let deps = self.inner.deps.clone();
        let changes = deps.changes.subscribe();
        let state = State {
            deps,
            name: name.to_owned(),
            last: after_version,
            changes,
            done: false,
        };
        Box::pin(futures::stream::unfold(state, |mut st| async move {
            if st.done {
                return None;
            }
            loop {
                st.changes.borrow_and_update();
                let next = next_for_watcher(&st.deps, &st.name, st.last).await;
                match next {
                    Ok(Some(token)) => {
                        st.last = Some(token.version.version);
                        return Some((Ok(token), st));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        st.done = true;
                        return Some((Err(e), st));
                    }
                }
                // A change seen by this process's engine or minting, or a
                // slow poll in case a wake-up was missed.
                let _ = tokio::time::timeout(WATCH_POLL, st.changes.changed()).await;
            }
        }))
    }

    /// Mints the next version of `name` now; with [`RevokePrevious::Now`]
    /// the previous versions are revoked upstream at once (before this
    /// returns, unless upstream fails: then they stay on the revocation
    /// queue, retried), else the previous one stays valid for the overlap.
    /// Returns the new CURRENT version.
    ///
    /// Errors: `NotFound` (not in the policy), `Busy` (another replica is
    /// minting), `Upstream` (the version is FAILED; the engine retries),
    /// `Store`.
    pub async fn rotate(
        &self,
        name: &str,
        revoke_previous: RevokePrevious,
    ) -> Result<CredentialVersion, CredentialError> {
        let deps = &self.inner.deps;
        let policy = deps.policy.current();
        let Some(spec) = policy.credential(name) else {
            let versions = deps.store.list_credential_versions(Some(name)).await?;
            if revoke_previous == RevokePrevious::Now && !versions.is_empty() {
                return revoke_all_now(deps, name, versions).await;
            }
            return Err(missing(deps, name, versions.is_empty()));
        };
        let versions = deps.store.list_credential_versions(Some(name)).await?;
        if versions
            .first()
            .is_some_and(|v| v.state == VersionState::Pending)
        {
            return Err(CredentialError::Busy {
                name: name.to_owned(),
            });
        }
        let minted = match engine::mint(
            deps,
            spec,
            versions.first().map(|v| v.version),
            // A rotation asked for starts a new schedule now.
            None,
            revoke_previous,
        )
        .await
        {
            Ok(v) => v,
            Err(engine::MintError::Busy) => {
                return Err(CredentialError::Busy {
                    name: name.to_owned(),
                })
            }
            Err(engine::MintError::Failed(e)) => return Err(e),
        };
        if revoke_previous == RevokePrevious::Now {
            let now = Timestamp::now();
            for v in deps.store.list_credential_versions(Some(name)).await? {
                if v.version < minted.version && v.state == VersionState::Previous {
                    if let Err(e) = engine::revoke_version(deps, &v, now).await {
                        tracing::warn!(credential = name, version = v.version, error = %e, "immediate revocation failed; left to background retries");
                    }
                }
            }
        }
        Ok(public(&minted))
    }

    /// Every version of every credential, grouped by credential (by name),
    /// newest version first within each; no tokens.
    pub async fn list(&self) -> Result<Vec<CredentialVersion>, CredentialError> {
        let versions = self.inner.deps.store.list_credential_versions(None).await?;
        Ok(versions.iter().map(public).collect())
    }

    /// Whether `identity` is a reader of credential `name` in the policy in
    /// force (reloaded live): listed in `readers` (exact or glob) or matched
    /// by `reader_regexes`, as a rule's identities. False for a name the
    /// policy does not declare.
    pub fn reader_allowed(&self, name: &str, identity: &Identity) -> bool {
        self.inner
            .deps
            .policy
            .current()
            .credential(name)
            .is_some_and(|c| c.is_reader(identity))
    }
}

/// With no credential anywhere, the engine runs every this many ticks.
const IDLE_EVERY: u32 = 30;

/// Delay before reopening a lost LISTEN connection.
const LISTEN_RETRY: Duration = Duration::from_secs(5);

/// How often a watcher reads the database when nothing woke it.
const WATCH_POLL: Duration = Duration::from_secs(5);

/// The next version a watcher that last got `last` should get, if any.
async fn next_for_watcher(
    deps: &CredentialDeps,
    name: &str,
    last: Option<i64>,
) -> Result<Option<CredentialToken>, CredentialError> {
    let versions = deps.store.list_credential_versions(Some(name)).await?;
    let current = versions.iter().find(|v| v.state == VersionState::Current);
    let Some(current) = current else {
        let in_policy = deps.policy.current().credential(name).is_some();
        if versions.is_empty() && !in_policy {
            return Err(CredentialError::NotFound {
                name: name.to_owned(),
            });
        }
        if !in_policy && versions.iter().all(|v| v.state != VersionState::Pending) {
            return Err(CredentialError::Retired {
                name: name.to_owned(),
            });
        }
        return Ok(None);
    };
    match last {
        None => with_token(deps, current).map(Some),
        Some(last) if last >= current.version => Ok(None),
        Some(last) => {
            // Oldest valid version after `last` (newest-first list).
            let next = versions
                .iter()
                .rev()
                .find(|v| v.version > last && v.state.holds_token())
                .unwrap_or(current);
            with_token(deps, next).map(Some)
        }
    }
}

/// A credential removed from the policy (retired or not yet): nothing to
/// mint, so NOW revokes every version still valid at once, letting an
/// operator cut off a leak after the entry is gone. Answers the newest
/// version as it is afterwards.
async fn revoke_all_now(
    deps: &CredentialDeps,
    name: &str,
    versions: Vec<CredentialVersionRecord>,
) -> Result<CredentialVersion, CredentialError> {
    let now = Timestamp::now();
    for v in &versions {
        if matches!(v.state, VersionState::Current | VersionState::Previous) {
            let previous = CredentialVersionRecord {
                state: VersionState::Previous,
                revoke_at: Some(now),
                update_time: now,
                ..v.clone()
            };
            deps.store
                .update_credential_version(&previous, v.state, None)
                .await?;
        }
    }
    for v in deps.store.list_credential_versions(Some(name)).await? {
        if matches!(v.state, VersionState::Previous | VersionState::Revoking) {
            if let Err(e) = engine::revoke_version(deps, &v, now).await {
                tracing::warn!(credential = name, version = v.version, error = %e, "immediate revocation failed; left to background retries");
            }
        }
    }
    engine::changed(deps, name).await;
    let after = deps.store.list_credential_versions(Some(name)).await?;
    let newest = after.first().ok_or_else(|| CredentialError::NotFound {
        name: name.to_owned(),
    })?;
    Ok(public(newest))
}

/// Why `name` has no CURRENT version.
fn missing(deps: &CredentialDeps, name: &str, never_stored: bool) -> CredentialError {
    let name = name.to_owned();
    if deps.policy.current().credential(&name).is_some() {
        CredentialError::NoValidVersion { name }
    } else if never_stored {
        CredentialError::NotFound { name }
    } else {
        CredentialError::Retired { name }
    }
}

/// `v` with its token opened.
fn with_token(
    deps: &CredentialDeps,
    v: &CredentialVersionRecord,
) -> Result<CredentialToken, CredentialError> {
    let sealed = v.sealed_token.as_ref().ok_or_else(|| {
        CredentialError::Internal(format!(
            "credential {} version {} in state {} holds no token",
            v.credential, v.version, v.state
        ))
    })?;
    let token = deps
        .keyring
        .open(sealed, &engine::token_aad(&v.credential, v.version))?;
    Ok(CredentialToken {
        version: public(v),
        token,
    })
}

/// The public view of a stored version.
fn public(v: &CredentialVersionRecord) -> CredentialVersion {
    CredentialVersion {
        credential: v.credential.clone(),
        version: v.version,
        state: v.state,
        organization: v.organization.to_string(),
        scopes: v
            .scopes
            .to_upstream()
            .split(' ')
            .map(str::to_owned)
            .collect(),
        authorization_id: v.authorization_id.map(|id| id.as_uuid()),
        valid_from: v.valid_from,
        rotate_time: v.rotate_time,
        expire_time: v.expire_time,
        revoke_time: v.revoke_time,
        last_error: v.last_error.clone(),
    }
}
