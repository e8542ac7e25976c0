//! `token-broker bench` as a user runs it: the real binary against a broker
//! and the emulator on loopback, with a baseline database. Figures are not
//! asserted (they depend on the machine), only the report's shape and that
//! the run leaves no live lease behind.

mod common;

use std::time::Duration;

use secrecy::ExposeSecret as _;
use serde_json::Value;
use token_broker::proto::v1 as pb;

use common::broker::{spawn_broker, BrokerSpec};
use common::db::TestDatabase;
use common::emulator::Emu;
use common::process::BIN;

const METHODS: [&str; 4] = ["CreateLease", "GetLease", "RenewLease", "RevokeLease"];

/// Runs `token-broker bench ARGS --output json` with `key`: whether it
/// succeeded, its standard output and its standard error.
async fn run_bench(key: &str, args: &[&str]) -> (bool, String, String) {
    let mut cmd = tokio::process::Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("TOKEN_BROKER_") {
            cmd.env_remove(k);
        }
    }
    let run = cmd
        .arg("bench")
        .args(args)
        .args(["--output", "json"])
        .env("TOKEN_BROKER_API_KEY", key)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("bench finishes")
        .expect("run token-broker bench");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`run_bench`] that must succeed; its JSON report.
async fn bench(key: &str, args: &[&str]) -> Value {
    let (ok, stdout, stderr) = run_bench(key, args).await;
    assert!(ok, "bench failed:\n{stdout}\n{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}"))
}

fn is_number(v: &Value) -> bool {
    v.as_f64().is_some_and(|x| x.is_finite() && x >= 0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_run_reports_every_figure_and_revokes_every_lease_it_created() {
    let emu = Emu::start_default().await;
    let store = TestDatabase::create().await;
    let baseline = TestDatabase::create().await;
    let spec = BrokerSpec::new(store.url.clone(), emu.running.url());
    let broker = spawn_broker(&spec).await;
    let key = spec.key("ci");
    let key = key.expose_secret();

    let report = bench(
        key,
        &[
            "--addr",
            &broker.url,
            "--organization",
            "fabrikam",
            "--scope",
            "vso.code_write",
            "--concurrency",
            "3",
            "--requests",
            "60",
            "--mix",
            "create=1,get=10,renew=1,revoke=1",
            "--baseline",
            &baseline.url,
            "--upstream",
            &emu.running.url(),
        ],
    )
    .await;

    let methods = report["methods"].as_object().expect("methods");
    let mut names: Vec<&str> = methods.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(names, METHODS, "{report:#}");
    for (name, m) in methods {
        let m = m.as_object().unwrap_or_else(|| panic!("{name}: {m}"));
        let mut fields: Vec<&str> = m.keys().map(String::as_str).collect();
        fields.sort();
        assert_eq!(
            fields,
            ["errors", "max_ms", "p50_ms", "p95_ms", "p99_ms", "rps"],
            "{name}"
        );
        assert!(is_number(&m["rps"]), "{name}: {m:?}");
        for q in ["p50_ms", "p95_ms", "p99_ms", "max_ms"] {
            assert!(is_number(&m[q]) || m[q].is_null(), "{name}.{q}: {m:?}");
        }
        // A healthy broker answers every call: the bench itself never
        // races two calls on one lease.
        assert_eq!(m["errors"], serde_json::json!({}), "{name}");
    }
    assert!(is_number(&report["methods"]["CreateLease"]["p99_ms"]));
    assert!(is_number(&report["baseline"]["writes_rps"]), "{report:#}");
    assert!(is_number(&report["baseline"]["read_rps"]), "{report:#}");
    assert!(is_number(&report["ratios"]["CreateLease"]), "{report:#}");
    assert!(is_number(&report["ratios"]["GetLease"]), "{report:#}");
    // Each lease costs at least its create and its revoke upstream.
    let per_lease = report["upstream_calls_per_lease"]
        .as_f64()
        .expect("a figure");
    assert!(per_lease >= 2.0, "{report:#}");

    // Every lease it created is revoked, and so is every PAT.
    let mut client = broker.client(&spec.key("ci")).await;
    let mut leases = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_leases(pb::ListLeasesRequest {
                page_size: 1000,
                page_token: page_token.clone(),
                filter: String::new(),
            })
            .await
            .expect("list leases")
            .into_inner();
        leases.extend(page.leases);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert!(!leases.is_empty());
    for lease in &leases {
        assert_eq!(lease.state(), pb::lease::State::Revoked, "{}", lease.name);
    }
    let pats = emu.pats().await;
    assert_eq!(pats.len(), leases.len());
    assert!(pats.iter().all(|p| p["state"] == "revoked"), "{pats:?}");

    // The scratch schema is gone from the baseline database.
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&baseline.url)
        .await
        .expect("connect to the baseline database");
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'token\\_broker\\_bench\\_%'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(left, 0);

    // Without --baseline and --upstream their fields are null, and a mix
    // names only the methods it calls.
    let plain = bench(
        key,
        &[
            "--addr",
            &broker.url,
            "--requests",
            "4",
            "--mix",
            "create=1,revoke=1",
        ],
    )
    .await;
    assert!(plain["baseline"].is_null(), "{plain:#}");
    assert!(plain["ratios"].is_null(), "{plain:#}");
    assert!(plain["upstream_calls_per_lease"].is_null(), "{plain:#}");
    let mut names: Vec<&str> = plain["methods"]
        .as_object()
        .expect("methods")
        .keys()
        .map(String::as_str)
        .collect();
    names.sort();
    assert_eq!(names, ["CreateLease", "RevokeLease"], "{plain:#}");
    broker.stop().await;
}

/// A script must be able to tell a run of refusals from a measurement, and
/// a wrong `--baseline` must not cost a run that mints leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_where_nothing_succeeds_fails_and_a_bad_baseline_is_refused_before_it_starts() {
    let emu = Emu::start_default().await;
    let store = TestDatabase::create().await;
    let spec = BrokerSpec::new(store.url.clone(), emu.running.url());
    let broker = spawn_broker(&spec).await;
    let short = ["--addr", &broker.url, "--requests", "5"];

    let wrong_key = "tbk_not-a-key-the-broker-knows-0123456789abcdef";
    let (ok, stdout, stderr) = run_bench(wrong_key, &short).await;
    assert!(!ok, "a run of refusals exits non-zero:\n{stdout}\n{stderr}");
    let report: Value = serde_json::from_str(&stdout).expect("the report is still printed");
    assert!(
        report["methods"]["CreateLease"]["errors"]["UNAUTHENTICATED"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{report}"
    );
    assert!(stderr.contains("no call succeeded"), "{stderr}");

    let key = spec.key("ci");
    let mut args = short.to_vec();
    args.extend(["--baseline", "sqlite://bench.db"]);
    let (ok, stdout, stderr) = run_bench(key.expose_secret(), &args).await;
    assert!(!ok);
    assert!(stdout.is_empty(), "no run, no report: {stdout}");
    assert!(
        stderr.contains("--baseline takes a postgres:// URL"),
        "{stderr}"
    );
    let mut client = broker.client(&key).await;
    let page = client
        .list_leases(pb::ListLeasesRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(
        page.leases.is_empty(),
        "no lease was minted: {:?}",
        page.leases
    );
}
