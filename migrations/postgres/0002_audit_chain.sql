-- Tamper-evident audit chain (issue 5 item 5; src/audit/mod.rs).
-- Each row written through audit::AuditLog carries the hex HMAC-SHA256 of
-- the previous row's mac and this row's fields, under a key kept outside
-- the database. Rows written before this migration keep a NULL mac.
ALTER TABLE audit_events ADD COLUMN mac TEXT;
