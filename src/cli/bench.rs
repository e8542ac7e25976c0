//! `token-broker bench`: drives a running broker over gRPC with a fixed
//! number of concurrent clients and reports, per method, throughput and
//! latency percentiles; optionally the same concurrency's ceiling of the
//! database itself (`--baseline`) and the upstream calls a lease costs
//! (`--upstream`, the emulator's counters).
//!
//! Tokens are dropped as soon as a CreateLease answers: nothing here prints,
//! logs or keeps one. Every lease the run created is revoked before it ends.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::Utc;
use clap::Args;
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::Rng as _;
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::{json, Map, Value};
use sqlx::postgres::{PgConnection, PgPoolOptions};
use tokio::time::Instant;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use super::grpc::{authorization, connect_error, endpoint, ClientArgs, ClientError, Output};
use crate::proto::v1 as pb;
use crate::proto::v1::lease_service_client::LeaseServiceClient;

/// Longest run: `--duration` may not exceed it, and a `--requests` run (and
/// each baseline phase) stops when it is reached.
const MAX_RUN: Duration = Duration::from_secs(3600);

/// Deadline of one call; it also bounds how long a stopped run waits for
/// its in-flight calls.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Latencies are recorded in microseconds, from 1 µs to [`MAX_RUN`], with 3
/// significant digits (percentiles within 0.1 %).
const SIGNIFICANT_DIGITS: u8 = 3;

/// `token-broker bench` options.
#[derive(Args, Debug)]
#[command(after_long_help = AFTER_HELP)]
pub struct BenchArgs {
    /// Broker address, API key and output format (as `lease …` takes them).
    #[command(flatten)]
    pub client: ClientArgs,
    /// Organization to lease in (the `dev` sample policy's by default).
    #[arg(
        long = "organization",
        visible_alias = "org",
        default_value = "fabrikam"
    )]
    pub organization: String,
    /// Scopes to lease; repeat or comma-separate.
    #[arg(
        long = "scope",
        value_delimiter = ',',
        default_value = "vso.code_write"
    )]
    pub scopes: Vec<String>,
    /// Concurrent clients, each with its own connection (1 to 256).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub concurrency: u32,
    /// Run for this long, e.g. `10s`, `1m` (at most 1h); the default when
    /// `--requests` is not given is 10s.
    #[arg(long, value_parser = parse_duration, conflicts_with = "requests")]
    pub duration: Option<Duration>,
    /// Run this many calls in all (across every client) instead.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: Option<u64>,
    /// Relative weights of the calls, e.g. `create=1,get=10,renew=1,revoke=1`
    /// (names: create, get, renew, revoke; an omitted name weighs 0; create
    /// at least 1). Gets, renewals and revocations act on leases this run
    /// created; with none to act on, a client creates one instead.
    #[arg(long, default_value = "create=1,get=10,renew=1,revoke=1", value_parser = Mix::parse)]
    pub mix: Mix,
    /// Also measure this PostgreSQL database (`postgres://…`) at the same
    /// concurrency: a CreateLease's durable writes and a primary-key read,
    /// on a scratch table in a schema of its own, dropped afterwards.
    #[arg(long, value_name = "URL")]
    pub baseline: Option<SecretString>,
    /// Emulator base URL: read its counters (`/_emulator/stats`) before and
    /// after, and report upstream calls per lease created.
    #[arg(long, value_name = "URL")]
    pub upstream: Option<url::Url>,
}

const AFTER_HELP: &str = "\
Figures: per method, rps (successful calls per second of the whole run), \
p50/p95/p99/max latency in ms of successful calls, and failed calls by gRPC code name.

--baseline runs after the broker run, for the same --duration (or the same --requests for \
each phase): writes = the intent INSERT then the activation UPDATE, each its own commit, \
per second; read = SELECT of one row by primary key per second; prepared statements, one \
connection per client. Ratios are the broker's rps over those: CreateLease/writes, GetLease/read.

--upstream: the broker's calls the emulator counted (PAT API and Entra token) from the \
start to the end (after the clean-up revocations), divided by the leases created.

--output json prints one object:
  {\"methods\": {\"CreateLease\": {\"rps\", \"p50_ms\", \"p95_ms\", \"p99_ms\", \"max_ms\", \
\"errors\": {CODE: n}}, …},
   \"baseline\": {\"writes_rps\", \"read_rps\"}, \"ratios\": {\"CreateLease\", \"GetLease\"},
   \"upstream_calls_per_lease\"}
\"methods\" holds each method of the mix; a latency is null when the method had no success. \
\"baseline\" and \"ratios\" are null without --baseline (a ratio is null when its method is not \
in the mix); \"upstream_calls_per_lease\" is null without --upstream or when no lease was created.

Every lease the run created and did not revoke is revoked at the end (also after Ctrl-C); \
the command fails if one could not be. Tokens are never printed.";

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() || d > MAX_RUN {
        return Err("must be more than 0s and at most 1h".into());
    }
    Ok(d)
}

/// The gRPC methods a run calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Method {
    /// `CreateLease`.
    Create,
    /// `GetLease`.
    Get,
    /// `RenewLease`.
    Renew,
    /// `RevokeLease`.
    Revoke,
}

impl Method {
    const ALL: [Method; 4] = [Method::Create, Method::Get, Method::Renew, Method::Revoke];

    /// The name in `--mix`.
    fn mix_name(self) -> &'static str {
        match self {
            Method::Create => "create",
            Method::Get => "get",
            Method::Renew => "renew",
            Method::Revoke => "revoke",
        }
    }

    /// The RPC name, as in the report.
    fn rpc_name(self) -> &'static str {
        match self {
            Method::Create => "CreateLease",
            Method::Get => "GetLease",
            Method::Renew => "RenewLease",
            Method::Revoke => "RevokeLease",
        }
    }
}

/// `--mix`: a weight per method.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mix(BTreeMap<Method, u32>);

impl Mix {
    fn parse(s: &str) -> Result<Mix, String> {
        let mut weights = BTreeMap::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}`: expected NAME=WEIGHT"))?;
            let method = Method::ALL
                .into_iter()
                .find(|m| m.mix_name() == name.trim())
                .ok_or_else(|| format!("`{name}`: expected create, get, renew or revoke"))?;
            let weight: u32 = weight
                .trim()
                .parse()
                .ok()
                .filter(|w| *w <= 1000)
                .ok_or_else(|| format!("`{part}`: the weight must be 0 to 1000"))?;
            if weights.insert(method, weight).is_some() {
                return Err(format!("`{name}` is given twice"));
            }
        }
        if weights.get(&Method::Create).copied().unwrap_or(0) == 0 {
            return Err("create must weigh at least 1: created leases feed the others".into());
        }
        weights.retain(|_, w| *w > 0);
        Ok(Mix(weights))
    }

    /// One cycle of the mix, each method as often as its weight, spread
    /// evenly (smooth weighted round-robin) rather than in runs.
    fn schedule(&self) -> Vec<Method> {
        let total: i64 = self.0.values().map(|w| i64::from(*w)).sum();
        let mut current: BTreeMap<Method, i64> = self.0.keys().map(|m| (*m, 0)).collect();
        let mut out = Vec::with_capacity(total as usize);
        for _ in 0..total {
            for (m, c) in current.iter_mut() {
                *c += i64::from(self.0[m]);
            }
            let (&pick, _) = current
                .iter()
                .max_by_key(|(m, c)| (**c, std::cmp::Reverse(**m)))
                .expect("the mix has create");
            *current.get_mut(&pick).expect("present") -= total;
            out.push(pick);
        }
        out
    }

    fn methods(&self) -> impl Iterator<Item = Method> + '_ {
        self.0.keys().copied()
    }

    fn describe(&self) -> String {
        self.0
            .iter()
            .map(|(m, w)| format!("{}={w}", m.mix_name()))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A failed bench, printed as `error: …`.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Bad flag value.
    #[error("{0}")]
    Usage(String),
    /// The broker cannot be reached.
    #[error("cannot reach the broker at {addr}: {message}")]
    Connect {
        /// The address tried.
        addr: String,
        /// Why.
        message: String,
    },
    /// The baseline database failed (the message never holds its URL).
    #[error("baseline database: {0}")]
    Baseline(String),
    /// The emulator's counters could not be read.
    #[error("upstream counters ({url}/_emulator/stats): {message}")]
    Upstream {
        /// The emulator base URL.
        url: String,
        /// Why.
        message: String,
    },
    /// Every call of the run failed (the report shows the error codes).
    #[error("no call succeeded; the report above counts the errors by code")]
    NothingSucceeded,
    /// The run ended but some leases it created are still live.
    #[error(
        "{} lease(s) this run created could not be revoked; revoke them with \
         `token-broker lease revoke NAME`: {}",
        .0.len(),
        .0.join(" ")
    )]
    LeftLive(Vec<String>),
}

/// What ends a run: a total number of calls or a point in time, and
/// Ctrl-C. Its progress bar (on stderr, hidden when that is not a terminal)
/// counts calls done, or time.
struct Bound {
    remaining: Option<AtomicU64>,
    started: Instant,
    deadline: Instant,
    stop: AtomicBool,
    progress: ProgressBar,
}

impl Bound {
    fn new(label: &str, requests: Option<u64>, duration: Duration) -> Bound {
        let len = requests.unwrap_or(duration.as_millis() as u64);
        let progress = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        if let Ok(style) =
            ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {percent:>3}%")
        {
            progress.set_style(style);
        }
        progress.set_prefix(label.to_owned());
        let started = Instant::now();
        Bound {
            remaining: requests.map(AtomicU64::new),
            started,
            deadline: started + duration,
            stop: AtomicBool::new(false),
            progress,
        }
    }

    /// Moves the bar after a call.
    fn step(&self) {
        if self.remaining.is_some() {
            self.progress.inc(1);
        } else {
            self.progress
                .set_position(self.started.elapsed().as_millis() as u64);
        }
    }

    fn finish(&self) {
        self.progress.finish_and_clear();
    }

    /// Claims the right to one more call.
    fn next(&self) -> bool {
        if self.stop.load(Ordering::Relaxed) || Instant::now() >= self.deadline {
            return false;
        }
        match &self.remaining {
            None => true,
            Some(n) => n
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok(),
        }
    }
}

/// Successful latencies (µs) and failures by code, of one method.
#[derive(Clone)]
struct MethodStats {
    latency_us: Histogram<u64>,
    errors: BTreeMap<&'static str, u64>,
}

impl MethodStats {
    fn new() -> MethodStats {
        MethodStats {
            latency_us: Histogram::new_with_bounds(
                1,
                MAX_RUN.as_micros() as u64,
                SIGNIFICANT_DIGITS,
            )
            .expect("valid histogram bounds"),
            errors: BTreeMap::new(),
        }
    }

    fn record(&mut self, elapsed: Duration, outcome: Result<(), Code>) {
        match outcome {
            Ok(()) => self
                .latency_us
                .saturating_record(elapsed.as_micros() as u64),
            Err(code) => *self.errors.entry(code_name(code)).or_default() += 1,
        }
    }

    fn merge(&mut self, other: &MethodStats) {
        self.latency_us
            .add(&other.latency_us)
            .expect("histograms of the same bounds");
        for (code, n) in &other.errors {
            *self.errors.entry(code).or_default() += n;
        }
    }

    fn ok(&self) -> u64 {
        self.latency_us.len()
    }

    /// `q`'s latency in ms; None without a success.
    fn quantile_ms(&self, q: f64) -> Option<f64> {
        (!self.latency_us.is_empty()).then(|| self.latency_us.value_at_quantile(q) as f64 / 1e3)
    }

    fn max_ms(&self) -> Option<f64> {
        (!self.latency_us.is_empty()).then(|| self.latency_us.max() as f64 / 1e3)
    }
}

/// The canonical gRPC name of `code` (`RESOURCE_EXHAUSTED`).
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Adds `authorization: Bearer <key>` to every call (or nothing).
#[derive(Clone)]
struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

type Client = LeaseServiceClient<InterceptedService<Channel, Bearer>>;

/// Leases the run created, and which of them other calls may use now.
#[derive(Default)]
struct Leases {
    /// Live and not in use by a renewal or revocation.
    idle: Vec<String>,
    created: Vec<String>,
    revoked: HashSet<String>,
}

/// A call to make, with the lease it acts on.
enum Call {
    Create,
    Get(String),
    Renew(String),
    Revoke(String),
}

impl Call {
    fn method(&self) -> Method {
        match self {
            Call::Create => Method::Create,
            Call::Get(_) => Method::Get,
            Call::Renew(_) => Method::Renew,
            Call::Revoke(_) => Method::Revoke,
        }
    }
}

/// What every client of a run shares.
struct Run {
    bound: Bound,
    leases: Mutex<Leases>,
    organization: String,
    scopes: Vec<String>,
}

impl Run {
    fn leases(&self) -> std::sync::MutexGuard<'_, Leases> {
        self.leases.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The call `planned` stands for, on a random idle lease; a create
    /// when there is none. A renewal or revocation takes its lease out of
    /// the idle set, so no two of them race on one lease.
    fn plan(&self, planned: Method) -> Call {
        let mut leases = self.leases();
        if leases.idle.is_empty() {
            return Call::Create;
        }
        let i = rand::thread_rng().gen_range(0..leases.idle.len());
        match planned {
            Method::Create => Call::Create,
            Method::Get => Call::Get(leases.idle[i].clone()),
            Method::Renew => Call::Renew(leases.idle.swap_remove(i)),
            Method::Revoke => Call::Revoke(leases.idle.swap_remove(i)),
        }
    }

    async fn call(&self, client: &mut Client, call: Call) -> Result<(), Code> {
        let result = match &call {
            Call::Create => client
                .create_lease(pb::CreateLeaseRequest {
                    organization: self.organization.clone(),
                    scopes: self.scopes.clone(),
                    ttl: None,
                    request_id: String::new(),
                })
                .await
                // Only the name is kept: the token is dropped here.
                .map(|r| Some(r.into_inner().name)),
            Call::Get(name) => client
                .get_lease(pb::GetLeaseRequest { name: name.clone() })
                .await
                .map(|_| None),
            Call::Renew(name) => client
                .renew_lease(pb::RenewLeaseRequest {
                    name: name.clone(),
                    increment: None,
                })
                .await
                .map(|_| None),
            Call::Revoke(name) => client
                .revoke_lease(pb::RevokeLeaseRequest { name: name.clone() })
                .await
                .map(|_| None),
        };
        let mut leases = self.leases();
        match (call, &result) {
            (Call::Create, Ok(Some(name))) => {
                leases.created.push(name.clone());
                leases.idle.push(name.clone());
            }
            (Call::Renew(name), _) => leases.idle.push(name),
            (Call::Revoke(name), Ok(_)) => {
                leases.revoked.insert(name);
            }
            // A failed revocation is left to the clean-up.
            _ => {}
        }
        result.map(|_| ()).map_err(|s| s.code())
    }
}

/// One client: calls in `schedule`'s order from `offset` until the run's
/// bound says stop.
async fn client_loop(
    run: Arc<Run>,
    mut client: Client,
    schedule: Arc<Vec<Method>>,
    offset: usize,
) -> BTreeMap<Method, MethodStats> {
    let mut stats: BTreeMap<Method, MethodStats> = BTreeMap::new();
    let mut i = offset;
    while run.bound.next() {
        let call = run.plan(schedule[i % schedule.len()]);
        i += 1;
        let method = call.method();
        let started = Instant::now();
        let outcome = run.call(&mut client, call).await;
        stats
            .entry(method)
            .or_insert_with(MethodStats::new)
            .record(started.elapsed(), outcome);
        run.bound.step();
    }
    stats
}

/// Results of the broker run.
struct BrokerRun {
    elapsed: Duration,
    stats: BTreeMap<Method, MethodStats>,
    created: usize,
    /// Leases the run left live that the clean-up revoked.
    cleaned_up: usize,
    /// Leases the clean-up could not revoke.
    left_live: Vec<String>,
}

/// Each client gets its own channel, so its own HTTP/2 connection, as N
/// separate services would: what happens per connection (Nagle's delay on
/// a request/response exchange, the server's task per connection) is then
/// charged to every client as in production. One shared channel measured
/// the same at 16 clients on today's broker (BENCHMARKS.md), but it funnels
/// every call through one connection task on each side, a limit of the
/// bench's own making once the broker is fast.
async fn connect(args: &ClientArgs, n: u32) -> Result<Vec<Client>, BenchError> {
    let usage = |e: ClientError| BenchError::Usage(e.to_string());
    let endpoint = endpoint(args).map_err(usage)?.timeout(CALL_TIMEOUT);
    let addr = endpoint.uri().to_string();
    // Read once: a run is short next to a projected token's lifetime.
    let bearer = authorization(args).map_err(usage)?;
    let mut clients = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let channel = endpoint.connect().await.map_err(|e| BenchError::Connect {
            addr: addr.clone(),
            message: match connect_error(&addr, &e) {
                ClientError::Connect { message, .. } => message,
                other => other.to_string(),
            },
        })?;
        clients.push(LeaseServiceClient::with_interceptor(
            channel,
            Bearer(bearer.clone()),
        ));
    }
    Ok(clients)
}

/// Stops `bound` on Ctrl-C (the run then cleans up as usual).
fn stop_on_ctrl_c(bound: &Arc<Run>) -> tokio::task::JoinHandle<()> {
    let run = Arc::clone(bound);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            run.bound.stop.store(true, Ordering::Relaxed);
        }
    })
}

async fn run_broker(args: &BenchArgs, duration: Duration, clients: Vec<Client>) -> BrokerRun {
    let run = Arc::new(Run {
        bound: Bound::new("broker", args.requests, duration),
        leases: Mutex::new(Leases::default()),
        organization: args.organization.clone(),
        scopes: args.scopes.clone(),
    });
    let ctrl_c = stop_on_ctrl_c(&run);

    let schedule = Arc::new(args.mix.schedule());
    let n = clients.len();
    let cleanup_client = clients[0].clone();
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, client)| {
            // Clients start spread over the cycle, not in lock step.
            let offset = i * schedule.len() / n;
            tokio::spawn(client_loop(
                Arc::clone(&run),
                client,
                Arc::clone(&schedule),
                offset,
            ))
        })
        .collect();
    let mut stats: BTreeMap<Method, MethodStats> = BTreeMap::new();
    for task in tasks {
        // A client task panics only on a bug; its figures are lost then.
        if let Ok(client_stats) = task.await {
            for (m, s) in client_stats {
                stats.entry(m).or_insert_with(MethodStats::new).merge(&s);
            }
        }
    }
    let elapsed = started.elapsed();
    run.bound.finish();
    ctrl_c.abort();

    let (created, left) = {
        let leases = run.leases();
        let left: Vec<String> = leases
            .created
            .iter()
            .filter(|n| !leases.revoked.contains(*n))
            .cloned()
            .collect();
        (leases.created.len(), left)
    };
    let to_revoke = left.len();
    let left_live = revoke_all(cleanup_client, left, n).await;
    BrokerRun {
        elapsed,
        stats,
        created,
        cleaned_up: to_revoke - left_live.len(),
        left_live,
    }
}

/// Revokes `names` with `concurrency` calls at a time; returns those not
/// revoked (or still being revoked by the broker's retries).
async fn revoke_all(client: Client, names: Vec<String>, concurrency: usize) -> Vec<String> {
    if names.is_empty() {
        return names;
    }
    eprintln!("revoking the {} lease(s) the run left live", names.len());
    futures::stream::iter(names)
        .map(|name| {
            let mut client = client.clone();
            async move {
                let done = client
                    .revoke_lease(pb::RevokeLeaseRequest { name: name.clone() })
                    .await
                    .is_ok_and(|l| {
                        use pb::lease::State;
                        matches!(
                            l.into_inner().state(),
                            State::Revoked | State::Expired | State::Failed
                        )
                    });
                (!done).then_some(name)
            }
        })
        .buffer_unordered(concurrency)
        .filter_map(|failed| async move { failed })
        .collect()
        .await
}

/// The emulator's counters of the broker's calls, by operation (`calls` of
/// `/_emulator/stats`).
async fn upstream_calls(
    http: &reqwest::Client,
    base: &url::Url,
) -> Result<BTreeMap<String, u64>, BenchError> {
    let base_text = base.as_str().trim_end_matches('/').to_owned();
    let err = |message: String| BenchError::Upstream {
        url: base_text.clone(),
        message,
    };
    let stats: Value = http
        .get(format!("{base_text}/_emulator/stats"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| err(e.to_string()))?
        .json()
        .await
        .map_err(|e| err(e.to_string()))?;
    let calls = stats
        .get("calls")
        .and_then(Value::as_object)
        .ok_or_else(|| err("no `calls` object: is this the token-broker emulator?".into()))?;
    Ok(calls
        .iter()
        // Data-plane calls are the PAT holders' own, never the broker's.
        .filter(|(k, _)| k.as_str() != "dataplane")
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
        .collect())
}

/// The database's own figures at the run's concurrency.
struct Baseline {
    writes_rps: f64,
    read_rps: f64,
}

/// The columns and indexes of `leases` (migrations/postgres), so a write
/// costs what the broker's does.
const SCRATCH_TABLE: &str = "CREATE TABLE {t} (
    id UUID PRIMARY KEY, holder TEXT NOT NULL, organization TEXT NOT NULL,
    scopes TEXT NOT NULL, display_name TEXT NOT NULL UNIQUE, authorization_id UUID,
    sealed_token TEXT, state TEXT NOT NULL CHECK (state IN
      ('PENDING', 'ACTIVE', 'REVOKING', 'REVOKED', 'EXPIRED', 'FAILED', 'REVOKE_FAILED')),
    create_time TIMESTAMPTZ NOT NULL, update_time TIMESTAMPTZ NOT NULL,
    expire_time TIMESTAMPTZ NOT NULL, max_expire_time TIMESTAMPTZ NOT NULL,
    revoke_time TIMESTAMPTZ, upstream_valid_to TIMESTAMPTZ,
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt_time TIMESTAMPTZ, last_error TEXT,
    claimed_by TEXT, claimed_until TIMESTAMPTZ);
CREATE INDEX ON {t} (holder, create_time DESC, id DESC);
CREATE INDEX ON {t} (create_time DESC, id DESC);
CREATE INDEX ON {t} (state, expire_time);
CREATE INDEX ON {t} (state, next_attempt_time);
CREATE INDEX ON {t} (organization);
CREATE INDEX ON {t} (state, create_time DESC, id DESC);";

/// The broker's statements (store::postgres), on the scratch table.
const INSERT_INTENT: &str = "INSERT INTO {t} (id, holder, organization, scopes, display_name, \
     authorization_id, sealed_token, state, create_time, update_time, expire_time, \
     max_expire_time, revoke_time, upstream_valid_to, attempts, next_attempt_time, last_error, \
     claimed_by, claimed_until) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)";
const ACTIVATE: &str = "UPDATE {t} SET authorization_id = $1, sealed_token = $2, state = $3, \
     update_time = $4, expire_time = $5, max_expire_time = $6, revoke_time = $7, \
     upstream_valid_to = $8, attempts = $9, next_attempt_time = $10, last_error = $11, \
     claimed_by = $12, claimed_until = $13 \
     WHERE id = $14 AND state = $15 AND ($16::timestamptz IS NULL OR update_time = $16)";
const READ_ONE: &str = "SELECT * FROM {t} WHERE id = $1";

/// The baseline's statements on one scratch table; the same text each
/// time, so each connection prepares each once.
struct Statements {
    insert: String,
    activate: String,
    read: String,
}

impl Statements {
    fn on(table: &str) -> Statements {
        Statements {
            insert: INSERT_INTENT.replace("{t}", table),
            activate: ACTIVATE.replace("{t}", table),
            read: READ_ONE.replace("{t}", table),
        }
    }
}

fn db_err(e: sqlx::Error) -> BenchError {
    // sqlx's messages name neither the URL nor its password.
    BenchError::Baseline(e.to_string())
}

/// A CreateLease's two durable writes: the intent row, then its activation,
/// each committed on its own (autocommit), as the broker issues them.
async fn write_pair(
    conn: &mut PgConnection,
    sql: Arc<Statements>,
) -> Result<uuid::Uuid, sqlx::Error> {
    let id = uuid::Uuid::new_v4();
    let now = Utc::now();
    let expire = now + chrono::Duration::hours(1);
    sqlx::query(&sql.insert)
        .bind(id)
        .bind("apikey:bench")
        .bind("fabrikam")
        .bind("vso.code_write")
        .bind(format!("token-broker-bench:{id}"))
        .bind(None::<uuid::Uuid>)
        .bind(None::<String>)
        .bind("PENDING")
        .bind(now)
        .bind(now)
        .bind(expire)
        .bind(now + chrono::Duration::hours(8))
        .bind(None::<chrono::DateTime<Utc>>)
        .bind(None::<chrono::DateTime<Utc>>)
        .bind(0_i32)
        .bind(None::<chrono::DateTime<Utc>>)
        .bind(None::<String>)
        .bind(None::<String>)
        .bind(None::<chrono::DateTime<Utc>>)
        .execute(&mut *conn)
        .await?;
    // A sealed token is `v1:<key id>:<base64>` of about this length.
    let sealed = format!("v1:bench:{}", "A".repeat(140));
    sqlx::query(&sql.activate)
        .bind(Some(uuid::Uuid::new_v4()))
        .bind(Some(sealed))
        .bind("ACTIVE")
        .bind(Utc::now())
        .bind(expire)
        .bind(now + chrono::Duration::hours(8))
        .bind(None::<chrono::DateTime<Utc>>)
        .bind(Some(expire))
        .bind(0_i32)
        .bind(None::<chrono::DateTime<Utc>>)
        .bind(None::<String>)
        .bind(None::<String>)
        .bind(None::<chrono::DateTime<Utc>>)
        .bind(id)
        .bind("PENDING")
        .bind(Some(now))
        .execute(&mut *conn)
        .await?;
    Ok(id)
}

/// One baseline operation on a connection.
type DbOp<T> = Arc<
    dyn for<'c> Fn(&'c mut PgConnection) -> futures::future::BoxFuture<'c, Result<T, sqlx::Error>>
        + Send
        + Sync,
>;

/// Runs `op` on every connection, each in a task of its own as the broker
/// run's clients are, until the phase's bound says stop. Returns the
/// operations done per second, what they produced, and the connections.
async fn phase<T: Send + 'static>(
    label: &str,
    conns: Vec<PgConnection>,
    requests: Option<u64>,
    duration: Duration,
    op: DbOp<T>,
) -> Result<(f64, Vec<T>, Vec<PgConnection>), BenchError> {
    let bound = Arc::new(Bound::new(label, requests, duration));
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            let (bound, op) = (Arc::clone(&bound), Arc::clone(&op));
            tokio::spawn(async move {
                let mut out = Vec::new();
                while bound.next() {
                    match op(&mut conn).await {
                        Ok(x) => out.push(x),
                        Err(e) => return Err(e),
                    }
                    bound.step();
                }
                Ok((out, conn))
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut conns = Vec::with_capacity(tasks.len());
    let mut failed = None;
    for task in tasks {
        match task.await {
            Ok(Ok((out, conn))) => {
                all.extend(out);
                conns.push(conn);
            }
            Ok(Err(e)) => failed = Some(db_err(e)),
            Err(e) => failed = Some(BenchError::Baseline(format!("a client task failed: {e}"))),
        }
    }
    let elapsed = bound.started.elapsed().as_secs_f64();
    bound.finish();
    match failed {
        Some(e) => Err(e),
        None => Ok((all.len() as f64 / elapsed.max(1e-9), all, conns)),
    }
}

/// `--baseline`: the scratch schema's life around the two phases.
/// `--baseline` measures PostgreSQL, the production store.
fn check_baseline_url(url: &str) -> Result<(), BenchError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(())
    } else {
        Err(BenchError::Usage(
            "--baseline takes a postgres:// URL".into(),
        ))
    }
}

/// Checks `--baseline` before anything runs: its form, then that one
/// connection opens within 10 s. Errors: `Usage` for another scheme,
/// `Baseline` (sqlx's message, which names neither URL nor password) when
/// the database cannot be reached.
async fn check_baseline(url: &str) -> Result<(), BenchError> {
    use sqlx::Connection as _;
    check_baseline_url(url)?;
    let conn = tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(url))
        .await
        .map_err(|_| BenchError::Baseline("no connection within 10 s".into()))?
        .map_err(db_err)?;
    let _ = conn.close().await;
    Ok(())
}

async fn run_baseline(
    url: &SecretString,
    concurrency: u32,
    requests: Option<u64>,
    duration: Duration,
) -> Result<Baseline, BenchError> {
    let url = url.expose_secret();
    check_baseline_url(url)?;
    let pool = PgPoolOptions::new()
        .max_connections(concurrency + 1)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .map_err(db_err)?;
    let schema = format!(
        "token_broker_bench_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let table = format!("{schema}.leases");
    sqlx::raw_sql(&format!(
        "CREATE SCHEMA {schema}; {}",
        SCRATCH_TABLE.replace("{t}", &table)
    ))
    .execute(&pool)
    .await
    .map_err(db_err)?;
    let result = baseline_phases(&pool, &table, concurrency, requests, duration).await;
    // Dropped whatever happened: the scratch rows never outlive the run.
    let dropped = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&pool)
        .await
        .map_err(db_err);
    pool.close().await;
    let baseline = result?;
    dropped?;
    Ok(baseline)
}

async fn baseline_phases(
    pool: &sqlx::PgPool,
    table: &str,
    concurrency: u32,
    requests: Option<u64>,
    duration: Duration,
) -> Result<Baseline, BenchError> {
    let mut conns = Vec::with_capacity(concurrency as usize);
    for _ in 0..concurrency {
        conns.push(pool.acquire().await.map_err(db_err)?.detach());
    }
    let sql = Arc::new(Statements::on(table));
    let write: DbOp<uuid::Uuid> = {
        let sql = Arc::clone(&sql);
        Arc::new(move |c| Box::pin(write_pair(c, Arc::clone(&sql))))
    };
    let (writes_rps, ids, conns) =
        phase("baseline writes", conns, requests, duration, write).await?;
    if ids.is_empty() {
        return Err(BenchError::Baseline("no row was written".into()));
    }
    let ids = Arc::new(ids);
    let read: DbOp<()> = Arc::new(move |c| {
        let id = ids[rand::thread_rng().gen_range(0..ids.len())];
        let sql = Arc::clone(&sql);
        Box::pin(async move {
            sqlx::query(&sql.read).bind(id).fetch_one(c).await?;
            Ok(())
        })
    });
    let (read_rps, _, conns) = phase("baseline reads", conns, requests, duration, read).await?;
    for conn in conns {
        let _ = sqlx::Connection::close(conn).await;
    }
    Ok(Baseline {
        writes_rps,
        read_rps,
    })
}

/// Runs `token-broker bench` and prints its report on stdout.
pub async fn run(args: BenchArgs) -> Result<(), BenchError> {
    if args.scopes.iter().all(|s| s.trim().is_empty()) {
        return Err(BenchError::Usage("--scope: at least one scope".into()));
    }
    let output = args
        .client
        .output("bench")
        .map_err(|e| BenchError::Usage(e.to_string()))?;
    let duration = args.duration.unwrap_or(match args.requests {
        Some(_) => MAX_RUN,
        None => Duration::from_secs(10),
    });
    // Before the broker phase, so a wrong URL or an unreachable database
    // costs no run and mints no lease.
    if let Some(url) = &args.baseline {
        check_baseline(url.expose_secret()).await?;
    }
    let http = reqwest::Client::new();
    let before = match &args.upstream {
        Some(u) => Some(upstream_calls(&http, u).await?),
        None => None,
    };
    let clients = connect(&args.client, args.concurrency).await?;
    let broker = run_broker(&args, duration, clients).await;
    // Counted after the clean-up, so each lease's revocation is included.
    let after = match &args.upstream {
        Some(u) => Some(upstream_calls(&http, u).await?),
        None => None,
    };
    let baseline = match &args.baseline {
        Some(url) => Some(run_baseline(url, args.concurrency, args.requests, duration).await?),
        None => None,
    };
    let upstream = before.zip(after).map(|(b, a)| {
        a.into_iter()
            .map(|(k, v)| {
                let d = v.saturating_sub(b.get(&k).copied().unwrap_or(0));
                (k, d)
            })
            .filter(|(_, d)| *d > 0)
            .collect::<BTreeMap<_, _>>()
    });
    let report = Report {
        args: &args,
        broker: &broker,
        baseline: baseline.as_ref(),
        upstream: upstream.as_ref(),
    };
    let out = match output {
        Output::Json => format!("{:#}", report.json()),
        Output::Text => report.text(),
    };
    // A reader that went away ends the output quietly: nothing to report.
    let _ = super::print_out(Ok::<_, BenchError>(out));
    if !broker.left_live.is_empty() {
        return Err(BenchError::LeftLive(broker.left_live));
    }
    if broker.stats.values().all(|m| m.ok() == 0) {
        // A script must not read a run of refusals as a measurement.
        return Err(BenchError::NothingSucceeded);
    }
    Ok(())
}

/// Everything a report shows.
struct Report<'a> {
    args: &'a BenchArgs,
    broker: &'a BrokerRun,
    baseline: Option<&'a Baseline>,
    /// Upstream calls by operation during the run.
    upstream: Option<&'a BTreeMap<String, u64>>,
}

impl Report<'_> {
    fn stats(&self, m: Method) -> MethodStats {
        self.broker
            .stats
            .get(&m)
            .cloned()
            .unwrap_or_else(MethodStats::new)
    }

    /// Methods of the mix, and any the run called instead (a create when no
    /// lease was idle).
    fn methods(&self) -> Vec<Method> {
        let mut ms: Vec<Method> = self.args.mix.methods().collect();
        ms.extend(self.broker.stats.keys());
        ms.sort();
        ms.dedup();
        ms
    }

    fn rps(&self, m: Method) -> f64 {
        self.stats(m).ok() as f64 / self.broker.elapsed.as_secs_f64().max(1e-9)
    }

    /// `m`'s rps over its baseline's: None without a baseline or when `m`
    /// was not in the mix.
    fn ratio(&self, m: Method) -> Option<f64> {
        let b = self.baseline?;
        let base = match m {
            Method::Create => b.writes_rps,
            Method::Get => b.read_rps,
            _ => return None,
        };
        self.args
            .mix
            .methods()
            .any(|x| x == m)
            .then(|| self.rps(m) / base.max(1e-9))
    }

    fn upstream_per_lease(&self) -> Option<f64> {
        let calls: u64 = self.upstream?.values().sum();
        (self.broker.created > 0).then(|| calls as f64 / self.broker.created as f64)
    }

    fn json(&self) -> Value {
        let round = |x: f64| (x * 1000.0).round() / 1000.0;
        let methods: Map<String, Value> = self
            .methods()
            .into_iter()
            .map(|m| {
                let s = self.stats(m);
                (
                    m.rpc_name().to_owned(),
                    json!({
                        "rps": round(self.rps(m)),
                        "p50_ms": s.quantile_ms(0.50).map(round),
                        "p95_ms": s.quantile_ms(0.95).map(round),
                        "p99_ms": s.quantile_ms(0.99).map(round),
                        "max_ms": s.max_ms().map(round),
                        "errors": s.errors,
                    }),
                )
            })
            .collect();
        json!({
            "methods": methods,
            "baseline": self.baseline.map(|b| json!({
                "writes_rps": round(b.writes_rps),
                "read_rps": round(b.read_rps),
            })),
            "ratios": self.baseline.map(|_| json!({
                "CreateLease": self.ratio(Method::Create).map(round),
                "GetLease": self.ratio(Method::Get).map(round),
            })),
            "upstream_calls_per_lease": self.upstream_per_lease().map(round),
        })
    }

    fn text(&self) -> String {
        let a = self.args;
        let ms = |x: Option<f64>| x.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
        let mut out = format!(
            "{} client(s), {:.1}s, mix {}\n{:<12} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8}  errors",
            a.concurrency,
            self.broker.elapsed.as_secs_f64(),
            a.mix.describe(),
            "method",
            "ok",
            "rps",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "max ms"
        );
        for m in self.methods() {
            let s = self.stats(m);
            let errors = if s.errors.is_empty() {
                "-".to_owned()
            } else {
                s.errors
                    .iter()
                    .map(|(c, n)| format!("{c} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            out.push_str(&format!(
                "\n{:<12} {:>8} {:>9.1} {:>8} {:>8} {:>8} {:>8}  {errors}",
                m.rpc_name(),
                s.ok(),
                self.rps(m),
                ms(s.quantile_ms(0.50)),
                ms(s.quantile_ms(0.95)),
                ms(s.quantile_ms(0.99)),
                ms(s.max_ms()),
            ));
        }
        if let Some(b) = self.baseline {
            let ratio = |m| {
                self.ratio(m)
                    .map_or_else(|| "-".to_owned(), |r| format!("{r:.3}"))
            };
            out.push_str(&format!(
                "\nbaseline (PostgreSQL, {} connection(s)): writes {:.1}/s (intent insert + \
                 activation update, two commits), read {:.1}/s (one row by primary key)\
                 \nratio to baseline: CreateLease {}, GetLease {}",
                a.concurrency,
                b.writes_rps,
                b.read_rps,
                ratio(Method::Create),
                ratio(Method::Get),
            ));
        }
        if let Some(calls) = self.upstream {
            let per = self
                .upstream_per_lease()
                .map_or_else(|| "-".to_owned(), |p| format!("{p:.2}"));
            let by_op = calls
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ");
            out.push_str(&format!(
                "\nupstream: {per} calls per lease created ({} created; {by_op})",
                self.broker.created
            ));
        }
        out.push_str(&format!(
            "\nleases created {}, revoked at the end {}",
            self.broker.created, self.broker.cleaned_up
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_parses_and_spreads_each_method_by_its_weight() {
        let mix = Mix::parse("create=1,get=10,renew=1,revoke=1").unwrap();
        let s = mix.schedule();
        assert_eq!(s.len(), 13);
        assert_eq!(s.iter().filter(|m| **m == Method::Get).count(), 10);
        assert_eq!(s.iter().filter(|m| **m == Method::Create).count(), 1);
        // Spread: never more than two gets before something else when
        // weights allow it (10 gets among 13 slots).
        let runs = s
            .split(|m| *m != Method::Get)
            .map(<[Method]>::len)
            .max()
            .unwrap();
        assert!(runs <= 4, "{s:?}");
        assert_eq!(Mix::parse("create=2").unwrap().schedule().len(), 2);
        assert_eq!(mix.describe(), "create=1,get=10,renew=1,revoke=1");
    }

    #[test]
    fn a_mix_without_create_or_with_a_bad_part_is_refused() {
        assert!(Mix::parse("get=1").is_err());
        assert!(Mix::parse("create=0,get=1").is_err());
        assert!(Mix::parse("create=1,list=1").is_err());
        assert!(Mix::parse("create=x").is_err());
        assert!(Mix::parse("create=1,create=2").is_err());
        assert_eq!(
            Mix::parse("create=1,get=0")
                .unwrap()
                .methods()
                .collect::<Vec<_>>(),
            vec![Method::Create]
        );
    }

    #[test]
    fn a_request_bound_hands_out_exactly_its_count() {
        let bound = Bound::new("test", Some(3), Duration::from_secs(60));
        assert_eq!((0..10).filter(|_| bound.next()).count(), 3);
        let stopped = Bound::new("test", None, Duration::from_secs(60));
        stopped.stop.store(true, Ordering::Relaxed);
        assert!(!stopped.next());
    }

    #[test]
    fn codes_have_their_canonical_names() {
        assert_eq!(code_name(Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(code_name(Code::Unavailable), "UNAVAILABLE");
    }

    #[test]
    fn the_scratch_table_has_every_column_the_statements_write() {
        for col in [
            "holder",
            "sealed_token",
            "upstream_valid_to",
            "claimed_until",
            "next_attempt_time",
        ] {
            assert!(SCRATCH_TABLE.contains(col), "{col}");
            assert!(INSERT_INTENT.contains(col), "{col}");
        }
    }
}
