-- Issue 15: only an ACTIVE lease keeps its sealed PAT. Every lease write
-- now stores sealed_token as NULL in any other state; this erases the
-- copies leases that closed before this release still hold.
UPDATE leases SET sealed_token = NULL WHERE state <> 'ACTIVE' AND sealed_token IS NOT NULL;

-- Retention (leases.retention): closed leases by when they closed (their
-- last write), oldest first.
CREATE INDEX leases_state_update_time_idx ON leases (state, update_time);
