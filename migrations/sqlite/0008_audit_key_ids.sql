-- Which keys made each audit row (issue 14 item 2): chain_key_id is the id
-- of the audit chain key its MAC was made with, fingerprint_key_id the id
-- of the fingerprint key of its token_fingerprint (NULL when it has none).
-- NULL chain_key_id: a row written before this migration, under the key id
-- `default`, whose MAC keeps its version 1 encoding; rows with a key id use
-- encoding version 2, which covers both ids (src/audit/chain.rs,
-- docs/audit-chain.md).
ALTER TABLE audit_events ADD COLUMN chain_key_id TEXT;
ALTER TABLE audit_events ADD COLUMN fingerprint_key_id TEXT;
