//! `token-broker git-credential` as git runs it: the real `git` binary,
//! configured with the compiled helper, clones, fetches and pushes a
//! repository the emulator serves (`--git-root`) with PATs the real broker
//! leases; one lease serves many commands; a lease revoked at the broker is
//! erased by git and replaced; hosts and organizations it does not serve get
//! nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use secrecy::ExposeSecret as _;
use token_broker::emulator::EmulatorConfig;
use token_broker::proto::v1 as pb;

use common::broker::{spawn_broker, BrokerSpec, TestBroker};
use common::db::sqlite_url;
use common::emulator::Emu;
use common::git::{path, repo_url, GitWorld};

const BIN: &str = env!("CARGO_BIN_EXE_token-broker");

// Tests run git (blocking) on the test's own thread: the emulator and the
// broker serve from the runtime's workers meanwhile.

/// A seeded repository served by an emulator, a broker leasing from it,
/// and git configured with the helper for the emulator's host.
struct World {
    git: GitWorld,
    emu: Emu,
    spec: BrokerSpec,
    broker: TestBroker,
    key_file: PathBuf,
}

async fn world() -> World {
    let git = GitWorld::new();
    git.seed();
    let emu = Emu::start(EmulatorConfig {
        git_root: Some(git.root()),
        ..EmulatorConfig::default()
    })
    .await;
    let spec = BrokerSpec::new(sqlite_url(&git.dir), emu.running.url());
    let broker = spawn_broker(&spec).await;
    let key_file = git.dir.path().join("ci.key");
    std::fs::write(&key_file, spec.key("ci").expose_secret()).unwrap();
    World {
        git,
        emu,
        spec,
        broker,
        key_file,
    }
}

impl World {
    /// `host:port` of the emulator.
    fn host(&self) -> String {
        self.emu.running.addr().to_string()
    }

    /// The helper command for git's configuration, with `extra` options,
    /// as the README writes it: `token-broker git-credential …` (git runs
    /// `git-credential-token-broker git-credential …`), found on git's PATH
    /// (see [`World::git`]).
    fn helper(&self, extra: &str) -> String {
        self.helper_named("token-broker git-credential", extra)
    }

    /// As [`World::helper`], with `name` for `token-broker git-credential`.
    fn helper_named(&self, name: &str, extra: &str) -> String {
        format!(
            "{name} --host {} --addr {} --api-key-file {} {extra}",
            self.host(),
            self.broker.url,
            path(&self.key_file)
        )
    }

    /// Configures (globally, in the world's HOME) the helper for the
    /// emulator's URL, with `credential.useHttpPath`.
    fn configure(&self, extra: &str) {
        self.configure_helper(&self.helper(extra));
    }

    /// As [`World::configure`], with `helper` as git's helper value.
    fn configure_helper(&self, helper: &str) {
        let base = self.emu.running.url();
        let home = self.git.dir.path().join("home");
        let key = format!("credential.{base}.helper");
        for args in [
            vec!["config", "--global", "--replace-all", &key, ""],
            vec!["config", "--global", "--add", &key, helper],
            vec!["config", "--global", "credential.useHttpPath", "true"],
        ] {
            self.git.ok(&self.git.git(&home, &args));
        }
    }

    /// Runs git with the compiled binaries' directory first on its PATH.
    fn git(&self, cwd: &Path, args: &[&str]) -> Output {
        self.git.git_env(cwd, args, &[("PATH", &git_path())])
    }

    /// Clones the repository into `work/NAME` and returns its path.
    fn clone(&self, name: &str) -> PathBuf {
        let dest = self.git.work().join(name);
        let out = self.git(
            &self.git.work(),
            &["clone", &repo_url(&self.emu.running.url()), path(&dest)],
        );
        self.git.ok(&out);
        dest
    }

    /// Every lease of `apikey:ci`, newest first.
    async fn leases(&self) -> Vec<pb::Lease> {
        let mut client = self.broker.client(&self.spec.key("ci")).await;
        client
            .list_leases(pb::ListLeasesRequest {
                page_size: 100,
                page_token: String::new(),
                filter: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .leases
    }

    /// Runs the helper itself with `action` and `input` on stdin (the
    /// broker's address unless `extra` has an `--addr`).
    fn helper_run(&self, action: &str, input: &str, extra: &[&str]) -> Output {
        let runtime = self.git.runtime_dir();
        self.helper_run_in(
            action,
            input,
            extra,
            &[("XDG_RUNTIME_DIR", runtime.as_path())],
        )
    }

    /// As [`World::helper_run`], with `env` instead of the test's
    /// `XDG_RUNTIME_DIR`.
    fn helper_run_in(
        &self,
        action: &str,
        input: &str,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> Output {
        use std::io::Write as _;
        let mut command = std::process::Command::new(BIN);
        for (name, _) in std::env::vars() {
            if name.starts_with("TOKEN_BROKER_") {
                command.env_remove(name);
            }
        }
        let mut child = command
            .args(["git-credential", "--host", &self.host()])
            .args(if extra.contains(&"--addr") {
                vec![]
            } else {
                vec!["--addr", self.broker.url.as_str()]
            })
            .args(["--api-key-file", path(&self.key_file)])
            .args(extra)
            .arg(action)
            .env_remove("XDG_RUNTIME_DIR")
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }
}

/// `PATH` with the compiled binaries' directory first.
fn git_path() -> String {
    let bin_dir = Path::new(BIN).parent().unwrap();
    let mut dirs = vec![bin_dir.to_path_buf()];
    dirs.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    let search = std::env::join_paths(dirs).unwrap();
    search.to_str().unwrap().to_owned()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn state(lease: &pb::Lease) -> pb::lease::State {
    lease.state()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_clones_and_fetches_twenty_times_on_one_lease() {
    let w = world().await;
    // A helper for every host, configured before ours: the README's
    // configuration drops it for this host, so it never stores the PAT.
    let home = w.git.dir.path().join("home");
    w.git
        .ok(&w.git(&home, &["config", "--global", "credential.helper", "store"]));
    w.configure("");
    let clone = w.clone("clone");
    assert_eq!(
        std::fs::read_to_string(clone.join("README")).unwrap(),
        "hello\n"
    );
    for _ in 0..20 {
        w.git.ok(&w.git(&clone, &["fetch", "origin"]));
    }
    let leases = w.leases().await;
    assert_eq!(leases.len(), 1, "one lease for a clone and twenty fetches");
    assert_eq!(leases[0].organization, "fabrikam");
    assert_eq!(leases[0].scopes, ["vso.code"]);
    assert_eq!(state(&leases[0]), pb::lease::State::Active);
    // Kept sealed in a private file: the token is not in it.
    let dir = w.git.runtime_dir().join("token-broker");
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let entry = entry.unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(entry.metadata().unwrap().permissions().mode() & 0o077, 0);
        let content = std::fs::read(entry.path()).unwrap();
        assert!(!content.is_empty() || entry.path().extension().unwrap() == "lock");
        files += 1;
    }
    assert!(files >= 1);
    assert!(
        !home.join(".git-credentials").exists(),
        "git's store helper kept the PAT"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_way_of_naming_the_helper_works() {
    let w = world().await;
    // Without `!` git runs `git-credential-token-broker` with the rest of
    // the value; with it, the command as written.
    for (n, name) in [
        "token-broker git-credential",
        "token-broker",
        "!token-broker git-credential",
    ]
    .into_iter()
    .enumerate()
    {
        w.configure_helper(&w.helper_named(name, ""));
        // A cache of its own, so this helper leases rather than reusing.
        let runtime = w.git.dir.path().join(format!("runtime-{n}"));
        std::fs::create_dir(&runtime).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
        let dest = w.git.work().join(format!("clone-{n}"));
        let out = w.git.git_env(
            &w.git.work(),
            &["clone", &repo_url(&w.emu.running.url()), path(&dest)],
            &[("PATH", &git_path()), ("XDG_RUNTIME_DIR", path(&runtime))],
        );
        w.git.ok(&out);
        assert_eq!(w.leases().await.len(), n + 1, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_needs_a_write_scoped_configuration() {
    let w = world().await;
    let bare = w.git.root().join("fabrikam/Fiber/app.git");
    w.configure("");
    let clone = w.clone("clone");
    std::fs::write(clone.join("NEW"), "pushed\n").unwrap();
    w.git.ok(&w.git(&clone, &["add", "NEW"]));
    w.git.ok(&w.git(&clone, &["commit", "-m", "second"]));
    let before = w.git.rev(&bare, "main");

    // Read-only (the default vso.code): refused, nothing changes.
    let out = w.git(&clone, &["push", "origin", "main"]);
    assert!(!out.status.success(), "a vso.code push succeeded");
    assert_eq!(w.git.rev(&bare, "main"), before);

    w.configure("--scope vso.code_write --ttl 30m");
    let out = w.git(&clone, &["push", "origin", "main"]);
    w.git.ok(&out);
    assert_eq!(w.git.rev(&bare, "main"), w.git.rev(&clone, "HEAD"));
    let write: Vec<_> = w
        .leases()
        .await
        .into_iter()
        .filter(|l| l.scopes == ["vso.code_write"])
        .collect();
    assert_eq!(write.len(), 1);
    let lifetime = write[0].expire_time.unwrap().seconds - write[0].create_time.unwrap().seconds;
    assert!((1790..=1810).contains(&lifetime), "{lifetime}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_revoked_at_the_broker_is_erased_by_git_and_replaced() {
    let w = world().await;
    w.configure("");
    let clone = w.clone("clone");
    let first = w.leases().await.remove(0);
    let mut client = w.broker.client(&w.spec.key("ci")).await;
    client
        .revoke_lease(pb::RevokeLeaseRequest {
            name: first.name.clone(),
        })
        .await
        .unwrap();

    // The cached PAT is refused: 401, git says so and erases it.
    let out = w.git(&clone, &["fetch", "origin"]);
    assert!(
        !out.status.success(),
        "a fetch with a revoked PAT succeeded"
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("Authentication failed") || stderr.contains("401"),
        "{stderr}"
    );
    // Forgotten: the next fetch leases anew and succeeds.
    w.git.ok(&w.git(&clone, &["fetch", "origin"]));
    let leases = w.leases().await;
    assert_eq!(leases.len(), 2);
    assert_eq!(state(&leases[0]), pb::lease::State::Active);
    assert_ne!(leases[0].name, first.name);
    assert_eq!(state(&leases[1]), pb::lease::State::Revoked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erase_revokes_the_cached_lease_only_for_its_own_token() {
    let w = world().await;
    let ask =
        "protocol=http\nhost={HOST}\npath=fabrikam/Fiber/_git/app\n\n".replace("{HOST}", &w.host());
    let out = w.helper_run("get", &ask, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let answer = text(&out.stdout);
    let password = answer
        .lines()
        .find_map(|l| l.strip_prefix("password="))
        .expect("a password")
        .to_owned();
    assert!(answer.contains("username=token-broker\n"), "{answer}");
    let expiry: i64 = answer
        .lines()
        .find_map(|l| l.strip_prefix("password_expiry_utc="))
        .expect("an expiry")
        .parse()
        .unwrap();
    let lease = w.leases().await.remove(0);
    assert_eq!(expiry, lease.expire_time.unwrap().seconds);

    // Another password: nothing happens; the same lease is served again.
    let out = w.helper_run("erase", &format!("{ask}password=something-else\n"), &[]);
    assert!(out.status.success());
    let again = w.helper_run("get", &ask, &[]);
    assert_eq!(text(&again.stdout), answer);
    assert_eq!(state(&w.leases().await[0]), pb::lease::State::Active);

    // Its token: revoked at the broker and forgotten.
    let erase = ask.replace("\n\n", &format!("\npassword={password}\n\n"));
    let out = w.helper_run("erase", &erase, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains(&password));
    assert_eq!(state(&w.leases().await[0]), pb::lease::State::Revoked);
    let fresh = w.helper_run("get", &ask, &[]);
    assert!(!text(&fresh.stdout).contains(&password));
    assert_eq!(w.leases().await.len(), 2);

    // `store` accepts and does nothing.
    let out = w.helper_run("store", &format!("{ask}password=x\n"), &[]);
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_organizations_and_brokers_it_cannot_serve_get_nothing() {
    let w = world().await;
    let host = w.host();
    // Fill the cache for fabrikam first.
    let ours = format!("protocol=http\nhost={host}\npath=fabrikam/Fiber/_git/app\n");
    let out = w.helper_run("get", &ours, &[]);
    assert!(out.status.success());
    let token = text(&out.stdout);
    let token = token
        .lines()
        .find_map(|l| l.strip_prefix("password="))
        .unwrap()
        .to_owned();

    for (what, input) in [
        (
            "an unrelated host",
            "protocol=https\nhost=github.com\npath=fabrikam/x.git\n".to_owned(),
        ),
        (
            "https on another port",
            "protocol=https\nhost=127.0.0.1:1\npath=fabrikam/x\n".to_owned(),
        ),
        (
            "no path (useHttpPath off)",
            format!("protocol=http\nhost={host}\n"),
        ),
        ("no input at all", String::new()),
    ] {
        let out = w.helper_run("get", &input, &[]);
        assert!(out.status.success(), "{what}: {}", text(&out.stderr));
        assert!(
            out.stdout.is_empty(),
            "{what}: answered {}",
            text(&out.stdout)
        );
        assert!(out.stderr.is_empty(), "{what}: {}", text(&out.stderr));
    }

    // Another organization: never fabrikam's lease; the policy refuses
    // contoso, so nothing is answered (exit 3, the refusal on stderr).
    let out = w.helper_run(
        "get",
        &format!("protocol=http\nhost={host}\npath=contoso/Fiber/_git/app\n"),
        &[],
    );
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("token-broker git-credential: "), "{stderr}");
    assert!(stderr.contains("PermissionDenied"), "{stderr}");
    assert!(!stderr.contains(&token));

    // No broker there: silently passed on to the next helper.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let out = w.helper_run(
        "get",
        &ours,
        &["--addr", &nowhere, "--scope", "vso.packaging"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty());
    assert_eq!(w.leases().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_gets_wait_for_one_lease() {
    let w = world().await;
    let ask = format!(
        "protocol=http\nhost={}\npath=fabrikam/Fiber/_git/app\n\n",
        w.host()
    );
    let answers: Vec<String> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..8)
            .map(|_| s.spawn(|| w.helper_run("get", &ask, &[])))
            .collect();
        runs.into_iter()
            .map(|r| {
                let out = r.join().unwrap();
                assert!(out.status.success(), "{}", text(&out.stderr));
                text(&out.stdout)
            })
            .collect()
    });
    assert!(answers[0].contains("password="));
    assert!(answers.iter().all(|a| *a == answers[0]));
    assert_eq!(w.leases().await.len(), 1);
}

/// A TCP relay to `target`; once `hang` is set, connections it accepts
/// are held open and never answered: a broker that hangs.
async fn relay(
    target: String,
    hang: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut inbound, _)) = listener.accept().await {
            if hang.load(std::sync::atomic::Ordering::SeqCst) {
                held.push(inbound);
                continue;
            }
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erase_gives_up_on_a_hung_broker_and_the_lease_stays_forgotten() {
    let w = world().await;
    let hang = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let target = w.broker.url.trim_start_matches("http://").to_owned();
    let via = format!("http://{}", relay(target, hang.clone()).await);
    let ask = format!(
        "protocol=http\nhost={}\npath=fabrikam/Fiber/_git/app\n\n",
        w.host()
    );
    let password = |out: &Output| {
        text(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("password="))
            .map(str::to_owned)
    };
    let out = w.helper_run("get", &ask, &["--addr", &via]);
    let first = password(&out).unwrap_or_else(|| panic!("{}", text(&out.stderr)));

    // The broker hangs: erase gives up (retry later, 5), without the token.
    hang.store(true, std::sync::atomic::Ordering::SeqCst);
    let erase = ask.replace("\n\n", &format!("\npassword={first}\n\n"));
    let out = w.helper_run("erase", &erase, &["--addr", &via]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains(&first));

    // Forgotten all the same: the next get leases anew.
    hang.store(false, std::sync::atomic::Ordering::SeqCst);
    let out = w.helper_run("get", &ask, &["--addr", &via]);
    let second = password(&out).unwrap_or_else(|| panic!("{}", text(&out.stderr)));
    assert_ne!(first, second);
    assert_eq!(w.leases().await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_xdg_runtime_dir_falls_back_to_a_private_tmpdir_and_still_reuses_the_lease() {
    let w = world().await;
    let ask = format!(
        "protocol=http\nhost={}\npath=fabrikam/Fiber/_git/app\n\n",
        w.host()
    );
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-runtime-dir");
    let env = [
        ("XDG_RUNTIME_DIR", missing.as_path()),
        ("TMPDIR", tmp.path()),
    ];
    let answers: Vec<String> = (0..3)
        .map(|_| {
            let out = w.helper_run_in("get", &ask, &[], &env);
            assert!(out.status.success(), "{}", text(&out.stderr));
            text(&out.stdout)
        })
        .collect();
    assert!(answers[0].contains("password="));
    assert!(answers.iter().all(|a| *a == answers[0]));
    assert_eq!(w.leases().await.len(), 1);
    let entries: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        entries.iter().any(|n| n.starts_with("token-broker-")),
        "{entries:?}"
    );
}

#[test]
fn a_host_git_never_sends_is_a_usage_error_not_a_silent_helper() {
    use std::io::Write as _;
    // A URL or a path in --host never matches git's `host=`: the helper
    // would answer nothing on every call, and git would just prompt.
    for bad in ["https://dev.azure.com", "dev.azure.com/fabrikam", "", "*."] {
        let mut child = std::process::Command::new(BIN)
            .args([
                "git-credential",
                "--host",
                bad,
                "--addr",
                "127.0.0.1:1",
                "get",
            ])
            .env("TOKEN_BROKER_API_KEY", "tbk_unused")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The helper may exit before reading: a closed pipe is fine.
        let _ = child
            .stdin
            .take()
            .unwrap()
            .write_all(b"protocol=https\nhost=dev.azure.com\npath=fabrikam/x\n\n");
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", text(&out.stderr));
        assert!(out.stdout.is_empty(), "{bad:?}");
        assert!(
            text(&out.stderr).contains("--host"),
            "{bad:?}: {}",
            text(&out.stderr)
        );
    }
}
