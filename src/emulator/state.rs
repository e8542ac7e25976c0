//! The emulator's in-memory state: PATs, organizations, Entra tokens,
//! fault rules, call counters and the clock. Secrets are kept only as
//! SHA-256 digests, so nothing here can print one.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

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

/// A digest as lower-case hex in the state file.
mod hex_digest {
    use super::SecretDigest;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &SecretDigest, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SecretDigest, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = hex::decode(text).map_err(serde::de::Error::custom)?;
        bytes
            .try_into()
            .map_err(|_| serde::de::Error::custom("a SHA-256 digest is 32 bytes"))
    }
}

/// One PAT as the service keeps it ("What the emulator models").
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
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
    #[serde(with = "hex_digest")]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum TokenKind {
    /// User-delegated (refresh-token grant): accepted by the PAT API.
    User,
    /// App-only (client-credentials grant): refused by the PAT API.
    App,
}

/// The signed-in user of the seeded refresh token, and of tokens kept by
/// an emulator that predates accounts (the `upn` it always put in tokens).
pub(crate) const DEFAULT_ACCOUNT: &str = "emulated.user@fabrikam.example";

fn default_account() -> String {
    DEFAULT_ACCOUNT.to_owned()
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AccessTokenRecord {
    pub kind: TokenKind,
    pub expires_at: DateTime<Utc>,
    /// The signed-in user of a user-delegated token; None for app-only
    /// tokens (and in state files written before accounts).
    #[serde(default)]
    pub account: Option<String>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RefreshTokenRecord {
    pub expires_at: DateTime<Utc>,
    pub revoked: bool,
    /// The signed-in user the refresh token belongs to; tokens redeemed
    /// with it keep this account.
    #[serde(default = "default_account")]
    pub account: String,
}

/// Where a device code stands (RFC 8628 device authorization grant).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum DeviceCodeStatus {
    /// Nobody has signed in yet.
    Pending,
    /// Approved (`/_emulator/device-codes/approve`) by this account.
    Approved { account: String },
    /// Declined (`/_emulator/device-codes/decline`).
    Declined,
}

/// A device code issued by `/{tenant}/oauth2/v2.0/devicecode`. Kept in
/// memory only (it lives 15 minutes), by the device code's digest.
#[derive(Clone, Debug)]
pub(crate) struct DeviceCodeRecord {
    /// Upper-case; not a secret on its own (useless without the device code).
    pub user_code: String,
    pub client_id: String,
    /// The scope asked for, as sent.
    pub scope: String,
    /// Emulator time.
    pub expires_at: DateTime<Utc>,
    /// Seconds a client must wait between polls; grows by 5 with each
    /// `slow_down` (RFC 8628 §3.5).
    pub interval_secs: u64,
    /// Emulator time of the last poll.
    pub last_poll: Option<DateTime<Utc>>,
    pub status: DeviceCodeStatus,
    /// `/_emulator/device-codes/slow-down` asked that the next poll get `slow_down`.
    pub slow_down_next: bool,
}

/// Counters for `/_emulator/stats`.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Stats {
    /// Calls per operation (create, get, list, update, revoke, token, dataplane).
    pub calls: BTreeMap<String, u64>,
    /// DELETE calls per `authorizationId` query value.
    pub deletes: BTreeMap<String, u64>,
    /// PAT API requests (create, get, list, update, revoke) being served now.
    pub in_flight: u64,
    /// The most PAT API requests ever served at once (since start or the
    /// last reset).
    pub max_in_flight: u64,
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
            in_flight: 0,
            max_in_flight: 0,
        }
    }
}

/// Most entries `/_emulator/requests` keeps (the oldest go first).
pub(crate) const MAX_REQUEST_LOG: usize = 10_000;

/// One PAT API request in `/_emulator/requests`. Times are microseconds
/// on the emulator's monotonic clock since it started, so tests can
/// compare them without wall-clock jumps.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RequestRecord {
    /// Arrival order, from 1.
    pub seq: u64,
    /// `create`, `get`, `list`, `update` or `revoke`.
    pub operation: &'static str,
    /// When the request arrived (its body read).
    pub arrived_micros: u64,
    /// When the answer was handed to the connection (before its first
    /// byte is written), or when the connection was dropped; None while
    /// the request is being served.
    pub answered_micros: Option<u64>,
    /// The HTTP status answered; None while served or when the
    /// connection was dropped without an answer.
    pub status: Option<u16>,
    /// The W3C `traceparent` header the request carried, if any (the
    /// broker's upstream span when it exports traces).
    pub traceparent: Option<String>,
}

/// Everything mutable, behind one lock (never held across an await).
#[derive(Debug)]
pub(crate) struct Inner {
    /// Every PAT ever made, in creation order (revoked ones stay); add
    /// with [`Inner::add_pat`] so [`Inner::pat_index`] follows.
    pub pats: Vec<PatRecord>,
    /// authorizationId → index in `pats`: a look-up by id costs O(1), not a
    /// scan, so a benchmark's upstream answers as fast with 100,000 PATs.
    pat_index: HashMap<Uuid, usize>,
    pub by_token: HashMap<SecretDigest, Uuid>,
    pub organizations: HashMap<String, Uuid>,
    pub access_tokens: HashMap<SecretDigest, AccessTokenRecord>,
    pub refresh_tokens: HashMap<SecretDigest, RefreshTokenRecord>,
    /// Device codes by their digest (not kept in the state file).
    pub device_codes: HashMap<SecretDigest, DeviceCodeRecord>,
    pub faults: Vec<FaultRule>,
    pub stats: Stats,
    /// Recent PAT API requests, oldest first, at most [`MAX_REQUEST_LOG`].
    pub requests: VecDeque<RequestRecord>,
    /// `seq` of the next request.
    pub next_request_seq: u64,
    /// Added to the wall clock (test-only `/_emulator/clock`).
    pub clock_offset: ChronoDuration,
}

impl Inner {
    /// Emulator time: wall clock plus the test offset.
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.clock_offset
    }

    /// The organization's GUID, made on first sight. `fabrikam` gets the
    /// GUID of Microsoft's examples ("Request and response shapes" [V] EX-*).
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
        self.pats.get(*self.pat_index.get(&id)?)
    }

    pub fn pat_mut(&mut self, id: Uuid) -> Option<&mut PatRecord> {
        self.pats.get_mut(*self.pat_index.get(&id)?)
    }

    /// Keeps `record` (and its token digest) as the newest PAT.
    pub fn add_pat(&mut self, record: PatRecord) {
        self.by_token
            .insert(record.token_digest, record.authorization_id);
        self.pat_index
            .insert(record.authorization_id, self.pats.len());
        self.pats.push(record);
    }

    pub fn count_call(&mut self, operation: &str) {
        *self.stats.calls.entry(operation.to_owned()).or_default() += 1;
    }

    /// Zeroes the counters and forgets the request log; requests being
    /// served stay counted in `inFlight` (and so in `maxInFlight`).
    pub fn reset_stats(&mut self) {
        let in_flight = self.stats.in_flight;
        self.stats = Stats {
            in_flight,
            max_in_flight: in_flight,
            ..Stats::default()
        };
        self.requests.clear();
    }

    fn request_mut(&mut self, seq: u64) -> Option<&mut RequestRecord> {
        let first = self.requests.front()?.seq;
        let index = usize::try_from(seq.checked_sub(first)?).ok()?;
        self.requests.get_mut(index)
    }
}

/// An Entra token as kept in the state file: its digest and record.
#[derive(serde::Serialize, serde::Deserialize)]
struct Kept<R> {
    #[serde(with = "hex_digest")]
    digest: SecretDigest,
    #[serde(flatten)]
    record: R,
}

/// What the state file holds (`--state-file`): everything a restarted
/// emulator needs to honour what it issued before. Secrets only as their
/// SHA-256 digests; fault rules and counters are not kept.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Snapshot {
    version: u32,
    /// [`Inner::clock_offset`] in milliseconds.
    clock_offset_ms: i64,
    organizations: BTreeMap<String, Uuid>,
    pats: Vec<PatRecord>,
    access_tokens: Vec<Kept<AccessTokenRecord>>,
    refresh_tokens: Vec<Kept<RefreshTokenRecord>>,
}

const SNAPSHOT_VERSION: u32 = 1;

impl Inner {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            version: SNAPSHOT_VERSION,
            clock_offset_ms: self.clock_offset.num_milliseconds(),
            organizations: self.organizations.clone().into_iter().collect(),
            pats: self.pats.clone(),
            access_tokens: self
                .access_tokens
                .iter()
                .map(|(d, r)| Kept {
                    digest: *d,
                    record: r.clone(),
                })
                .collect(),
            refresh_tokens: self
                .refresh_tokens
                .iter()
                .map(|(d, r)| Kept {
                    digest: *d,
                    record: r.clone(),
                })
                .collect(),
        }
    }

    fn restore(&mut self, snap: Snapshot) {
        self.clock_offset = ChronoDuration::milliseconds(snap.clock_offset_ms);
        self.organizations = snap.organizations.into_iter().collect();
        self.by_token = snap
            .pats
            .iter()
            .map(|p| (p.token_digest, p.authorization_id))
            .collect();
        self.pat_index = snap
            .pats
            .iter()
            .enumerate()
            .map(|(i, p)| (p.authorization_id, i))
            .collect();
        self.pats = snap.pats;
        self.access_tokens = snap
            .access_tokens
            .into_iter()
            .map(|k| (k.digest, k.record))
            .collect();
        // The seeded refresh token stays accepted beside the kept ones.
        for k in snap.refresh_tokens {
            self.refresh_tokens.insert(k.digest, k.record);
        }
    }
}

/// Where the state is written, one writer at a time (so the last rename
/// always carries the latest state).
#[derive(Debug)]
struct StateFile {
    path: PathBuf,
    writing: Mutex<()>,
}

/// The shared emulator: configuration and state.
#[derive(Clone, Debug)]
pub(crate) struct Emulator {
    pub config: Arc<EmulatorConfig>,
    inner: Arc<Mutex<Inner>>,
    state_file: Option<Arc<StateFile>>,
    /// Zero of the request log's clock.
    started: Instant,
}

/// A PAT API request being served (see [`Emulator::begin_pat_call`]).
pub(crate) struct PatCall {
    emu: Emulator,
    seq: u64,
}

impl PatCall {
    /// Logs the answer's status and time (just before it is sent).
    pub fn answered(&self, status: u16) {
        let now = self.emu.micros();
        if let Some(r) = self.emu.lock().request_mut(self.seq) {
            r.answered_micros = Some(now);
            r.status = Some(status);
        }
    }
}

impl Drop for PatCall {
    fn drop(&mut self) {
        let now = self.emu.micros();
        let mut inner = self.emu.lock();
        inner.stats.in_flight = inner.stats.in_flight.saturating_sub(1);
        if let Some(r) = inner.request_mut(self.seq) {
            r.answered_micros.get_or_insert(now);
        }
    }
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
                account: default_account(),
            },
        );
        Emulator {
            config: Arc::new(config),
            inner: Arc::new(Mutex::new(Inner {
                pats: Vec::new(),
                pat_index: HashMap::new(),
                by_token: HashMap::new(),
                organizations: HashMap::new(),
                access_tokens: HashMap::new(),
                refresh_tokens,
                device_codes: HashMap::new(),
                faults: Vec::new(),
                stats: Stats::default(),
                requests: VecDeque::new(),
                next_request_seq: 1,
                clock_offset: ChronoDuration::zero(),
            })),
            state_file: None,
            started: Instant::now(),
        }
    }

    /// Microseconds on the monotonic clock since the emulator started.
    fn micros(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Counts a PAT API request in flight and logs its arrival; the guard
    /// logs its answer ([`PatCall::answered`]) and, when dropped (also
    /// with a dropped connection), takes it out of flight.
    pub fn begin_pat_call(&self, operation: &'static str, traceparent: Option<&str>) -> PatCall {
        let arrived_micros = self.micros();
        let mut inner = self.lock();
        let seq = inner.next_request_seq;
        inner.next_request_seq += 1;
        inner.stats.in_flight += 1;
        inner.stats.max_in_flight = inner.stats.max_in_flight.max(inner.stats.in_flight);
        if inner.requests.len() >= MAX_REQUEST_LOG {
            inner.requests.pop_front();
        }
        inner.requests.push_back(RequestRecord {
            seq,
            operation,
            arrived_micros,
            answered_micros: None,
            status: None,
            traceparent: traceparent.map(str::to_owned),
        });
        PatCall {
            emu: self.clone(),
            seq,
        }
    }

    /// [`Emulator::new`], then the state in `config.state_file` if that
    /// file exists (a missing file is a first start).
    ///
    /// Errors: the file cannot be read or is not a state file this
    /// version wrote.
    pub fn open(config: EmulatorConfig) -> std::io::Result<Self> {
        let path = config.state_file.clone();
        let mut emu = Emulator::new(config);
        if let Some(path) = path {
            match std::fs::read(&path) {
                Ok(bytes) => {
                    let snap: Snapshot = serde_json::from_slice(&bytes).map_err(|e| {
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("emulator state file {}: {e}", path.display()),
                        )
                    })?;
                    if snap.version != SNAPSHOT_VERSION {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!(
                                "emulator state file {}: version {} (expected {SNAPSHOT_VERSION})",
                                path.display(),
                                snap.version
                            ),
                        ));
                    }
                    emu.lock().restore(snap);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("emulator state file {}: {e}", path.display()),
                    ))
                }
            }
            emu.state_file = Some(Arc::new(StateFile {
                path,
                writing: Mutex::new(()),
            }));
        }
        Ok(emu)
    }

    /// Writes the state file, if there is one: to a temporary file beside
    /// it, then renamed over it, so a crash leaves the old or the new
    /// state, never half of one. Failures are logged (the emulator keeps
    /// serving from memory).
    pub fn persist(&self) {
        let Some(file) = &self.state_file else {
            return;
        };
        let _one_writer = file.writing.lock().unwrap_or_else(|e| e.into_inner());
        let snap = self.lock().snapshot();
        if let Err(e) = write_atomically(&file.path, &snap) {
            tracing::warn!(path = %file.path.display(), error = %e, "cannot write emulator state file");
        }
    }

    /// Locks the state. A poisoned lock is taken over: the state is plain
    /// data and every mutation is completed before a lock is released.
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn write_atomically(path: &Path, snap: &Snapshot) -> std::io::Result<()> {
    use std::io::Write as _;
    let bytes = serde_json::to_vec_pretty(snap)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// std Duration to chrono Duration, saturating.
pub(crate) fn to_chrono(d: std::time::Duration) -> ChronoDuration {
    ChronoDuration::from_std(d).unwrap_or(ChronoDuration::MAX)
}
