//! Audit events for decisions made outside the lease rules: policy
//! reloads. Appended through the same chained audit trail, best effort
//! with background retries (not a grant). (Refused authentications are
//! audited by the authenticator's `RefusalAudit`, wired in `cli::serve`.)

use tokio::sync::broadcast;

use super::support::{audit_best_effort, now, BACKGROUND_ACTOR};
use super::LeaseDeps;
use crate::audit::{AuditEvent, Outcome};
use crate::policy::ReloadOutcome;

fn event(identity: &str, peer: Option<String>, action: &str, outcome: Outcome) -> AuditEvent {
    AuditEvent {
        id: 0,
        time: now(),
        identity: identity.to_owned(),
        peer,
        action: action.to_owned(),
        outcome,
        reason: None,
        policy_rule: None,
        lease_id: None,
        organization: None,
        scopes: None,
        token_fingerprint: None,
        caller_detail: None,
    }
}

/// The `policy.reload` audit event of one reload attempt: allowed with the
/// trigger, file hash and rule count, or denied (`POLICY_INVALID`) with
/// the field paths of what was wrong.
pub(super) fn policy_reload_event(outcome: &ReloadOutcome) -> AuditEvent {
    match outcome {
        ReloadOutcome::Applied {
            trigger,
            file,
            rules,
            sha256,
        } => {
            let mut e = event(BACKGROUND_ACTOR, None, "policy.reload", Outcome::Allowed);
            e.reason = Some(format!(
                "{trigger}: {} sha256={sha256} rules={rules}",
                file.display()
            ));
            e
        }
        ReloadOutcome::Refused {
            trigger,
            file,
            error,
        } => {
            let mut e = event(BACKGROUND_ACTOR, None, "policy.reload", Outcome::Denied);
            e.reason = Some(format!(
                "POLICY_INVALID ({trigger}: {}): {error}",
                file.display()
            ));
            e
        }
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
