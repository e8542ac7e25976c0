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
            peer: refusal.peer,
            reason: Some(refusal.error.reason().to_owned()),
            ..AuditEvent::new(Utc::now(), "-", AUTHENTICATE, outcome)
        };
        if let Err(e) = self.0.append(&event).await {
            tracing::error!(action = AUTHENTICATE, error = %e, "audit event not written");
        }
    }
}
