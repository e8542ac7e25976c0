//! The emulator's in-memory state: PATs, organizations, Entra tokens,
//! fault rules, call counters and the clock. Secrets are kept only as
//! SHA-256 digests, so nothing here can print one.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::faults::FaultRule;
use super::EmulatorConfig;

/// SHA-256 of a secret; the only form in which a secret is kept.
pub(crate) type SecretDigest = [u8; 32];

/// Digest of a secret string.
pub(crate) fn digest(secret: &str) -> SecretDigest {
    Sha256::digest(secret.as_bytes()).into()
}

/// One PAT as the service keeps it (section 6 checklist).
#[derive(Clone, Debug)]
pub(crate) struct PatRecord {
    /// Lower-case organization the PAT was created in.
    pub organization: String,
    pub authorization_id: Uuid,
    pub display_name: String,
    /// Normalised: single spaces, lower case.
    pub scope: String,
    /// The organization GUIDs; None for a global (`allOrgs`) PAT.
    pub target_accounts: Option<Vec<Uuid>>,
    pub valid_from: DateTime<Utc>,
    pub valid_to: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub token_digest: SecretDigest,
}

/// Derived state for `displayFilterOption` and `/_emulator/pats`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum PatState {
    Active,
    Expired,
    Revoked,
}

impl PatState {
    pub fn as_str(self) -> &'static str {
        match self {
            PatState::Active => "active",
            PatState::Expired => "expired",
            PatState::Revoked => "revoked",
        }
    }
}

impl PatRecord {
    /// Revoked wins over expired; expired once `validTo` is not in the future.
    pub fn state(&self, now: DateTime<Utc>) -> PatState {
        if self.revoked_at.is_some() {
            PatState::Revoked
        } else if self.valid_to <= now {
            PatState::Expired
        } else {
            PatState::Active
        }
    }
}

/// Who an Entra access token speaks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TokenKind {
    /// User-delegated (refresh-token grant): accepted by the PAT API.
    User,
    /// App-only (client-credentials grant): refused by the PAT API.
    App,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct AccessTokenRecord {
    pub kind: TokenKind,
    pub expires_at: DateTime<Utc>,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct RefreshTokenRecord {
    pub expires_at: DateTime<Utc>,
    pub revoked: bool,
}

/// Counters for `/_emulator/stats`.
#[derive(Clone, Debug, serde::Serialize)]
pub(crate) struct Stats {
    /// Calls per operation (create, get, list, update, revoke, token, dataplane).
    pub calls: BTreeMap<String, u64>,
    /// DELETE calls per `authorizationId` query value.
    pub deletes: BTreeMap<String, u64>,
}

impl Default for Stats {
    /// Every operation's counter present at zero (scripts read
    /// `calls["create"]` before any create).
    fn default() -> Self {
        use super::faults::Operation;
        let calls = [
            Operation::Create,
            Operation::Get,
            Operation::List,
            Operation::Update,
            Operation::Revoke,
            Operation::Token,
            Operation::Dataplane,
        ]
        .into_iter()
        .map(|op| (op.as_str().to_owned(), 0))
        .collect();
        Stats {
            calls,
            deletes: BTreeMap::new(),
        }
    }
}

/// Everything mutable, behind one lock (never held across an await).
#[derive(Debug)]
pub(crate) struct Inner {
    pub pats: Vec<PatRecord>,
    pub by_token: HashMap<SecretDigest, Uuid>,
    pub organizations: HashMap<String, Uuid>,
    pub access_tokens: HashMap<SecretDigest, AccessTokenRecord>,
    pub refresh_tokens: HashMap<SecretDigest, RefreshTokenRecord>,
    pub faults: Vec<FaultRule>,
    pub stats: Stats,
    /// Added to the wall clock (test-only `/_emulator/clock`).
    pub clock_offset: ChronoDuration,
}

impl Inner {
    /// Emulator time: wall clock plus the test offset.
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.clock_offset
    }

    /// The organization's GUID, made on first sight. `fabrikam` gets the
    /// GUID of Microsoft's examples (section 1.3 [V] EX-*).
    pub fn organization_id(&mut self, org: &str) -> Uuid {
        *self.organizations.entry(org.to_owned()).or_insert_with(|| {
            if org == "fabrikam" {
                Uuid::from_u128(0x38aaa865_2c70_4bf7_a308_0c6539c38c1a)
            } else {
                Uuid::new_v4()
            }
        })
    }

    pub fn pat(&self, id: Uuid) -> Option<&PatRecord> {
        self.pats.iter().find(|p| p.authorization_id == id)
    }

    pub fn pat_mut(&mut self, id: Uuid) -> Option<&mut PatRecord> {
        self.pats.iter_mut().find(|p| p.authorization_id == id)
    }

    pub fn count_call(&mut self, operation: &str) {
        *self.stats.calls.entry(operation.to_owned()).or_default() += 1;
    }
}

/// The shared emulator: configuration and state.
#[derive(Clone, Debug)]
pub(crate) struct Emulator {
    pub config: Arc<EmulatorConfig>,
    inner: Arc<Mutex<Inner>>,
}

impl Emulator {
    pub fn new(config: EmulatorConfig) -> Self {
        use secrecy::ExposeSecret;
        let now = Utc::now();
        let mut refresh_tokens = HashMap::new();
        refresh_tokens.insert(
            digest(config.refresh_token.expose_secret()),
            RefreshTokenRecord {
                expires_at: now + to_chrono(config.refresh_token_lifetime),
                revoked: false,
            },
        );
        Emulator {
            config: Arc::new(config),
            inner: Arc::new(Mutex::new(Inner {
                pats: Vec::new(),
                by_token: HashMap::new(),
                organizations: HashMap::new(),
                access_tokens: HashMap::new(),
                refresh_tokens,
                faults: Vec::new(),
                stats: Stats::default(),
                clock_offset: ChronoDuration::zero(),
            })),
        }
    }

    /// Locks the state. A poisoned lock is taken over: the state is plain
    /// data and every mutation is completed before a lock is released.
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// std Duration to chrono Duration, saturating.
pub(crate) fn to_chrono(d: std::time::Duration) -> ChronoDuration {
    ChronoDuration::from_std(d).unwrap_or(ChronoDuration::MAX)
}
