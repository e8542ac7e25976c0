//! `token-broker exec` as a CI job runs it: the compiled binary against a
//! real broker (SQLite) and the emulator over real sockets, running real
//! `sh`, `curl` and `git`. The child proves the PAT by calling the
//! emulator's data plane with it (from `AZURE_DEVOPS_EXT_PAT`, a `--env`
//! name, and git's extraHeader); the token is never printed: the child
//! shows HTTP statuses and a SHA-256 of it. After the child exits, however
//! it exits (also when exec is signalled), the lease is REVOKED.

mod common;

use std::path::Path;
use std::process::Stdio;

use std::time::Duration;
use tokio::io::AsyncWriteExt as _;

use rustix::process::{kill_process, Pid, Signal};
use secrecy::ExposeSecret as _;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use common::broker::{spawn_broker, BrokerSpec, TestBroker};
use common::db::sqlite_url;
use common::emulator::Emu;
use common::git::{path, repo_url, GitWorld};
use common::wait::poll;
use token_broker::emulator::EmulatorConfig;
use token_broker::proto::v1 as pb;

const BIN: &str = env!("CARGO_BIN_EXE_token-broker");

/// `apikey:ci` may lease code and packaging scopes in `fabrikam`.
const POLICY: &str = r#"
rules:
  - name: ci
    identities: ["apikey:ci"]
    organizations: ["fabrikam"]
    scopes: ["vso.code", "vso.code_write", "vso.packaging"]
    default_ttl: 1h
    max_ttl: 8h
"#;

/// Shell functions for the child: `pat_status VAR PATH` and `git_status
/// PATH` print the HTTP status of `GET $EMU/fabrikam/_apis/PATH` with the
/// PAT in `$VAR` as Basic auth, or with git's extraHeader for the
/// organization. The header goes to curl on stdin, never in an argument.
const CHECKS: &str = r#"
set -u
pat_status() {
  eval "pat=\$$1"
  printf 'Authorization: Basic %s\n' "$(printf ':%s' "$pat" | base64 -w0)" |
    curl -s -o /dev/null -w '%{http_code}' -H @- "$EMU/fabrikam/_apis/$2?api-version=7.1"
}
git_status() {
  git config --get "http.$EMU/fabrikam/.extraHeader" |
    curl -s -o /dev/null -w '%{http_code}' -H @- "$EMU/fabrikam/_apis/$1?api-version=7.1"
}
"#;

struct World {
    broker: TestBroker,
    spec: BrokerSpec,
    emu: Emu,
    dir: tempfile::TempDir,
}

async fn world() -> World {
    world_with(EmulatorConfig::default()).await
}

/// A broker against an emulator started with `config`.
async fn world_with(config: EmulatorConfig) -> World {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emu::start(config).await;
    let spec = BrokerSpec::new(sqlite_url(&dir), emu.running.url()).with_policy(POLICY);
    let broker = spawn_broker(&spec).await;
    World {
        broker,
        spec,
        emu,
        dir,
    }
}

/// What a run of exec did. Its Debug shows the status and stderr; stdout
/// only when a test prints it on purpose (it may hold the token).
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run")
            .field("code", &self.code)
            .field("stderr", &self.stderr)
            .finish_non_exhaustive()
    }
}

impl World {
    /// `token-broker exec ARGS` as `apikey:ci`, with `env` added to an
    /// environment holding nothing of the test's own `TOKEN_BROKER_*`,
    /// `GIT_CONFIG_*`, `VSS_*` or `AZURE_DEVOPS_EXT_PAT`; the child sees
    /// `EMU` (the emulator's URL) and `OUT` (the test's directory), and runs
    /// there.
    fn command(&self, args: &[&str], env: &[(&str, &str)]) -> tokio::process::Command {
        let mut command = self.environment(BIN, env);
        command.arg("exec").args(args);
        command
    }

    /// `program` with the environment of [`World::command`].
    fn environment(&self, program: &str, env: &[(&str, &str)]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(program);
        for (name, _) in std::env::vars() {
            if name.starts_with("TOKEN_BROKER_")
                || name.starts_with("GIT_CONFIG")
                || name.starts_with("VSS_")
                || name == "AZURE_DEVOPS_EXT_PAT"
            {
                command.env_remove(name);
            }
        }
        let key = self.spec.key("ci");
        command
            .env("TOKEN_BROKER_ADDR", &self.broker.url)
            .env("TOKEN_BROKER_API_KEY", key.expose_secret())
            .env("EMU", self.emu.running.url())
            .env("OUT", self.dir.path())
            .envs(env.iter().copied())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    /// Runs exec to its end.
    async fn exec(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let out = self
            .command(args, env)
            .output()
            .await
            .expect("run token-broker");
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `apikey:ci`'s leases, newest first.
    async fn leases(&self) -> Vec<pb::Lease> {
        let mut client = self.broker.client(&self.spec.key("ci")).await;
        client
            .list_leases(pb::ListLeasesRequest::default())
            .await
            .expect("list leases")
            .into_inner()
            .leases
    }

    /// Asserts exec made exactly one lease and it is REVOKED, at the broker
    /// and upstream.
    async fn one_lease_revoked(&self, run: &Run) {
        let leases = self.leases().await;
        assert_eq!(leases.len(), 1, "{run:?}");
        assert_eq!(
            leases[0].state(),
            pb::lease::State::Revoked,
            "{:?} {run:?}",
            leases[0].name
        );
        let pats = self.emu.pats().await;
        assert_eq!(pats.len(), 1, "{pats:?}");
        assert_eq!(pats[0]["state"], "revoked", "{pats:?}");
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

/// `sh -c SCRIPT` (with [`CHECKS`] first) as exec's COMMAND.
fn sh(script: &str) -> [String; 3] {
    ["sh".into(), "-c".into(), format!("{CHECKS}\n{script}")]
}

fn args<'a>(flags: &[&'a str], command: &'a [String]) -> Vec<&'a str> {
    let mut all = flags.to_vec();
    all.push("--");
    all.extend(command.iter().map(String::as_str));
    all
}

const FABRIKAM_CODE: &[&str] = &["--organization", "fabrikam", "--scope", "vso.code"];

/// The flags every test gives: fabrikam, `vso.code`, git pointed at the
/// emulator.
fn code_flags(w: &World) -> Vec<String> {
    let mut flags: Vec<String> = FABRIKAM_CODE.iter().map(|s| s.to_string()).collect();
    flags.extend(["--azure-devops-url".into(), w.emu.running.url()]);
    flags
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Waits until the child has written `OUT/name`.
async fn wait_for_file(path: &Path) {
    poll("the child to start", Duration::from_secs(30), || async {
        if path.exists() {
            Ok(())
        } else {
            Err(format!("{} not there yet", path.display()))
        }
    })
    .await
}

// ---- the environment ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_child_uses_the_pat_from_its_environment_and_through_git_then_the_lease_is_revoked() {
    let w = world().await;
    let command = sh(r#"
        echo "pat $(pat_status AZURE_DEVOPS_EXT_PAT git/repositories)"
        echo "git $(git_status git/repositories)"
        echo "count $GIT_CONFIG_COUNT"
        exit 7"#);
    let flags = code_flags(&w);
    let run = w.exec(&args(&strs(&flags), &command), &[]).await;
    assert_eq!(
        run.stdout, "pat 200\ngit 200\ncount 1\n",
        "the PAT works from AZURE_DEVOPS_EXT_PAT and git's extraHeader: {run:?}"
    );
    assert_eq!(run.code, Some(7), "exec exits with the command's status");
    assert!(run.stderr.is_empty(), "{run:?}");
    w.one_lease_revoked(&run).await;
    w.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_names_replace_the_default_and_existing_git_config_entries_are_kept() {
    let w = world().await;
    let command = sh(r#"
        [ -z "${AZURE_DEVOPS_EXT_PAT+set}" ] && echo "default unset"
        [ -z "${TOKEN_BROKER_API_KEY+set}${TOKEN_BROKER_API_KEY_FILE+set}" ] && echo "no broker credential"
        [ "$MY_PAT" = "$ALSO_PAT" ] && echo "same token"
        echo "pat $(pat_status MY_PAT git/repositories)"
        echo "user $(git config --get user.name)"
        echo "git $(git_status git/repositories)"
        echo "count $GIT_CONFIG_COUNT""#);
    let mut flags = code_flags(&w);
    flags.extend(["--env", "MY_PAT", "--env", "ALSO_PAT"].map(String::from));
    let existing = [
        ("GIT_CONFIG_COUNT", "1"),
        ("GIT_CONFIG_KEY_0", "user.name"),
        ("GIT_CONFIG_VALUE_0", "Exec Test"),
    ];
    let run = w.exec(&args(&strs(&flags), &command), &existing).await;
    assert_eq!(
        run.stdout, "default unset\nno broker credential\nsame token\npat 200\nuser Exec Test\ngit 200\ncount 2\n",
        "{run:?}"
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    w.one_lease_revoked(&run).await;

    // A GIT_CONFIG_COUNT git would refuse is the caller's mistake (2):
    // no lease, no command.
    let touch = ["sh".to_owned(), "-c".into(), "touch \"$OUT/ran\"".into()];
    for bad in [
        &[("GIT_CONFIG_COUNT", "two")][..],
        &[("GIT_CONFIG_COUNT", "1")],
    ] {
        let run = w.exec(&args(&strs(&flags), &touch), bad).await;
        assert_eq!(run.code, Some(2), "{bad:?}: {run:?}");
        assert!(run.stderr.contains("GIT_CONFIG_COUNT"), "{run:?}");
    }
    assert!(!w.path("ran").exists());
    assert_eq!(w.leases().await.len(), 1, "no other lease was made");
    w.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nuget_feeds_get_the_pat_in_the_credential_providers_variable() {
    let w = world().await;
    let feed_a = "https://pkgs.dev.azure.com/fabrikam/_packaging/a/nuget/v3/index.json";
    let feed_b = "https://pkgs.dev.azure.com/fabrikam/_packaging/b/nuget/v3/index.json";
    let other = r#"{"endpointCredentials":[{"endpoint":"https://nuget.example/index.json","username":"u","password":"not-ours"}]}"#;
    // Line 1: the feeds data plane's answer; 2: SHA-256 of the PAT; 3: the
    // variable (holds the PAT: never printed by this test).
    let command = sh(r#"
        echo "feeds $(pat_status AZURE_DEVOPS_EXT_PAT packaging/feeds)"
        printf '%s' "$AZURE_DEVOPS_EXT_PAT" | sha256sum | cut -d' ' -f1
        printf '%s\n' "$VSS_NUGET_EXTERNAL_FEED_ENDPOINTS""#);
    let flags = [
        "--organization",
        "fabrikam",
        "--scope",
        "vso.packaging",
        "--nuget-feed",
        feed_a,
        "--nuget-feed",
        feed_b,
    ];
    let run = w
        .exec(
            &args(&flags, &command),
            &[("VSS_NUGET_EXTERNAL_FEED_ENDPOINTS", other)],
        )
        .await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{run:?}");
    assert_eq!(lines[0], "feeds 200", "{run:?}");
    let digest = lines[1];
    let endpoints: Value = serde_json::from_str(lines[2]).expect("the variable is JSON");
    let entries = endpoints["endpointCredentials"]
        .as_array()
        .expect("endpointCredentials");
    let shown: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| {
            (
                e["endpoint"].as_str().unwrap_or(""),
                e["username"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        shown,
        [
            ("https://nuget.example/index.json", "u"),
            (feed_a, "token-broker"),
            (feed_b, "token-broker")
        ]
    );
    assert_eq!(entries[0]["password"], "not-ours", "kept as it was");
    for entry in &entries[1..] {
        let password = entry["password"].as_str().expect("a password");
        assert!(
            !run.stderr.contains(password),
            "exec never prints the token"
        );
        assert!(
            hex::encode(Sha256::digest(password.as_bytes())) == digest,
            "the feed's password is the PAT in AZURE_DEVOPS_EXT_PAT"
        );
        assert_eq!(
            w.emu.use_pat("fabrikam", "packaging/feeds", password).await,
            401,
            "the PAT is revoked once the command exited"
        );
    }
    w.one_lease_revoked(&run).await;
    w.broker.stop().await;
}

// ---- git against the emulator ---------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_clones_and_pushes_through_exec_against_the_emulator_and_each_lease_is_revoked() {
    let git = GitWorld::new();
    let bare = git.seed();
    let w = world_with(EmulatorConfig {
        git_root: Some(git.root()),
        ..EmulatorConfig::default()
    })
    .await;
    let base = w.emu.running.url();
    let url = repo_url(&base);
    let home = git.dir.path().join("home");
    let git_env = [
        ("HOME", path(&home)),
        ("GIT_CONFIG_NOSYSTEM", "1"),
        ("GIT_TERMINAL_PROMPT", "0"),
        ("GIT_AUTHOR_NAME", "Test"),
        ("GIT_AUTHOR_EMAIL", "test@example.com"),
        ("GIT_COMMITTER_NAME", "Test"),
        ("GIT_COMMITTER_EMAIL", "test@example.com"),
    ];
    let clone = git.work().join("clone");

    // Without a credential the emulator refuses git.
    let plain = git.git(&git.work(), &["clone", &url, "plain"]);
    assert!(!plain.status.success(), "cloned without a PAT");

    let flags = ["--organization", "fabrikam", "--scope", "vso.code"];
    let mut fetch = flags.to_vec();
    fetch.extend(["--azure-devops-url", &base, "--", "git", "clone", &url]);
    fetch.push(path(&clone));
    let run = w.exec(&fetch, &git_env).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        std::fs::read_to_string(clone.join("README")).unwrap(),
        "hello\n"
    );
    w.one_lease_revoked(&run).await;
    let config = std::fs::read_to_string(clone.join(".git/config")).unwrap();
    assert!(
        !config.to_lowercase().contains("extraheader"),
        "the credential stays out of the clone: {config}"
    );

    // A push needs vso.code_write.
    std::fs::write(clone.join("NEW"), "pushed\n").unwrap();
    git.ok(&git.git(&clone, &["add", "NEW"]));
    git.ok(&git.git(&clone, &["commit", "-m", "second"]));
    let push = [
        "--organization",
        "fabrikam",
        "--scope",
        "vso.code_write",
        "--azure-devops-url",
        &base,
        "--",
        "git",
        "-C",
        path(&clone),
        "push",
        "origin",
        "main",
    ];
    let run = w.exec(&push, &git_env).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(git.rev(&bare, "main"), git.rev(&clone, "HEAD"));
    let leases = w.leases().await;
    assert_eq!(leases.len(), 2);
    assert!(
        leases
            .iter()
            .all(|l| l.state() == pb::lease::State::Revoked),
        "{leases:?}"
    );

    // Afterwards git alone is refused again: nothing was left behind.
    let out = git.git(&clone, &["fetch", "origin"]);
    assert!(!out.status.success(), "fetched without exec");
    w.broker.stop().await;
}

// ---- exits and signals ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_exec_reaches_the_child_and_the_lease_is_revoked_after_it_exits() {
    let w = world().await;
    let command = sh(r#"
        trap 'echo "got TERM"; exit 3' TERM
        touch "$OUT/ready"
        while :; do sleep 0.1; done"#);
    let flags = code_flags(&w);
    let child = w
        .command(&args(&strs(&flags), &command), &[])
        .spawn()
        .expect("spawn exec");
    wait_for_file(&w.path("ready")).await;
    let pid = Pid::from_raw(child.id().unwrap() as i32).unwrap();
    kill_process(pid, Signal::TERM).unwrap();
    // The deadline only stops a hung test (exec that never forwarded).
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("exec exits once its child does")
        .unwrap();
    let run = Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert_eq!(run.stdout, "got TERM\n", "forwarded to the child: {run:?}");
    assert_eq!(
        run.code,
        Some(3),
        "exec waits for the child and exits with its status"
    );
    w.one_lease_revoked(&run).await;
    w.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_to_exec_ends_a_child_that_does_not_catch_it_with_130_and_the_lease_is_revoked() {
    let w = world().await;
    let command = sh(r#"touch "$OUT/ready"; exec sleep 600"#);
    let flags = code_flags(&w);
    let mut child = w
        .command(&args(&strs(&flags), &command), &[])
        .spawn()
        .expect("spawn exec");
    wait_for_file(&w.path("ready")).await;
    // `exec sleep` may not have replaced the shell yet: send until the
    // child is gone (the same SIGINT each time).
    let pid = Pid::from_raw(child.id().unwrap() as i32).unwrap();
    let status = poll("exec to exit", Duration::from_secs(30), || {
        let _ = kill_process(pid, Signal::INT);
        let exited = child.try_wait();
        async move {
            match exited {
                Ok(Some(status)) => Ok(status),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    assert_eq!(status.code(), Some(130), "128 + SIGINT, as shells report");
    let run = Run {
        code: status.code(),
        stdout: String::new(),
        stderr: String::new(),
    };
    w.one_lease_revoked(&run).await;
    w.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminals_ctrl_c_reaches_the_command_once_and_exec_waits_for_it() {
    let w = world().await;
    // `script` (util-linux) gives exec and its command a terminal; a ^C
    // typed into it makes the kernel send SIGINT to the terminal's
    // foreground process group: exec and the command. exec must not send
    // the command a second one.
    let command = r#"trap 'echo got-INT; touch "$OUT/interrupted"' INT
        touch "$OUT/ready"
        while [ ! -e "$OUT/go" ]; do sleep 0.1; done
        echo done"#;
    std::fs::write(w.path("child.sh"), command).unwrap();
    // script(1) runs the line with `$SHELL -c`; a shell that waits instead
    // of replacing itself (dash) would be killed by the same ^C, so `exec`
    // and a fixed SHELL keep the terminal's foreground group to exec and
    // its command, whatever shell the machine's user has.
    let line = format!("exec {BIN} exec --organization fabrikam --scope vso.code -- sh child.sh");
    let mut script = w.environment("script", &[("SHELL", "/bin/sh")]);
    script
        .args(["-q", "-f", "-e", "-c", &line, "/dev/null"])
        .stdin(Stdio::piped());
    let mut running = script.spawn().expect("run script(1) (util-linux)");
    wait_for_file(&w.path("ready")).await;
    let mut terminal = running.stdin.take().unwrap();
    terminal.write_all(b"\x03").await.unwrap();
    terminal.flush().await.unwrap();
    wait_for_file(&w.path("interrupted")).await;
    std::fs::write(w.path("go"), "").unwrap();
    let out = tokio::time::timeout(Duration::from_secs(60), running.wait_with_output())
        .await
        .expect("exec exits once its command does")
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert_eq!(shown.matches("got-INT").count(), 1, "{shown}");
    assert!(
        shown.contains("done"),
        "exec kept waiting for the command: {shown}"
    );
    let run = Run {
        code: out.status.code(),
        stdout: String::new(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert_eq!(run.code, Some(0), "the command's status: {run:?}");
    w.one_lease_revoked(&run).await;
    w.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_killed_by_a_signal_gives_128_plus_it_and_the_lease_is_revoked() {
    let w = world().await;
    let command = sh("kill -KILL $$");
    let flags = code_flags(&w);
    let run = w.exec(&args(&strs(&flags), &command), &[]).await;
    assert_eq!(run.code, Some(137), "{run:?}");
    w.one_lease_revoked(&run).await;

    // A command that does not exist: 127 as in shells, and still revoked.
    let missing = ["no-such-command-token-broker-test".to_owned()];
    let run = w.exec(&args(&strs(&flags), &missing), &[]).await;
    assert_eq!(run.code, Some(127), "{run:?}");
    assert!(run.stderr.contains("no-such-command"), "{run:?}");
    let leases = w.leases().await;
    assert_eq!(leases.len(), 2);
    assert!(
        leases
            .iter()
            .all(|l| l.state() == pb::lease::State::Revoked),
        "{leases:?}"
    );
    w.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_lease_exits_with_the_client_codes_and_never_runs_the_command() {
    let w = world().await;
    let touch = ["sh".to_owned(), "-c".into(), "touch \"$OUT/ran\"".into()];
    // Refused by policy: 3.
    let run = w
        .exec(
            &args(
                &["--organization", "fabrikam", "--scope", "vso.build"],
                &touch,
            ),
            &[],
        )
        .await;
    assert_eq!(run.code, Some(3), "{run:?}");
    // A wrong API key: 3.
    let run = w
        .exec(
            &args(FABRIKAM_CODE, &touch),
            &[(
                "TOKEN_BROKER_API_KEY",
                "tbk_wrong_0123456789abcdef0123456789",
            )],
        )
        .await;
    assert_eq!(run.code, Some(3), "{run:?}");
    // No broker there: 5.
    let run = w
        .exec(
            &args(FABRIKAM_CODE, &touch),
            &[("TOKEN_BROKER_ADDR", "http://127.0.0.1:9")],
        )
        .await;
    assert_eq!(run.code, Some(5), "{run:?}");
    // A bad flag: 2.
    let run = w
        .exec(&args(&["--organization", "fabrikam"], &touch), &[])
        .await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(!w.path("ran").exists(), "the command never ran");
    assert!(w.leases().await.is_empty());
    w.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_that_fails_names_the_lease_and_exec_still_exits_with_the_commands_status() {
    let w = world().await;
    let command = sh(r#"
        touch "$OUT/ready"
        while [ ! -e "$OUT/go" ]; do sleep 0.1; done
        exit 4"#);
    let flags = code_flags(&w);
    let child = w
        .command(&args(&strs(&flags), &command), &[])
        .spawn()
        .expect("spawn exec");
    wait_for_file(&w.path("ready")).await;
    let leases = w.leases().await;
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].state(), pb::lease::State::Active);
    // The broker goes away while the command runs.
    let World {
        broker, dir, emu, ..
    } = w;
    broker.stop().await;
    std::fs::write(dir.path().join("go"), "").unwrap();
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("exec exits")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "the command's status: {stderr}");
    assert!(
        stderr.contains("could not revoke") && stderr.contains(&leases[0].name),
        "{stderr}"
    );
    let pats = emu.pats().await;
    assert_eq!(pats[0]["state"], "active", "{pats:?}");
}
