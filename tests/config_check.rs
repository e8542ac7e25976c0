//! `token-broker config check`: the real binary on real files; it checks
//! everything `serve` would without opening the database, prints the
//! effective settings with secrets redacted, or names each problem.

use std::path::Path;
use std::process::{Command, Output};

const SEALING: &str = "CxVvueRxIvnn9J84TYo1P3A2D2mD90mmKOzRgApwE4U=";
const FINGERPRINT: &str = "RGp2Vo6En4ss/1GxTuvA4dSQQqIYboS74/TOUcPRxB4=";
const CHAIN: &str = "r3Xt5L75Hc7vxa1t6nmQ39RbZGR8E+YF/08qFunT+Fo=";
const DB_PASSWORD: &str = "db-pass-hunter2";
const REFRESH_TOKEN: &str = "rt-do-not-print-0123456789";
const CLIENT_SECRET: &str = "cs-do-not-print-9876543210";

const POLICY: &str = r#"
rules:
  - name: ci
    identities: ["apikey:ci"]
    organizations: ["fabrikam"]
    scopes: ["vso.packaging"]
    default_ttl: 1h
    max_ttl: 8h
"#;

/// Runs `config check --config FILE` in `dir`, with no `TOKEN_BROKER_*`
/// variable inherited.
fn config_check(dir: &Path, config: &str) -> Output {
    std::fs::write(dir.join("broker.toml"), config).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_token-broker"));
    for (name, _) in std::env::vars() {
        if name.starts_with("TOKEN_BROKER_") {
            command.env_remove(name);
        }
    }
    command
        .args(["config", "check", "--config", "broker.toml"])
        .current_dir(dir)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn valid_config() -> String {
    format!(
        r#"
[database]
url = "postgres://broker:{DB_PASSWORD}@db.internal:5432/token_broker?sslmode=disable"

[keys]
active = "k1"
sealing = {{ k1 = "{SEALING}" }}
fingerprint = "{FINGERPRINT}"
audit_chain = "{CHAIN}"

[upstream]
refresh_token = "{REFRESH_TOKEN}"

[upstream.entra]
client_secret = "{CLIENT_SECRET}"

[policy]
file = "policy.yaml"
"#
    )
}

#[test]
fn a_valid_configuration_prints_its_settings_with_every_secret_redacted() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), POLICY).unwrap();
    let out = config_check(dir.path(), &valid_config());
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    // TOML of the effective settings: file values and defaults.
    let printed: toml::Table = toml::from_str(&stdout).expect("stdout is TOML");
    assert_eq!(
        printed["database"]["url"].as_str(),
        Some("postgres://broker:[REDACTED]@db.internal:5432/token_broker?sslmode=disable")
    );
    assert_eq!(printed["keys"]["active"].as_str(), Some("k1"));
    assert_eq!(
        printed["keys"]["sealing"]["k1"].as_str(),
        Some("[REDACTED]")
    );
    assert_eq!(printed["keys"]["fingerprint"].as_str(), Some("[REDACTED]"));
    assert_eq!(printed["keys"]["audit_chain"].as_str(), Some("[REDACTED]"));
    assert_eq!(
        printed["upstream"]["refresh_token"].as_str(),
        Some("[REDACTED]")
    );
    assert_eq!(
        printed["upstream"]["entra"]["client_secret"].as_str(),
        Some("[REDACTED]")
    );
    assert_eq!(printed["policy"]["file"].as_str(), Some("policy.yaml"));
    assert_eq!(printed["grpc"]["listen"].as_str(), Some("127.0.0.1:50051"));
    for secret in [
        DB_PASSWORD,
        REFRESH_TOKEN,
        CLIENT_SECRET,
        SEALING,
        FINGERPRINT,
        CHAIN,
    ] {
        assert!(!stdout.contains(secret), "{secret} in stdout: {stdout}");
        assert!(!stderr.contains(secret), "{secret} in stderr: {stderr}");
    }
}

#[cfg(unix)]
#[test]
fn a_database_url_from_its_file_is_the_one_printed_redacted() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), POLICY).unwrap();
    let url_file = dir.path().join("url");
    std::fs::write(
        &url_file,
        format!("postgres://broker:{DB_PASSWORD}@db.internal:5432/token_broker\n"),
    )
    .unwrap();
    std::fs::set_permissions(&url_file, std::fs::Permissions::from_mode(0o440)).unwrap();
    let config = valid_config().replace(
        &format!(
            "url = \"postgres://broker:{DB_PASSWORD}@db.internal:5432/token_broker?sslmode=disable\""
        ),
        "url_file = \"url\"",
    );
    let out = config_check(dir.path(), &config);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    let printed: toml::Table = toml::from_str(&stdout).expect("stdout is TOML");
    // The file's URL, not the built-in SQLite default.
    assert_eq!(
        printed["database"]["url"].as_str(),
        Some("postgres://broker:[REDACTED]@db.internal:5432/token_broker")
    );
    assert_eq!(printed["database"]["url_file"].as_str(), Some("url"));
    assert!(
        !stdout.contains(DB_PASSWORD),
        "password in stdout: {stdout}"
    );
    assert!(
        !stderr.contains(DB_PASSWORD),
        "password in stderr: {stderr}"
    );
}

#[test]
fn two_bad_settings_are_both_named_and_the_check_fails() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), POLICY).unwrap();
    let config = format!(
        "{}\n[grpc]\nmax_connections = 0\n\n[leases]\ndisplay_name_prefix = \"bad:prefix\"\n",
        valid_config()
    );
    let out = config_check(dir.path(), &config);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("grpc.max_connections"), "{stderr}");
    assert!(stderr.contains("leases.display_name_prefix"), "{stderr}");
    for secret in [DB_PASSWORD, REFRESH_TOKEN, CLIENT_SECRET, SEALING] {
        assert!(!stderr.contains(secret), "{secret} in stderr: {stderr}");
    }
}

#[test]
fn a_missing_or_invalid_policy_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = config_check(dir.path(), &valid_config());
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("policy.file"), "{stderr}");
    assert!(stderr.contains("policy.yaml"), "{stderr}");

    // Present but not a policy: named too, as `serve` would refuse it.
    std::fs::write(dir.path().join("policy.yaml"), "rules: 7\n").unwrap();
    let out = config_check(dir.path(), &valid_config());
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("policy.file"), "{stderr}");
}

#[test]
fn an_sqlite_configuration_is_checked_without_creating_the_database_or_a_keys_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = config_check(dir.path(), "[database]\nurl = \"sqlite:data/broker.db\"\n");
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    // `data/` does not exist: `serve` would create the file there; the
    // check leaves the directory as it was.
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        stdout.contains("url = \"sqlite:data/broker.db\""),
        "{stdout}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("broker.toml")]);

    std::fs::create_dir(dir.path().join("data")).unwrap();
    let out = config_check(dir.path(), "[database]\nurl = \"sqlite:data/broker.db\"\n");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read_dir(dir.path().join("data")).unwrap().count(),
        0,
        "the check created a file beside the database"
    );
}
