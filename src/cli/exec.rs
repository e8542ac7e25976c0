//! `token-broker exec`: leases a PAT, runs a command with it in its
//! environment (`AZURE_DEVOPS_EXT_PAT` or `--env` names; git configured for
//! the organization through `GIT_CONFIG_COUNT`/`GIT_CONFIG_KEY_n`/
//! `GIT_CONFIG_VALUE_n`; NuGet feeds through the Azure Artifacts credential
//! provider's `VSS_NUGET_EXTERNAL_FEED_ENDPOINTS`), forwards signals to it,
//! revokes the lease once it exits however it exits, and exits with its
//! status. The token is held only in memory and in the child's environment:
//! never written to a file, printed or put in an error.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt as _;
use std::process::ExitStatus;
use std::time::Duration;

use base64::Engine as _;
use clap::Args;
use rustix::process::{getpgid, kill_process, Pid, Signal};
use secrecy::zeroize::Zeroizing;
use serde_json::{json, Value};
use signal_hook::consts::signal::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
use signal_hook::iterator::exfiltrator::WithOrigin;
use signal_hook::iterator::{Handle, SignalsInfo};
use signal_hook::low_level::siginfo::{Cause, Origin};
use tokio::sync::mpsc;

use super::client::connect;
use super::grpc::{answer, request, ClientArgs, ClientError, ClientOutput};
use crate::proto::v1 as pb;

/// Variable that sets `--azure-devops-url`.
pub const AZURE_DEVOPS_URL_VAR: &str = "TOKEN_BROKER_AZURE_DEVOPS_URL";
/// `--azure-devops-url` when neither it nor [`AZURE_DEVOPS_URL_VAR`] is set.
pub const DEFAULT_AZURE_DEVOPS_URL: &str = "https://dev.azure.com";
/// Where the PAT goes without `--env`: the variable `az devops` reads
/// (Azure CLI devops extension, "Sign in with a PAT").
pub const DEFAULT_PAT_VAR: &str = "AZURE_DEVOPS_EXT_PAT";
/// The Azure Artifacts credential provider's variable of feed credentials
/// (microsoft/artifacts-credprovider README, "Environment Variables").
pub const NUGET_ENDPOINTS_VAR: &str = "VSS_NUGET_EXTERNAL_FEED_ENDPOINTS";
/// User name given with the PAT to NuGet. Azure DevOps ignores the user
/// name of Basic auth with a PAT; NuGet wants one.
pub const NUGET_USERNAME: &str = "token-broker";
/// Count of git's environment configuration entries (git-config(1),
/// `GIT_CONFIG_COUNT`; git 2.31 or later).
const GIT_CONFIG_COUNT: &str = "GIT_CONFIG_COUNT";
/// Exit status when COMMAND cannot be found, as shells use.
const NOT_FOUND_STATUS: u8 = 127;
/// Exit status when COMMAND was found but cannot be run, as shells use.
const CANNOT_RUN_STATUS: u8 = 126;
/// Attempts at revoking the lease after COMMAND exits, while the broker
/// answers "retry later" (exit code 5), and the wait before each retry.
const REVOKE_RETRY_DELAYS: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(3)];
/// Longest wait for one revocation call (the channel has a connect
/// timeout but no call deadline).
const REVOKE_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// `token-broker exec …`.
#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Azure DevOps organization, e.g. `fabrikam`.
    #[arg(long = "organization", visible_alias = "org")]
    pub organization: String,
    /// Scope to grant; repeat or comma-separate (`--scope vso.code,vso.packaging`).
    #[arg(long = "scope", required = true, value_delimiter = ',')]
    pub scopes: Vec<String>,
    /// Lease lifetime, e.g. `15m`, `1h` (default: the policy's). The lease
    /// is not renewed: give one longer than COMMAND runs.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// Variable to put the PAT in, instead of `AZURE_DEVOPS_EXT_PAT`;
    /// repeat for several names.
    #[arg(long = "env", value_name = "NAME", value_parser = pat_variable)]
    pub env: Vec<String>,
    /// Base URL of Azure DevOps that git's `http.<URL>/<ORG>/.extraHeader`
    /// is set for.
    #[arg(
        long,
        env = AZURE_DEVOPS_URL_VAR,
        value_name = "URL",
        default_value = DEFAULT_AZURE_DEVOPS_URL,
        value_parser = azure_devops_url
    )]
    pub azure_devops_url: String,
    /// A NuGet feed (its `index.json` URL, as in nuget.config) to give the
    /// PAT to through `VSS_NUGET_EXTERNAL_FEED_ENDPOINTS`; repeatable.
    #[arg(long = "nuget-feed", value_name = "URL", value_parser = feed_url)]
    pub nuget_feeds: Vec<String>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// A `--env` name: a portable variable name (letters, digits, `_`, not
/// starting with a digit), not one exec sets itself.
fn pat_variable(name: &str) -> Result<String, String> {
    let mut chars = name.chars();
    let portable = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !portable {
        return Err("a variable name is letters, digits and `_`, not starting with a digit".into());
    }
    if name.starts_with("GIT_CONFIG_") || name == NUGET_ENDPOINTS_VAR {
        return Err(format!("exec sets {name} itself"));
    }
    Ok(name.to_owned())
}

/// `--azure-devops-url`: an absolute http(s) URL without credentials,
/// query or fragment; kept without its trailing `/`.
fn azure_devops_url(value: &str) -> Result<String, String> {
    let url = http_url(value)?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err("no query or fragment: the base URL, e.g. https://dev.azure.com".into());
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// `--nuget-feed`: an absolute http(s) URL without credentials, kept as
/// given (the credential provider matches it against nuget.config's).
fn feed_url(value: &str) -> Result<String, String> {
    http_url(value)?;
    Ok(value.to_owned())
}

fn http_url(value: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(value).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err("an http:// or https:// URL with a host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("no user name or password in the URL".into());
    }
    Ok(url)
}

/// What exec adds to COMMAND's environment, checked before any lease.
#[derive(Debug)]
struct Plan {
    /// Variables that get the PAT itself.
    pat_variables: Vec<String>,
    /// `http.<url>/<org>/.extraHeader`.
    git_key: String,
    /// Index of our entry: the count of entries already in the environment.
    git_index: usize,
    /// `VSS_NUGET_EXTERNAL_FEED_ENDPOINTS`'s entries already in the
    /// environment, less those for our feeds; `None` without `--nuget-feed`.
    nuget_kept: Option<Vec<Value>>,
    nuget_feeds: Vec<String>,
}

impl Plan {
    /// Checks `args` against the environment `var` reads: an existing
    /// `GIT_CONFIG_COUNT` must be a count whose entries all exist (git
    /// refuses anything else), an existing `VSS_NUGET_EXTERNAL_FEED_ENDPOINTS`
    /// must be the provider's JSON when exec adds to it. Errors name the
    /// variable, never its value (it may hold credentials).
    fn new(args: &ExecArgs, var: impl Fn(&str) -> Option<OsString>) -> Result<Plan, ClientError> {
        let mut pat_variables: Vec<String> = Vec::new();
        for name in &args.env {
            if !pat_variables.contains(name) {
                pat_variables.push(name.clone());
            }
        }
        if pat_variables.is_empty() {
            pat_variables.push(DEFAULT_PAT_VAR.to_owned());
        }
        let git_index = git_config_count(&var)?;
        let nuget_kept = if args.nuget_feeds.is_empty() {
            None
        } else {
            Some(nuget_entries(var(NUGET_ENDPOINTS_VAR), &args.nuget_feeds)?)
        };
        Ok(Plan {
            pat_variables,
            git_key: format!(
                "http.{}/{}/.extraHeader",
                args.azure_devops_url, args.organization
            ),
            git_index,
            nuget_kept,
            nuget_feeds: args.nuget_feeds.clone(),
        })
    }

    /// The variables to set for COMMAND with `pat`, values zeroized when
    /// dropped.
    fn environment(&self, pat: &str) -> Vec<(String, Zeroizing<String>)> {
        let mut vars: Vec<(String, Zeroizing<String>)> = self
            .pat_variables
            .iter()
            .map(|name| (name.clone(), Zeroizing::new(pat.to_owned())))
            .collect();
        let basic =
            Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(format!(":{pat}")));
        let n = self.git_index;
        vars.push((format!("GIT_CONFIG_KEY_{n}"), self.git_key.clone().into()));
        vars.push((
            format!("GIT_CONFIG_VALUE_{n}"),
            Zeroizing::new(format!("Authorization: Basic {}", basic.as_str())),
        ));
        vars.push((GIT_CONFIG_COUNT.to_owned(), (n + 1).to_string().into()));
        if let Some(kept) = &self.nuget_kept {
            let mut entries = kept.clone();
            entries.extend(self.nuget_feeds.iter().map(
                |feed| json!({"endpoint": feed, "username": NUGET_USERNAME, "password": pat}),
            ));
            let value = json!({ "endpointCredentials": entries }).to_string();
            vars.push((NUGET_ENDPOINTS_VAR.to_owned(), Zeroizing::new(value)));
        }
        vars
    }
}

/// The `GIT_CONFIG_COUNT` in the environment (0 when unset or empty, as
/// git takes it), after checking that each of its entries is there.
fn git_config_count(var: &impl Fn(&str) -> Option<OsString>) -> Result<usize, ClientError> {
    let Some(value) = var(GIT_CONFIG_COUNT) else {
        return Ok(0);
    };
    let bad =
        |why: &str| ClientError::Usage(format!("{GIT_CONFIG_COUNT} in the environment {why}"));
    let text = value.to_str().ok_or_else(|| bad("is not text"))?;
    if text.is_empty() {
        return Ok(0);
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("is not a count (git refuses it too)"));
    }
    let count: usize = text
        .parse()
        .ok()
        .filter(|n| *n < i32::MAX as usize)
        .ok_or_else(|| bad("is too large"))?;
    for i in 0..count {
        for name in [
            format!("GIT_CONFIG_KEY_{i}"),
            format!("GIT_CONFIG_VALUE_{i}"),
        ] {
            if var(&name).is_none() {
                return Err(bad(&format!(
                    "is {count} but {name} is not set (git refuses that too)"
                )));
            }
        }
    }
    Ok(count)
}

/// The entries of an existing `VSS_NUGET_EXTERNAL_FEED_ENDPOINTS` to keep:
/// all but those for `feeds` (ours replace them; the provider keys its
/// entries by endpoint).
fn nuget_entries(existing: Option<OsString>, feeds: &[String]) -> Result<Vec<Value>, ClientError> {
    let Some(existing) = existing.filter(|v| !v.is_empty()) else {
        return Ok(Vec::new());
    };
    let bad = || {
        ClientError::Usage(format!(
            "{NUGET_ENDPOINTS_VAR} in the environment is not {{\"endpointCredentials\": [...]}} \
             JSON; unset it or fix it"
        ))
    };
    let text = Zeroizing::new(existing.into_string().map_err(|_| bad())?);
    let mut parsed: Value = serde_json::from_str(&text).map_err(|_| bad())?;
    let Some(Value::Array(entries)) = parsed.get_mut("endpointCredentials").map(Value::take) else {
        return Err(bad());
    };
    Ok(entries
        .into_iter()
        .filter(|e| {
            let endpoint = e.get("endpoint").and_then(Value::as_str).unwrap_or("");
            !feeds.iter().any(|f| f.eq_ignore_ascii_case(endpoint))
        })
        .collect())
}

/// Relays SIGINT, SIGTERM, SIGHUP and SIGQUIT, with who sent them, from a
/// thread of signal-hook's to the async side. While it lives, those
/// signals no longer end token-broker.
struct Signals {
    received: mpsc::UnboundedReceiver<Origin>,
    handle: Handle,
}

impl Signals {
    fn start() -> std::io::Result<Signals> {
        let mut signals = SignalsInfo::<WithOrigin>::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT])?;
        let handle = signals.handle();
        let (tx, received) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("exec-signals".into())
            .spawn(move || {
                for origin in signals.forever() {
                    if tx.send(origin).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Signals { received, handle })
    }

    /// The next signal.
    async fn next(&mut self) -> Origin {
        match self.received.recv().await {
            Some(origin) => origin,
            None => std::future::pending().await,
        }
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        self.handle.close();
    }
}

/// Whether a signal token-broker got should be sent on to the child
/// `child`. Not when the kernel sent it while the child is still in our
/// process group (a terminal's Ctrl-C, Ctrl-\\ or hangup goes to the whole
/// foreground process group: the child has it already, and a second one
/// may mean "force quit" to it), nor when the child itself sent it (`kill
/// 0`); otherwise yes (`kill`, a CI runner's or Kubernetes' SIGTERM).
fn should_forward(origin: &Origin, child: Pid) -> bool {
    match (origin.cause, origin.process) {
        (Cause::Kernel, _) => match (getpgid(Some(child)), getpgid(None)) {
            (Ok(theirs), Ok(ours)) => theirs != ours,
            _ => true,
        },
        (_, Some(sender)) => sender.pid != child.as_raw_pid(),
        _ => true,
    }
}

/// 128 + the signal's number, as shells report a command a signal ended.
fn signal_status(signal: i32) -> u8 {
    (128 + signal).clamp(0, 255) as u8
}

/// Runs `token-broker exec`: returns the exit status (COMMAND's, 128+N if
/// a signal N ended it or ended token-broker before it started, 126/127
/// when it cannot be run), or the client error that kept it from running.
pub async fn run(client: &ClientArgs, args: ExecArgs) -> Result<u8, ClientError> {
    if client.output != ClientOutput::Text {
        return Err(ClientError::Usage(
            "--output does not apply to `exec`: it prints nothing of its own".into(),
        ));
    }
    let plan = Plan::new(&args, |name| std::env::var_os(name))?;
    let mut signals = match Signals::start() {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("error: cannot handle signals: {e}");
            return Ok(1);
        }
    };

    // Lease. A signal meanwhile lets the call finish, so that a lease it
    // made is revoked; a second one gives up on it (it expires at its TTL).
    let create = async {
        let mut leases = connect(client).await?;
        let req = pb::CreateLeaseRequest {
            organization: args.organization.clone(),
            scopes: args.scopes.clone(),
            ttl: args.ttl.map(|d| prost_types::Duration {
                seconds: d.as_secs() as i64,
                nanos: d.subsec_nanos() as i32,
            }),
            request_id: String::new(),
        };
        let lease = answer(leases.create_lease(request(req, client)?).await)?;
        Ok::<_, ClientError>((leases, lease))
    };
    tokio::pin!(create);
    let mut interrupted: Option<i32> = None;
    let (mut leases, mut lease) = loop {
        tokio::select! {
            created = &mut create => break created?,
            origin = signals.next() => {
                if let Some(first) = interrupted {
                    eprintln!(
                        "error: interrupted while leasing; a lease it made expires at its TTL"
                    );
                    return Ok(signal_status(first));
                }
                interrupted = Some(origin.signal);
            }
        }
    };
    let pat = Zeroizing::new(std::mem::take(&mut lease.token));
    let lease_name = lease.name;

    let status = match interrupted {
        Some(signal) => signal_status(signal),
        None => run_child(&plan, &pat, &args.command, &mut signals).await,
    };
    drop(pat);

    // Revoke, retrying while the broker says "retry later".
    let mut delays = REVOKE_RETRY_DELAYS.iter();
    let outcome = loop {
        let req = request(
            pb::RevokeLeaseRequest {
                name: lease_name.clone(),
            },
            client,
        );
        let result = match req {
            Ok(req) => {
                match tokio::time::timeout(REVOKE_CALL_TIMEOUT, leases.revoke_lease(req)).await {
                    Ok(reply) => answer(reply),
                    Err(_) => Err(ClientError::Lost(format!(
                        "no answer within {}",
                        humantime::format_duration(REVOKE_CALL_TIMEOUT)
                    ))),
                }
            }
            Err(e) => Err(e),
        };
        match (result, delays.next()) {
            (Err(e), Some(delay)) if e.exit_code() == 5 => tokio::time::sleep(*delay).await,
            (result, _) => break result,
        }
    };
    match outcome {
        Ok(revoked) => match revoked.state() {
            pb::lease::State::Revoked | pb::lease::State::Failed => {}
            pb::lease::State::Expired => eprintln!(
                "warning: {lease_name} expired before the command exited: give a longer --ttl"
            ),
            state => eprintln!(
                "warning: {lease_name} is {}: Azure DevOps did not confirm the revocation yet; \
                 the broker keeps retrying it",
                state.as_str_name()
            ),
        },
        Err(e) => eprintln!(
            "error: could not revoke {lease_name} after the command exited: {e}; its PAT stays \
             valid until the lease expires, when the broker revokes it (or run `token-broker \
             lease revoke {lease_name}`)"
        ),
    }
    Ok(status)
}

/// The client variables that carry or point at the caller's broker
/// credential, removed from COMMAND's environment.
const BROKER_CREDENTIAL_VARIABLES: [&str; 5] = [
    "TOKEN_BROKER_API_KEY",
    "TOKEN_BROKER_API_KEY_FILE",
    "TOKEN_BROKER_TOKEN_FILE",
    "TOKEN_BROKER_CLIENT_CERT_FILE",
    "TOKEN_BROKER_CLIENT_KEY_FILE",
];

/// Runs `command` with `plan`'s environment for `pat`, forwarding
/// signals, and returns its exit status (126/127 when it cannot start).
async fn run_child(plan: &Plan, pat: &str, command: &[OsString], signals: &mut Signals) -> u8 {
    let (program, arguments) = command.split_first().expect("clap requires COMMAND");
    let mut child = {
        let environment = plan.environment(pat);
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(arguments);
        // Least privilege: COMMAND gets the PAT it was leased, not the
        // means to lease more (another organization, wider scopes).
        for name in BROKER_CREDENTIAL_VARIABLES {
            cmd.env_remove(name);
        }
        for (name, value) in &environment {
            cmd.env(name, value.as_str());
        }
        match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                eprintln!("error: cannot run {}: {e}", program.to_string_lossy());
                return match e.kind() {
                    std::io::ErrorKind::NotFound => NOT_FOUND_STATUS,
                    _ => CANNOT_RUN_STATUS,
                };
            }
        }
    };
    let pid = child
        .id()
        .and_then(|id| Pid::from_raw(id as i32))
        .expect("a child just spawned has a pid");
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            origin = signals.next() => {
                if should_forward(&origin, pid) {
                    if let Some(signal) = Signal::from_named_raw(origin.signal) {
                        let _ = kill_process(pid, signal);
                    }
                }
            }
        }
    };
    match status {
        Ok(status) => exit_status(status),
        Err(e) => {
            eprintln!("error: lost track of {}: {e}", program.to_string_lossy());
            1
        }
    }
}

/// A child's exit status as a shell reports it: its code, or 128 + the
/// signal that ended it.
fn exit_status(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => (code & 0xff) as u8,
        (None, Some(signal)) => signal_status(signal),
        (None, None) => 1,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        exec: ExecArgs,
    }

    fn parse(args: &[&str]) -> Result<ExecArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("exec").chain(args.iter().copied())).map(|c| c.exec)
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn vars(plan: &Plan) -> HashMap<String, String> {
        plan.environment("PAT")
            .into_iter()
            .map(|(k, v)| (k, v.as_str().to_owned()))
            .collect()
    }

    #[test]
    fn git_gets_a_basic_header_for_the_organization_after_existing_entries() {
        let args = parse(&[
            "--org",
            "fabrikam",
            "--scope",
            "vso.code",
            "--azure-devops-url",
            "http://127.0.0.1:8081/",
            "--",
            "git",
            "clone",
        ])
        .unwrap();
        assert_eq!(args.command, ["git", "clone"]);
        let plan = Plan::new(&args, env(&[])).unwrap();
        let v = vars(&plan);
        assert_eq!(v["AZURE_DEVOPS_EXT_PAT"], "PAT");
        assert_eq!(v["GIT_CONFIG_COUNT"], "1");
        assert_eq!(
            v["GIT_CONFIG_KEY_0"],
            "http.http://127.0.0.1:8081/fabrikam/.extraHeader"
        );
        // base64(":PAT")
        assert_eq!(v["GIT_CONFIG_VALUE_0"], "Authorization: Basic OlBBVA==");
        assert!(!v.contains_key(NUGET_ENDPOINTS_VAR));

        let existing = env(&[
            ("GIT_CONFIG_COUNT", "2"),
            ("GIT_CONFIG_KEY_0", "a.b"),
            ("GIT_CONFIG_VALUE_0", "1"),
            ("GIT_CONFIG_KEY_1", "c.d"),
            ("GIT_CONFIG_VALUE_1", ""),
        ]);
        let v = vars(&Plan::new(&args, existing).unwrap());
        assert_eq!(v["GIT_CONFIG_COUNT"], "3");
        assert!(v.contains_key("GIT_CONFIG_KEY_2"));
        assert!(Plan::new(&args, env(&[("GIT_CONFIG_COUNT", "")])).is_ok());
    }

    #[test]
    fn a_git_config_count_git_would_refuse_is_a_usage_error_naming_it() {
        let args = parse(&["--org", "o", "--scope", "vso.code", "--", "true"]).unwrap();
        for bad in [
            &[("GIT_CONFIG_COUNT", "x")][..],
            &[("GIT_CONFIG_COUNT", "-1")],
            &[("GIT_CONFIG_COUNT", "99999999999")],
            &[("GIT_CONFIG_COUNT", "1"), ("GIT_CONFIG_KEY_0", "a.b")],
        ] {
            let err = Plan::new(&args, env(bad)).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad:?}");
            assert!(err.to_string().contains("GIT_CONFIG_COUNT"), "{err}");
        }
    }

    #[test]
    fn nuget_feeds_join_the_credential_providers_json_replacing_their_endpoints() {
        let args = parse(&[
            "--org",
            "o",
            "--scope",
            "vso.packaging",
            "--nuget-feed",
            "https://pkgs.dev.azure.com/o/_packaging/a/nuget/v3/index.json",
            "--nuget-feed",
            "https://pkgs.dev.azure.com/o/_packaging/b/nuget/v3/index.json",
            "--env",
            "MY_PAT",
            "--",
            "dotnet",
            "restore",
        ])
        .unwrap();
        let existing = r#"{"endpointCredentials":[
            {"endpoint":"https://other/index.json","username":"u","password":"keep"},
            {"endpoint":"HTTPS://pkgs.dev.azure.com/o/_packaging/a/nuget/v3/index.json","password":"old"}]}"#;
        let v = vars(&Plan::new(&args, env(&[(NUGET_ENDPOINTS_VAR, existing)])).unwrap());
        assert_eq!(v["MY_PAT"], "PAT");
        assert!(
            !v.contains_key(DEFAULT_PAT_VAR),
            "--env replaces the default"
        );
        let parsed: Value = serde_json::from_str(&v[NUGET_ENDPOINTS_VAR]).unwrap();
        let entries = parsed["endpointCredentials"].as_array().unwrap();
        assert_eq!(entries.len(), 3, "{parsed}");
        assert_eq!(entries[0]["password"], "keep");
        assert_eq!(
            entries[1],
            json!({"endpoint": "https://pkgs.dev.azure.com/o/_packaging/a/nuget/v3/index.json",
                   "username": NUGET_USERNAME, "password": "PAT"})
        );
        let err = Plan::new(&args, env(&[(NUGET_ENDPOINTS_VAR, "password=hunter2")])).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains(NUGET_ENDPOINTS_VAR), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn bad_flags_are_refused_naming_them() {
        let base = ["--org", "o", "--scope", "vso.code"];
        for (extra, flag) in [
            (&["--env", "1X"][..], "--env"),
            (&["--env", "GIT_CONFIG_COUNT"], "--env"),
            (&["--azure-devops-url", "ftp://x"], "--azure-devops-url"),
            (
                &["--azure-devops-url", "https://u:p@x"],
                "--azure-devops-url",
            ),
            (
                &["--azure-devops-url", "https://x/?q"],
                "--azure-devops-url",
            ),
            (&["--nuget-feed", "feed"], "--nuget-feed"),
        ] {
            let mut args: Vec<&str> = base.to_vec();
            args.extend(extra);
            args.extend(["--", "true"]);
            let err = parse(&args).expect_err("refused").to_string();
            assert!(err.contains(flag), "{extra:?}: {err}");
        }
        assert!(parse(&base).is_err(), "COMMAND is required");
    }

    #[test]
    fn a_signal_ending_the_child_is_reported_as_shells_do() {
        assert_eq!(exit_status(ExitStatus::from_raw(7 << 8)), 7);
        assert_eq!(exit_status(ExitStatus::from_raw(SIGTERM)), 143);
        assert_eq!(signal_status(SIGINT), 130);
    }
}
