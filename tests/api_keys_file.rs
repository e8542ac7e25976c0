//! `auth.api_keys_file`: API keys from a file of their own, reloaded with
//! the policy on SIGHUP and when the file changes, against the real
//! `token-broker serve` binary over real sockets.

mod common;

use std::path::Path;
use std::time::Duration;

use secrecy::SecretString;
use tonic::Code;

use common::broker::BrokerSpec;
use common::db::sqlite_url;
use common::emulator::Emu;
use common::process::ServeProcess;
use common::wait::poll;
use token_broker::auth::GeneratedApiKey;
use token_broker::proto::v1 as pb;

/// A fresh key named `name`.
fn key(name: &str) -> GeneratedApiKey {
    GeneratedApiKey::generate(name).expect("key")
}

/// The TOML API keys file holding `keys`.
fn toml_file(keys: &[&GeneratedApiKey]) -> String {
    if keys.is_empty() {
        return "api_keys = []\n".into();
    }
    keys.iter()
        .map(|k| {
            format!(
                "[[api_keys]]\nname = \"{}\"\nsha256 = \"{}\"\n\n",
                k.name,
                k.hash.to_hex()
            )
        })
        .collect()
}

/// The YAML API keys file holding `keys`.
fn yaml_file(keys: &[&GeneratedApiKey]) -> String {
    let mut yaml = "api_keys:\n".to_owned();
    for k in keys {
        yaml.push_str(&format!(
            "  - name: {}\n    sha256: \"{}\"\n",
            k.name,
            k.hash.to_hex()
        ));
    }
    yaml
}

/// Replaces `path` atomically (a rename, as a ConfigMap update does), so
/// the watcher never reads half a file.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).expect("write the new file");
    std::fs::rename(&tmp, path).expect("rename it into place");
}

/// A spec with no `auth.api_keys` (the file holds them), on SQLite in `dir`.
fn spec_without_inline_keys(dir: &tempfile::TempDir, emu: &Emu) -> BrokerSpec {
    let mut spec = BrokerSpec::new(sqlite_url(dir), emu.running.url());
    spec.api_keys.clear();
    spec
}

/// Whether `key` authenticates now: `Ok(true)` when a ListLeases call
/// with it succeeds, `Ok(false)` when it is refused UNAUTHENTICATED.
async fn accepted(broker: &ServeProcess, key: &SecretString) -> Result<bool, String> {
    match broker
        .client(key)
        .await
        .list_leases(pb::ListLeasesRequest::default())
        .await
    {
        Ok(_) => Ok(true),
        Err(s) if s.code() == Code::Unauthenticated => Ok(false),
        Err(s) => Err(format!("unexpected answer: {s:?}")),
    }
}

/// Waits until `key` is accepted (`true`) or refused (`false`).
async fn until(broker: &ServeProcess, key: &GeneratedApiKey, want: bool, what: &str) {
    poll(what, Duration::from_secs(30), || async {
        match accepted(broker, &key.key).await? {
            got if got == want => Ok(()),
            got => Err(format!("apikey:{} accepted = {got}", key.name)),
        }
    })
    .await
}

/// Log lines containing every one of `parts`.
fn lines_with(log: &str, parts: &[&str]) -> usize {
    log.lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .count()
}

/// Waits until the log has more than `before` lines containing `parts`.
async fn logged(broker: &ServeProcess, parts: &[&str], before: usize) {
    poll(
        &format!("a log line with {parts:?}"),
        Duration::from_secs(30),
        || async {
            if lines_with(&broker.log(), parts) > before {
                Ok(())
            } else {
                Err(broker.log_tail())
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_added_to_or_removed_from_the_file_count_after_sighup_and_a_broken_file_keeps_the_old_ones(
) {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emu::start_default().await;
    let spec = spec_without_inline_keys(&dir, &emu);
    let (ci, ops) = (key("ci"), key("ops"));
    let file = dir.path().join("api-keys.toml");
    std::fs::write(&file, toml_file(&[&ci])).unwrap();
    let broker =
        ServeProcess::start(&spec, &[("auth.api_keys_file", file.to_str().unwrap())]).await;

    assert_eq!(accepted(&broker, &ci.key).await, Ok(true));
    assert_eq!(accepted(&broker, &ops.key).await, Ok(false));

    // Added: works after SIGHUP, without a restart. One SIGHUP reloads the
    // policy and the API keys both.
    let applied = ["API keys reloaded", "trigger=sighup"];
    let policy = ["policy reloaded", "trigger=sighup"];
    let (keys_before, policy_before) = (
        lines_with(&broker.log(), &applied),
        lines_with(&broker.log(), &policy),
    );
    replace(&file, &toml_file(&[&ci, &ops]));
    broker.sighup();
    logged(&broker, &applied, keys_before).await;
    logged(&broker, &policy, policy_before).await;
    until(&broker, &ops, true, "the added key to work").await;
    assert_eq!(accepted(&broker, &ci.key).await, Ok(true));

    // Removed: refused after the reload.
    let before = lines_with(&broker.log(), &applied);
    replace(&file, &toml_file(&[&ops]));
    broker.sighup();
    logged(&broker, &applied, before).await;
    until(&broker, &ci, false, "the removed key to be refused").await;
    assert_eq!(accepted(&broker, &ops.key).await, Ok(true));

    // Broken (a bad second entry): refused, naming the file and the entry;
    // the previous keys stay in force.
    let refused = ["API keys reload refused", "trigger=sighup"];
    let before = lines_with(&broker.log(), &refused);
    let broken = format!(
        "{}[[api_keys]]\nname = \"bad\"\nsha256 = \"not-hex\"\n",
        toml_file(&[&ci])
    );
    replace(&file, &broken);
    broker.sighup();
    logged(&broker, &refused, before).await;
    let log = broker.log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("API keys reload refused"))
        .unwrap();
    assert!(
        line.contains(file.to_str().unwrap())
            && line.contains("api_keys[1] (")
            && line.contains("bad")
            && line.contains(".sha256: expected 64 hexadecimal digits"),
        "{line}"
    );
    assert_eq!(accepted(&broker, &ops.key).await, Ok(true));
    assert_eq!(accepted(&broker, &ci.key).await, Ok(false));
    // A missing file is refused the same way.
    std::fs::remove_file(&file).unwrap();
    let before = lines_with(&broker.log(), &refused);
    broker.sighup();
    logged(&broker, &refused, before).await;
    assert_eq!(accepted(&broker, &ops.key).await, Ok(true));

    // Every attempt is audited: applied ones allowed with the key count,
    // refused ones denied naming the entry; by the broker itself.
    let url = sqlite_url(&dir);
    let rows = poll("the reloads audited", Duration::from_secs(30), || async {
        let pool = sqlx::SqlitePool::connect(&url)
            .await
            .map_err(|e| e.to_string())?;
        let rows: Vec<(String, String, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT identity, outcome, caller_detail, reason FROM audit_events \
             WHERE action = 'auth.api_keys_reload' ORDER BY id",
        )
        .fetch_all(&pool)
        .await
        .map_err(|e| e.to_string())?;
        pool.close().await;
        if rows.len() >= 4 {
            Ok(rows)
        } else {
            Err(format!("{rows:?}"))
        }
    })
    .await;
    assert!(
        rows.iter().all(|r| r.0 == "system:token-broker"),
        "{rows:?}"
    );
    assert!(
        rows.iter()
            .any(|r| r.1 == "allowed" && r.2.as_deref() == Some("keys=2")),
        "{rows:?}"
    );
    assert!(
        rows.iter().any(|r| r.1 == "denied"
            && r.3
                .as_deref()
                .is_some_and(|reason| reason.starts_with("API_KEYS_INVALID")
                    && reason.contains(r#"api_keys[1] ("bad")"#))),
        "{rows:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_yaml_file_is_reloaded_without_a_signal() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emu::start_default().await;
    let spec = spec_without_inline_keys(&dir, &emu);
    let (ci, late) = (key("ci"), key("late"));
    let file = dir.path().join("api-keys.yaml");
    std::fs::write(&file, yaml_file(&[&ci])).unwrap();
    let broker =
        ServeProcess::start(&spec, &[("auth.api_keys_file", file.to_str().unwrap())]).await;
    assert_eq!(accepted(&broker, &ci.key).await, Ok(true));
    assert_eq!(accepted(&broker, &late.key).await, Ok(false));

    // The watcher reads the file every 2 s and compares its content.
    replace(&file, &yaml_file(&[&late]));
    until(&broker, &late, true, "the key added to the file to work").await;
    until(
        &broker,
        &ci,
        false,
        "the key removed from the file to be refused",
    )
    .await;
    assert!(
        lines_with(
            &broker.log(),
            &["API keys reloaded", "trigger=file_changed", "keys=1"]
        ) >= 1,
        "{}",
        broker.log_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_and_an_api_keys_file_together_refuse_to_start_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emu::start_default().await;
    // The spec's own `ci` key goes to `auth.api_keys`.
    let spec = BrokerSpec::new(sqlite_url(&dir), emu.running.url());
    let file = dir.path().join("api-keys.toml");
    std::fs::write(&file, toml_file(&[&key("ops")])).unwrap();
    let mut broker = ServeProcess::spawn(&spec, &[("auth.api_keys_file", file.to_str().unwrap())]);
    let status = broker.wait_exit(Duration::from_secs(60)).await;
    assert!(!status.success());
    let log = broker.log();
    assert!(
        log.contains(
            "auth.api_keys_file: auth.api_keys and auth.api_keys_file are both set; set one"
        ),
        "{log}"
    );

    // A file invalid at start-up stops the start too, naming file and entry.
    let spec = spec_without_inline_keys(&dir, &emu);
    std::fs::write(&file, "[[api_keys]]\nname = \"x\"\n").unwrap();
    let mut broker = ServeProcess::spawn(&spec, &[("auth.api_keys_file", file.to_str().unwrap())]);
    assert!(!broker.wait_exit(Duration::from_secs(60)).await.success());
    let log = broker.log();
    assert!(
        log.contains("auth.api_keys_file: ")
            && log.contains(file.to_str().unwrap())
            && log.contains("api_keys[0]")
            && log.contains("sha256"),
        "{log}"
    );
}
