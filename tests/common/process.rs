//! The real `token-broker serve` binary as a child process: a temporary
//! TOML config written from a [`BrokerSpec`] (store, emulator, keys, API
//! keys, policy file, `admin.listen` and `grpc.listen` on port 0), extra
//! settings as `TOKEN_BROKER_*` variables, stdout and stderr in a log file.
//! Waits until it serves (`/readyz` 200), reads its `/metrics`, stops it
//! with SIGTERM or SIGKILL, and always kills it when dropped (printing the
//! log tail when the test is panicking).

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use tempfile::TempDir;
use token_broker::auth::GeneratedApiKey;

use super::broker::{BrokerSpec, Client, TestBroker};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_token-broker");

/// How long a start may take before the test gives up (a bound against a
/// hung test on a loaded machine, not a speed requirement).
const START_DEADLINE: Duration = Duration::from_secs(90);

/// Lines of log shown when something fails.
const TAIL_LINES: usize = 60;

/// A `token-broker serve` child process. Killed (SIGKILL) when dropped.
pub struct ServeProcess {
    child: Child,
    /// Holds the config, the policy file and the log.
    dir: TempDir,
    log: PathBuf,
    grpc: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    deployment_id: Option<String>,
}

/// `setting` (`leases.reconcile_after`) as its environment variable
/// (`TOKEN_BROKER_LEASES__RECONCILE_AFTER`).
fn env_name(setting: &str) -> String {
    format!(
        "{}{}",
        token_broker::config::ENV_PREFIX,
        setting.replace('.', "__").to_ascii_uppercase()
    )
}

/// A TOML basic string (JSON string escapes are valid TOML ones).
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// The config file `spec` stands for; the policy lives at `policy_file`.
fn config_toml(spec: &BrokerSpec, policy_file: &std::path::Path) -> String {
    assert!(
        spec.tls.is_none() && spec.kubernetes.is_none(),
        "ServeProcess supports API-key callers over plaintext only"
    );
    let mut toml = format!(
        "[grpc]\nlisten = \"127.0.0.1:0\"\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [database]\nurl = {db}\n\n\
         [keys]\nactive = \"test\"\nfingerprint = {fp}\naudit_chain = {chain}\n\n\
         [keys.sealing]\ntest = {seal}\n\n\
         [upstream]\n{refresh}\n\
         [upstream.azure_devops]\nbase_url = {emu}\n\n\
         [upstream.entra]\nauthority = {emu}\nclient_id = \"token-broker-tests\"\n\n\
         [policy]\nfile = {policy}\n\n\
         [leases]\nreaper_interval = {reaper}\nvalid_to_skew = {skew}\n\n\
         [log]\nfilter = \"info\"\njson = false\n",
        db = toml_str(&spec.store_url),
        fp = toml_str(spec.fingerprint_key.expose_secret()),
        chain = toml_str(spec.audit_chain_key.expose_secret()),
        seal = toml_str(spec.sealing_key.expose_secret()),
        // An empty token in the spec: none configured (signed in later).
        refresh = if spec.refresh_token.expose_secret().is_empty() {
            String::new()
        } else {
            format!(
                "refresh_token = {}\n",
                toml_str(spec.refresh_token.expose_secret())
            )
        },
        emu = toml_str(&spec.emulator_url),
        policy = toml_str(&policy_file.display().to_string()),
        reaper = toml_str(&humantime::format_duration(spec.reaper_interval).to_string()),
        skew = toml_str(&humantime::format_duration(spec.valid_to_skew).to_string()),
    );
    for (name, key) in &spec.api_keys {
        let k = GeneratedApiKey::from_key(name, key.clone()).expect("valid key");
        toml.push_str(&format!(
            "\n[[auth.api_keys]]\nname = {}\nsha256 = {}\n",
            toml_str(name),
            toml_str(&k.hash.to_hex())
        ));
    }
    toml
}

/// Writes the config file (and its policy file) `spec` stands for into
/// `dir`, as `serve` reads it; returns the config file's path. For the
/// commands that read the server configuration (`upstream …`).
pub fn write_config(spec: &BrokerSpec, dir: &std::path::Path) -> PathBuf {
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, &spec.policy_yaml).expect("write the policy");
    let config = dir.join("token-broker.toml");
    std::fs::write(&config, config_toml(spec, &policy)).expect("write the config");
    config
}

/// The value after `key` (e.g. `addr=`) in a text log line, up to the next
/// space.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(key)? + key.len();
    line[at..].split_whitespace().next()
}

impl ServeProcess {
    /// Starts `token-broker serve` as `spec` says, with `settings`
    /// (`("leases.reconcile_after", "6s")`, …) passed as environment
    /// variables, and does not wait: see [`ServeProcess::wait_ready`].
    /// Several spawned back to back start at (nearly) the same moment.
    pub fn spawn(spec: &BrokerSpec, settings: &[(&str, &str)]) -> ServeProcess {
        Self::spawn_limited(spec, settings, None, &|toml| toml, &[])
    }

    /// [`ServeProcess::spawn`] with other environment variables too
    /// (`("OTEL_EXPORTER_OTLP_ENDPOINT", "http://…")`, …), set as given.
    pub fn spawn_with_env(
        spec: &BrokerSpec,
        settings: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> ServeProcess {
        Self::spawn_limited(spec, settings, None, &|toml| toml, env)
    }

    /// [`ServeProcess::spawn`] with the config file's text passed through
    /// `edit` first (e.g. another `[keys]` section).
    pub fn spawn_edited(
        spec: &BrokerSpec,
        settings: &[(&str, &str)],
        edit: &dyn Fn(String) -> String,
    ) -> ServeProcess {
        Self::spawn_limited(spec, settings, None, edit, &[])
    }

    /// [`ServeProcess::spawn`] with its open-file limit (soft and hard
    /// RLIMIT_NOFILE) set to `open_files`, through `sh -c 'ulimit -n …'`
    /// (which then execs the broker: the same process id).
    pub fn spawn_with_open_files(
        spec: &BrokerSpec,
        settings: &[(&str, &str)],
        open_files: u64,
    ) -> ServeProcess {
        Self::spawn_limited(spec, settings, Some(open_files), &|toml| toml, &[])
    }

    fn spawn_limited(
        spec: &BrokerSpec,
        settings: &[(&str, &str)],
        open_files: Option<u64>,
        edit: &dyn Fn(String) -> String,
        env: &[(&str, &str)],
    ) -> ServeProcess {
        let dir = tempfile::tempdir().expect("temporary directory");
        let policy = dir.path().join("policy.yaml");
        std::fs::write(&policy, &spec.policy_yaml).expect("write the policy");
        let config = dir.path().join("token-broker.toml");
        std::fs::write(&config, edit(config_toml(spec, &policy))).expect("write the config");
        let log = dir.path().join("serve.log");
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("create the log file");
        let err = out.try_clone().expect("clone the log file handle");

        // `TB_SERVE_BIN` runs another build (a release binary, for the
        // figures in BENCHMARKS.md) under the same harness.
        let bin = std::env::var("TB_SERVE_BIN").unwrap_or_else(|_| BIN.to_owned());
        let mut cmd = match open_files {
            None => Command::new(bin),
            Some(n) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(bin);
                sh
            }
        };
        cmd.current_dir(dir.path());
        // Nothing of the test's own environment configures the child.
        for (k, _) in std::env::vars() {
            if k.starts_with(token_broker::config::ENV_PREFIX)
                || k.starts_with("OTEL_")
                || k == "RUST_LOG"
            {
                cmd.env_remove(k);
            }
        }
        for (setting, value) in settings {
            cmd.env(env_name(setting), value);
        }
        cmd.envs(env.iter().copied());
        let child = cmd
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("start token-broker serve");
        ServeProcess {
            child,
            dir,
            log,
            grpc: None,
            admin: None,
            deployment_id: None,
        }
    }

    /// [`ServeProcess::spawn`], then [`ServeProcess::wait_ready`].
    pub async fn start(spec: &BrokerSpec, settings: &[(&str, &str)]) -> ServeProcess {
        let mut process = ServeProcess::spawn(spec, settings);
        process.wait_ready().await;
        process
    }

    /// Waits until the process logged its gRPC and admin addresses and its
    /// `/readyz` answers 200. Panics with the log tail if it exits first or
    /// does not get there within 90 s.
    pub async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + START_DEADLINE;
        let http = reqwest::Client::new();
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the child") {
                panic!(
                    "token-broker serve exited with {status} before serving:\n{}",
                    self.log_tail()
                );
            }
            if self.grpc.is_none() || self.admin.is_none() {
                self.read_addresses();
            }
            if let Some(admin) = self.admin.filter(|_| self.grpc.is_some()) {
                let ready = http
                    .get(format!("http://{admin}/readyz"))
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200);
                if ready {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "token-broker serve was not ready within {START_DEADLINE:?}:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Picks the addresses (and deployment id) out of the start-up lines.
    fn read_addresses(&mut self) {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        for line in log.lines() {
            if line.contains("token-broker serving gRPC") {
                self.grpc = field(line, "addr=").and_then(|a| a.parse().ok());
                self.deployment_id = field(line, "deployment_id=").map(str::to_owned);
            }
            if line.contains("token-broker serving admin HTTP") {
                self.admin = field(line, "addr=").and_then(|a| a.parse().ok());
            }
        }
    }

    /// The gRPC address; panics before [`ServeProcess::wait_ready`].
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.expect("wait_ready() first")
    }

    /// The deployment id it logged at start.
    pub fn deployment_id(&self) -> &str {
        self.deployment_id.as_deref().expect("wait_ready() first")
    }

    /// A LeaseService client sending `key` as its bearer credential.
    pub async fn client(&self, key: &SecretString) -> Client {
        let channel =
            tonic::transport::Channel::from_shared(format!("http://{}", self.grpc_addr()))
                .unwrap()
                .connect()
                .await
                .expect("connect to the broker process");
        TestBroker::client_on(channel, Some(&format!("Bearer {}", key.expose_secret())))
    }

    /// `GET /metrics` on its admin port: the Prometheus text.
    pub async fn metrics(&self) -> String {
        let admin = self.admin.expect("wait_ready() first");
        let resp = reqwest::get(format!("http://{admin}/metrics"))
            .await
            .unwrap_or_else(|e| panic!("GET /metrics: {e}\n{}", self.log_tail()));
        assert_eq!(resp.status(), 200);
        resp.text().await.expect("metrics text")
    }

    /// `GET /readyz` on its admin port: status and body.
    pub async fn readyz(&self) -> (u16, String) {
        let admin = self.admin.expect("wait_ready() first");
        let resp = reqwest::get(format!("http://{admin}/readyz"))
            .await
            .unwrap_or_else(|e| panic!("GET /readyz: {e}\n{}", self.log_tail()));
        let status = resp.status().as_u16();
        (status, resp.text().await.expect("readyz body"))
    }

    /// The value of the unlabelled sample `name` in its `/metrics`.
    pub async fn metric(&self, name: &str) -> u64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
            .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
    }

    /// Sends SIGTERM (as Kubernetes does) and waits for the exit, at most
    /// 60 s (then it panics; Drop kills it).
    pub async fn sigterm(&mut self) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the child") {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "token-broker serve did not stop on SIGTERM:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGHUP: the broker re-reads its policy file and its
    /// `auth.api_keys_file` (point that at a file of the test's own with
    /// the setting `("auth.api_keys_file", PATH)`, and leave
    /// `BrokerSpec::api_keys` empty).
    pub fn sighup(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -HUP failed");
    }

    /// Waits for the process to exit by itself (e.g. refusing to start),
    /// at most `within` (then it panics with the log tail).
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the child") {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "token-broker serve still running after {within:?}:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: the process dies on the spot, no shutdown code runs.
    pub fn sigkill(&mut self) {
        // `Child::kill` sends SIGKILL on Unix.
        self.child.kill().expect("SIGKILL the broker");
        self.child.wait().expect("reap the broker");
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its config file (for `token-broker upstream … --config`).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("token-broker.toml")
    }

    /// Everything it wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of its stdout and stderr.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(TAIL_LINES);
        format!(
            "--- last {} lines of {} ---\n{}",
            lines.len() - from,
            self.log.display(),
            lines[from..].join("\n")
        )
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "token-broker serve (pid {}):\n{}",
                self.child.id(),
                self.log_tail()
            );
        }
    }
}
