//! Policy test set-up: a policy file on disk that a test edits while a
//! broker watches it, and the wait for the broker's reload outcome.

use std::path::PathBuf;
use std::time::Duration;

use tempfile::TempDir;
use token_broker::policy::{PolicyHandle, ReloadOutcome};
use token_broker::proto::v1 as pb;
use tokio::sync::broadcast;

/// Longest wait for a reload outcome before the test fails (the watcher
/// reads the file every `DEFAULT_POLL_INTERVAL`); a bound, not a speed claim.
const RELOAD_BOUND: Duration = Duration::from_secs(60);

/// A policy YAML file in its own temporary directory.
pub struct PolicyFile {
    /// The directory; removed on drop.
    pub dir: TempDir,
    /// `DIR/policy.yaml`.
    pub path: PathBuf,
}

impl PolicyFile {
    /// Writes `yaml` to a fresh `policy.yaml`.
    pub fn new(yaml: &str) -> PolicyFile {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("policy.yaml");
        std::fs::write(&path, yaml).expect("write policy");
        PolicyFile { dir, path }
    }

    /// Replaces the file's content atomically (a temporary file renamed
    /// over it, as editors and Kubernetes ConfigMap updates do).
    pub fn edit(&self, yaml: &str) {
        let tmp = self.dir.path().join(".policy.yaml.tmp");
        std::fs::write(&tmp, yaml).expect("write policy");
        std::fs::rename(&tmp, &self.path).expect("rename policy");
    }

    /// A handle loading this file (the broker given it watches it).
    pub fn handle(&self) -> PolicyHandle {
        PolicyHandle::from_file(&self.path).expect("test policy is valid")
    }
}

/// The next reload outcome on `outcomes`; fails the test after a long bound.
pub async fn next_reload(outcomes: &mut broadcast::Receiver<ReloadOutcome>) -> ReloadOutcome {
    tokio::time::timeout(RELOAD_BOUND, outcomes.recv())
        .await
        .expect("the broker reloads the edited policy file")
        .expect("reload outcome")
}

/// A CreateLease request (no TTL: the rule's default).
pub fn create_request(
    organization: &str,
    scopes: &[&str],
    request_id: &str,
) -> pb::CreateLeaseRequest {
    pb::CreateLeaseRequest {
        organization: organization.into(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        ttl: None,
        request_id: request_id.into(),
    }
}
