//! Configuration: defaults < file < `TOKEN_BROKER_*` environment, validated
//! with errors that name the setting. Each test runs in a figment `Jail`
//! (its own working directory and environment variables).

// figment's Jail closures return figment::Result; its error is large by design.
#![allow(clippy::result_large_err)]

use std::path::Path;

use figment::Jail;
use secrecy::ExposeSecret as _;
use token_broker::config::{Backend, Config, ConfigErrors};
use token_broker::settings::Settings;

const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
const KEY_A: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

fn load(file: Option<&str>) -> Result<Config, ConfigErrors> {
    Settings::load(file.map(Path::new)).map(|s| s.config)
}

fn fails_naming(jail: &mut Jail, toml: &str, setting: &str) {
    jail.create_file("bad.toml", toml).unwrap();
    let err = load(Some("bad.toml")).expect_err(toml);
    assert!(
        err.names(setting),
        "expected an error naming {setting} for {toml:?}, got: {err}"
    );
    assert!(err.to_string().contains(setting));
}

#[test]
fn with_nothing_configured_the_broker_listens_locally_on_an_embedded_sqlite_file() {
    Jail::expect_with(|_| {
        let c = load(None).unwrap();
        assert_eq!(c.grpc.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(
            c.database.backend().unwrap(),
            Backend::Sqlite(Some("token-broker.db".into()))
        );
        assert!(c.keys.is_unset());
        assert!(c.auth.api_keys.is_empty());
        assert_eq!(c.leases.display_name_prefix, "token-broker");
        assert_eq!(c.leases.valid_to_skew.as_secs(), 300);
        assert_eq!(c.leases.reaper_interval.as_secs(), 15);
        assert_eq!(
            c.upstream.azure_devops.base_url.as_str(),
            "https://vssps.dev.azure.com/"
        );
        assert_eq!(c.upstream.entra.tenant, "organizations");
        assert_eq!(c.log.filter, "info");
        assert!(c.policy.file.is_none());
        Ok(())
    });
}

#[test]
fn a_file_overrides_defaults_and_the_environment_overrides_the_file() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "broker.toml",
            r#"
            [grpc]
            listen = "0.0.0.0:6000"
            [database]
            url = "postgres://postgres@db.internal/broker"
            [upstream.azure_devops]
            base_url = "http://127.0.0.1:8081"
            [leases]
            display_name_prefix = "staging"
            valid_to_skew = "2m"
            "#,
        )?;
        let c = load(Some("broker.toml")).unwrap();
        assert_eq!(c.grpc.listen.to_string(), "0.0.0.0:6000");
        assert_eq!(c.leases.display_name_prefix, "staging");
        assert_eq!(c.leases.valid_to_skew.as_secs(), 120);
        assert_eq!(
            c.upstream.azure_devops.base_url.as_str(),
            "http://127.0.0.1:8081/"
        );
        assert_eq!(c.upstream.azure_devops.api_version, "7.1-preview.1");

        jail.set_env("TOKEN_BROKER_GRPC__LISTEN", "127.0.0.1:0");
        jail.set_env("TOKEN_BROKER_DATABASE__URL", "sqlite:other.db");
        jail.set_env("TOKEN_BROKER_LEASES__REAPER_INTERVAL", "1m");
        let c = load(Some("broker.toml")).unwrap();
        assert_eq!(c.grpc.listen.to_string(), "127.0.0.1:0");
        assert_eq!(c.database.url.expose_secret(), "sqlite:other.db");
        assert_eq!(
            c.leases.display_name_prefix, "staging",
            "file still applies"
        );
        assert_eq!(c.leases.reaper_interval.as_secs(), 60);
        Ok(())
    });
}

#[test]
fn api_keys_and_secrets_can_come_from_the_environment() {
    Jail::expect_with(|jail| {
        jail.set_env(
            "TOKEN_BROKER_AUTH__API_KEYS",
            format!(r#"[{{name="ci", sha256="{SHA}"}}]"#),
        );
        jail.set_env("TOKEN_BROKER_UPSTREAM__REFRESH_TOKEN", "rt-secret-value");
        let c = load(None).unwrap();
        assert_eq!(c.auth.api_keys.len(), 1);
        assert_eq!(c.auth.api_keys().unwrap().len(), 1);
        assert_eq!(
            c.upstream.refresh_token.as_ref().unwrap().expose_secret(),
            "rt-secret-value"
        );
        assert!(!format!("{c:?}").contains("rt-secret-value"));
        Ok(())
    });
}

#[test]
fn each_bad_setting_fails_naming_it() {
    Jail::expect_with(|jail| {
        let cases = [
            ("[grpc]\nlisten = \"nowhere\"", "grpc.listen"),
            ("[database]\nurl = \"mysql://x\"", "database.url"),
            (
                "[upstream.azure_devops]\nbase_url = \"ftp://x\"",
                "upstream.azure_devops.base_url",
            ),
            (
                "[upstream.azure_devops]\nbase_url = \"not a url\"",
                "upstream.azure_devops.base_url",
            ),
            (
                "[upstream.azure_devops]\nrequest_timeout = \"soon\"",
                "upstream.azure_devops.request_timeout",
            ),
            (
                "[upstream.azure_devops]\nrequest_timeout = \"0s\"",
                "upstream.azure_devops.request_timeout",
            ),
            (
                "[upstream.azure_devops]\npage_size = 500",
                "upstream.azure_devops.page_size",
            ),
            ("[upstream.entra]\nauthority = \"ftp://x\"", "upstream.entra.authority"),
            ("[upstream]\nrefresh_token = \"\"", "upstream.refresh_token"),
            ("[policy]\nfile = \"missing.yaml\"", "policy.file"),
            ("[leases]\ndisplay_name_prefix = \"a:b\"", "leases.display_name_prefix"),
            ("[leases]\nvalid_to_skew = \"2h\"", "leases.valid_to_skew"),
            ("[leases]\nreaper_interval = \"0s\"", "leases.reaper_interval"),
            ("[database]\nmax_connections = 2", "database.max_connections"),
            ("[database]\nmax_connections = 1001", "database.max_connections"),
            ("[database]\nmax_connections = -1", "database.max_connections"),
            ("[database]\nacquire_timeout = \"0s\"", "database.acquire_timeout"),
            ("[database]\nacquire_timeout = \"11m\"", "database.acquire_timeout"),
            ("[database]\nacquire_timeout = \"soon\"", "database.acquire_timeout"),
            (
                "[audit]\nauth_failure_interval = \"0s\"",
                "audit.auth_failure_interval",
            ),
            (
                "[audit]\nauth_failure_interval = \"2h\"",
                "audit.auth_failure_interval",
            ),
            (
                "[audit]\nauth_failure_interval = \"soon\"",
                "audit.auth_failure_interval",
            ),
            (
                "[audit]\nhead_log_interval = \"0s\"",
                "audit.head_log_interval",
            ),
            (
                "[audit]\nhead_log_interval = \"2h\"",
                "audit.head_log_interval",
            ),
            (
                "[auth]\napi_keys = [{ name = \"ci\", sha256 = \"abc\" }]",
                "auth.api_keys[0].sha256",
            ),
            (
                &format!("[auth]\napi_keys = [{{ name = \"bad name\", sha256 = \"{SHA}\" }}]"),
                "auth.api_keys",
            ),
            ("[log]\nfilter = \"[[[\"", "log.filter"),
            ("[log]\njson = \"yes\"", "log.json"),
            ("[keys]\nactive = \"k1\"", "keys.active"),
            (
                &format!("[keys]\nactive = \"k1\"\nfingerprint = \"{KEY_A}\"\n[keys.sealing]\nk1 = \"short\""),
                "keys.sealing.k1",
            ),
            (
                &format!("[keys]\nactive = \"k1\"\n[keys.sealing]\nk1 = \"{KEY_A}\""),
                "keys.fingerprint",
            ),
            (
                &format!("[keys]\nfile = \"k.toml\"\nactive = \"k1\"\nfingerprint = \"{KEY_A}\"\n[keys.sealing]\nk1 = \"{KEY_A}\""),
                "keys.file",
            ),
        ];
        for (toml, setting) in cases {
            fails_naming(jail, toml, setting);
        }
        Ok(())
    });
}

#[test]
fn a_bad_environment_value_fails_naming_the_setting_and_variable() {
    Jail::expect_with(|jail| {
        jail.set_env("TOKEN_BROKER_GRPC__LISTEN", "not-an-address");
        let err = load(None).unwrap_err();
        assert!(err.names("grpc.listen"), "{err}");
        assert!(
            err.to_string().contains("TOKEN_BROKER_GRPC__LISTEN"),
            "{err}"
        );
        Ok(())
    });
}

#[test]
fn an_unknown_setting_fails_naming_it() {
    Jail::expect_with(|jail| {
        fails_naming(
            jail,
            "[grpc]\nlisten = \"127.0.0.1:1\"\nlistne = \"x\"",
            "grpc.listne",
        );
        fails_naming(jail, "[metrics]\nport = 9000", "metrics");
        jail.set_env("TOKEN_BROKER_DATABASE__URLL", "sqlite:x.db");
        let err = load(None).unwrap_err();
        assert!(err.names("database.urll"), "{err}");
        Ok(())
    });
}

#[test]
fn client_variables_are_neither_server_settings_nor_errors() {
    Jail::expect_with(|jail| {
        jail.set_env("TOKEN_BROKER_ADDR", "http://127.0.0.1:1");
        jail.set_env("TOKEN_BROKER_API_KEY", "tbk_client_key_xxxxxxxxxxxxxxxx");
        jail.set_env(
            "TOKEN_BROKER_DEV_API_KEY",
            "tbk_dev_key_xxxxxxxxxxxxxxxxxxx",
        );
        jail.set_env("TOKEN_BROKER_CONFIG", "does-not-exist.toml");
        jail.set_env("TOKEN_BROKER_API_KEY_FILE", "/run/secrets/api-key");
        jail.set_env("TOKEN_BROKER_TOKEN_FILE", "/var/run/secrets/tokens/broker");
        jail.set_env("TOKEN_BROKER_CA_FILE", "/etc/ssl/broker-ca.pem");
        jail.set_env("TOKEN_BROKER_CLIENT_CERT_FILE", "/etc/ssl/client.crt");
        jail.set_env("TOKEN_BROKER_CLIENT_KEY_FILE", "/etc/ssl/client.key");
        jail.set_env("TOKEN_BROKER_AZURE_DEVOPS_URL", "https://dev.azure.com");
        jail.set_env("TOKEN_BROKER_EMULATOR_LISTEN", "127.0.0.1:1");
        jail.set_env("TOKEN_BROKER_EMULATOR_REFRESH_TOKEN", "x");
        let c = load(None).unwrap();
        assert_eq!(c.grpc.listen.to_string(), "127.0.0.1:50051");
        Ok(())
    });
}

#[test]
fn sqlite_without_keys_generates_a_private_keys_file_and_reuses_it() {
    Jail::expect_with(|jail| {
        let c = load(None).unwrap();
        let backend = c.database.backend().unwrap();
        let (first, created) = c.keys.resolve(&backend).unwrap();
        let path = created.expect("a keys file is generated on first start");
        assert_eq!(path, Path::new("token-broker.db.keys.toml"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(jail.directory().join(&path))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (second, created) = c.keys.resolve(&backend).unwrap();
        assert!(created.is_none(), "the file is reused");
        assert_eq!(first.active, second.active);
        assert_eq!(
            first.sealing[&first.active].expose_secret(),
            second.sealing[&second.active].expose_secret()
        );
        first.build().expect("generated keys build a keyring");
        Ok(())
    });
}

#[test]
fn postgres_without_keys_is_a_start_up_error_naming_keys() {
    Jail::expect_with(|jail| {
        jail.set_env(
            "TOKEN_BROKER_DATABASE__URL",
            "postgres://postgres@127.0.0.1/x",
        );
        let c = load(None).unwrap();
        let err = c.keys.resolve(&c.database.backend().unwrap()).unwrap_err();
        assert_eq!(err.setting, "keys");
        Ok(())
    });
}

#[test]
fn configured_keys_are_used_inline_or_from_a_file() {
    Jail::expect_with(|jail| {
        let keys =
            format!("active = \"k1\"\nfingerprint = \"{KEY_A}\"\naudit_chain = \"{KEY_A}\"\n[sealing]\nk1 = \"{KEY_A}\"\n");
        secret_file(jail, "keys.toml", &keys, 0o600);
        jail.set_env(
            "TOKEN_BROKER_DATABASE__URL",
            "postgres://postgres@127.0.0.1/x",
        );
        jail.set_env("TOKEN_BROKER_KEYS__FILE", "keys.toml");
        let c = load(None).unwrap();
        let (k, created) = c.keys.resolve(&Backend::Postgres).unwrap();
        assert_eq!((k.active.as_str(), created), ("k1", None));
        assert!(!format!("{k:?}").contains(KEY_A));
        let (keyring, _) = k.build().unwrap();
        assert_eq!(keyring.active_key_id(), "k1");
        Ok(())
    });
}

#[test]
fn a_missing_or_malformed_config_file_is_reported_with_its_path() {
    Jail::expect_with(|jail| {
        let err = load(Some("nowhere.toml")).unwrap_err();
        assert!(err.names("--config"), "{err}");
        assert!(err.to_string().contains("nowhere.toml"), "{err}");
        jail.create_file("broken.toml", "[grpc\nlisten = 1")?;
        let err = load(Some("broken.toml")).unwrap_err();
        assert!(err.to_string().contains("broken.toml"), "{err}");
        Ok(())
    });
}

#[test]
fn a_secret_with_the_wrong_type_is_refused_without_echoing_it() {
    Jail::expect_with(|jail| {
        jail.set_env("TOKEN_BROKER_UPSTREAM__REFRESH_TOKEN", "987654321");
        let err = load(None).unwrap_err();
        assert!(err.names("upstream.refresh_token"), "{err}");
        assert!(!err.to_string().contains("987654321"), "{err}");
        Ok(())
    });
}

#[test]
fn connection_limits_default_for_one_pod_are_settings_and_zero_is_refused_naming_them() {
    Jail::expect_with(|jail| {
        let c = load(None).unwrap();
        let g = &c.grpc;
        assert_eq!(g.max_connections, 1024);
        assert_eq!(g.max_concurrent_streams, 100);
        assert_eq!(g.handshake_timeout.as_secs(), 10);
        assert_eq!(g.idle_timeout.as_secs(), 300);
        assert_eq!(g.keepalive_interval.as_secs(), 60);
        assert_eq!(g.keepalive_timeout.as_secs(), 10);
        assert_eq!(g.max_request_size, 1024 * 1024);
        assert_eq!(g.max_header_list_size, 32 * 1024);

        jail.create_file(
            "broker.toml",
            "[grpc]\nmax_connections = 50\nidle_timeout = \"90s\"\n",
        )?;
        jail.set_env("TOKEN_BROKER_GRPC__HANDSHAKE_TIMEOUT", "3s");
        jail.set_env("TOKEN_BROKER_GRPC__MAX_HEADER_LIST_SIZE", "65536");
        let c = load(Some("broker.toml")).unwrap();
        assert_eq!(c.grpc.max_connections, 50);
        assert_eq!(c.grpc.idle_timeout.as_secs(), 90);
        assert_eq!(c.grpc.handshake_timeout.as_secs(), 3);
        assert_eq!(c.grpc.max_header_list_size, 65536);
        assert_eq!(c.grpc.max_concurrent_streams, 100);

        jail.clear_env();
        for (toml, setting) in [
            ("[grpc]\nmax_connections = 0", "grpc.max_connections"),
            (
                "[grpc]\nmax_concurrent_streams = 0",
                "grpc.max_concurrent_streams",
            ),
            (
                "[grpc]\nhandshake_timeout = \"0s\"",
                "grpc.handshake_timeout",
            ),
            (
                "[grpc]\nhandshake_timeout = \"1h\"",
                "grpc.handshake_timeout",
            ),
            ("[grpc]\nidle_timeout = 0", "grpc.idle_timeout"),
            ("[grpc]\nidle_timeout = \"soon\"", "grpc.idle_timeout"),
            (
                "[grpc]\nkeepalive_interval = \"0s\"",
                "grpc.keepalive_interval",
            ),
            (
                "[grpc]\nkeepalive_interval = \"10ms\"",
                "grpc.keepalive_interval",
            ),
            (
                "[grpc]\nkeepalive_timeout = \"0s\"",
                "grpc.keepalive_timeout",
            ),
            ("[grpc]\nmax_request_size = 0", "grpc.max_request_size"),
            (
                "[grpc]\nmax_header_list_size = 0",
                "grpc.max_header_list_size",
            ),
            // Below the authenticator's own bearer limit plus headroom.
            (
                "[grpc]\nmax_header_list_size = 16384",
                "grpc.max_header_list_size",
            ),
            (
                "[grpc]\nmax_connection_age = \"1h\"",
                "grpc.max_connection_age",
            ),
        ] {
            fails_naming(jail, toml, setting);
        }
        Ok(())
    });
}

#[test]
fn the_chain_head_is_logged_at_most_once_a_minute_unless_configured() {
    Jail::expect_with(|jail| {
        assert_eq!(load(None).unwrap().audit.head_log_interval.as_secs(), 60);
        jail.set_env("TOKEN_BROKER_AUDIT__HEAD_LOG_INTERVAL", "5m");
        assert_eq!(load(None).unwrap().audit.head_log_interval.as_secs(), 300);
        Ok(())
    });
}

#[test]
fn refused_authentications_are_written_every_ten_seconds_unless_configured() {
    Jail::expect_with(|jail| {
        assert_eq!(
            load(None).unwrap().audit.auth_failure_interval.as_secs(),
            10
        );
        jail.create_file("broker.toml", "[audit]\nauth_failure_interval = \"30s\"\n")?;
        assert_eq!(
            load(Some("broker.toml"))
                .unwrap()
                .audit
                .auth_failure_interval
                .as_secs(),
            30
        );
        jail.set_env("TOKEN_BROKER_AUDIT__AUTH_FAILURE_INTERVAL", "2m");
        assert_eq!(
            load(Some("broker.toml"))
                .unwrap()
                .audit
                .auth_failure_interval
                .as_secs(),
            120
        );
        jail.set_env("TOKEN_BROKER_AUDIT__AUTH_FAILURE_INTERVAL", "0");
        let err = load(Some("broker.toml")).unwrap_err();
        assert!(err.names("audit.auth_failure_interval"), "{err}");
        Ok(())
    });
}

#[test]
fn background_work_schedules_default_sensibly_and_are_settings() {
    Jail::expect_with(|jail| {
        let c = load(None).unwrap();
        assert_eq!(c.leases.reconcile_after.as_secs(), 120);
        assert_eq!(c.leases.sweep_interval.as_secs(), 600);
        assert_eq!(c.leases.retention.as_secs(), 90 * 24 * 3600);
        let retry = &c.leases.revocation_retry;
        assert_eq!(retry.min_delay.as_secs(), 5);
        assert_eq!(retry.max_delay.as_secs(), 600);
        assert_eq!(retry.max_attempts, 10);
        assert_eq!(retry.failed_interval.as_secs(), 3600);

        jail.create_file(
            "broker.toml",
            "[leases]\nreconcile_after = \"45s\"\nsweep_interval = \"2m\"\n\
             [leases.revocation_retry]\nmin_delay = \"1s\"\n",
        )?;
        jail.set_env("TOKEN_BROKER_LEASES__REVOCATION_RETRY__MAX_ATTEMPTS", "3");
        let c = load(Some("broker.toml")).unwrap();
        assert_eq!(c.leases.reconcile_after.as_secs(), 45);
        assert_eq!(c.leases.sweep_interval.as_secs(), 120);
        assert_eq!(c.leases.revocation_retry.min_delay.as_secs(), 1);
        assert_eq!(c.leases.revocation_retry.max_attempts, 3);
        // Unset members of the table keep their defaults.
        assert_eq!(c.leases.revocation_retry.failed_interval.as_secs(), 3600);
        Ok(())
    });
}

#[test]
fn database_pool_limits_default_to_10_connections_and_10s_and_are_settings() {
    Jail::expect_with(|jail| {
        let c = load(None).unwrap();
        assert_eq!(c.database.max_connections, 10);
        assert_eq!(c.database.acquire_timeout.as_secs(), 10);

        jail.create_file(
            "broker.toml",
            "[database]\nmax_connections = 4\nacquire_timeout = \"3s\"\n",
        )?;
        let c = load(Some("broker.toml")).unwrap();
        assert_eq!(c.database.max_connections, 4);
        assert_eq!(c.database.acquire_timeout.as_secs(), 3);
        jail.set_env("TOKEN_BROKER_DATABASE__MAX_CONNECTIONS", "25");
        jail.set_env("TOKEN_BROKER_DATABASE__ACQUIRE_TIMEOUT", "1m");
        let c = load(Some("broker.toml")).unwrap();
        assert_eq!(c.database.max_connections, 25);
        assert_eq!(c.database.acquire_timeout.as_secs(), 60);
        Ok(())
    });
}

#[test]
fn a_reconcile_bound_within_the_upstream_request_timeout_is_refused() {
    Jail::expect_with(|jail| {
        // A create may still be in flight for request_timeout: reconciling
        // sooner could mark a lease FAILED while its PAT is being minted.
        fails_naming(
            jail,
            "[leases]\nreconcile_after = \"30s\"\n",
            "leases.reconcile_after",
        );
        jail.create_file(
            "ok.toml",
            "[leases]\nreconcile_after = \"20s\"\n[upstream.azure_devops]\nrequest_timeout = \"10s\"\n",
        )?;
        assert!(load(Some("ok.toml")).is_ok());
        fails_naming(
            jail,
            "[leases.revocation_retry]\nmax_attempts = 0\n",
            "leases.revocation_retry.max_attempts",
        );
        fails_naming(
            jail,
            "[leases.revocation_retry]\nmin_delay = \"10s\"\nmax_delay = \"1s\"\n",
            "leases.revocation_retry.max_delay",
        );
        fails_naming(
            jail,
            "[leases]\nsweep_interval = \"0s\"\n",
            "leases.sweep_interval",
        );
        fails_naming(jail, "[leases]\nretention = \"59m\"\n", "leases.retention");
        fails_naming(
            jail,
            "[leases]\nretention = \"3651d\"\n",
            "leases.retention",
        );
        jail.create_file("retention.toml", "[leases]\nretention = \"1h\"\n")?;
        assert_eq!(
            load(Some("retention.toml"))
                .unwrap()
                .leases
                .retention
                .as_secs(),
            3600
        );
        // Beyond the upper bounds a schedule would mean "never" and time
        // arithmetic would leave what the stores hold.
        fails_naming(
            jail,
            "[leases]\nsweep_interval = \"1000000000000000h\"\n",
            "leases.sweep_interval",
        );
        fails_naming(
            jail,
            "[leases]\nreconcile_after = \"100000000d\"\n",
            "leases.reconcile_after",
        );
        fails_naming(
            jail,
            "[leases.revocation_retry]\nmin_delay = \"100000000000h\"\nmax_delay = \"100000000000h\"\n",
            "leases.revocation_retry.min_delay",
        );
        fails_naming(
            jail,
            "[leases.revocation_retry]\nmax_attempts = 5000\n",
            "leases.revocation_retry.max_attempts",
        );
        fails_naming(
            jail,
            "[upstream.azure_devops]\nretry_min_delay = \"100000000000h\"\nretry_max_delay = \"100000000000h\"\n",
            "upstream.azure_devops.retry_max_delay",
        );
        fails_naming(
            jail,
            "[upstream.azure_devops]\nmax_retry_after = \"2h\"\n",
            "upstream.azure_devops.max_retry_after",
        );
        fails_naming(
            jail,
            "[upstream.entra]\nrequest_timeout = \"100000000000h\"\n",
            "upstream.entra.request_timeout",
        );
        Ok(())
    });
}

#[test]
fn dev_uses_short_background_schedules_that_the_environment_still_overrides() {
    Jail::expect_with(|jail| {
        let c = Settings::load_over(Some(token_broker::cli::dev::DEV_DEFAULTS), None)
            .unwrap()
            .config;
        // dev reconciles within 30 s and sweeps every 60 s (README, dev).
        assert!(
            c.leases.reconcile_after + c.leases.reaper_interval
                <= std::time::Duration::from_secs(30)
        );
        assert_eq!(c.leases.sweep_interval.as_secs(), 60);
        jail.set_env("TOKEN_BROKER_LEASES__SWEEP_INTERVAL", "5m");
        let c = Settings::load_over(Some(token_broker::cli::dev::DEV_DEFAULTS), None)
            .unwrap()
            .config;
        assert_eq!(c.leases.sweep_interval.as_secs(), 300);
        Ok(())
    });
}

/// Writes `text` to `name` in the jail with permission bits `mode`.
fn secret_file(jail: &mut Jail, name: &str, text: &str, mode: u32) {
    jail.create_file(name, text).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(name, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    #[cfg(not(unix))]
    let _ = mode;
}

#[test]
fn a_secret_and_its_file_both_set_is_a_start_up_error_naming_both() {
    for (toml, env, value, file) in [
        (
            "[upstream]\nrefresh_token = \"rt-secret-value\"\nrefresh_token_file = \"secret\"",
            None,
            "upstream.refresh_token",
            "upstream.refresh_token_file",
        ),
        (
            "[upstream.entra]\nclient_secret = \"rt-secret-value\"",
            Some(("TOKEN_BROKER_UPSTREAM__ENTRA__CLIENT_SECRET_FILE", "secret")),
            "upstream.entra.client_secret",
            "upstream.entra.client_secret_file",
        ),
        (
            "[database]\nurl = \"postgres://u:rt-secret-value@h/db\"",
            Some(("TOKEN_BROKER_DATABASE__URL_FILE", "secret")),
            "database.url",
            "database.url_file",
        ),
        // The default's value, given: still both.
        (
            "[database]\nurl = \"sqlite:token-broker.db\"\nurl_file = \"secret\"",
            None,
            "database.url",
            "database.url_file",
        ),
    ] {
        Jail::expect_with(|jail| {
            secret_file(jail, "secret", "secret-from-file\n", 0o600);
            if let Some((var, path)) = env {
                jail.set_env(var, path);
            }
            jail.create_file("both.toml", toml)?;
            let err = load(Some("both.toml")).unwrap_err();
            assert!(err.names(file), "{err}");
            assert!(
                err.to_string()
                    .contains(&format!("{value} and {file} are both set; set one")),
                "{err}"
            );
            assert!(!err.to_string().contains("rt-secret-value"), "{err}");
            assert!(!err.to_string().contains("secret-from-file"), "{err}");
            Ok(())
        });
    }
}

#[test]
fn secret_files_are_read_trimmed_into_their_settings() {
    Jail::expect_with(|jail| {
        secret_file(jail, "rt", "rt-from-file\r\n", 0o440);
        secret_file(jail, "cs", "\tcs-from-file \n", 0o640);
        secret_file(
            jail,
            "db",
            "postgres://broker:pw-from-file@db.internal/broker\n",
            0o400,
        );
        jail.create_file(
            "broker.toml",
            "[upstream]\nrefresh_token_file = \"rt\"\n[upstream.entra]\nclient_secret_file = \"cs\"\n",
        )?;
        jail.set_env("TOKEN_BROKER_DATABASE__URL_FILE", "db");
        let c = load(Some("broker.toml")).unwrap();
        assert_eq!(
            c.upstream.refresh_token.as_ref().unwrap().expose_secret(),
            "rt-from-file"
        );
        assert_eq!(
            c.upstream
                .entra
                .client_secret
                .as_ref()
                .unwrap()
                .expose_secret(),
            "cs-from-file"
        );
        assert_eq!(
            c.database.url.expose_secret(),
            "postgres://broker:pw-from-file@db.internal/broker"
        );
        assert_eq!(c.database.backend().unwrap(), Backend::Postgres);
        // Resolved once: the paths are gone, so checking again is the same.
        assert!(c.upstream.refresh_token_file.is_none());
        assert!(c.database.url_file.is_none());
        let again = Settings::new(c).unwrap().config;
        assert_eq!(
            again.upstream.refresh_token.unwrap().expose_secret(),
            "rt-from-file"
        );
        Ok(())
    });
}

#[test]
fn database_url_file_replaces_the_default_sqlite_url() {
    Jail::expect_with(|jail| {
        secret_file(jail, "db", "sqlite:from-file.db\r\n", 0o600);
        jail.set_env("TOKEN_BROKER_DATABASE__URL_FILE", "db");
        let c = load(None).unwrap();
        assert_eq!(
            c.database.backend().unwrap(),
            Backend::Sqlite(Some("from-file.db".into()))
        );
        Ok(())
    });
}

#[test]
fn secrets_from_the_environment_are_trimmed() {
    Jail::expect_with(|jail| {
        jail.set_env("TOKEN_BROKER_UPSTREAM__REFRESH_TOKEN", "rt-from-env\r\n");
        jail.set_env(
            "TOKEN_BROKER_UPSTREAM__ENTRA__CLIENT_SECRET",
            " cs-from-env\t\n",
        );
        jail.set_env(
            "TOKEN_BROKER_DATABASE__URL",
            "postgres://postgres@127.0.0.1/x\r\n",
        );
        let c = load(None).unwrap();
        assert_eq!(
            c.upstream.refresh_token.unwrap().expose_secret(),
            "rt-from-env"
        );
        assert_eq!(
            c.upstream.entra.client_secret.unwrap().expose_secret(),
            "cs-from-env"
        );
        assert_eq!(
            c.database.url.expose_secret(),
            "postgres://postgres@127.0.0.1/x"
        );
        Ok(())
    });
}

#[test]
fn secrets_from_the_config_file_are_trimmed() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "broker.toml",
            "[database]\nurl = \"sqlite:trimmed.db \\n\"\n[upstream]\nrefresh_token = \"\"\"\nrt-from-toml\n\"\"\"\n[upstream.entra]\nclient_secret = \"cs-from-toml\\r\\n\"\n",
        )?;
        let c = load(Some("broker.toml")).unwrap();
        assert_eq!(
            c.upstream.refresh_token.unwrap().expose_secret(),
            "rt-from-toml"
        );
        assert_eq!(
            c.upstream.entra.client_secret.unwrap().expose_secret(),
            "cs-from-toml"
        );
        assert_eq!(
            c.database.backend().unwrap(),
            Backend::Sqlite(Some("trimmed.db".into()))
        );
        Ok(())
    });
}

#[test]
fn a_secret_empty_after_trimming_is_an_error_naming_the_setting() {
    Jail::expect_with(|jail| {
        for (toml, setting) in [
            (
                "[upstream]\nrefresh_token = \" \\r\\n\"",
                "upstream.refresh_token",
            ),
            (
                "[upstream.entra]\nclient_secret = \"\\t\\n\"",
                "upstream.entra.client_secret",
            ),
            ("[database]\nurl = \"  \"", "database.url"),
        ] {
            fails_naming(jail, toml, setting);
        }
        secret_file(jail, "blank", " \r\n", 0o600);
        for (toml, setting) in [
            (
                "[upstream]\nrefresh_token_file = \"blank\"",
                "upstream.refresh_token_file",
            ),
            (
                "[upstream.entra]\nclient_secret_file = \"blank\"",
                "upstream.entra.client_secret_file",
            ),
            ("[database]\nurl_file = \"blank\"", "database.url_file"),
        ] {
            jail.create_file("bad.toml", toml)?;
            let err = load(Some("bad.toml")).unwrap_err();
            assert!(err.names(setting), "{err}");
            assert!(err.to_string().contains("blank is empty"), "{err}");
        }
        Ok(())
    });
}

#[cfg(unix)]
#[test]
fn a_secret_file_readable_by_others_is_refused_with_its_path_and_mode() {
    Jail::expect_with(|jail| {
        secret_file(jail, "rt", "rt-secret-value\n", 0o644);
        jail.create_file("broker.toml", "[upstream]\nrefresh_token_file = \"rt\"")?;
        let err = load(Some("broker.toml")).unwrap_err();
        assert!(err.names("upstream.refresh_token_file"), "{err}");
        assert!(
            err.to_string().contains(
                "upstream.refresh_token_file: rt is readable by others (mode 0644); chmod o-r it"
            ),
            "{err}"
        );
        assert!(!err.to_string().contains("rt-secret-value"), "{err}");

        // Group-readable, as Kubernetes mounts Secrets under an fsGroup: fine.
        for mode in [0o440, 0o640] {
            secret_file(jail, "rt", "rt-secret-value\n", mode);
            let c = load(Some("broker.toml")).unwrap();
            assert_eq!(
                c.upstream.refresh_token.unwrap().expose_secret(),
                "rt-secret-value"
            );
        }
        Ok(())
    });
}

#[test]
fn a_missing_secret_file_is_an_error_naming_the_setting_and_path() {
    Jail::expect_with(|jail| {
        jail.set_env("TOKEN_BROKER_UPSTREAM__REFRESH_TOKEN_FILE", "missing");
        let err = load(None).unwrap_err();
        assert!(err.names("upstream.refresh_token_file"), "{err}");
        assert!(err.to_string().contains("cannot read missing: "), "{err}");
        Ok(())
    });
}

#[test]
fn migrate_settings_default_to_migrating_over_database_url_and_name_themselves_in_errors() {
    Jail::expect_with(|jail| {
        let c = load(None).unwrap();
        assert!(c.database.migrate_on_start);
        assert!(c.database.migrate_url.is_none());

        jail.set_env("TOKEN_BROKER_DATABASE__MIGRATE_ON_START", "false");
        jail.set_env(
            "TOKEN_BROKER_DATABASE__MIGRATE_URL",
            "sqlite:direct-migrations.db",
        );
        let c = load(None).unwrap();
        assert!(!c.database.migrate_on_start);
        assert_eq!(
            c.database.migrate_url.as_ref().unwrap().expose_secret(),
            "sqlite:direct-migrations.db"
        );
        assert!(!format!("{c:?}").contains("direct-migrations"));

        // Another kind of database than database.url, refused naming the
        // setting and never showing the value (it may hold a password).
        jail.set_env(
            "TOKEN_BROKER_DATABASE__MIGRATE_URL",
            "postgres://u:pw-secret-value@db/x",
        );
        let err = load(None).expect_err("sqlite url with a postgres migrate_url");
        assert!(err.names("database.migrate_url"), "{err}");
        assert!(!err.to_string().contains("pw-secret-value"), "{err}");
        Ok(())
    });
}

#[test]
fn credentials_retire_after_a_day_absent_unless_configured_and_bounds_are_named() {
    Jail::expect_with(|jail| {
        assert_eq!(
            load(None)
                .unwrap()
                .policy
                .credentials_retire_after
                .as_secs(),
            24 * 3600
        );
        jail.set_env("TOKEN_BROKER_POLICY__CREDENTIALS_RETIRE_AFTER", "2h");
        assert_eq!(
            load(None)
                .unwrap()
                .policy
                .credentials_retire_after
                .as_secs(),
            7200
        );
        jail.clear_env();
        jail.create_file(
            "broker.toml",
            "[policy]\ncredentials_retire_after = \"45m\"\n",
        )?;
        assert_eq!(
            load(Some("broker.toml"))
                .unwrap()
                .policy
                .credentials_retire_after
                .as_secs(),
            2700
        );
        fails_naming(
            jail,
            "[policy]\ncredentials_retire_after = \"0s\"",
            "policy.credentials_retire_after",
        );
        fails_naming(
            jail,
            "[policy]\ncredentials_retire_after = \"400d\"",
            "policy.credentials_retire_after",
        );
        Ok(())
    });
}
