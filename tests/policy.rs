//! Policy v1 as operators and callers meet it: `token-broker policy check`
//! in CI (the real binary), identity patterns that never cross kinds,
//! exact-only admins, the active-lease quota over real sockets on
//! PostgreSQL and SQLite, and a policy file edited under a running broker.

mod common;

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt as _;

use common::broker::{spawn_broker, spawn_broker_with_policy, BrokerSpec, Client};
use common::db::{sqlite_url, TestDatabase};
use common::emulator::Emu;
use common::policy::{create_request, next_reload, PolicyFile};
use token_broker::domain::{Identity, Organization, ScopeSet};
use token_broker::policy::{Decision, Policy, PolicyError, ReloadOutcome, ReloadTrigger, SCHEMA};
use token_broker::proto::v1 as pb;

const BIN: &str = env!("CARGO_BIN_EXE_token-broker");

/// `token-broker policy check FILE` on `yaml`: (exit code, stdout, stderr).
fn policy_check(yaml: &str) -> (i32, String, String) {
    let file = PolicyFile::new(yaml);
    let out = Command::new(BIN)
        .args(["policy", "check"])
        .arg(&file.path)
        .env_clear()
        .output()
        .expect("run token-broker");
    (
        out.status.code().expect("exit code"),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

const GOOD_POLICY: &str = r#"
admins: ["apikey:ops"]
rules:
  - name: ci
    identities: ["apikey:ci", "k8s:system:serviceaccount:build:*"]
    identity_regexes: ["^k8s:system:serviceaccount:ci-[a-z0-9-]+:builder$"]
    organizations: ["fabrikam"]
    scopes: ["vso.code_write", "vso.packaging"]
    default_ttl: 1h
    max_ttl: 8h
    max_active_leases: 2
"#;

#[test]
fn policy_check_passes_a_good_file_with_ok() {
    let (code, stdout, stderr) = policy_check(GOOD_POLICY);
    assert_eq!((code, stdout.trim()), (0, "OK"), "{stderr}");
}

#[test]
fn policy_check_rejects_a_schema_invalid_file_naming_each_bad_field() {
    let bad = GOOD_POLICY
        .replace("\"vso.packaging\"", "\"vso.kode\"")
        .replace("max_active_leases: 2", "max_active_leases: lots")
        .replace("\"apikey:ops\"", "\"apikey:ops-*\"");
    let (code, stdout, stderr) = policy_check(&bad);
    assert_eq!(code, 1, "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(lines[0].starts_with("admins[0]: "), "{stdout}");
    assert!(
        lines.contains(&r#"rules[0].scopes[1]: unknown scope "vso.kode""#),
        "{stdout}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("rules[0].max_active_leases: ")),
        "{stdout}"
    );
    assert!(stderr.contains("3 problems"), "{stderr}");
}

#[test]
fn policy_check_rejects_what_only_the_semantic_checks_see() {
    let bad = format!(
        "{GOOD_POLICY}  - name: ci\n    identities: [\"apikey:x\"]\n    organizations: [fabrikam]\n    scopes: [vso.code]\n    default_ttl: 2h\n    max_ttl: 1h\n"
    );
    let (code, stdout, _) = policy_check(&bad);
    assert_eq!(code, 1);
    let paths: Vec<&str> = stdout
        .lines()
        .map(|l| l.split_once(": ").unwrap().0)
        .collect();
    assert_eq!(paths, ["rules[1].name", "rules[1].default_ttl"], "{stdout}");
}

#[test]
fn policy_check_of_a_missing_file_fails_naming_it() {
    let out = Command::new(BIN)
        .args(["policy", "check", "/nonexistent/policy.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/policy.yaml"));
}

#[test]
fn the_published_schema_is_draft_2020_12_and_the_binary_prints_it() {
    let in_repo =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/policy.schema.json"))
            .unwrap();
    assert_eq!(in_repo, SCHEMA);
    let schema: serde_json::Value = serde_json::from_str(SCHEMA).unwrap();
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    assert!(jsonschema::meta::is_valid(&schema));
    // Every catalogue scope, and nothing else, is in the schema's enum.
    let listed: Vec<&str> = schema["$defs"]["scope"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    let catalogue: Vec<&str> = token_broker::domain::Scope::all()
        .map(|s| s.as_str())
        .collect();
    assert_eq!(listed, catalogue);

    let out = Command::new(BIN)
        .args(["policy", "schema"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), SCHEMA);
}

fn allowed(policy: &Policy, who: &Identity) -> bool {
    matches!(
        policy.decide(
            who,
            &Organization::parse("fabrikam").unwrap(),
            &ScopeSet::parse(["vso.code"]).unwrap(),
            None
        ),
        Decision::Allow { .. }
    )
}

#[test]
fn glob_and_regex_rules_grant_only_within_their_own_kind() {
    let policy = Policy::from_yaml(GOOD_POLICY).unwrap();
    for yes in [
        "apikey:ci",
        "k8s:system:serviceaccount:build:restorer",
        "k8s:system:serviceaccount:ci-web:builder",
    ] {
        assert!(allowed(&policy, &yes.parse().unwrap()), "{yes}");
    }
    // Same text, other kinds: an API key or a certificate named like a
    // service account gets nothing from service-account rules.
    for no in [
        Identity::ApiKey("build".into()),
        Identity::X509("k8s:system:serviceaccount:ci-web:builder".into()),
        Identity::Spiffe("spiffe://k8s:system:serviceaccount:build:restorer".into()),
        "k8s:system:serviceaccount:ci-web:deployer".parse().unwrap(),
        "k8s:system:serviceaccount:prod:builder".parse().unwrap(),
        "x509:ci".parse().unwrap(),
    ] {
        assert!(!allowed(&policy, &no), "{no:?}");
    }
}

#[test]
fn admin_rights_go_to_exact_identities_and_a_pattern_is_refused() {
    let policy = Policy::from_yaml(GOOD_POLICY).unwrap();
    assert!(policy.is_admin(&"apikey:ops".parse().unwrap()));
    assert!(!policy.is_admin(&"apikey:ci".parse().unwrap()));
    assert!(!policy.is_admin(&Identity::X509("ops".into())));
    for pattern in [
        "apikey:ops-*",
        "k8s:system:serviceaccount:sec:*",
        "^apikey:ops$",
    ] {
        let yaml = GOOD_POLICY.replace("\"apikey:ops\"", &format!("{pattern:?}"));
        match Policy::from_yaml(&yaml) {
            Err(PolicyError::Invalid(problems)) => {
                assert_eq!(problems[0].path, "admins[0]", "{pattern}");
                assert!(problems[0].message.contains("exact"), "{problems:?}");
            }
            other => panic!("{pattern}: expected a load error, got {other:?}"),
        }
    }
}

/// The reason in a status's ErrorInfo.
fn reason(status: &tonic::Status) -> String {
    status.get_details_error_info().expect("ErrorInfo").reason
}

async fn quota_is_enforced(store_url: String) {
    let emu = Emu::start_default().await;
    let spec = BrokerSpec::new(store_url, emu.running.url()).with_policy(GOOD_POLICY);
    let broker = spawn_broker(&spec).await;
    let mut ci: Client = broker.client(&spec.key("ci")).await;
    let ask = || create_request("fabrikam", &["vso.code"], "");

    let first = ci.create_lease(ask()).await.unwrap().into_inner();
    let replay_key = uuid::Uuid::new_v4().to_string();
    let second = ci
        .create_lease(create_request("fabrikam", &["vso.code"], &replay_key))
        .await
        .unwrap()
        .into_inner();

    let status = ci.create_lease(ask()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "ACTIVE_LEASE_QUOTA_EXCEEDED");
    assert_eq!(emu.pats().await.len(), 2, "no PAT for the refused lease");

    // A retry of a lease already held is not a new lease: it replays.
    let replayed = ci
        .create_lease(create_request("fabrikam", &["vso.code"], &replay_key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed.name, second.name);

    // Giving one back makes room.
    ci.revoke_lease(pb::RevokeLeaseRequest {
        name: first.name.clone(),
    })
    .await
    .unwrap();
    ci.create_lease(ask()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_beyond_the_active_lease_quota_is_refused_on_postgres() {
    let db = TestDatabase::create().await;
    quota_is_enforced(db.url.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_beyond_the_active_lease_quota_is_refused_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    quota_is_enforced(sqlite_url(&dir)).await;
}

/// `GOOD_POLICY` with room for five live leases.
fn policy_with_cap_of_five() -> String {
    GOOD_POLICY.replace("max_active_leases: 2", "max_active_leases: 5")
}

async fn concurrent_creates_admit_exactly_the_quota(store_url: String) {
    let emu = Emu::start_default().await;
    let spec = BrokerSpec::new(store_url.clone(), emu.running.url())
        .with_policy(&policy_with_cap_of_five());
    let broker = spawn_broker(&spec).await;
    let ci: Client = broker.client(&spec.key("ci")).await;
    // From zero live leases, 30 at once: they must not count each other's
    // half-made leases and refuse everyone.
    let calls: Vec<_> = (0..30)
        .map(|_| {
            let mut ci = ci.clone();
            tokio::spawn(async move {
                ci.create_lease(create_request("fabrikam", &["vso.code"], ""))
                    .await
            })
        })
        .collect();
    let mut granted = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => granted += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert_eq!(reason(&status), "ACTIVE_LEASE_QUOTA_EXCEEDED");
            }
        }
    }
    assert_eq!(granted, 5, "exactly the cap of 5 is admitted");
    assert_eq!(
        emu.pats().await.len(),
        5,
        "a PAT exists only for a granted lease"
    );
    let store = token_broker::store::open(&store_url).await.unwrap();
    let rows = store
        .list_leases(&Default::default(), None, 1_000)
        .await
        .unwrap();
    assert_eq!(rows.len(), 5, "a refused create leaves no row behind");
    assert!(rows
        .iter()
        .all(|l| l.state == token_broker::domain::LeaseState::Active));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_concurrent_creates_under_a_cap_of_five_admit_exactly_five_on_postgres() {
    let db = TestDatabase::create().await;
    concurrent_creates_admit_exactly_the_quota(db.url.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_concurrent_creates_under_a_cap_of_five_admit_exactly_five_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    concurrent_creates_admit_exactly_the_quota(sqlite_url(&dir)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_file_edited_to_grant_less_takes_effect_without_restart_and_in_flight_calls_finish(
) {
    let emu = Emu::start_default().await;
    let dir = tempfile::tempdir().unwrap();
    let file = PolicyFile::new(GOOD_POLICY);
    let handle = file.handle();
    let mut outcomes = handle.subscribe();
    let spec = BrokerSpec::new(sqlite_url(&dir), emu.running.url());
    let broker = spawn_broker_with_policy(&spec, handle.clone()).await;
    let mut ci = broker.client(&spec.key("ci")).await;

    // A create held up upstream is in flight while the policy changes.
    emu.set_faults(json!([{"operation": "create", "latencyMs": 8000, "times": 1}]))
        .await;
    let in_flight = {
        let mut ci = ci.clone();
        tokio::spawn(async move {
            ci.create_lease(create_request("fabrikam", &["vso.packaging"], ""))
                .await
        })
    };
    // It has passed the policy once its PENDING lease is listed.
    loop {
        let listed = ci
            .list_leases(pb::ListLeasesRequest::default())
            .await
            .unwrap()
            .into_inner();
        if !listed.leases.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The edit drops vso.packaging from the rule.
    file.edit(&GOOD_POLICY.replace(", \"vso.packaging\"", ""));
    let outcome = next_reload(&mut outcomes).await;
    assert!(
        matches!(
            outcome,
            ReloadOutcome::Applied {
                trigger: ReloadTrigger::FileChanged,
                rules: 1,
                ..
            }
        ),
        "{outcome:?}"
    );

    let status = ci
        .create_lease(create_request("fabrikam", &["vso.packaging"], ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "SCOPE_NOT_ALLOWED");
    ci.create_lease(create_request("fabrikam", &["vso.code"], ""))
        .await
        .expect("what the new policy grants is still granted");

    let lease = in_flight
        .await
        .unwrap()
        .expect("the call in flight finishes under the policy it started with")
        .into_inner();
    assert_eq!(lease.state, pb::lease::State::Active as i32);
    assert!(!lease.token.is_empty());
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_policy_edit_leaves_the_old_policy_in_force_and_is_reported() {
    let emu = Emu::start_default().await;
    let dir = tempfile::tempdir().unwrap();
    let file = PolicyFile::new(GOOD_POLICY);
    let handle = file.handle();
    let mut outcomes = handle.subscribe();
    let spec = BrokerSpec::new(sqlite_url(&dir), emu.running.url());
    let broker = spawn_broker_with_policy(&spec, handle.clone()).await;
    let mut ci = broker.client(&spec.key("ci")).await;

    // Meant to grant less, but with a typo.
    file.edit(&GOOD_POLICY.replace("\"vso.packaging\"", "\"vso.packagin\""));
    match next_reload(&mut outcomes).await {
        ReloadOutcome::Refused { error, file: f, .. } => {
            assert_eq!(f, file.path);
            assert!(
                error.contains(r#"rules[0].scopes[1]: unknown scope "vso.packagin""#),
                "{error}"
            );
        }
        other => panic!("expected the edit to be refused, got {other:?}"),
    }
    ci.create_lease(create_request("fabrikam", &["vso.packaging"], ""))
        .await
        .expect("the old policy is still in force");

    // Fixing the file puts the fix in force.
    file.edit(&GOOD_POLICY.replace(", \"vso.packaging\"", ""));
    assert!(next_reload(&mut outcomes).await.is_applied());
    let status = ci
        .create_lease(create_request("fabrikam", &["vso.packaging"], ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    broker.stop().await;
}

/// A `token-broker serve` child process, killed when dropped, with its
/// stderr lines readable as they come.
struct Serve {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    log: String,
}

impl Serve {
    fn start(dir: &std::path::Path, policy: &std::path::Path) -> Serve {
        let mut cmd = Command::new(BIN);
        for (k, _) in std::env::vars() {
            if k.starts_with("TOKEN_BROKER_") || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd
            .current_dir(dir)
            .arg("serve")
            .env("TOKEN_BROKER_GRPC__LISTEN", "127.0.0.1:0")
            .env("TOKEN_BROKER_POLICY__FILE", policy)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start token-broker serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Serve {
            child,
            lines,
            log: String::new(),
        }
    }

    /// Waits (within a long bound) for a log line with every one of `parts`.
    fn wait_for(&mut self, parts: &[&str]) -> String {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    self.log.push_str(&line);
                    self.log.push('\n');
                    if parts.iter().all(|p| line.contains(p)) {
                        return line;
                    }
                }
                Err(e) => panic!("no log line with {parts:?} ({e}):\n{}", self.log),
            }
        }
    }

    fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{name}");
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn sighup_makes_serve_reread_its_policy_and_an_invalid_file_is_refused_with_a_clear_log() {
    let dir = tempfile::tempdir().unwrap();
    let file = PolicyFile::new(GOOD_POLICY);
    let mut serve = Serve::start(dir.path(), &file.path);
    serve.wait_for(&["policy loaded", "rules=1"]);
    serve.wait_for(&["token-broker serving gRPC"]);

    serve.signal("HUP");
    serve.wait_for(&["policy reloaded", "trigger=sighup", "rules=1"]);

    file.edit(&GOOD_POLICY.replace("max_ttl: 8h", "max_ttl: 2years"));
    serve.signal("HUP");
    let refused = serve.wait_for(&["policy reload refused"]);
    assert!(refused.contains("rules[0].max_ttl"), "{refused}");
    assert!(refused.contains("ERROR"), "{refused}");

    serve.signal("TERM");
    let exit = serve.child.wait().unwrap();
    assert!(
        exit.success(),
        "still running after SIGHUP, then a clean stop: {exit:?}"
    );
}

#[test]
fn the_documented_example_policy_passes_policy_check() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/policy.md")).unwrap();
    let start = doc.find("```yaml\n").expect("a yaml example") + "```yaml\n".len();
    let example = &doc[start..start + doc[start..].find("```").unwrap()];
    let (code, stdout, stderr) = policy_check(example);
    assert_eq!((code, stdout.trim()), (0, "OK"), "{stdout}{stderr}");
    let policy = Policy::from_yaml(example).unwrap();
    assert!(policy.is_admin(&"apikey:ops".parse().unwrap()));
}
