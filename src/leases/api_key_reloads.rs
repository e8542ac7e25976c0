//! The audit trail of API keys file reloads (`auth.api_keys_file`): every
//! reload attempt, applied or refused, is one `auth.api_keys_reload` row,
//! appended best effort with background retries (not a grant), like a
//! policy reload.

use tokio::sync::broadcast;

use super::auditing::{audit_best_effort, Actor};
use super::time::now;
use super::LeaseDeps;
use crate::audit::{AuditEvent, Outcome};
use crate::auth::ApiKeysReloadOutcome;

/// The `auth.api_keys_reload` audit event of one reload attempt: allowed
/// with the trigger, file hash and key count (`caller_detail` `keys=N`),
/// or denied (`API_KEYS_INVALID`) with the file and entry at fault. Never
/// a key or a key's hash.
pub(super) fn api_keys_reload_event(outcome: &ApiKeysReloadOutcome) -> AuditEvent {
    let (outcome, reason, detail) = match outcome {
        ApiKeysReloadOutcome::Applied {
            trigger,
            file,
            keys,
            sha256,
        } => (
            Outcome::Allowed,
            format!("{trigger}: {} sha256={sha256} keys={keys}", file.display()),
            Some(format!("keys={keys}")),
        ),
        ApiKeysReloadOutcome::Refused {
            trigger,
            file,
            error,
        } => (
            Outcome::Denied,
            format!("API_KEYS_INVALID ({trigger}: {}): {error}", file.display()),
            None,
        ),
    };
    AuditEvent {
        reason: Some(reason),
        caller_detail: detail,
        ..Actor::background().event(crate::audit::API_KEYS_RELOAD, outcome, now())
    }
}

/// See [`super::Leases::audit_api_key_reloads`].
pub(super) async fn audit_api_key_reloads(
    deps: &LeaseDeps,
    mut outcomes: broadcast::Receiver<ApiKeysReloadOutcome>,
) {
    loop {
        match outcomes.recv().await {
            Ok(outcome) => audit_best_effort(deps, api_keys_reload_event(&outcome)).await,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::error!(missed, "API keys reload outcomes not audited: fell behind");
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
    fn api_keys_reloads_are_allowed_with_the_count_or_denied_naming_file_and_entry() {
        let e = api_keys_reload_event(&ApiKeysReloadOutcome::Refused {
            trigger: ReloadTrigger::Signal,
            file: PathBuf::from("/etc/tb/keys.toml"),
            error: "/etc/tb/keys.toml: api_keys[1] (\"b\").sha256: expected 64 hexadecimal digits"
                .into(),
        });
        assert_eq!(
            (e.action.as_str(), e.outcome, e.identity.as_str()),
            ("auth.api_keys_reload", Outcome::Denied, BACKGROUND_ACTOR)
        );
        let reason = e.reason.unwrap();
        assert!(reason.starts_with("API_KEYS_INVALID (sighup: /etc/tb/keys.toml)"));
        assert!(reason.contains("api_keys[1]"), "{reason}");
        let e = api_keys_reload_event(&ApiKeysReloadOutcome::Applied {
            trigger: ReloadTrigger::FileChanged,
            file: PathBuf::from("keys.yaml"),
            keys: 3,
            sha256: "ab".repeat(32),
        });
        assert_eq!(e.outcome, Outcome::Allowed);
        assert_eq!(e.identity, BACKGROUND_ACTOR);
        assert_eq!(e.caller_detail.as_deref(), Some("keys=3"));
        assert!(e
            .reason
            .unwrap()
            .starts_with("file_changed: keys.yaml sha256="));
    }
}
