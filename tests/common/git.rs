//! The real `git` binary in an isolated environment: its own HOME and XDG
//! directories, no system or user configuration, never a prompt; and a
//! `--git-root` holding one bare repository with one commit.

use std::path::{Path, PathBuf};
use std::process::Output;

/// The organization, project and repository of [`GitWorld::seed`].
pub const ORG: &str = "fabrikam";
/// See [`ORG`].
pub const PROJECT: &str = "Fiber";
/// See [`ORG`].
pub const REPO: &str = "app";

/// A temporary HOME for git and a git root for the emulator.
pub struct GitWorld {
    /// Removed when dropped.
    pub dir: tempfile::TempDir,
}

impl GitWorld {
    /// An empty world: `home/`, `runtime/` (0700) and `root/`.
    pub fn new() -> GitWorld {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["home", "root", "work", "runtime"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(
                dir.path().join("runtime"),
                std::fs::Permissions::from_mode(0o700),
            )
            .unwrap();
        }
        GitWorld { dir }
    }

    /// The emulator's `--git-root`.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// `$XDG_RUNTIME_DIR` of the git processes.
    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.path().join("runtime")
    }

    /// A scratch directory for clones.
    pub fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// Creates the bare repository `root/ORG/PROJECT/REPO.git` with one
    /// commit on `main` holding `README` = "hello\n".
    pub fn seed(&self) -> PathBuf {
        let bare = self
            .root()
            .join(ORG)
            .join(PROJECT)
            .join(format!("{REPO}.git"));
        std::fs::create_dir_all(&bare).unwrap();
        self.ok(&self.git(&self.root(), &["init", "--bare", "-b", "main", path(&bare)]));
        let seed = self.dir.path().join("seed");
        std::fs::create_dir_all(&seed).unwrap();
        self.ok(&self.git(&seed, &["init", "-b", "main"]));
        std::fs::write(seed.join("README"), "hello\n").unwrap();
        self.ok(&self.git(&seed, &["add", "README"]));
        self.ok(&self.git(&seed, &["commit", "-m", "first"]));
        self.ok(&self.git(&seed, &["push", path(&bare), "main"]));
        bare
    }

    /// Runs `git args` in `cwd` with this world's environment and `env`.
    pub fn git_env(&self, cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut command = std::process::Command::new("git");
        for (name, _) in std::env::vars() {
            if name.starts_with("GIT_") || name.starts_with("TOKEN_BROKER_") {
                command.env_remove(name);
            }
        }
        command
            .current_dir(cwd)
            .args(args)
            .env("HOME", self.dir.path().join("home"))
            .env("XDG_CONFIG_HOME", self.dir.path().join("home/.config"))
            .env("XDG_RUNTIME_DIR", self.runtime_dir())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_AUTHOR_NAME", "Test")
            .env("GIT_AUTHOR_EMAIL", "test@example.com")
            .env("GIT_COMMITTER_NAME", "Test")
            .env("GIT_COMMITTER_EMAIL", "test@example.com")
            .env_remove("SSH_ASKPASS")
            .env_remove("GIT_ASKPASS")
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run git")
    }

    /// [`GitWorld::git_env`] without extra variables.
    pub fn git(&self, cwd: &Path, args: &[&str]) -> Output {
        self.git_env(cwd, args, &[])
    }

    /// Panics with git's stderr unless `out` succeeded.
    pub fn ok(&self, out: &Output) {
        assert!(
            out.status.success(),
            "git failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The commit `rev` names in the bare repository.
    pub fn rev(&self, bare: &Path, rev: &str) -> String {
        let out = self.git(bare, &["rev-parse", rev]);
        self.ok(&out);
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }
}

/// `p` as UTF-8.
pub fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// The repository's URL on an emulator at `base` (`http://127.0.0.1:PORT`).
pub fn repo_url(base: &str) -> String {
    format!("{base}/{ORG}/{PROJECT}/_git/{REPO}")
}
