//! A throwaway PostgreSQL cluster a test owns, so it can stop and start it
//! under a running broker: `initdb -A trust` into a temporary directory,
//! served on a free port of 127.0.0.1 (socket directory inside it too).
//! Binaries come from `/usr/lib/postgresql/<newest>/bin`; missing binaries
//! fail the test saying so. PostgreSQL refuses to run as root, so as root
//! every command runs through `runuser -u postgres` (or `tbci`, made if
//! need be), as `.ci/run` does. Dropping the cluster stops it and removes
//! the directory.

use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::process::{Command, Output};

use tempfile::TempDir;

/// A running (or stopped) cluster of the test's own.
pub struct PgCluster {
    bin: PathBuf,
    dir: TempDir,
    port: u16,
    /// Who runs the server when the test runs as root.
    run_as: Option<String>,
}

impl PgCluster {
    /// Makes and starts a fresh cluster. Panics with what went wrong (no
    /// binaries, initdb or start failure with the server log).
    pub async fn start() -> PgCluster {
        tokio::task::spawn_blocking(PgCluster::start_blocking)
            .await
            .expect("cluster start does not panic")
    }

    fn start_blocking() -> PgCluster {
        let bin = server_bin_dir();
        let run_as = is_root().then(unprivileged_user);
        let dir = tempfile::Builder::new()
            .prefix("token-broker-pg-")
            .tempdir()
            .expect("temporary directory");
        if let Some(user) = &run_as {
            run(Command::new("chown").arg(user).arg(dir.path()), "chown");
        }
        let mut cluster = PgCluster {
            bin,
            dir,
            port: 0,
            run_as,
        };
        let initdb = cluster
            .command("initdb")
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-locale",
                "-E",
                "UTF8",
                "-D",
            ])
            .arg(cluster.data_dir())
            .output()
            .expect("run initdb");
        assert!(
            initdb.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&initdb.stderr)
        );
        // A free port can be taken between the probe and the start: try a few.
        for _ in 0..5 {
            cluster.port = free_port();
            if cluster.pg_ctl_start().status.success() {
                return cluster;
            }
        }
        panic!("PostgreSQL did not start; log:\n{}", cluster.server_log());
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres` (trust: no password).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server (`pg_ctl stop -m fast`: sessions are ended, the
    /// server shuts down cleanly) and waits until it is down. Needs a
    /// multi-threaded runtime (the command blocks its thread only).
    pub async fn stop(&self) {
        let out =
            tokio::task::block_in_place(|| self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "60"]));
        assert!(
            out.status.success(),
            "pg_ctl stop failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.server_log()
        );
    }

    /// Starts the stopped server again on the same port and waits until
    /// it accepts connections.
    pub async fn start_again(&self) {
        let out = tokio::task::block_in_place(|| self.pg_ctl_start());
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.server_log()
        );
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn server_log(&self) -> String {
        std::fs::read_to_string(self.log_file()).unwrap_or_default()
    }

    fn pg_ctl_start(&self) -> Output {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {}",
            self.port,
            self.dir.path().display()
        );
        let log = self.log_file();
        self.pg_ctl(&[
            "start",
            "-w",
            "-t",
            "60",
            "-l",
            log.to_str().expect("UTF-8 path"),
            "-o",
            &options,
        ])
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        self.command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(args)
            .output()
            .expect("run pg_ctl")
    }

    /// `program` from the server's bin directory, as the unprivileged
    /// user when running as root.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.port != 0 {
            let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "30"]);
        }
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding `initdb`.
fn server_bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "this test starts its own PostgreSQL cluster, but no server binaries were found \
             under /usr/lib/postgresql/*/bin: install PostgreSQL (apt-get install postgresql)"
        ),
    }
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// `postgres` if that user exists, else `tbci` (created if missing).
fn unprivileged_user() -> String {
    let exists = |user: &str| {
        Command::new("id")
            .arg(user)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    for user in ["postgres", "tbci"] {
        if exists(user) {
            return user.to_owned();
        }
    }
    run(
        Command::new("useradd").args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "tbci",
        ]),
        "useradd tbci",
    );
    "tbci".to_owned()
}

fn run(command: &mut Command, what: &str) {
    let out = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}
