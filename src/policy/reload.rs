//! The policy in force and its live reload: on a change of the file's
//! content (polled) and on SIGHUP. A call takes the `Arc<Policy>` in force
//! when it starts and keeps it to the end, so a reload never fails or
//! changes a call in flight. An invalid new file is refused (logged, and
//! reported to subscribers) and the previous policy stays in force.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, Mutex};
use tokio::task::JoinHandle;

use super::{Policy, PolicyError};

/// How often the watcher reads the policy file to look for a change.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// How many reload outcomes a slow subscriber may fall behind before it
/// sees `RecvError::Lagged` (reloads are rare; this is ample).
const OUTCOME_BUFFER: usize = 64;

/// What started a reload attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReloadTrigger {
    /// The watcher saw the file's content change.
    FileChanged,
    /// The process received SIGHUP (always re-reads the file).
    Signal,
}

impl ReloadTrigger {
    /// `file_changed` or `sighup`, for logs and audit events.
    pub fn as_str(&self) -> &'static str {
        match self {
            ReloadTrigger::FileChanged => "file_changed",
            ReloadTrigger::Signal => "sighup",
        }
    }
}

impl fmt::Display for ReloadTrigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of one reload attempt (the audit trail records each one as
/// a `policy.reload` event).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The new file is in force for every call that starts from now on.
    Applied {
        /// What started the attempt.
        trigger: ReloadTrigger,
        /// The policy file.
        file: PathBuf,
        /// Rules in the new policy.
        rules: usize,
        /// SHA-256 of the file's bytes, lower-case hex: which version is
        /// in force.
        sha256: String,
    },
    /// The new file was refused; the previous policy stays in force.
    Refused {
        /// What started the attempt.
        trigger: ReloadTrigger,
        /// The policy file.
        file: PathBuf,
        /// Why, with the path of each bad field ([`PolicyError`]).
        error: String,
    },
}

impl ReloadOutcome {
    /// True for [`ReloadOutcome::Applied`].
    pub fn is_applied(&self) -> bool {
        matches!(self, ReloadOutcome::Applied { .. })
    }
}

/// The policy in force. Cheap to clone (all clones share it); the lease
/// service reads it through [`PolicyHandle::current`] once per call.
#[derive(Clone)]
pub struct PolicyHandle {
    inner: Arc<Inner>,
}

struct Inner {
    current: RwLock<Arc<Policy>>,
    /// The file it came from; None for a fixed policy (never reloaded).
    file: Option<PathBuf>,
    /// SHA-256 of the last content tried (applied or refused), so a poll
    /// retries only new content and a bad file is reported once. Held
    /// across an attempt: attempts never interleave.
    last_seen: Mutex<Option<[u8; 32]>>,
    outcomes: broadcast::Sender<ReloadOutcome>,
    /// Every trigger the watcher acted on, for what reloads with the
    /// policy (`auth.api_keys_file`).
    triggers: broadcast::Sender<ReloadTrigger>,
}

impl fmt::Debug for PolicyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyHandle")
            .field("file", &self.inner.file)
            .field("rules", &self.current().rules().len())
            .finish()
    }
}

impl From<Policy> for PolicyHandle {
    fn from(policy: Policy) -> Self {
        PolicyHandle::fixed(policy)
    }
}

impl PolicyHandle {
    fn new(policy: Policy, file: Option<PathBuf>, seen: Option<[u8; 32]>) -> Self {
        PolicyHandle {
            inner: Arc::new(Inner {
                current: RwLock::new(Arc::new(policy)),
                file,
                last_seen: Mutex::new(seen),
                outcomes: broadcast::channel(OUTCOME_BUFFER).0,
                triggers: broadcast::channel(OUTCOME_BUFFER).0,
            }),
        }
    }

    /// A policy that never changes (tests, `dev`, no `policy.file`).
    pub fn fixed(policy: Policy) -> Self {
        PolicyHandle::new(policy, None, None)
    }

    /// Loads the policy file at `path`; [`PolicyHandle::reload`] and the
    /// watcher re-read it later.
    ///
    /// Errors: as [`Policy::load`] (at start-up an invalid file is fatal).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, PolicyError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(PolicyError::read(path))?;
        let policy = parse(&bytes)?;
        Ok(PolicyHandle::new(
            policy,
            Some(path.to_owned()),
            Some(Sha256::digest(&bytes).into()),
        ))
    }

    /// The policy in force now. A call keeps the `Arc` it took for its
    /// whole life, so a reload never changes a decision half-way.
    pub fn current(&self) -> Arc<Policy> {
        // A poisoned lock still holds a whole Arc: the swap cannot tear.
        self.inner
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The policy file, if this handle reloads from one.
    pub fn file(&self) -> Option<&Path> {
        self.inner.file.as_deref()
    }

    /// Every reload attempt's outcome from now on (for the audit trail and
    /// tests). A broadcast, not a `watch`: each attempt is reported, not
    /// only the latest.
    pub fn subscribe(&self) -> broadcast::Receiver<ReloadOutcome> {
        self.inner.outcomes.subscribe()
    }

    /// Every trigger the watcher ([`PolicyHandle::spawn_watcher`]) acts on
    /// from now on (each poll tick as [`ReloadTrigger::FileChanged`], each
    /// SIGHUP as [`ReloadTrigger::Signal`]), sent after the policy's own
    /// reload, whether or not the policy has a file: what reloads with the
    /// policy (the API keys file) follows these instead of taking SIGHUP
    /// itself, so one SIGHUP reloads both.
    pub fn triggers(&self) -> broadcast::Receiver<ReloadTrigger> {
        self.inner.triggers.subscribe()
    }

    /// Re-reads the file and puts it in force if valid; logs and reports
    /// the outcome. With [`ReloadTrigger::FileChanged`], does nothing (None)
    /// when the content is the same as at the last attempt; with
    /// [`ReloadTrigger::Signal`] it always tries. None for a fixed policy.
    pub async fn reload(&self, trigger: ReloadTrigger) -> Option<ReloadOutcome> {
        let file = self.inner.file.as_ref()?;
        let mut last_seen = self.inner.last_seen.lock().await;
        let read = tokio::fs::read(file).await;
        // The hash of what was read, or of the read error, so an unreadable
        // file is reported once, not on every poll.
        let seen: [u8; 32] = match &read {
            Ok(bytes) => Sha256::digest(bytes).into(),
            Err(e) => Sha256::digest(format!("unreadable: {e}")).into(),
        };
        if trigger == ReloadTrigger::FileChanged && *last_seen == Some(seen) {
            return None;
        }
        *last_seen = Some(seen);
        let result = read
            .map_err(PolicyError::read(file))
            .and_then(|bytes| parse(&bytes));
        let outcome = match result {
            Ok(policy) => {
                let rules = policy.rules().len();
                *self
                    .inner
                    .current
                    .write()
                    .unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
                let sha256 = hex::encode(seen);
                tracing::info!(file = %file.display(), %trigger, rules, %sha256, "policy reloaded");
                ReloadOutcome::Applied {
                    trigger,
                    file: file.clone(),
                    rules,
                    sha256,
                }
            }
            Err(e) => {
                tracing::error!(
                    file = %file.display(),
                    %trigger,
                    error = %e,
                    "policy reload refused; the previous policy stays in force"
                );
                ReloadOutcome::Refused {
                    trigger,
                    file: file.clone(),
                    error: e.to_string(),
                }
            }
        };
        // No subscriber is fine: the log line above is the record.
        let _ = self.inner.outcomes.send(outcome.clone());
        Some(outcome)
    }

    /// Watches the policy file until `shutdown` resolves: reads it every
    /// `every` and reloads when its content changed, and reloads on SIGHUP;
    /// passes each trigger on to [`PolicyHandle::triggers`]. A fixed policy
    /// (no file) has nothing to reload, but SIGHUP is still taken (and
    /// logged, and passed on), so it never ends the process. Must be called
    /// inside a Tokio runtime.
    pub fn spawn_watcher(
        &self,
        every: Duration,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> JoinHandle<()> {
        let handle = self.clone();
        // Registered before returning, so a SIGHUP sent once the broker is
        // up reloads instead of killing the process (the default action).
        let mut hangup = hangup_signal();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tokio::pin!(shutdown);
            loop {
                let trigger = tokio::select! {
                    () = &mut shutdown => return,
                    _ = tick.tick() => ReloadTrigger::FileChanged,
                    Some(()) = recv_hangup(&mut hangup) => ReloadTrigger::Signal,
                };
                if handle.inner.file.is_some() {
                    handle.reload(trigger).await;
                } else if trigger == ReloadTrigger::Signal {
                    tracing::info!("SIGHUP received; the policy is built in, nothing to reload");
                }
                // Nobody listening is fine.
                let _ = handle.inner.triggers.send(trigger);
            }
        })
    }
}

fn parse(bytes: &[u8]) -> Result<Policy, PolicyError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        PolicyError::Invalid(vec![super::Problem {
            path: "(document)".into(),
            message: format!("not UTF-8: {e}"),
        }])
    })?;
    Policy::from_yaml(text)
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

#[cfg(unix)]
fn hangup_signal() -> Hangup {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; the policy file is still polled");
            None
        }
    }
}

#[cfg(not(unix))]
fn hangup_signal() -> Hangup {
    None
}

/// The next SIGHUP; pending forever without a listener.
async fn recv_hangup(hangup: &mut Hangup) -> Option<()> {
    #[cfg(unix)]
    if let Some(s) = hangup {
        return s.recv().await;
    }
    let _ = hangup;
    std::future::pending().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Identity, Organization, ScopeSet};
    use crate::policy::Decision;

    fn rule(identity: &str) -> String {
        format!(
            "rules:\n  - name: r\n    identities: [\"{identity}\"]\n    organizations: [fabrikam]\n    scopes: [vso.code]\n    default_ttl: 1h\n    max_ttl: 1h\n"
        )
    }

    /// A policy file allowing `identity`, and a handle loaded from it.
    fn handle_on_file(identity: &str) -> (tempfile::TempDir, PathBuf, PolicyHandle) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.yaml");
        std::fs::write(&path, rule(identity)).unwrap();
        let handle = PolicyHandle::from_file(&path).unwrap();
        (dir, path, handle)
    }

    fn allows(policy: &Policy, who: &str) -> bool {
        matches!(
            policy.decide(
                &who.parse::<Identity>().unwrap(),
                &Organization::parse("fabrikam").unwrap(),
                &ScopeSet::parse(["vso.code"]).unwrap(),
                None
            ),
            Decision::Allow { .. }
        )
    }

    #[tokio::test]
    async fn an_edited_file_is_put_in_force_and_a_call_keeps_the_policy_it_took() {
        let (_dir, path, handle) = handle_on_file("apikey:a");
        let mut outcomes = handle.subscribe();
        let in_flight = handle.current();

        assert_eq!(handle.reload(ReloadTrigger::FileChanged).await, None);
        std::fs::write(&path, rule("apikey:b")).unwrap();
        let outcome = handle.reload(ReloadTrigger::FileChanged).await.unwrap();
        assert!(outcome.is_applied(), "{outcome:?}");
        assert_eq!(outcomes.recv().await.unwrap(), outcome);

        assert!(allows(&handle.current(), "apikey:b"));
        assert!(!allows(&handle.current(), "apikey:a"));
        assert!(
            allows(&in_flight, "apikey:a"),
            "the call's policy is unchanged"
        );
        // Clones share the policy in force.
        assert!(allows(&handle.clone().current(), "apikey:b"));
    }

    #[tokio::test]
    async fn an_invalid_edit_is_refused_once_and_the_old_policy_stays() {
        let (_dir, path, handle) = handle_on_file("apikey:a");

        std::fs::write(&path, rule("apikey:a").replace("vso.code", "vso.kode")).unwrap();
        match handle.reload(ReloadTrigger::FileChanged).await.unwrap() {
            ReloadOutcome::Refused { error, trigger, .. } => {
                assert_eq!(trigger, ReloadTrigger::FileChanged);
                assert!(error.contains("rules[0].scopes[0]"), "{error}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(allows(&handle.current(), "apikey:a"));
        // The same bad content is not re-reported by polling; SIGHUP retries.
        assert_eq!(handle.reload(ReloadTrigger::FileChanged).await, None);
        let again = handle.reload(ReloadTrigger::Signal).await.unwrap();
        assert!(!again.is_applied());

        std::fs::remove_file(&path).unwrap();
        let gone = handle.reload(ReloadTrigger::FileChanged).await.unwrap();
        assert!(!gone.is_applied(), "{gone:?}");
        assert!(allows(&handle.current(), "apikey:a"));
    }

    #[tokio::test]
    async fn a_fixed_policy_never_reloads() {
        let handle = PolicyHandle::from(Policy::default());
        assert_eq!(handle.reload(ReloadTrigger::Signal).await, None);
        assert!(handle.file().is_none());
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_sighup_does_not_end_a_broker_whose_policy_has_no_file() {
        let handle = PolicyHandle::from(Policy::default());
        let mut triggers = handle.triggers();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let watcher = handle.spawn_watcher(Duration::from_secs(1), async {
            let _ = stopped.await;
        });
        // Without a handler, SIGHUP's default action would end this whole
        // test process.
        let status = std::process::Command::new("kill")
            .args(["-HUP", &std::process::id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(handle.reload(ReloadTrigger::Signal).await, None);
        // The SIGHUP is passed on to what reloads with the policy.
        tokio::time::timeout(Duration::from_secs(10), async {
            while triggers.recv().await.unwrap() != ReloadTrigger::Signal {}
        })
        .await
        .expect("the SIGHUP is passed on");
        let _ = stop.send(());
        watcher.await.expect("the watcher stops on shutdown");
    }
}
