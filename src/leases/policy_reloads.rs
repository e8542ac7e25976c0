//! The audit trail of policy reloads: every reload attempt, applied or
//! refused, is one `policy.reload` row, appended best effort with
//! background retries (not a grant).

use tokio::sync::broadcast;

use super::auditing::{audit_best_effort, Actor};
use super::time::now;
use super::LeaseDeps;
use crate::audit::{AuditEvent, Outcome};
use crate::policy::ReloadOutcome;

/// The `policy.reload` audit event of one reload attempt: allowed with the
/// trigger, file hash and rule count, or denied (`POLICY_INVALID`) with
/// the field paths of what was wrong.
pub(super) fn policy_reload_event(outcome: &ReloadOutcome) -> AuditEvent {
    let (outcome, reason) = match outcome {
        ReloadOutcome::Applied {
            trigger,
            file,
            rules,
            sha256,
        } => (
            Outcome::Allowed,
            format!(
                "{trigger}: {} sha256={sha256} rules={rules}",
                file.display()
            ),
        ),
        ReloadOutcome::Refused {
            trigger,
            file,
            error,
        } => (
            Outcome::Denied,
            format!("POLICY_INVALID ({trigger}: {}): {error}", file.display()),
        ),
    };
    AuditEvent {
        reason: Some(reason),
        ..Actor::background().event(crate::audit::POLICY_RELOAD, outcome, now())
    }
}

/// See [`super::Leases::audit_policy_reloads`].
pub(super) async fn audit_policy_reloads(
    deps: &LeaseDeps,
    mut outcomes: broadcast::Receiver<ReloadOutcome>,
) {
    loop {
        match outcomes.recv().await {
            Ok(outcome) => audit_best_effort(deps, policy_reload_event(&outcome)).await,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::error!(missed, "policy reload outcomes not audited: fell behind");
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::super::auditing::BACKGROUND_ACTOR;
    use super::*;
    use crate::policy::ReloadTrigger;

    #[test]
    fn a_refused_policy_reload_is_a_denied_event_naming_the_bad_field() {
        let e = policy_reload_event(&ReloadOutcome::Refused {
            trigger: ReloadTrigger::Signal,
            file: PathBuf::from("/etc/tb/policy.yaml"),
            error: "rules[0].scopes[0]: unknown scope \"vso.kode\"".into(),
        });
        assert_eq!(
            (e.action.as_str(), e.outcome),
            ("policy.reload", Outcome::Denied)
        );
        let reason = e.reason.unwrap();
        assert!(reason.starts_with("POLICY_INVALID (sighup: /etc/tb/policy.yaml)"));
        assert!(reason.contains("rules[0].scopes[0]"));
        let e = policy_reload_event(&ReloadOutcome::Applied {
            trigger: ReloadTrigger::FileChanged,
            file: PathBuf::from("p.yaml"),
            rules: 3,
            sha256: "ab".repeat(32),
        });
        assert_eq!(e.outcome, Outcome::Allowed);
        assert_eq!(e.identity, BACKGROUND_ACTOR);
    }
}
