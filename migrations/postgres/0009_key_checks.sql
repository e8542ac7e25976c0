-- Keys that match, or no start (issue 14 item 1). Per purpose (sealing,
-- audit_chain, fingerprint) and key id, a check value: hex HMAC-SHA256 of
-- the label "token-broker key check v1" under that key (src/keycheck.rs).
-- A replica records the keys it is configured with that are not yet here,
-- and refuses to start when a configured key's check value differs.
CREATE TABLE key_checks (
    purpose     TEXT NOT NULL CHECK (purpose IN ('sealing', 'audit_chain', 'fingerprint')),
    key_id      TEXT NOT NULL,
    check_value TEXT NOT NULL,
    create_time TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (purpose, key_id)
);

-- The sealing key id of each lease's token (the `<key_id>` of its text
-- form v1:<key_id>:<base64>), so the start check finds the key ids in use
-- and `keys rewrap` the tokens under other keys without a scan of every
-- lease. Queries must use this exact expression (Dialect::SEALED_KEY_ID).
CREATE INDEX leases_sealed_key_id_idx ON leases ((split_part(sealed_token, ':', 2)));

-- The audit rows per chain and fingerprint key id (migration 0008's
-- columns), counted at every start (Store::count_audit_rows_by_key): the
-- grouping reads this index instead of sorting the audit table.
CREATE INDEX audit_events_key_ids_idx ON audit_events (chain_key_id, fingerprint_key_id);
