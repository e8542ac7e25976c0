//! Managed credentials (issue 17) end to end: the real broker (in-process,
//! and as real `serve` processes on one PostgreSQL) against the emulator,
//! driven through the Rust API the gRPC layer calls
//! (`token_broker::credentials::Credentials`); tokens checked on the
//! emulator's data plane.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt as _;
use secrecy::ExposeSecret as _;
use serde_json::Value;

use common::broker::BrokerSpec;
use common::db::{sqlite_url, TestDatabase};
use common::emulator::Emu;
use common::process::ServeProcess;
use common::wait::poll;
use token_broker::credentials::{
    CredentialError, CredentialToken, Credentials, RevokePrevious, VersionState,
};
use token_broker::policy::{PolicyHandle, ReloadTrigger};

/// The data-plane resource `vso.packaging` opens.
const FEEDS: &str = "packaging/feeds";

/// A policy with the CI rule and one credential `mirror-feed` rotating
/// every `period` with `overlap`.
fn policy(period: &str, overlap: &str) -> String {
    format!(
        r#"
rules: []
credentials:
  - name: mirror-feed
    organization: fabrikam
    scopes: ["vso.packaging"]
    rotation_period: {period}
    overlap: {overlap}
    readers: ["apikey:ci"]
    reader_regexes: []
"#
    )
}

/// The credential's current token, once it has one.
async fn current(credentials: &Credentials) -> CredentialToken {
    poll("a CURRENT version", Duration::from_secs(60), || async {
        credentials
            .current("mirror-feed")
            .await
            .map_err(|e| e.to_string())
    })
    .await
}

/// The emulator's PATs of credential `mirror-feed`, by version.
async fn upstream_versions(emu: &Emu) -> BTreeMap<i64, Vec<Value>> {
    let mut out: BTreeMap<i64, Vec<Value>> = BTreeMap::new();
    for pat in emu.pats().await {
        let name = pat["displayName"].as_str().unwrap_or_default();
        if let Some((_, version)) = name.rsplit_once(":credential:mirror-feed:") {
            out.entry(version.parse().unwrap())
                .or_default()
                .push(pat.clone());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn versions_rotate_with_overlap_one_always_works_and_old_ones_are_revoked_upstream() {
    let emu = Emu::start_default().await;
    let db = TestDatabase::create().await;
    let mut spec = BrokerSpec::new(&db.url, emu.url(""));
    spec.policy_yaml = policy("10s", "4s");
    let broker = common::broker::spawn_broker(&spec).await;
    let credentials = broker.credentials();
    assert!(credentials.reader_allowed("mirror-feed", &"apikey:ci".parse().unwrap()));
    assert!(!credentials.reader_allowed("mirror-feed", &"apikey:other".parse().unwrap()));
    assert!(!credentials.reader_allowed("nope", &"apikey:ci".parse().unwrap()));

    // A watcher from the start collects every version it is sent.
    let mut stream = credentials.watch("mirror-feed", None);
    let watched = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Some(item) = stream.next().await {
            let token = item.expect("watch item");
            got.push((token.version.version, token.token));
            if got.len() == 4 {
                break;
            }
        }
        got
    });

    // Sample the current token on the data plane until version 4 exists.
    let mut tokens: BTreeMap<i64, secrecy::SecretString> = BTreeMap::new();
    let mut samples = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let token = current(&credentials).await;
        let status = emu
            .use_pat("fabrikam", FEEDS, token.token.expose_secret())
            .await;
        assert_eq!(
            status, 200,
            "the current version {} does not work",
            token.version.version
        );
        samples += 1;
        tokens
            .entry(token.version.version)
            .or_insert(token.token.clone());
        if token.version.version >= 4 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no 4th version; saw {:?}",
            tokens.keys()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(samples > 10, "too few samples: {samples}");

    // The watcher saw 1, 2, 3, 4 in order, each token the one current() gave.
    let got = tokio::time::timeout(Duration::from_secs(30), watched)
        .await
        .expect("the watcher got 4 versions")
        .unwrap();
    let versions: Vec<i64> = got.iter().map(|(v, _)| *v).collect();
    assert_eq!(versions, vec![1, 2, 3, 4]);
    for (v, token) in &got {
        if let Some(seen) = tokens.get(v) {
            assert_eq!(seen.expose_secret(), token.expose_secret());
        }
    }

    // Versions 1 and 2 are past their overlap: revoked at the emulator, their
    // tokens refused; each version was minted once upstream.
    poll(
        "versions 1 and 2 REVOKED",
        Duration::from_secs(60),
        || async {
            let list = credentials.list().await.map_err(|e| e.to_string())?;
            let states: BTreeMap<i64, VersionState> =
                list.iter().map(|v| (v.version, v.state)).collect();
            match (states.get(&1), states.get(&2)) {
                (Some(VersionState::Revoked), Some(VersionState::Revoked)) => Ok(()),
                _ => Err(format!("{states:?}")),
            }
        },
    )
    .await;
    let upstream = upstream_versions(&emu).await;
    for v in [1, 2] {
        assert_eq!(upstream[&v].len(), 1, "version {v} minted once");
        assert_eq!(upstream[&v][0]["state"], "revoked", "version {v}");
        let (_, token) = got.iter().find(|(n, _)| *n == v).unwrap();
        assert_eq!(
            emu.use_pat("fabrikam", FEEDS, token.expose_secret()).await,
            401,
            "revoked version {v} still works"
        );
    }
    for (v, pats) in &upstream {
        assert_eq!(pats.len(), 1, "version {v} minted {} times", pats.len());
    }
    // The listing is newest first and carries the timeline.
    let list = credentials.list().await.unwrap();
    assert!(list.windows(2).all(|w| w[0].version > w[1].version));
    let v1 = list.iter().find(|v| v.version == 1).unwrap();
    assert_eq!(v1.organization, "fabrikam");
    assert_eq!(v1.scopes, vec!["vso.packaging".to_owned()]);
    assert!(v1.rotate_time > v1.valid_from && v1.expire_time > v1.rotate_time);
    assert!(v1.revoke_time.is_some());
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotate_now_makes_the_previous_token_fail_at_once_and_watchers_get_the_new_one() {
    let emu = Emu::start_default().await;
    let dir = tempfile::tempdir().unwrap();
    let mut spec = BrokerSpec::new(sqlite_url(&dir), emu.url(""));
    spec.policy_yaml = policy("1h", "10m");
    let broker = common::broker::spawn_broker(&spec).await;
    let credentials = broker.credentials();
    let first = current(&credentials).await;
    assert_eq!(first.version.version, 1);
    assert_eq!(
        emu.use_pat("fabrikam", FEEDS, first.token.expose_secret())
            .await,
        200
    );
    let mut stream = credentials.watch("mirror-feed", Some(1));

    let rotated = credentials
        .rotate("mirror-feed", RevokePrevious::Now)
        .await
        .expect("rotate");
    assert_eq!(rotated.version, 2);
    assert_eq!(rotated.state, VersionState::Current);
    assert_eq!(
        emu.use_pat("fabrikam", FEEDS, first.token.expose_secret())
            .await,
        401,
        "the previous token still works after rotate NOW"
    );
    let next = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("the watcher got the new version")
        .unwrap()
        .unwrap();
    assert_eq!(next.version.version, 2);
    assert_eq!(
        emu.use_pat("fabrikam", FEEDS, next.token.expose_secret())
            .await,
        200
    );
    // A routine rotation keeps the previous one valid for the overlap.
    let third = credentials
        .rotate("mirror-feed", RevokePrevious::AfterOverlap)
        .await
        .unwrap();
    assert_eq!(third.version, 3);
    assert_eq!(
        emu.use_pat("fabrikam", FEEDS, next.token.expose_secret())
            .await,
        200
    );
    let list = credentials.list().await.unwrap();
    let states: Vec<(i64, VersionState)> = list.iter().map(|v| (v.version, v.state)).collect();
    assert_eq!(
        states,
        vec![
            (3, VersionState::Current),
            (2, VersionState::Previous),
            (1, VersionState::Revoked)
        ]
    );
    // Unknown names.
    assert!(matches!(
        credentials.rotate("nope", RevokePrevious::Now).await,
        Err(CredentialError::NotFound { .. })
    ));
    assert!(matches!(
        credentials.current("nope").await,
        Err(CredentialError::NotFound { .. })
    ));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_credential_removed_from_the_policy_is_retired_after_retire_after() {
    let emu = Emu::start_default().await;
    let dir = tempfile::tempdir().unwrap();
    let mut spec = BrokerSpec::new(sqlite_url(&dir), emu.url(""));
    spec.policy_yaml = policy("1h", "3s");
    let file = dir.path().join("policy.yaml");
    std::fs::write(&file, &spec.policy_yaml).unwrap();
    let handle = PolicyHandle::from_file(&file).unwrap();
    let mut config = spec.config();
    config.policy.credentials_retire_after = Duration::from_secs(3);
    let broker = {
        // The spec's config with the short retirement, the file's policy.
        let settings = token_broker::settings::Settings::new(config).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        token_broker::server::Broker::start(settings, handle.clone(), listener)
            .await
            .unwrap()
    };
    let credentials = broker.credentials();
    let first = current(&credentials).await;

    // `rules: []` and no credentials: the credential is absent, but served
    // until it is retired.
    std::fs::write(&file, "rules: []\n").unwrap();
    assert!(handle
        .reload(ReloadTrigger::Signal)
        .await
        .unwrap()
        .is_applied());
    assert!(!credentials.reader_allowed("mirror-feed", &"apikey:ci".parse().unwrap()));

    poll(
        "the retired version REVOKED",
        Duration::from_secs(60),
        || async {
            let list = credentials.list().await.map_err(|e| e.to_string())?;
            match list.first() {
                Some(v) if v.version == 1 && v.state == VersionState::Revoked => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert!(matches!(
        credentials.current("mirror-feed").await,
        Err(CredentialError::Retired { .. })
    ));
    assert_eq!(
        emu.use_pat("fabrikam", FEEDS, first.token.expose_secret())
            .await,
        401
    );
    // No new version was minted after retirement.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(credentials.list().await.unwrap().len(), 1);
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_serve_processes_on_one_postgres_mint_each_version_once() {
    let emu = Emu::start_default().await;
    let db = TestDatabase::create().await;
    let mut spec = BrokerSpec::new(&db.url, emu.url(""));
    spec.policy_yaml = policy("5s", "2s");
    let mut a = ServeProcess::spawn(&spec, &[]);
    let mut b = ServeProcess::spawn(&spec, &[]);
    a.wait_ready().await;
    b.wait_ready().await;

    poll("version 6 minted", Duration::from_secs(120), || async {
        let upstream = upstream_versions(&emu).await;
        match upstream.keys().max() {
            Some(&max) if max >= 6 => Ok(()),
            other => Err(format!("newest version upstream {other:?}")),
        }
    })
    .await;
    a.sigterm().await;
    b.sigterm().await;

    // Each version's PAT was created once upstream, with no gaps.
    let upstream = upstream_versions(&emu).await;
    let versions: BTreeSet<i64> = upstream.keys().copied().collect();
    let max = *versions.iter().max().unwrap();
    assert_eq!(versions, (1..=max).collect::<BTreeSet<_>>());
    for (v, pats) in &upstream {
        assert_eq!(pats.len(), 1, "version {v} minted {} times", pats.len());
    }
    // Both replicas minted (over several periods each has a chance); not
    // asserted, only reported: which one wins a version is a race.
    let stats = emu.stats().await;
    eprintln!("emulator stats: {stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watcher_on_one_replica_gets_versions_minted_by_another() {
    let emu = Emu::start_default().await;
    let db = TestDatabase::create().await;
    let mut spec = BrokerSpec::new(&db.url, emu.url(""));
    spec.policy_yaml = policy("1h", "10m");
    let a = common::broker::spawn_broker(&spec).await;
    let b = common::broker::spawn_broker(&spec).await;
    let first = current(&a.credentials()).await;
    let mut stream = a.credentials().watch("mirror-feed", None);
    let got = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("the current version at once")
        .unwrap()
        .unwrap();
    assert_eq!(got.version.version, first.version.version);

    for expected in 2..=3 {
        let minted = b
            .credentials()
            .rotate("mirror-feed", RevokePrevious::AfterOverlap)
            .await
            .expect("rotate on the other replica");
        assert_eq!(minted.version, expected);
        let got = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("the version minted elsewhere")
            .unwrap()
            .unwrap();
        assert_eq!(got.version.version, expected);
        assert_eq!(
            emu.use_pat("fabrikam", FEEDS, got.token.expose_secret())
                .await,
            200
        );
    }
    // Resuming after version 1 sends 2 (still valid) then 3, in order.
    let mut resumed = a.credentials().watch("mirror-feed", Some(1));
    for expected in [2, 3] {
        let got = tokio::time::timeout(Duration::from_secs(30), resumed.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got.version.version, expected);
    }
    a.stop().await;
    b.stop().await;
}

/// The value of `metric{credential="mirror-feed"}` on the broker's
/// `/metrics`, if exported.
async fn credential_metric(broker: &common::broker::TestBroker, metric: &str) -> Option<f64> {
    let text = reqwest::get(broker.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = format!("{metric}{{credential=\"mirror-feed\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map(|v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_rotations_are_counted_cleaned_up_upstream_and_retried_and_valid_until_is_exported()
{
    let emu = Emu::start_default().await;
    // The first two creates make their PAT but answer 500: ambiguous.
    emu.set_faults(serde_json::json!([
        {"operation": "create", "status": 500, "latencyWhen": "after", "times": 2}
    ]))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut spec = BrokerSpec::new(sqlite_url(&dir), emu.url("")).with_admin_port();
    spec.policy_yaml = policy("1h", "10m");
    let broker = common::broker::spawn_broker(&spec).await;
    let credentials = broker.credentials();
    let token = current(&credentials).await;
    assert_eq!(token.version.version, 3, "versions 1 and 2 FAILED");
    let list = credentials.list().await.unwrap();
    let states: Vec<VersionState> = list.iter().map(|v| v.state).collect();
    assert_eq!(
        states,
        [
            VersionState::Current,
            VersionState::Failed,
            VersionState::Failed
        ]
    );
    // ListCredentials says why they failed.
    assert!(list[0].last_error.is_none(), "{:?}", list[0].last_error);
    assert!(list[1..].iter().all(|v| v.last_error.is_some()), "{list:?}");
    // The PATs the lost answers made are revoked; only version 3's is live.
    let upstream = upstream_versions(&emu).await;
    for v in [1, 2] {
        assert!(
            upstream[&v].iter().all(|p| p["state"] == "revoked"),
            "version {v}: {:?}",
            upstream[&v]
        );
    }
    assert_eq!(upstream[&3][0]["state"], "active");

    assert!(
        credential_metric(&broker, "token_broker_credential_rotation_failures_total")
            .await
            .is_some_and(|n| n >= 2.0)
    );
    let until = poll("valid_until exported", Duration::from_secs(30), || async {
        // 0 until a tick has seen version 3.
        credential_metric(&broker, "token_broker_credential_valid_until_seconds")
            .await
            .filter(|v| *v > 0.0)
            .ok_or_else(|| "absent or 0".to_owned())
    })
    .await;
    let expire = token.version.expire_time.as_micros() as f64 / 1e6;
    assert!((until - expire).abs() < 1.0, "{until} vs {expire}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sweep_revokes_credential_pats_no_live_version_owns_and_keeps_the_live_ones() {
    let emu = Emu::start_default().await;
    let dir = tempfile::tempdir().unwrap();
    let mut spec = BrokerSpec::new(sqlite_url(&dir), emu.url(""));
    spec.policy_yaml = policy("1h", "10m");
    let mut config = spec.config();
    config.leases.sweep_interval = Duration::from_secs(1);
    let settings = token_broker::settings::Settings::new(config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let policy = token_broker::policy::Policy::from_yaml(&spec.policy_yaml).unwrap();
    let broker = token_broker::server::Broker::start(settings, policy, listener)
        .await
        .unwrap();
    let credentials = broker.credentials();
    let live = current(&credentials).await;

    // A PAT named like a version that has no row (a crash after an
    // upstream create whose row is gone), and one of a version that FAILED.
    let bearer = emu.user_bearer().await;
    let orphan_name = format!(
        "token-broker:{}:credential:mirror-feed:99",
        broker.deployment_id()
    );
    let (_, orphan) = emu
        .create_pat(&bearer, "fabrikam", &orphan_name, "vso.packaging", 1)
        .await;
    assert_eq!(emu.use_pat("fabrikam", FEEDS, &orphan).await, 200);
    // Not ours: another deployment's credential, and a name that only
    // looks alike.
    let (_, foreign) = emu
        .create_pat(
            &bearer,
            "fabrikam",
            "token-broker:other-deployment:credential:mirror-feed:99",
            "vso.packaging",
            1,
        )
        .await;

    poll("the orphan revoked", Duration::from_secs(60), || async {
        match emu.use_pat("fabrikam", FEEDS, &orphan).await {
            401 => Ok(()),
            other => Err(format!("status {other}")),
        }
    })
    .await;
    assert_eq!(emu.use_pat("fabrikam", FEEDS, &foreign).await, 200);
    assert_eq!(
        emu.use_pat("fabrikam", FEEDS, live.token.expose_secret())
            .await,
        200,
        "the live version's PAT was swept"
    );
    broker.stop().await.unwrap();
}
