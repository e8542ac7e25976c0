//! Keys that match, or no start; `keys status` and `keys rewrap` (issue
//! 14), on PostgreSQL and SQLite: the real binary against the emulator for
//! the refusal and a whole rotation, and a rewrap interrupted between
//! batches against the real store.

#[macro_use]
mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::Value;
use uuid::Uuid;

use common::broker::{BrokerSpec, Client};
use common::db::{postgres_store, sqlite_store, sqlite_url, TestDatabase};
use common::emulator::Emu;
use common::process::{write_config, ServeProcess, BIN};
use token_broker::audit::{AuditEvent, Outcome};
use token_broker::config::ResolvedKeys;
use token_broker::crypto::Keyring;
use token_broker::domain::{
    AuthorizationId, Identity, LeaseId, LeaseState, Organization, ScopeSet, Timestamp,
};
use token_broker::keycheck;
use token_broker::proto::v1 as pb;
use token_broker::store::{
    CredentialSource, CredentialWrite, LeaseRecord, NewUpstreamCredential, SecretOwner, Store,
    UpstreamCredential,
};

#[derive(Clone, Copy, Debug)]
enum Backend {
    Postgres,
    Sqlite,
}

on_both_stores!(
    postgres = super::Backend::Postgres,
    sqlite = super::Backend::Sqlite;
    a_broker_with_another_key_refuses_and_a_rotation_rewraps_every_secret,
    a_rewrap_interrupted_between_batches_resumes_and_finishes,
    audit_rows_under_a_key_no_longer_configured_refuse_the_start,
);

/// Keeps a test database alive.
enum Guard {
    #[allow(dead_code)]
    Postgres(TestDatabase),
    #[allow(dead_code)]
    Sqlite(tempfile::TempDir),
}

async fn database(backend: Backend) -> (String, Guard) {
    match backend {
        Backend::Postgres => {
            let db = TestDatabase::create().await;
            (db.url.clone(), Guard::Postgres(db))
        }
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            (sqlite_url(&dir), Guard::Sqlite(dir))
        }
    }
}

/// Runs `token-broker ARGS` with nothing of the test's environment
/// configuring it; kills it after 90 s (a broker that should have refused
/// to start would otherwise serve forever).
fn run_cli(args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with(token_broker::config::ENV_PREFIX) || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run token-broker");
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The harness's config (sealing key id `test`) with key `k2` added as the
/// active sealing key; without `test` when `drop_old`.
fn with_k2(toml: String, k2: &SecretString, drop_old: bool) -> String {
    let k2_line = format!("k2 = \"{}\"", k2.expose_secret());
    let toml = toml.replacen("active = \"test\"", "active = \"k2\"", 1);
    if drop_old {
        toml.lines()
            .map(|l| {
                if l.starts_with("test = ") {
                    k2_line.clone()
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    } else {
        toml.replacen(
            "[keys.sealing]\n",
            &format!("[keys.sealing]\n{k2_line}\n"),
            1,
        )
    }
}

async fn create_lease(client: &mut Client, request_id: Uuid) -> pb::Lease {
    client
        .create_lease(pb::CreateLeaseRequest {
            organization: "fabrikam".into(),
            scopes: vec!["vso.code_write".into()],
            ttl: None,
            request_id: request_id.to_string(),
        })
        .await
        .unwrap_or_else(|s| panic!("CreateLease refused: {s:?}"))
        .into_inner()
}

fn status_json(config: &Path) -> Value {
    let out = run_cli(&[
        "keys",
        "status",
        "--config",
        config.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert!(out.status.success(), "keys status: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn a_broker_with_another_key_refuses_and_a_rotation_rewraps_every_secret(backend: Backend) {
    let (url, _guard) = database(backend).await;
    let emu = Emu::start_default().await;
    let spec = BrokerSpec::new(url, emu.running.url());
    let ci = spec.key("ci");

    // The first broker records its keys and seals 4 PATs and the upstream
    // credential under `test`.
    let mut first = ServeProcess::start(&spec, &[]).await;
    let mut client = first.client(&ci).await;
    let mut leases = Vec::new();
    for _ in 0..4 {
        let request_id = Uuid::new_v4();
        let lease = create_lease(&mut client, request_id).await;
        assert!(!lease.token.is_empty());
        leases.push((request_id, lease.token));
    }

    // A second replica with another keys file refuses to start, naming
    // the key, and so do `migrate` and `keys status`.
    let dir = tempfile::tempdir().unwrap();
    let wrong = BrokerSpec {
        sealing_key: Keyring::generate_key(),
        ..spec.clone()
    };
    let wrong_config = write_config(&wrong, dir.path());
    let wrong_config = wrong_config.to_str().unwrap();
    for args in [
        &["serve", "--config", wrong_config][..],
        &["migrate", "--config", wrong_config],
        &["keys", "status", "--config", wrong_config],
    ] {
        let out = run_cli(args);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} ran: {stderr}");
        assert!(
            stderr.contains(
                "keys.sealing.test does not match the key this database recorded for sealing key test: wrong keys file?"
            ),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains(spec.sealing_key.expose_secret()));
        assert!(!stderr.contains(wrong.sealing_key.expose_secret()));
    }
    // So does one with another audit chain key.
    let wrong_chain = BrokerSpec {
        audit_chain_key: Keyring::generate_key(),
        ..spec.clone()
    };
    let wrong_chain_dir = tempfile::tempdir().unwrap();
    let config = write_config(&wrong_chain, wrong_chain_dir.path());
    let out = run_cli(&["serve", "--config", config.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(
            "keys.audit_chain does not match the key this database recorded for audit chain key default"
        ),
        "{}",
        text(&out.stderr)
    );

    // Rotation: k2 is added as the active key (test kept), every secret
    // is rewrapped, then test is removed.
    assert!(first.sigterm().await.success());
    let k2 = Keyring::generate_key();
    let rotating = ServeProcess::spawn_edited(&spec, &[], &|t| with_k2(t, &k2, false));
    let mut rotating = rotating;
    rotating.wait_ready().await;
    let config_dir = tempfile::tempdir().unwrap();
    let config = write_config(&spec, config_dir.path());
    std::fs::write(
        &config,
        with_k2(std::fs::read_to_string(&config).unwrap(), &k2, false),
    )
    .unwrap();
    let before = status_json(&config);
    assert_eq!(before["sealing"]["active"], "k2");
    assert_eq!(before["sealing"]["keys"]["test"], 5, "{before}");
    assert_eq!(before["sealing"]["keys"]["k2"], 0, "{before}");

    let out = run_cli(&[
        "keys",
        "rewrap",
        "--config",
        config.to_str().unwrap(),
        "--batch-size",
        "2",
    ]);
    assert!(out.status.success(), "keys rewrap: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        "rewrapped 5 secrets; 0 remain under other keys"
    );
    let after = status_json(&config);
    assert_eq!(after["sealing"]["keys"]["test"], 0, "{after}");
    assert_eq!(after["sealing"]["keys"]["k2"], 5, "{after}");
    assert_eq!(after["auditChain"]["active"], "default");
    assert!(after["auditChain"]["keys"]["default"].as_u64().unwrap() > 0);
    assert_eq!(after["fingerprint"]["active"], "default");
    assert!(after["fingerprint"]["keys"]["default"].as_u64().unwrap() >= 4);
    // Text output lists the same keys.
    let out = run_cli(&["keys", "status", "--config", config.to_str().unwrap()]);
    assert!(out.status.success());
    let shown = text(&out.stdout);
    assert!(shown.contains("sealing (active k2):"), "{shown}");

    // Without test: the broker starts; every live lease's idempotent
    // replay returns its token; the upstream credential opens (a new
    // lease is minted).
    assert!(rotating.sigterm().await.success());
    let last = ServeProcess::spawn_edited(&spec, &[], &|t| with_k2(t, &k2, true));
    let mut last = last;
    last.wait_ready().await;
    let mut client = last.client(&ci).await;
    for (request_id, token) in &leases {
        let replay = create_lease(&mut client, *request_id).await;
        assert_eq!(&replay.token, token, "the replay returns the same token");
    }
    let fresh = create_lease(&mut client, Uuid::new_v4()).await;
    assert!(!fresh.token.is_empty());

    // Rewrapped secrets are now needed: a keys file without k2 refuses,
    // counting them.
    let no_k2_dir = tempfile::tempdir().unwrap();
    let no_k2 = write_config(&spec, no_k2_dir.path());
    let out = run_cli(&["migrate", "--config", no_k2.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr)
            .contains("6 stored secrets are sealed with sealing key k2, which is not configured"),
        "{}",
        text(&out.stderr)
    );
}

/// An ACTIVE lease whose PAT `token` is sealed under `keyring` as the
/// lease service seals it.
fn lease_with_token(keyring: &Keyring, token: &str) -> LeaseRecord {
    let id = LeaseId::new();
    let now: Timestamp = Utc::now().into();
    let hour = chrono::Duration::hours(1);
    LeaseRecord {
        id,
        holder: "apikey:ci".parse::<Identity>().unwrap(),
        organization: Organization::parse("contoso").unwrap(),
        scopes: ScopeSet::parse(["vso.code"]).unwrap(),
        display_name: format!("tb:test:{id}"),
        authorization_id: Some(AuthorizationId::from_uuid(Uuid::new_v4())),
        sealed_token: Some(keyring.seal(
            &SecretString::from(token.to_owned()),
            &SecretOwner::Lease(id).aad(),
        )),
        state: LeaseState::Active,
        create_time: now,
        update_time: now,
        expire_time: now + hour,
        max_expire_time: now + hour * 4,
        revoke_time: None,
        upstream_valid_to: Some(now + hour),
        attempts: 0,
        next_attempt_time: None,
        last_error: None,
        claimed_by: None,
        claimed_until: None,
    }
}

/// Every stored secret opens with `keyring` to what was sealed.
async fn every_secret_opens(
    store: &Arc<dyn Store>,
    keyring: &Keyring,
    leases: &[(LeaseId, String)],
) {
    for (id, token) in leases {
        let lease = store.get_lease(*id).await.unwrap().unwrap();
        let opened = keyring
            .open(
                lease.sealed_token.as_ref().unwrap(),
                &SecretOwner::Lease(*id).aad(),
            )
            .unwrap();
        assert_eq!(opened.expose_secret(), token);
    }
    let credential = store.load_upstream_credential().await.unwrap().unwrap();
    let opened = keyring
        .open(&credential.sealed, UpstreamCredential::AAD)
        .unwrap();
    assert_eq!(opened.expose_secret(), "refresh-token");
}

async fn a_rewrap_interrupted_between_batches_resumes_and_finishes(backend: Backend) {
    let (store, _guard) = match backend {
        Backend::Postgres => postgres_store().await,
        Backend::Sqlite => sqlite_store().await,
    };
    let (k1, k2) = (Keyring::generate_key(), Keyring::generate_key());
    let old = Keyring::new("k1", [("k1".to_string(), k1.clone())]).unwrap();
    let mut leases = Vec::new();
    for i in 0..20 {
        let token = format!("pat-{i}");
        let lease = lease_with_token(&old, &token);
        store.create_lease(&lease, None, None).await.unwrap();
        leases.push((lease.id, token));
    }
    store
        .save_upstream_credential(
            &NewUpstreamCredential {
                sealed: old.seal(
                    &SecretString::from("refresh-token"),
                    UpstreamCredential::AAD,
                ),
                account: None,
                source: CredentialSource::Login,
                refreshed: true,
            },
            CredentialWrite::Replace,
            Utc::now().into(),
        )
        .await
        .unwrap();

    let rotated = Arc::new(
        Keyring::new(
            "k2",
            [
                ("k1".to_string(), k1.clone()),
                ("k2".to_string(), k2.clone()),
            ],
        )
        .unwrap(),
    );
    // The first run dies after its third batch of 3 (a kill between
    // batches: the task is gone, nothing after it runs).
    let batches = Arc::new(Mutex::new(0));
    let run = {
        let (store, rotated, batches) = (store.clone(), rotated.clone(), batches.clone());
        tokio::spawn(async move {
            keycheck::rewrap(store.as_ref(), &rotated, 3, &mut |_| {
                let mut n = batches.lock().unwrap();
                *n += 1;
                assert!(*n < 3, "killed after batch {n}");
            })
            .await
        })
    };
    assert!(run.await.is_err(), "the first run was cut short");
    let left = keycheck::count_not_under(store.as_ref(), "k2")
        .await
        .unwrap();
    assert_eq!(left, 21 - 9, "three batches of 3 were rewrapped");
    every_secret_opens(&store, &rotated, &leases).await;

    // The rerun carries on and finishes.
    let report = keycheck::rewrap(store.as_ref(), &rotated, 3, &mut |_| {})
        .await
        .unwrap();
    assert_eq!(report.rewrapped, 12);
    assert_eq!(report.remaining, 0);
    let only_k2 = Keyring::new("k2", [("k2".to_string(), k2)]).unwrap();
    every_secret_opens(&store, &only_k2, &leases).await;
    let counts = store
        .count_sealed_by_key(&["k1".into(), "k2".into()])
        .await
        .unwrap();
    assert_eq!(counts["k1"], 0);
    assert_eq!(counts["k2"], 21);
    // And nothing is left to do.
    let again = keycheck::rewrap(store.as_ref(), &rotated, 3, &mut |_| {})
        .await
        .unwrap();
    assert_eq!((again.rewrapped, again.remaining), (0, 0));
}

/// Keys with sealing key `k1` and the given chain and fingerprint keyrings.
fn resolved(
    k1: &SecretString,
    chain: (&str, &[(&str, &SecretString)]),
    fingerprint: (&str, &[(&str, &SecretString)]),
) -> ResolvedKeys {
    let ring = |keys: &[(&str, &SecretString)]| {
        keys.iter()
            .map(|(id, k)| (id.to_string(), (*k).clone()))
            .collect()
    };
    ResolvedKeys {
        active: "k1".into(),
        sealing: [("k1".to_string(), k1.clone())].into(),
        fingerprint_active: fingerprint.0.into(),
        fingerprint_keys: ring(fingerprint.1),
        audit_chain_active: chain.0.into(),
        audit_chain_keys: ring(chain.1),
        source: "test".into(),
    }
}

async fn audit_rows_under_a_key_no_longer_configured_refuse_the_start(backend: Backend) {
    let (store, _guard) = match backend {
        Backend::Postgres => postgres_store().await,
        Backend::Sqlite => sqlite_store().await,
    };
    let (k1, chain, fp, a2, f2) = (
        Keyring::generate_key(),
        Keyring::generate_key(),
        Keyring::generate_key(),
        Keyring::generate_key(),
        Keyring::generate_key(),
    );
    let single = resolved(
        &k1,
        ("default", &[("default", &chain)]),
        ("default", &[("default", &fp)]),
    );
    keycheck::check_keys(store.as_ref(), &single).await.unwrap();
    // Rows from before key ids: under `default` for both.
    for fingerprinted in [true, false, true] {
        let mut event = AuditEvent::new(Utc::now(), "apikey:ci", "lease.create", Outcome::Allowed);
        if fingerprinted {
            event.token_fingerprint = Some("0f".repeat(32));
        }
        store.append_audit(&event).await.unwrap();
    }

    // New active keys beside the old ones: fine.
    let rotated = resolved(
        &k1,
        ("a2", &[("default", &chain), ("a2", &a2)]),
        ("f2", &[("default", &fp), ("f2", &f2)]),
    );
    keycheck::check_keys(store.as_ref(), &rotated)
        .await
        .unwrap();

    // The old ones removed: refused, naming purpose, key id and rows.
    let removed = resolved(&k1, ("a2", &[("a2", &a2)]), ("f2", &[("f2", &f2)]));
    let err = keycheck::check_keys(store.as_ref(), &removed)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "3 audit rows are chained with audit chain key default, which is not configured"
        ),
        "{err}"
    );
    assert!(
        err.contains("2 audit rows carry token fingerprints made with fingerprint key default, which is not configured"),
        "{err}"
    );
    // A different key under a recorded id: refused, naming the setting.
    let other = resolved(
        &k1,
        ("a2", &[("default", &chain), ("a2", &f2)]),
        ("f2", &[("default", &fp), ("f2", &f2)]),
    );
    let err = keycheck::check_keys(store.as_ref(), &other)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("keys.audit_chain_keys.a2 does not match the key this database recorded for audit chain key a2: wrong keys file?"),
        "{err}"
    );
}
