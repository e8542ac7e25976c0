//! Audit events: one append-only row per decision. Never holds a token,
//! only its keyed fingerprint.
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

use std::sync::{Arc, Mutex};

use crate::error::{ErrorCode, ServiceError};
use crate::store::{Store, StoreError};

pub mod chain;
mod refusals;

/// Audit events are a domain type; re-exported where they are chained.
pub use crate::domain::{AuditEvent, Outcome};

pub use chain::{
    parse_expected_head, verify, BadHead, ChainBroken, ChainKey, Defect, VerifyError, VerifyReport,
    GENESIS_MAC,
};
pub use refusals::ChainedRefusalAudit;

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
/// `action` of a stale PENDING lease resolved by the reconciler.
pub const LEASE_RECONCILE: &str = "lease.reconcile";
/// `action` of an upstream PAT revoked by the orphan sweep: it carried this
/// deployment's display-name prefix and no live lease owned it.
pub const PAT_REVOKE_ORPHAN: &str = "pat.revoke_orphan";
/// `action` of a policy reload attempt (applied or refused).
pub const POLICY_RELOAD: &str = "policy.reload";
/// `action` of a refused authentication.
pub const AUTHENTICATE: &str = "authenticate";

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
}

/// Appends audit events to the chain and remembers the newest link this
/// process wrote. Cheap to share behind an `Arc`; several replicas (one
/// `AuditLog` each) may append to one PostgreSQL database at once.
pub struct AuditLog {
    store: Arc<dyn Store>,
    key: ChainKey,
    head: Mutex<Option<AppendedEvent>>,
    observer: Option<AppendObserver>,
}

/// Called after every append with the event and where it landed (e.g. to
/// export the chain head as a metric). Must be quick; it must not block.
pub type AppendObserver = Box<dyn Fn(&AuditEvent, &AppendedEvent) + Send + Sync>;

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("head", &self.head())
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// An audit log over `store`, chaining under `chain_key`.
    pub fn new(store: Arc<dyn Store>, chain_key: ChainKey) -> Self {
        AuditLog {
            store,
            key: chain_key,
            head: Mutex::new(None),
            observer: None,
        }
    }

    /// Also calls `observer` after every successful append (the row is
    /// written then); appends racing each other may reach it out of id
    /// order.
    pub fn with_observer(mut self, observer: AppendObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Appends `event` (its `id` is ignored; its time is kept to the
    /// microsecond) as the next chain link, then reports the new head
    /// outside the database: an INFO log line `audit chain head` with
    /// fields `audit_id` and `mac`, [`AuditLog::head`], and the observer
    /// (see [`AuditLog::with_observer`]).
    ///
    /// Errors: [`AuditError::NotWritten`] when the row cannot be written;
    /// nothing is written then, and the caller must fail closed (see the
    /// module doc).
    pub async fn append(&self, event: &AuditEvent) -> Result<AppendedEvent, AuditError> {
        let key = &self.key;
        let mac_of = |prev: Option<&str>, stored: &AuditEvent| key.mac(prev, stored);
        let (id, mac) = self.store.append_audit_chained(event, &mac_of).await?;
        let appended = AppendedEvent { id, mac };
        tracing::info!(audit_id = appended.id, mac = %appended.mac, "audit chain head");
        let mut head = self.head.lock().unwrap_or_else(|p| p.into_inner());
        if head.as_ref().is_none_or(|h| h.id < appended.id) {
            *head = Some(appended.clone());
        }
        drop(head);
        if let Some(observe) = &self.observer {
            observe(event, &appended);
        }
        Ok(appended)
    }

    /// The newest link this process appended (highest id), or `None`
    /// before its first append. Other replicas' appends are not seen here;
    /// the newest head across replicas is the one with the highest id.
    pub fn head(&self) -> Option<AppendedEvent> {
        self.head.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
