//! Refused authentications in the chained audit trail.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;

use super::{AuditEvent, AuditLog, Outcome, AUTHENTICATE};
use crate::auth::{Refusal, RefusalAudit};
use crate::error::{ErrorCode, ServiceError as _};

/// Records refused authentications as audit events: identity `-`, action
/// `authenticate`, outcome `denied` (UNAVAILABLE ones: `error`), the
/// refusal's reason, appended to the chained audit trail. Best effort, like
/// other denials.
pub struct ChainedRefusalAudit(pub Arc<AuditLog>);

#[async_trait]
impl RefusalAudit for ChainedRefusalAudit {
    async fn refused(&self, refusal: Refusal) {
        let outcome = match refusal.error.code() {
            ErrorCode::Unauthenticated => Outcome::Denied,
            _ => Outcome::Error,
        };
        let event = AuditEvent {
            id: 0,
            time: Utc::now(),
            identity: "-".to_owned(),
            peer: refusal.peer,
            action: AUTHENTICATE.to_owned(),
            outcome,
            reason: Some(refusal.error.reason().to_owned()),
            policy_rule: None,
            lease_id: None,
            organization: None,
            scopes: None,
            token_fingerprint: None,
            caller_detail: None,
        };
        if let Err(e) = self.0.append(&event).await {
            tracing::error!(action = AUTHENTICATE, error = %e, "audit event not written");
        }
    }
}
