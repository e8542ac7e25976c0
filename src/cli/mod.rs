//! The `token-broker` command line (clap): the server (`serve`, `migrate`),
//! the configuration check (`config check`), the local run (`dev`, `emulator`), key generation (`apikey generate`),
//! policy files (`policy check`), the upstream credential (`upstream
//! login | status | set-refresh-token`), the gRPC clients (`lease ...`,
//! `credential ...`, `admin ...`, `audit list`, `git-credential`), a command run with a leased
//! PAT (`exec`), the audit chain check (`audit verify`) and the keys against
//! the database (`keys status | rewrap`).

use std::fmt::Display;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use secrecy::ExposeSecret as _;

use crate::auth::GeneratedApiKey;
use serve::ConfigArg;

pub mod admin;
pub mod audit;
pub mod bench;
pub mod client;
pub mod config;
pub mod credential;
pub mod dev;
#[cfg(unix)]
pub mod exec;
pub mod git_credential;
pub mod grpc;
pub mod keys;
pub mod policy;
pub mod serve;
pub mod tls_probe;
pub mod upstream;

/// Leases short-lived, least-scope Azure DevOps PATs over gRPC.
#[derive(Parser, Debug)]
#[command(name = "token-broker", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the broker (gRPC server, reaper).
    Serve(ConfigArg),
    /// Apply database migrations and exit.
    Migrate(ConfigArg),
    /// Check the server configuration (for CI): settings, keys, policy, TLS and API keys files.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// One-command local run: emulator + broker on SQLite, with a dev key.
    Dev(dev::DevArgs),
    /// Run the Azure DevOps + Entra emulator alone.
    Emulator(crate::emulator::EmulatorArgs),
    /// Manage API keys.
    #[command(subcommand)]
    Apikey(ApikeyCommand),
    /// Check policy files (for CI) and print their schema.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Lease PATs from a running broker (gRPC client).
    Lease {
        #[command(flatten)]
        client: client::ClientArgs,
        #[command(flatten)]
        token_file: grpc::TokenFileArg,
        #[command(subcommand)]
        command: client::LeaseCommand,
    },
    /// Read managed credentials: get the current token, watch new versions (gRPC client; a reader's key).
    Credential {
        #[command(flatten)]
        client: client::ClientArgs,
        #[command(flatten)]
        token_file: grpc::TokenFileArg,
        #[command(subcommand)]
        command: credential::CredentialCommand,
    },
    /// Run a command with a leased PAT in its environment (for git, az
    /// devops, NuGet); revoke the lease when it exits; exit with its status.
    ///
    /// The PAT goes in AZURE_DEVOPS_EXT_PAT (or each --env NAME), in git's
    /// `http.<URL>/<ORG>/.extraHeader` (GIT_CONFIG_COUNT, after existing
    /// entries) and, per --nuget-feed, in VSS_NUGET_EXTERNAL_FEED_ENDPOINTS;
    /// never in a file. SIGINT, SIGTERM, SIGHUP and SIGQUIT are passed on.
    /// Exit status: COMMAND's (128+N when signal N ended it, 127 not found,
    /// 126 cannot run); the client exit codes when no lease was made.
    #[cfg(unix)]
    #[command(mut_arg("output", |a| a.hide(true)))]
    Exec {
        #[command(flatten)]
        client: client::ClientArgs,
        #[command(flatten)]
        token_file: grpc::TokenFileArg,
        #[command(flatten)]
        args: exec::ExecArgs,
    },
    /// Incident response across holders: bulk revoke, list; managed credentials: rotate, list (gRPC client; admin key).
    Admin {
        #[command(flatten)]
        client: client::ClientArgs,
        #[command(subcommand)]
        command: admin::AdminCommand,
    },
    /// Read the audit trail (gRPC client) or verify its chain (server configuration).
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Git credential helper: answers Azure Repos' credential with a leased PAT (gRPC client).
    #[command(mut_arg("output", |a| a.hide(true)))]
    GitCredential(git_credential::GitCredentialArgs),
    /// Measure a running broker (gRPC client), optionally against its database's own ceiling.
    Bench(bench::BenchArgs),
    /// The broker's own upstream credential: sign in, status, set a refresh token (server configuration).
    #[command(subcommand)]
    Upstream(upstream::UpstreamCommand),
    /// The keys against the database: status, re-seal under the active key (server configuration).
    #[command(subcommand)]
    Keys(keys::KeysCommand),
}

#[derive(Subcommand, Debug)]
enum ApikeyCommand {
    /// Make a new key: prints it once, and the line to configure its hash.
    Generate {
        /// Key name; the caller's identity becomes `apikey:NAME`.
        name: String,
    },
}

/// Entry point of the `token-broker` binary.
pub fn main() -> ExitCode {
    main_from(std::env::args_os())
}

/// Entry point of the `git-credential-token-broker` binary, which git runs
/// for a helper configured without `!` (`credential.helper "token-broker
/// git-credential …"` runs `git credential-token-broker git-credential …
/// get`; see `git help credential`). Its arguments are those of
/// `token-broker`, with `git-credential` put first when absent, so
/// `credential.helper "token-broker --scope vso.code_write"` works too.
pub fn git_credential_main() -> ExitCode {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_none_or(|first| first != "git-credential") {
        args.insert(0, "git-credential".into());
    }
    main_from(std::iter::once("token-broker".into()).chain(args))
}

/// Parses `args` (the program name first) and runs the command.
fn main_from(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    // reqwest and sqlx use rustls: pin its process-wide crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse_from(args);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(status) => ExitCode::from(status),
        Err(failure) => {
            eprintln!("error: {}", failure.message);
            ExitCode::from(failure.status)
        }
    }
}

/// A failed command: what to print after `error: ` and the exit status
/// (1, or a client command's [`grpc::ClientError::exit_code`]).
struct Failure {
    message: String,
    status: u8,
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure { message, status: 1 }
    }
}

impl From<grpc::ClientError> for Failure {
    fn from(e: grpc::ClientError) -> Failure {
        Failure {
            message: e.to_string(),
            status: e.exit_code(),
        }
    }
}

/// Prints a client command's answer as [`print_out`] does; a failure
/// keeps its exit status.
fn print_client(answer: Result<String, grpc::ClientError>) -> Result<(), Failure> {
    print_out(Ok::<_, String>(answer?))?;
    Ok(())
}

/// `client` with the token file of `TOKEN_BROKER_TOKEN_FILE` (commands
/// whose `--token-file` means something else, or that have none).
fn with_env_token_file(mut client: client::ClientArgs) -> client::ClientArgs {
    client.token_file = grpc::token_file_from_env();
    client
}

/// `answer`, with a connection lost under the call to an mTLS broker that
/// refuses this client's certificate told as that refusal
/// ([`tls_probe::diagnose`]).
async fn diagnosed<T>(
    client: &client::ClientArgs,
    answer: Result<T, grpc::ClientError>,
) -> Result<T, grpc::ClientError> {
    match answer {
        Err(e) => Err(tls_probe::diagnose(client, e).await),
        ok => ok,
    }
}

/// Runs the command line; the exit status (0, or `exec`'s command's).
async fn run(cli: Cli) -> Result<u8, Failure> {
    match cli.command {
        #[cfg(unix)]
        Command::Exec {
            mut client,
            token_file,
            args,
        } => {
            client.token_file = token_file.token_file;
            let status = exec::run(&client, args).await;
            Ok(diagnosed(&client, status).await?)
        }
        command => run_command(command).await.map(|()| 0),
    }
}

async fn run_command(command: Command) -> Result<(), Failure> {
    match command {
        #[cfg(unix)]
        Command::Exec { .. } => unreachable!("`run` runs exec"),
        Command::Lease {
            mut client,
            token_file,
            command,
        } => {
            client.token_file = token_file.token_file;
            print_client(diagnosed(&client, client::run(&client, command).await).await)
        }
        Command::Credential {
            mut client,
            token_file,
            command,
        } => {
            client.token_file = token_file.token_file;
            match command {
                credential::CredentialCommand::Get { name } => {
                    print_client(diagnosed(&client, credential::get(&client, name).await).await)
                }
                credential::CredentialCommand::Watch { name, output_file } => {
                    Ok(credential::watch(&client, name, output_file).await?)
                }
            }
        }
        Command::Admin {
            mut client,
            command,
        } => {
            client.token_file = command.caller_token_file();
            print_client(diagnosed(&client, admin::run(&client, command).await).await)
        }
        Command::Audit(audit::AuditCommand::List {
            mut client,
            token_file,
            filter,
            page_size,
            page_token,
        }) => {
            client.token_file = token_file.token_file;
            let listed = audit::list(&client, filter, page_size, page_token).await;
            print_client(diagnosed(&client, listed).await)
        }
        Command::GitCredential(args) => {
            let client = args.client.clone();
            let answer = git_credential::run(args).await;
            // git shows a helper's stderr among its own: say who speaks.
            let out = diagnosed(&client, answer).await.map_err(|e| Failure {
                message: format!("token-broker git-credential: {e}"),
                status: e.exit_code(),
            })?;
            if !out.is_empty() {
                print_out(Ok::<_, String>(out))?;
            }
            Ok(())
        }
        Command::Bench(mut args) => {
            args.client = with_env_token_file(args.client);
            Ok(bench::run(args).await.map_err(|e| e.to_string())?)
        }
        Command::Serve(arg) => Ok(serve::serve(&arg).await?),
        Command::Migrate(arg) => Ok(serve::migrate(&arg).await?),
        Command::Config(command) => Ok(print_out(config::run(command))?),
        Command::Dev(args) => Ok(dev::run(args).await.map_err(|e| e.to_string())?),
        Command::Emulator(args) => {
            crate::telemetry::init("info", false).map_err(|e| e.to_string())?;
            Ok(crate::emulator::run(args)
                .await
                .map_err(|e| e.to_string())?)
        }
        Command::Apikey(ApikeyCommand::Generate { name }) => {
            let key = GeneratedApiKey::generate(&name)?;
            println!("{}", key.key.expose_secret());
            eprintln!(
                "\nThis key is shown once. Configure its hash (not the key) on the broker:\n\n  \
                 [auth]\n  api_keys = [{}]\n\nor in the environment:\n\n  \
                 TOKEN_BROKER_AUTH__API_KEYS='[{}]'\n",
                key.config_entry(),
                key.config_entry()
            );
            Ok(())
        }
        Command::Policy(command) => Ok(policy::run(command)?),
        Command::Upstream(command) => Ok(print_out(upstream::run(command).await)?),
        Command::Keys(command) => Ok(print_out(keys::run(command).await)?),
        Command::Audit(audit::AuditCommand::Verify(args)) => {
            let settings = serve::load_settings(&ConfigArg {
                config: args.config.clone(),
            })?;
            Ok(print_out(
                audit::verify_heads(
                    &settings.config,
                    &args.expected_head,
                    args.expected_heads_file.as_deref(),
                    args.from_head.as_deref(),
                )
                .await,
            )?)
        }
        Command::Audit(audit::AuditCommand::Head { config }) => {
            let settings = serve::load_settings(&ConfigArg { config })?;
            Ok(print_out(audit::head(&settings.config).await)?)
        }
    }
}

/// Prints a command's answer and a newline on stdout, or passes its error
/// on. A reader that went away (`token-broker audit list | head`) ends the
/// output quietly instead of panicking as `println!` would.
fn print_out(answer: Result<String, impl Display>) -> Result<(), String> {
    use std::io::Write as _;
    let out = answer.map_err(|e| e.to_string())?;
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{out}").and_then(|()| stdout.flush());
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM (what Kubernetes sends before a kill).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_dev_database_password_never_shows_in_debug_output() {
        let cli = Cli::try_parse_from([
            "token-broker",
            "dev",
            "--database-url",
            "postgres://broker:hunter2@db.internal/token_broker",
        ])
        .unwrap();
        assert!(!format!("{cli:?}").contains("hunter2"));
    }

    #[test]
    fn an_api_key_given_on_the_command_line_never_shows_in_debug_output() {
        let key = "tbk_do-not-print-me-0123456789abcdef";
        let cli = Cli::try_parse_from([
            "token-broker",
            "lease",
            "--api-key",
            key,
            "create",
            "--org",
            "fabrikam",
            "--scope",
            "vso.code,vso.packaging",
            "--ttl",
            "15m",
        ])
        .unwrap();
        assert!(!format!("{cli:?}").contains(key));
        let Command::Lease {
            command: client::LeaseCommand::Create { scopes, ttl, .. },
            ..
        } = cli.command
        else {
            panic!("parsed as another command");
        };
        assert_eq!(scopes, vec!["vso.code", "vso.packaging"]);
        assert_eq!(ttl, Some(std::time::Duration::from_secs(900)));
    }
}
