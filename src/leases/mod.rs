//! Lease business rules: issue, renew, revoke, expire (the lease lifecycle
//! in docs/architecture.md).
//! Knows no SQL and no HTTP: it speaks to [`crate::store::Store`] and
//! [`crate::upstream::PatClient`].
//!
//! The api layer has already validated input into domain types and
//! authenticated the caller. Submodules: `transition` (the state machine:
//! every change of a lease's state), `issue` (create and request_id
//! replay), `lifecycle` (get, list, renew, revoke), `revocation` (the
//! upstream revoke and its retry schedule), `background` (the reaper,
//! revocation retries, the reconciler), `sweep` (orphan PATs), `admin`,
//! `policy_reloads` and `api_key_reloads` (their audit rows), `auditing` (who acted, how rows are
//! appended), `sealing` (the PAT at rest), `time`, `page_token` (opaque
//! list cursors).
//!
//! Choices worth knowing:
//! - A request_id replay waits up to 30 s for a PENDING attempt, then
//!   answers `InProgress` (UNAVAILABLE + RetryInfo); a FAILED attempt is
//!   replaced by a fresh lease under the same key.
//! - After a timeout, 5xx or unreadable answer to the upstream create, the
//!   broker lists upstream for the lease's display name. A PAT found there
//!   cannot be adopted (its secret is only in the lost create answer), so it
//!   is revoked and the lease marked FAILED; the caller's retry mints afresh.
//!   If that look-up fails the lease stays PENDING for the reconciler.
//! - Times are kept at microseconds (what both stores hold); upstream's
//!   `validTo` is rounded down to them, and a clamped `validTo` shortens
//!   `expire_time` and `max_expire_time`.
//! - `revoke_time` is set when revocation begins (REVOKING); the final state
//!   is EXPIRED if that was at or after `expire_time`, else REVOKED.
//! - A REVOKING row carries `next_attempt_time` 60 s ahead while the caller's
//!   own attempt runs, so background work only takes it over if that task
//!   died; failed attempts back off (jittered, 5 s doubling to 10 min) and
//!   after 10 the lease is REVOKE_FAILED, retried hourly.
//! - Page tokens carry a keyed MAC (the audit fingerprint key, domain
//!   separated) over the cursor, the holder and the filter.

use std::time::Duration;

use secrecy::SecretString;
use uuid::Uuid;

use crate::domain::Timestamp;
use crate::domain::{LeaseState, Organization, ScopeSet};
use crate::store::LeaseRecord;

/// A validated CreateLease request.
#[derive(Clone, Debug)]
pub struct CreateLease {
    /// Organization.
    pub organization: Organization,
    /// Requested scopes.
    pub scopes: ScopeSet,
    /// Requested TTL; None: the policy's default.
    pub ttl: Option<Duration>,
    /// Idempotency key.
    pub request_id: Option<Uuid>,
}

impl CreateLease {
    /// The request fingerprint kept with its request_id: hex SHA-256 over
    /// the normalized parameters (lower-case organization, sorted scopes,
    /// and the TTL as asked, or `default` when unset, so a later change of
    /// the policy default does not make a retry "different").
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let ttl = match self.ttl {
            Some(ttl) => format!("{}.{:09}s", ttl.as_secs(), ttl.subsec_nanos()),
            None => "default".to_owned(),
        };
        let normalized = format!(
            "v1\norganization={}\nscopes={}\nttl={}",
            self.organization,
            self.scopes.to_upstream(),
            ttl
        );
        hex::encode(Sha256::digest(normalized.as_bytes()))
    }
}

/// A freshly issued (or replayed) lease and its PAT, if any. Debug redacts the
/// token (`SecretString`).
#[derive(Debug)]
pub struct IssuedLease {
    /// The lease.
    pub lease: LeaseRecord,
    /// The PAT, to hand to the caller: always for a new lease; for a
    /// replay only while the lease is ACTIVE (a lease that left ACTIVE
    /// keeps no token, and is answered without one).
    pub token: Option<SecretString>,
}

/// A validated ListLeases request.
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    /// 1..=1000 (the api layer applies the default and the cap).
    pub page_size: u32,
    /// Opaque token from a previous page; empty for the first.
    pub page_token: String,
    /// Only these states (empty: all).
    pub states: Vec<LeaseState>,
    /// Only this organization.
    pub organization: Option<Organization>,
}

/// One page of leases.
#[derive(Clone, Debug)]
pub struct LeasePage {
    /// Newest first.
    pub leases: Vec<LeaseRecord>,
    /// Empty on the last page.
    pub next_page_token: String,
}

use std::sync::Arc;

use crate::audit::{AuditError, AuditLog};
use crate::auth::Caller;
use crate::crypto::{CryptoError, Keyring, TokenFingerprinter};
use crate::domain::LeaseId;
use crate::error::{ErrorCode, ServiceError};
use crate::policy::{Denial, PolicyHandle};
use crate::store::{Store, StoreError};
use crate::upstream::{PatClient, UpstreamError};

mod admin;
mod api_key_reloads;
mod auditing;
mod background;
mod issue;
mod lifecycle;
mod page_token;
mod policy_reloads;
mod retention;
mod revocation;
mod sealing;
mod sweep;
mod time;
mod transition;

pub use admin::{AuditPage, AuditQuery, BulkRevoke, LeaseSelector, MAX_FORCE_REASON_CHARS};
pub(crate) use auditing::append_best_effort;
pub use retention::RetentionReport;
pub use sweep::SweepReport;

/// Why a lease operation failed. `reason()` values are stable API.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Policy refused the request.
    #[error("denied by policy: {}", denial.reason())]
    Denied {
        /// Which check failed.
        denial: Denial,
        /// The closest rule, if any matched the identity.
        rule: Option<String>,
    },
    /// No such lease, or it is not the caller's (indistinguishable on purpose).
    #[error("lease not found")]
    NotFound,
    /// The request_id was used before with other parameters.
    #[error("request_id was already used with other parameters")]
    RequestIdReused,
    /// The lease is not ACTIVE (or past its expire_time).
    #[error("lease cannot be renewed in state {0}")]
    NotRenewable(LeaseState),
    /// The lease is ACTIVE but already expires at its max_expire_time (UTC):
    /// no renewal can move it further.
    #[error(
        "lease is already at its max_expire_time ({}) and cannot be renewed further",
        .0.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    )]
    AtMaxExpireTime(Timestamp),
    /// The page token is not one this service issued for this query.
    #[error("invalid page_token")]
    InvalidPageToken,
    /// An earlier attempt with the same request_id is still in flight.
    #[error("an earlier request with this request_id is still in progress")]
    InProgress,
    /// The lease is still being issued (PENDING); it can be revoked once
    /// that settles.
    #[error("lease is still being issued; retry shortly")]
    StillPending,
    /// The upstream create outlived `leases.reconcile_after` and the lease
    /// was settled (FAILED) meanwhile; its PAT is revoked. A retry with the
    /// same request_id mints afresh.
    #[error("the lease was abandoned while upstream was still minting its PAT; retry")]
    Abandoned,
    /// A concurrent renewal of the same lease committed first; read the
    /// lease again and retry if still needed.
    #[error("the lease was renewed concurrently; read it again and retry")]
    RenewConflict,
    /// Background work holds a live claim on the lease (a revoke retry may
    /// be under way upstream); retry shortly.
    #[error("a background revocation of this lease is under way; retry shortly")]
    Busy {
        /// Until the background claim lapses at the latest.
        retry_after: Duration,
    },
    /// The caller holds as many live leases as policy allows.
    #[error("active lease quota exceeded")]
    QuotaExceeded,
    /// Upstream failed.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The audit row of a grant could not be written, so nothing was
    /// granted (fail closed).
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// An AdminService call by an identity the policy does not name as an
    /// admin.
    #[error("admin rights required")]
    AdminRequired,
    /// A bulk revoke with no selection criterion (never "everything").
    #[error("at least one of holder, organization, scope or names is required")]
    EmptySelector,
    /// A force-revoke of a lease that is not REVOKE_FAILED (the state it
    /// is in): only a revocation the broker gave up on may be forced.
    #[error("lease is {0}; only a REVOKE_FAILED lease can be force-revoked")]
    NotForceable(LeaseState),
    /// A sealed token could not be opened.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// A state the rules do not expect (a bug or a concurrent actor); the
    /// text is for logs and carries no secret.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServiceError for LeaseError {
    fn code(&self) -> ErrorCode {
        match self {
            LeaseError::Denied { .. } => ErrorCode::PermissionDenied,
            LeaseError::NotFound => ErrorCode::NotFound,
            LeaseError::RequestIdReused => ErrorCode::AlreadyExists,
            LeaseError::RenewConflict => ErrorCode::Aborted,
            LeaseError::NotRenewable(_)
            | LeaseError::AtMaxExpireTime(_)
            | LeaseError::NotForceable(_) => ErrorCode::FailedPrecondition,
            LeaseError::InvalidPageToken => ErrorCode::InvalidArgument,
            LeaseError::InProgress
            | LeaseError::StillPending
            | LeaseError::Abandoned
            | LeaseError::Busy { .. } => ErrorCode::Unavailable,
            LeaseError::QuotaExceeded => ErrorCode::ResourceExhausted,
            LeaseError::Upstream(e) => e.code(),
            LeaseError::Store(e) => e.code(),
            LeaseError::Audit(e) => e.code(),
            LeaseError::AdminRequired => ErrorCode::PermissionDenied,
            LeaseError::EmptySelector => ErrorCode::InvalidArgument,
            LeaseError::Crypto(_) | LeaseError::Internal(_) => ErrorCode::Internal,
        }
    }
    fn reason(&self) -> &'static str {
        match self {
            LeaseError::Denied { denial, .. } => denial.reason(),
            LeaseError::NotFound => "LEASE_NOT_FOUND",
            LeaseError::RequestIdReused => "REQUEST_ID_REUSED",
            LeaseError::RenewConflict => "RENEW_CONFLICT",
            LeaseError::NotRenewable(_) | LeaseError::AtMaxExpireTime(_) => "LEASE_NOT_RENEWABLE",
            LeaseError::InvalidPageToken => "INVALID_PAGE_TOKEN",
            LeaseError::InProgress => "REQUEST_IN_PROGRESS",
            LeaseError::StillPending => "LEASE_PENDING",
            LeaseError::Abandoned => "CREATE_ABANDONED",
            LeaseError::Busy { .. } => "LEASE_BUSY",
            LeaseError::QuotaExceeded => "ACTIVE_LEASE_QUOTA_EXCEEDED",
            LeaseError::Upstream(e) => e.reason(),
            LeaseError::Store(e) => e.reason(),
            LeaseError::Audit(e) => e.reason(),
            LeaseError::AdminRequired => "ADMIN_REQUIRED",
            LeaseError::EmptySelector => "FILTER_EMPTY",
            LeaseError::NotForceable(_) => "LEASE_NOT_REVOKE_FAILED",
            LeaseError::Crypto(_) | LeaseError::Internal(_) => "INTERNAL",
        }
    }
    fn field(&self) -> Option<&str> {
        match self {
            LeaseError::InvalidPageToken => Some("page_token"),
            _ => None,
        }
    }
    fn retry_after(&self) -> Option<Duration> {
        match self {
            LeaseError::InProgress | LeaseError::StillPending | LeaseError::Abandoned => {
                Some(Duration::from_secs(1))
            }
            LeaseError::Busy { retry_after } => Some(*retry_after),
            LeaseError::Upstream(e) => e.retry_after(),
            LeaseError::Store(e) => e.retry_after(),
            LeaseError::Audit(e) => e.retry_after(),
            _ => None,
        }
    }
}

/// Tunables of the lease rules, from configuration.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// First part of every upstream display name, e.g. `token-broker`.
    pub display_name_prefix: String,
    /// This deployment's id (stable across restarts on one store); the
    /// second part of every display name.
    pub deployment_id: String,
    /// Added to expire_time when setting the PAT's validTo upstream.
    pub valid_to_skew: Duration,
    /// How often the reaper looks for expired leases.
    pub reaper_interval: Duration,
    /// This replica's name in `claimed_by`.
    pub replica_id: String,
    /// How old a PENDING lease must be before the reconciler resolves it;
    /// the orphan sweep leaves PATs of younger PENDING leases alone.
    pub reconcile_after: Duration,
    /// How often the deployment sweeps upstream for orphan PATs (one
    /// replica per interval).
    pub sweep_interval: Duration,
    /// How long a closed lease (REVOKED, EXPIRED, FAILED) is kept after it
    /// closed; it is deleted, with its idempotency key, once this has
    /// passed and its PAT's validTo has too (`leases.retention`). Closed
    /// managed credential versions (REVOKED, FAILED; never a credential's
    /// newest) go by the same rule in the same run.
    pub retention: Duration,
    /// When failed upstream revocations are retried.
    pub revocation_retry: RetrySchedule,
    /// Claimed leases one replica works at once (at least 1): `serve` takes
    /// half of `upstream.azure_devops.max_concurrent_requests`, at most 8,
    /// so background work always leaves upstream room for callers.
    pub background_workers: usize,
}

impl LeaseSettings {
    /// Claimed leases one replica works at once for an upstream client of
    /// `max_concurrent_requests`: half of them, 1 to 8, so background work
    /// always leaves upstream room for callers.
    pub fn background_workers_for(max_concurrent_requests: usize) -> usize {
        (max_concurrent_requests / 2).clamp(1, 8)
    }
}

/// The schedule of upstream revoke retries, configuration
/// `[leases.revocation_retry]`: exponential backoff from `min_delay`
/// doubling to `max_delay`, each delay jittered up to twice its value;
/// after `max_attempts` failures the lease is REVOKE_FAILED, retried every
/// `failed_interval`. Durations read as seconds or humantime strings (`"5s"`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySchedule {
    /// First delay; default `5s`.
    #[serde(deserialize_with = "crate::duration::de_duration")]
    pub min_delay: Duration,
    /// Longest delay within the budget (before jitter); default `10m`.
    #[serde(deserialize_with = "crate::duration::de_duration")]
    pub max_delay: Duration,
    /// Failed attempts before REVOKE_FAILED; default 10, at least 1.
    pub max_attempts: u32,
    /// Delay between retries of a REVOKE_FAILED lease; default `1h`.
    #[serde(deserialize_with = "crate::duration::de_duration")]
    pub failed_interval: Duration,
}

impl Default for RetrySchedule {
    /// 5 s doubling to 10 min, REVOKE_FAILED after 10 failures, then hourly.
    fn default() -> Self {
        RetrySchedule {
            min_delay: Duration::from_secs(5),
            max_delay: Duration::from_secs(600),
            max_attempts: 10,
            failed_interval: Duration::from_secs(3600),
        }
    }
}

/// What the lease service is built from.
#[derive(Clone)]
pub struct LeaseDeps {
    /// Persistence.
    pub store: Arc<dyn Store>,
    /// Upstream PAT API.
    pub upstream: Arc<dyn PatClient>,
    /// Seals tokens at rest.
    pub keyring: Arc<Keyring>,
    /// Who may have what: the policy in force (reloaded live); each call
    /// takes [`PolicyHandle::current`] once and keeps it.
    pub policy: PolicyHandle,
    /// Keyed HMAC of tokens for the audit trail (and the MAC of page tokens).
    pub fingerprinter: Arc<TokenFingerprinter>,
    /// The chained audit trail every audit row is appended to.
    pub audit: Arc<AuditLog>,
    /// Tunables.
    pub settings: LeaseSettings,
}

/// The lease service: every business rule about leases.
pub struct Leases {
    deps: LeaseDeps,
    /// `deps` with the store handle background work uses (the same one
    /// unless [`Leases::with_background_store`] gave it its own).
    background: LeaseDeps,
}

impl Leases {
    /// Builds the service.
    pub fn new(deps: LeaseDeps) -> Self {
        Leases {
            background: deps.clone(),
            deps,
        }
    }

    /// Runs background work (the reaper, revocation retries, the
    /// reconciler, the orphan sweep) on `store`, a handle on the same
    /// database over connections of its own, so however busy it gets it
    /// never holds the connections callers' requests need
    /// ([`crate::store::Stores`]). Its audit rows still go through
    /// `deps.audit`.
    pub fn with_background_store(mut self, store: Arc<dyn Store>) -> Self {
        self.background.store = store;
        self
    }

    /// Issues a lease (or replays one for a repeated request_id).
    ///
    /// Errors: `Denied` (policy; audited, nothing written, no upstream
    /// call), `QuotaExceeded` (the caller already holds the deciding
    /// rule's `max_active_leases` live leases; audited, no upstream call,
    /// at most a FAILED row when concurrent creates raced past the cap),
    /// `RequestIdReused` (same key, other parameters), `InProgress`
    /// (an earlier attempt with the key is still PENDING after 30 s),
    /// `Upstream` (the lease is FAILED and the key may be retried).
    pub async fn create(
        &self,
        caller: &Caller,
        req: CreateLease,
    ) -> Result<IssuedLease, LeaseError> {
        issue::create(&self.deps, caller, req).await
    }

    /// One of the caller's leases, without its token. Another holder's
    /// lease is `NotFound`.
    pub async fn get(&self, caller: &Caller, id: LeaseId) -> Result<LeaseRecord, LeaseError> {
        lifecycle::get_owned(&self.deps, caller, id).await
    }

    /// A page of the caller's leases, newest first. Errors:
    /// `InvalidPageToken` for a token not issued for this caller and filter.
    pub async fn list(&self, caller: &Caller, query: ListQuery) -> Result<LeasePage, LeaseError> {
        lifecycle::list(&self.deps, caller, query).await
    }

    /// Extends a lease by `increment` (None: policy default TTL), capped at
    /// max_expire_time, moving the PAT's validTo upstream.
    ///
    /// Errors: `NotFound`, `NotRenewable` (not ACTIVE, or past
    /// expire_time), `AtMaxExpireTime`, `Denied` (policy no longer
    /// grants it), `Upstream`, `RenewConflict` (a concurrent renewal
    /// committed first; the PAT's validTo is put back to follow it).
    pub async fn renew(
        &self,
        caller: &Caller,
        id: LeaseId,
        increment: Option<Duration>,
    ) -> Result<LeaseRecord, LeaseError> {
        lifecycle::renew(&self.deps, caller, id, increment).await
    }

    /// Revokes a lease; idempotent. Answers REVOKING if upstream failed
    /// (the background loop retries it). Errors: `NotFound`, `StillPending`
    /// (still PENDING).
    pub async fn revoke(&self, caller: &Caller, id: LeaseId) -> Result<LeaseRecord, LeaseError> {
        lifecycle::revoke(&self.deps, caller, id).await
    }

    /// Revokes, as admin `caller`, every live lease `selector` picks,
    /// upstream, through the normal revocation path (each lease's own
    /// `lease.revoke` audit row, then one `admin.revoke_leases` row).
    ///
    /// Errors: `AdminRequired` (audited), `EmptySelector`, `Store`.
    pub async fn admin_revoke(
        &self,
        caller: &Caller,
        selector: LeaseSelector,
    ) -> Result<BulkRevoke, LeaseError> {
        admin::revoke_leases(&self.deps, caller, selector).await
    }

    /// Closes a REVOKE_FAILED lease as admin `caller` without revoking its
    /// PAT upstream (the PAT stays valid until its validTo): REVOKED, or
    /// EXPIRED if it had reached expire_time when revocation began; no more
    /// retries; audited as `lease.force_revoke` with `reason`. Set by
    /// compare-and-set on REVOKE_FAILED, so a background revoke that
    /// succeeds meanwhile is never overwritten.
    ///
    /// Errors: `AdminRequired` (audited), `NotFound`, `NotForceable` (any
    /// other state, including one a concurrent revoke just reached), `Busy`
    /// (a background retry still holds the lease after about 10 s).
    pub async fn admin_force_revoke(
        &self,
        caller: &Caller,
        id: LeaseId,
        reason: Option<String>,
    ) -> Result<LeaseRecord, LeaseError> {
        admin::force_revoke(&self.deps, caller, id, reason).await
    }

    /// The lease `token` (a PAT) belongs to, in whatever state, for admin
    /// `caller`: found by the token's keyed fingerprint under every
    /// fingerprint key held, against the fingerprints recorded with the
    /// leases' `lease.create` audit rows. Audited as `admin.lookup_token`
    /// with the fingerprint, never the token.
    ///
    /// Errors: `AdminRequired` (audited), `NotFound` (audited: no lease
    /// issued this token, or it was deleted), `Store`.
    pub async fn admin_lookup_token(
        &self,
        caller: &Caller,
        token: &SecretString,
    ) -> Result<LeaseRecord, LeaseError> {
        admin::lookup_token(&self.deps, caller, token).await
    }

    /// A page of every holder's leases (optionally one holder's), newest
    /// first, for admin `caller`. Errors: `AdminRequired`, `InvalidPageToken`.
    pub async fn admin_list(
        &self,
        caller: &Caller,
        holder: Option<crate::domain::Identity>,
        query: ListQuery,
    ) -> Result<LeasePage, LeaseError> {
        admin::list_leases(&self.deps, caller, holder, query).await
    }

    /// A page of audit events (oldest first) for admin `caller`.
    /// Errors: `AdminRequired`, `InvalidPageToken`.
    pub async fn audit_events(
        &self,
        caller: &Caller,
        query: AuditQuery,
    ) -> Result<AuditPage, LeaseError> {
        admin::audit_events(&self.deps, caller, query).await
    }

    /// Records every policy reload attempt from `outcomes`
    /// (`PolicyHandle::subscribe`) as a `policy.reload` audit event, until
    /// the channel closes.
    pub async fn audit_policy_reloads(
        &self,
        outcomes: tokio::sync::broadcast::Receiver<crate::policy::ReloadOutcome>,
    ) {
        policy_reloads::audit_policy_reloads(&self.deps, outcomes).await
    }

    /// Records every API keys file reload attempt from `outcomes`
    /// (`ApiKeysHandle::subscribe`) as an `auth.api_keys_reload` audit
    /// event, until the channel closes.
    pub async fn audit_api_key_reloads(
        &self,
        outcomes: tokio::sync::broadcast::Receiver<crate::auth::ApiKeysReloadOutcome>,
    ) {
        api_key_reloads::audit_api_key_reloads(&self.deps, outcomes).await
    }

    /// Runs background work (the reaper, revocation retries, the
    /// reconciler, and the orphan sweep when its deployment-wide claim is
    /// due) every `settings.reaper_interval` until `shutdown` resolves.
    pub async fn run_background(&self, shutdown: impl std::future::Future<Output = ()> + Send) {
        background::run(&self.background, shutdown).await
    }

    /// One pass of background work (expire due leases, retry due
    /// revocations, reconcile stale PENDING leases); what `run_background`
    /// does each tick (the sweep runs beside it: [`Leases::run_sweep_once`]).
    /// Returns how many leases it finished (EXPIRED or REVOKED).
    pub async fn run_background_once(&self) -> Result<usize, LeaseError> {
        background::run_once(&self.background).await
    }

    /// Runs the orphan sweep once if it is due for the deployment (the last
    /// sweep is `sweep_interval` old and no replica holds its claim), as
    /// `run_background` does after each pass. Returns what it did
    /// (`ran: false` when it was not due). Errors: `Store` (upstream
    /// failures are counted in the report instead).
    pub async fn run_sweep_once(&self) -> Result<SweepReport, LeaseError> {
        sweep::sweep_if_due(&self.background, &std::sync::atomic::AtomicBool::new(false)).await
    }

    /// Runs retention once if it is due for the deployment (its last run is
    /// an hour old and no replica holds its claim), as `run_background`
    /// does beside its passes: deletes the closed leases past
    /// `settings.retention` whose PAT is past its validTo, with their
    /// idempotency keys, and the closed managed credential versions the
    /// same bounds allow (never a credential's newest). Returns what it did (`ran: false` when it was not
    /// due). Errors: `Store`.
    pub async fn run_retention_once(&self) -> Result<RetentionReport, LeaseError> {
        retention::retain_if_due(&self.background, &std::sync::atomic::AtomicBool::new(false)).await
    }
}
