//! A refresh token pasted with a trailing `\r\n` (a Secret made from a file
//! edited on Windows, an `echo` into a mounted file) still leases: given in
//! the config file, in the environment or in `upstream.refresh_token_file`,
//! it is loaded through the real figment layers, trimmed at start, and a
//! real broker mints a PAT with it at the emulator over real sockets.

// figment's Jail closures return figment::Result; its error is large by design.
#![allow(clippy::result_large_err)]

mod common;

use std::path::{Path, PathBuf};

use figment::Jail;
use secrecy::{ExposeSecret as _, SecretString};

use common::broker::{spawn_broker_with_config, BrokerSpec};
use common::db::sqlite_url;
use common::emulator::Emu;
use token_broker::config::Config;
use token_broker::emulator::DEFAULT_REFRESH_TOKEN;
use token_broker::proto::v1 as pb;

/// Where the refresh token comes from.
#[derive(Clone, Copy, Debug)]
enum Source {
    /// `upstream.refresh_token` in the config file.
    ConfigFile,
    /// `TOKEN_BROKER_UPSTREAM__REFRESH_TOKEN`.
    Environment,
    /// `upstream.refresh_token_file` (mode 0440).
    SecretFile,
}

/// The emulator's refresh token as pasted carelessly.
fn with_crlf() -> String {
    format!("{DEFAULT_REFRESH_TOKEN}\r\n")
}

/// `upstream.refresh_token` and `upstream.refresh_token_file` as the layered
/// configuration reads them (in a Jail: its own working directory and
/// environment) when the token comes from `source`; `dir` holds the secret
/// file, which must outlive the Jail.
fn load_refresh_token(source: Source, dir: &Path) -> (Option<SecretString>, Option<PathBuf>) {
    let mut loaded = None;
    Jail::expect_with(|jail| {
        let toml = match source {
            Source::ConfigFile => {
                format!("[upstream]\nrefresh_token = \"{DEFAULT_REFRESH_TOKEN}\\r\\n\"\n")
            }
            Source::Environment => {
                jail.set_env("TOKEN_BROKER_UPSTREAM__REFRESH_TOKEN", with_crlf());
                String::new()
            }
            Source::SecretFile => {
                let path = dir.join("refresh-token");
                std::fs::write(&path, with_crlf()).unwrap();
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt as _;
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o440))
                        .unwrap();
                }
                format!("[upstream]\nrefresh_token_file = \"{}\"\n", path.display())
            }
        };
        jail.create_file("broker.toml", &toml)?;
        let config = Config::read(None, Some(Path::new("broker.toml"))).expect("loads");
        loaded = Some((
            config.upstream.refresh_token,
            config.upstream.refresh_token_file,
        ));
        Ok(())
    });
    loaded.unwrap()
}

async fn a_refresh_token_with_a_trailing_crlf_leases(source: Source) {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emu::start_default().await;
    // As given, the token is not one the emulator issued.
    assert_eq!(emu.refresh_grant(&with_crlf()).await.status(), 400);

    let (refresh_token, refresh_token_file) = load_refresh_token(source, dir.path());
    match source {
        // Loaded untrimmed: the broker's start trims it.
        Source::ConfigFile => {
            assert_eq!(refresh_token.as_ref().unwrap().expose_secret(), with_crlf())
        }
        // figment's environment provider may trim already; start trims too.
        Source::Environment => assert!(refresh_token.is_some()),
        Source::SecretFile => assert!(refresh_token.is_none()),
    }
    let spec = BrokerSpec::new(sqlite_url(&dir), emu.running.url());
    let mut config = spec.config();
    config.upstream.refresh_token = refresh_token;
    config.upstream.refresh_token_file = refresh_token_file;
    let broker = spawn_broker_with_config(&spec, config).await;

    let lease = broker
        .client(&spec.key("ci"))
        .await
        .create_lease(pb::CreateLeaseRequest {
            organization: "fabrikam".into(),
            scopes: vec!["vso.code_write".into()],
            ttl: None,
            request_id: String::new(),
        })
        .await
        .unwrap_or_else(|s| panic!("{source:?}: lease refused: {s:?}"))
        .into_inner();
    assert_eq!(lease.state(), pb::lease::State::Active, "{source:?}");
    assert!(!lease.token.is_empty(), "{source:?}");
    broker.stop().await;
}

#[tokio::test]
async fn a_refresh_token_with_a_trailing_crlf_leases_from_the_config_file_the_environment_and_a_file(
) {
    for source in [Source::ConfigFile, Source::Environment, Source::SecretFile] {
        a_refresh_token_with_a_trailing_crlf_leases(source).await;
    }
}
