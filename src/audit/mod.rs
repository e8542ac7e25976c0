//! Audit events: one append-only row per decision (refused
//! authentications: one row per reason and client address per interval,
//! [`RefusalCounter`]). Never holds a token, only its keyed fingerprint.
//!
//! Rows are chained by a keyed MAC ([`chain`]): each row's `mac` covers the
//! previous row's `mac` and this row's fields as stored, under a key kept
//! outside the database, so write access to the database alone cannot
//! forge a consistent chain. [`AuditLog`] appends (and reports the chain
//! head outside the database); [`verify`] proves the chain intact or names
//! the first broken row.
//!
//! Fail closed: [`AuditLog::append`] returns an error when the row cannot
//! be written. A caller about to grant something (create, renew) must then
//! refuse the grant; a revocation goes ahead and retries its audit row.

use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::oneshot;

use crate::error::{ErrorCode, ServiceError};
use crate::store::{
    AuditAppend, AuditChainer, AuditKeyIds, LeaseWrite, Store, StoreError, DEFAULT_KEY_ID,
};

pub mod chain;
mod refusals;

/// Audit events are a domain type; re-exported where they are chained.
pub use crate::domain::{AuditEvent, Outcome};

pub use chain::{
    parse_expected_head, switch_detail, verify, verify_from, verify_heads, BadHead, ChainBroken,
    ChainKey, ChainKeys, Defect, VerifyError, VerifyReport, CHAIN_KEY_ROTATE, GENESIS_MAC,
};
pub use refusals::{RefusalCounter, RefusalObserver, MAX_REFUSAL_ADDRESSES, OTHER_ADDRESSES};

/// `action` of an issued (or replayed) lease.
pub const LEASE_CREATE: &str = "lease.create";
/// `action` of a renewal.
pub const LEASE_RENEW: &str = "lease.renew";
/// `action` of a revocation on request (holder or admin).
pub const LEASE_REVOKE: &str = "lease.revoke";
/// `action` of a revocation by the reaper at expiry.
pub const LEASE_EXPIRE: &str = "lease.expire";
/// `action` of an operator closing a REVOKE_FAILED lease without an
/// upstream revoke (AdminService.ForceRevokeLease): the PAT stays valid
/// upstream until its validTo, which the row's reason states, unless the
/// orphan sweep (`pat.revoke_orphan`) later revokes it.
pub const LEASE_FORCE_REVOKE: &str = "lease.force_revoke";
/// `action` of an admin's look-up of a lease by its PAT
/// (AdminService.LookupToken): the row carries the token's fingerprint
/// (never the token) and, when found, the lease; not found is `denied`
/// with reason `LEASE_NOT_FOUND`.
pub const ADMIN_LOOKUP_TOKEN: &str = "admin.lookup_token";
/// `action` of a stale PENDING lease resolved by the reconciler.
pub const LEASE_RECONCILE: &str = "lease.reconcile";
/// `action` of an upstream PAT revoked by the orphan sweep: it carried this
/// deployment's display-name prefix and no live lease owned it.
pub const PAT_REVOKE_ORPHAN: &str = "pat.revoke_orphan";
/// `action` of a policy reload attempt (applied or refused).
pub const POLICY_RELOAD: &str = "policy.reload";
/// `action` of an `auth.api_keys_file` reload attempt (applied, with
/// `caller_detail` `keys=N`, or refused).
pub const API_KEYS_RELOAD: &str = "auth.api_keys_reload";
/// `action` of refused authentications: one row per reason and client
/// address per `audit.auth_failure_interval`, with the count in
/// `caller_detail` (see [`RefusalCounter`]).
pub const AUTHENTICATE: &str = "authenticate";
/// `action` of a device-code sign-in (`token-broker upstream login`):
/// `caller_detail` is `account=… version=N`; never a token.
pub const UPSTREAM_LOGIN: &str = "upstream.login";
/// `action` of `token-broker upstream set-refresh-token`: `caller_detail`
/// is `version=N`.
pub const UPSTREAM_SET_REFRESH_TOKEN: &str = "upstream.set_refresh_token";
/// `action` of a changed `upstream.refresh_token` adopted at start:
/// `caller_detail` is `version=N`.
pub const UPSTREAM_ADOPT_CONFIGURED: &str = "upstream.adopt_configured";
/// `action` of the row a replica appends when the row it appended last is
/// gone or carries another MAC (the chain's tail was deleted or rewritten
/// since): identity `system:token-broker`, outcome ERROR, reason
/// `ROWS_DELETED` or `ROW_REWRITTEN`, `caller_detail`
/// `expected=ID:MAC found=ID:MAC` (`found` is the row at the expected id,
/// else the newest row; `ID:-` a row without a MAC, `-` no row at all).
/// Chained onto what was found, so the gap itself is on the record.
pub const AUDIT_TAMPER_DETECTED: &str = "audit.tamper_detected";
/// `action` of a managed credential's version handed to a reader
/// (CredentialService.GetCredential): `policy_rule` `credential:NAME` and
/// `version=N` at the end of `caller_detail` (as [`CREDENTIAL_MINT`]), with
/// the version's organization and scopes; never the token. A caller who is
/// not a reader: `denied`, reason `CREDENTIAL_READER_REQUIRED`.
pub const CREDENTIAL_GET: &str = "credential.get";
/// `action` of a version sent on a CredentialService.WatchCredential
/// stream, one row per version sent, as [`CREDENTIAL_GET`]; a stream ended
/// because its caller is no longer a reader: `denied`, as there.
pub const CREDENTIAL_WATCH: &str = "credential.watch";
/// `action` of an admin's AdminService.RotateCredential: as
/// [`CREDENTIAL_GET`] for the new version, `reason`
/// `revoke_previous=AFTER_OVERLAP|NOW`; on failure (outcome `error`) the
/// error's reason and the mode; a caller who is not an admin: `denied`,
/// `ADMIN_REQUIRED`.
pub const CREDENTIAL_ROTATE: &str = "credential.rotate";
/// `action` of an admin's AdminService.ListCredentials.
pub const ADMIN_LIST_CREDENTIALS: &str = "admin.list_credentials";
/// `action` of a managed credential version minted by the broker:
/// `policy_rule` `credential:NAME`, `caller_detail` `version=N`; never a
/// token.
pub const CREDENTIAL_MINT: &str = "credential.mint";
/// `action` of a managed credential version revoked upstream (overlap
/// over, rotated with `NOW`, or retired): as [`CREDENTIAL_MINT`].
pub const CREDENTIAL_REVOKE: &str = "credential.revoke";
/// Identity of the broker's own actions (the reaper, the sweep, adopting
/// configuration).
pub const SYSTEM_IDENTITY: &str = "system:token-broker";

/// Where a row landed in the chain: its id and its MAC (64 lower-case hex
/// characters; not a secret). Also the shape of the chain head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendedEvent {
    /// The row's id.
    pub id: i64,
    /// The row's chain MAC, hex.
    pub mac: String,
}

/// An audit row could not be written. The caller fails closed: no grant
/// without its audit row.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The store refused or could not be reached; nothing was written.
    #[error("audit event not written: {0}")]
    NotWritten(#[from] StoreError),
}

impl ServiceError for AuditError {
    fn code(&self) -> ErrorCode {
        match self {
            AuditError::NotWritten(e) => e.code(),
        }
    }
    fn reason(&self) -> &'static str {
        "AUDIT_UNAVAILABLE"
    }
    fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            AuditError::NotWritten(e) => e.retry_after(),
        }
    }
}

/// Most queued events one append transaction takes; the rest wait for the
/// next. Bounds a transaction's size and the time its lock is held.
const MAX_BATCH: usize = 128;

/// Appends audit events to the chain and remembers the newest link this
/// process wrote. Cheap to share behind an `Arc`; several replicas (one
/// `AuditLog` each) may append to one PostgreSQL database at once.
///
/// Group commit: appends that arrive while an append transaction is in
/// flight queue up, and the next transaction writes all of them (up to
/// [`MAX_BATCH`]) as consecutive chain links, then wakes each caller. So a
/// grant waits for one commit, not for every other grant's commit, and the
/// chain stays one strict sequence. The transaction runs in a task of its
/// own: a caller that goes away (a cancelled RPC) does not cancel the other
/// callers' rows.
pub struct AuditLog {
    shared: Arc<Shared>,
}

/// What the appending task and the callers share.
struct Shared {
    store: Arc<dyn Store>,
    keys: Keys,
    /// The row this process appended last (chain order).
    head: Mutex<Option<AppendedEvent>>,
    /// The head last written to the `audit chain head` log line.
    logged: Mutex<Option<AppendedEvent>>,
    observer: OnceLock<AppendObserver>,
    tamper_observer: OnceLock<TamperObserver>,
    queue: Mutex<Queue>,
}

/// The keys rows are made with: the chain keyring (its active key MACs new
/// rows) and the id of the fingerprint key the callers' fingerprints use.
struct Keys {
    chain: ChainKeys,
    fingerprint_key_id: String,
}

/// Chains one append transaction: the keys, and the row this process
/// appended last, checked under the chain lock (truncation detection).
struct Batch<'a> {
    keys: &'a Keys,
    last: Option<AppendedEvent>,
    /// Set when the transaction appends a tamper row.
    tampered: std::sync::atomic::AtomicBool,
}

impl AuditChainer for Batch<'_> {
    fn chain_key_id(&self) -> &str {
        self.keys.chain.active_key_id()
    }

    fn fingerprint_key_id(&self) -> &str {
        &self.keys.fingerprint_key_id
    }

    fn last_appended(&self) -> Option<(i64, &str)> {
        self.last.as_ref().map(|l| (l.id, l.mac.as_str()))
    }

    fn tamper_event(
        &self,
        expected: (i64, &str),
        found: Option<(i64, Option<&str>)>,
    ) -> AuditEvent {
        let expected_text = format!("{}:{}", expected.0, expected.1);
        let found_text = match found {
            Some((id, Some(mac))) => format!("{id}:{mac}"),
            Some((id, None)) => format!("{id}:-"),
            None => "-".to_owned(),
        };
        let reason = match found {
            Some((id, _)) if id == expected.0 => "ROW_REWRITTEN",
            _ => "ROWS_DELETED",
        };
        tracing::error!(
            expected = %expected_text,
            found = %found_text,
            reason,
            "audit chain tampered: the row this replica appended last is gone or changed (truncated or rewritten); appending an audit.tamper_detected row"
        );
        self.tampered
            .store(true, std::sync::atomic::Ordering::Relaxed);
        AuditEvent {
            reason: Some(reason.to_owned()),
            caller_detail: Some(format!("expected={expected_text} found={found_text}")),
            ..AuditEvent::new(
                chrono::Utc::now(),
                SYSTEM_IDENTITY,
                AUDIT_TAMPER_DETECTED,
                Outcome::Error,
            )
        }
    }

    fn switch_event(&self, from: &str) -> AuditEvent {
        let to = self.keys.chain.active_key_id();
        tracing::info!(from, to, "audit chain key switch: appending the switch row");
        AuditEvent {
            caller_detail: Some(switch_detail(from, to)),
            ..AuditEvent::new(
                chrono::Utc::now(),
                SYSTEM_IDENTITY,
                CHAIN_KEY_ROTATE,
                Outcome::Allowed,
            )
        }
    }

    fn mac(&self, prev: Option<&str>, event: &AuditEvent, key_ids: &AuditKeyIds) -> String {
        self.keys.chain.active().mac_with_ids(prev, event, key_ids)
    }
}

/// Events waiting for a transaction, and whether a task is writing.
#[derive(Default)]
struct Queue {
    waiting: Vec<Waiter>,
    flushing: bool,
}

/// One queued append and where its outcome goes (`None`: its lease write
/// did not apply, nothing was written for it).
struct Waiter {
    append: AuditAppend,
    done: oneshot::Sender<Result<Option<AppendedEvent>, AuditError>>,
}

/// Called after every append with the event and where it landed (e.g. to
/// export the chain head as a metric). Must be quick; it must not block.
pub type AppendObserver = Box<dyn Fn(&AuditEvent, &AppendedEvent) + Send + Sync>;

/// Called once per committed `audit.tamper_detected` row (e.g. to count
/// it as a metric). Must be quick; it must not block.
pub type TamperObserver = Box<dyn Fn() + Send + Sync>;

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("head", &self.head())
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// An audit log over `store`, chaining under the active key of
    /// `chain_keys` (a single [`ChainKey`] is key id `default`); rows with
    /// a token fingerprint record fingerprint key id `default` (see
    /// [`AuditLog::with_keys`]).
    ///
    /// Each append transaction reads the newest row's chain key id under
    /// the chain lock; when it is not the active key's (a rotation, or
    /// during a rollout another replica with another active key wrote
    /// last), it first appends a switch row ([`CHAIN_KEY_ROTATE`],
    /// `caller_detail` `from=OLD to=NEW`) MAC'd under the active key.
    pub fn new(store: Arc<dyn Store>, chain_keys: impl Into<ChainKeys>) -> Self {
        Self::with_keys(store, chain_keys, DEFAULT_KEY_ID)
    }

    /// As [`AuditLog::new`], with the id of the fingerprint key the
    /// callers' token fingerprints are made with, recorded as
    /// `fingerprint_key_id` on rows that have one.
    pub fn with_keys(
        store: Arc<dyn Store>,
        chain_keys: impl Into<ChainKeys>,
        fingerprint_key_id: impl Into<String>,
    ) -> Self {
        AuditLog {
            shared: Arc::new(Shared {
                store,
                keys: Keys {
                    chain: chain_keys.into(),
                    fingerprint_key_id: fingerprint_key_id.into(),
                },
                head: Mutex::new(None),
                logged: Mutex::new(None),
                observer: OnceLock::new(),
                tamper_observer: OnceLock::new(),
                queue: Mutex::new(Queue::default()),
            }),
        }
    }

    /// Also calls `observer` after every successful append (the row is
    /// written then), in chain order within this process. Set once; a
    /// second observer is ignored.
    pub fn with_observer(self, observer: AppendObserver) -> Self {
        let _ = self.shared.observer.set(observer);
        self
    }

    /// Also calls `observer` once per committed `audit.tamper_detected`
    /// row ([`AUDIT_TAMPER_DETECTED`]). Set once; a second is ignored.
    pub fn with_tamper_observer(self, observer: TamperObserver) -> Self {
        let _ = self.shared.tamper_observer.set(observer);
        self
    }

    /// Appends `event` (its `id` is ignored; its time is kept to the
    /// microsecond) as the next chain link, then reports the new head
    /// outside the database: [`AuditLog::head`] and the observer (see
    /// [`AuditLog::with_observer`]; the `audit chain head` log line is
    /// [`AuditLog::log_head`]'s, at most once per interval). First, under
    /// the chain lock, it checks that the row this process appended last is
    /// still stored with its MAC; if not (the tail was deleted or
    /// rewritten), it logs an ERROR, appends an [`AUDIT_TAMPER_DETECTED`]
    /// row onto what it found and calls the tamper observer, then appends
    /// `event` after it. Returns once the row
    /// is committed, possibly together with other callers' rows (see the
    /// type's doc). Must be called within a Tokio runtime.
    ///
    /// Errors: [`AuditError::NotWritten`] when the row cannot be written;
    /// nothing of its transaction is written then (every row of that
    /// transaction gets the same error, and when the database was
    /// unreachable, so does every row queued meanwhile), and the caller
    /// must fail closed (see the module doc).
    pub async fn append(&self, event: &AuditEvent) -> Result<AppendedEvent, AuditError> {
        let append = AuditAppend {
            event: event.clone(),
            lease_write: None,
        };
        self.enqueue(append).await?.ok_or_else(|| {
            AuditError::NotWritten(StoreError::Database(
                "an audit row without a lease write was not written".into(),
            ))
        })
    }

    /// Writes `write` and appends `event` in one transaction, the row only
    /// if the write applies (compare-and-set; see [`LeaseWrite`]): a lease
    /// change and its audit row land together or not at all. Otherwise as
    /// [`AuditLog::append`].
    ///
    /// Returns `Ok(None)` when the lease had moved: nothing was written.
    /// Errors: [`AuditError::NotWritten`]; neither the lease nor the row
    /// was written.
    pub async fn append_with(
        &self,
        event: &AuditEvent,
        write: LeaseWrite,
    ) -> Result<Option<AppendedEvent>, AuditError> {
        self.enqueue(AuditAppend {
            event: event.clone(),
            lease_write: Some(write),
        })
        .await
    }

    /// Queues `append` for the appending task (starting one if none runs)
    /// and waits for its outcome.
    async fn enqueue(&self, append: AuditAppend) -> Result<Option<AppendedEvent>, AuditError> {
        let (done, outcome) = oneshot::channel();
        let start = {
            let mut queue = lock(&self.shared.queue);
            queue.waiting.push(Waiter { append, done });
            !std::mem::replace(&mut queue.flushing, true)
        };
        if start {
            tokio::spawn(flush(self.shared.clone()));
        }
        outcome.await.unwrap_or_else(|_| {
            // The runtime dropped the appending task mid-transaction: the
            // row's fate is unknown, so the grant must not go ahead.
            Err(AuditError::NotWritten(StoreError::Unavailable(
                "the audit appender stopped before confirming the row".into(),
            )))
        })
    }

    /// The newest link this process appended (the last in chain order;
    /// ids only grow unless the database was tampered with), or `None`
    /// before its first append. Other replicas' appends are not seen here;
    /// the newest head across replicas is the one with the highest id.
    pub fn head(&self) -> Option<AppendedEvent> {
        lock(&self.shared.head).clone()
    }

    /// Logs the INFO line `audit chain head` (fields `audit_id` and `mac`:
    /// `ID:MAC` for `audit verify --expected-head`) if this process
    /// appended since the line was last logged; else nothing. Returns
    /// whether it logged.
    pub fn log_head(&self) -> bool {
        let Some(head) = self.head() else {
            return false;
        };
        let mut logged = lock(&self.shared.logged);
        if logged.as_ref() == Some(&head) {
            return false;
        }
        tracing::info!(audit_id = head.id, mac = %head.mac, "audit chain head");
        *logged = Some(head);
        true
    }

    /// [`AuditLog::log_head`] every `interval` (`audit.head_log_interval`)
    /// until `stop` resolves. The head at shutdown is the caller's to log
    /// (with [`AuditLog::log_head`]) once its last rows are written.
    pub async fn run_head_log(
        &self,
        interval: std::time::Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    self.log_head();
                }
                () = &mut stop => break,
            }
        }
    }
}

/// Locks `mutex`, ignoring poisoning (its data stays consistent: every
/// critical section here is a plain assignment or a `Vec` move).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Ends an appending task that did not finish normally (cancelled with its
/// runtime, or a panic): clears `flushing` and drops every queued waiter,
/// whose `append` then fails closed ("stopped before confirming"), rather
/// than leave them waiting for a task nobody starts.
struct FlushingFlag<'a> {
    queue: &'a Mutex<Queue>,
    armed: bool,
}

impl Drop for FlushingFlag<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut queue = lock(self.queue);
            queue.flushing = false;
            queue.waiting.clear();
        }
    }
}

/// The appending task: writes queued events a transaction at a time until
/// the queue is empty.
async fn flush(shared: Arc<Shared>) {
    let mut flag = FlushingFlag {
        queue: &shared.queue,
        armed: true,
    };
    loop {
        let batch: Vec<Waiter> = {
            let mut queue = lock(&shared.queue);
            let n = queue.waiting.len().min(MAX_BATCH);
            if n == 0 {
                // Cleared under the same lock an append checks it under,
                // so an append arriving now starts a new task.
                queue.flushing = false;
                flag.armed = false;
                return;
            }
            queue.waiting.drain(..n).collect()
        };
        let (appends, waiters): (Vec<AuditAppend>, Vec<_>) =
            batch.into_iter().map(|w| (w.append, w.done)).unzip();
        let chainer = Batch {
            keys: &shared.keys,
            last: lock(&shared.head).clone(),
            tampered: std::sync::atomic::AtomicBool::new(false),
        };
        match shared
            .store
            .append_audit_keyed_batch(&appends, &chainer)
            .await
        {
            Ok(rows) => {
                if chainer.tampered.into_inner() {
                    if let Some(observe) = shared.tamper_observer.get() {
                        observe();
                    }
                }
                for ((append, done), row) in appends.iter().zip(waiters).zip(rows) {
                    let appended = row.map(|(id, mac)| AppendedEvent { id, mac });
                    if let Some(appended) = &appended {
                        // Rows come in chain order: the last one is the
                        // newest this process wrote (even when a database
                        // writer made ids go back).
                        *lock(&shared.head) = Some(appended.clone());
                        if let Some(observe) = shared.observer.get() {
                            observe(&append.event, appended);
                        }
                    }
                    // A caller that went away no longer needs its answer.
                    let _ = done.send(Ok(appended));
                }
            }
            Err(e) => {
                let mut failed = waiters;
                if matches!(e, StoreError::Unavailable(_)) {
                    // The database was unreachable for as long as these
                    // waited: answer them now rather than let each queue
                    // for an attempt of its own (one timeout, not several).
                    failed.extend(lock(&shared.queue).waiting.drain(..).map(|w| w.done));
                }
                tracing::error!(rows = failed.len(), error = %e, "audit append failed");
                for done in failed {
                    let _ = done.send(Err(AuditError::NotWritten(e.clone())));
                }
            }
        }
    }
}
