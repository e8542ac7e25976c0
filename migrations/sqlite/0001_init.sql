-- token-broker schema v1 (SQLite). DESIGN.md section 8.
-- Times are TEXT in one fixed RFC 3339 form, UTC with microseconds and a
-- trailing Z (2026-01-02T03:04:05.123456Z), so text order is time order.
-- They are always bound from the application (never datetime('now')).
-- UUIDs are TEXT, hyphenated lower case, so text order is UUID order.

CREATE TABLE leases (
    id                TEXT PRIMARY KEY NOT NULL,
    -- the holder's typed identity text, e.g. apikey:ci
    holder            TEXT NOT NULL,
    organization      TEXT NOT NULL,
    -- space-separated, sorted scope names (upstream's form)
    scopes            TEXT NOT NULL,
    -- upstream displayName <prefix>:<deployment id>:<lease id>
    display_name      TEXT NOT NULL UNIQUE,
    authorization_id  TEXT,
    -- crypto::Sealed text form v1:<key_id>:<base64>
    sealed_token      TEXT,
    state             TEXT NOT NULL CHECK (state IN
                        ('PENDING', 'ACTIVE', 'REVOKING', 'REVOKED', 'EXPIRED', 'FAILED', 'REVOKE_FAILED')),
    create_time       TEXT NOT NULL,
    update_time       TEXT NOT NULL,
    expire_time       TEXT NOT NULL,
    max_expire_time   TEXT NOT NULL,
    revoke_time       TEXT,
    upstream_valid_to TEXT,
    attempts          INTEGER NOT NULL DEFAULT 0,
    next_attempt_time TEXT,
    last_error        TEXT,
    claimed_by        TEXT,
    claimed_until     TEXT
) STRICT;

-- ListLeases for one holder, newest first (keyset on create_time, id).
CREATE INDEX leases_holder_create_time_idx ON leases (holder, create_time DESC, id DESC);
-- Listing everything newest first (admin).
CREATE INDEX leases_create_time_idx ON leases (create_time DESC, id DESC);
-- Due work: the reaper (ACTIVE by expire_time), the reconciler (PENDING by create_time).
CREATE INDEX leases_state_expire_time_idx ON leases (state, expire_time);
-- Due work: the revocation queue.
CREATE INDEX leases_state_next_attempt_time_idx ON leases (state, next_attempt_time);

-- (holder, request_id) -> lease: CreateLease's idempotency key.
CREATE TABLE idempotency_keys (
    holder      TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    -- hex SHA-256 of the normalized request parameters
    fingerprint TEXT NOT NULL,
    lease_id    TEXT NOT NULL REFERENCES leases (id),
    create_time TEXT NOT NULL,
    PRIMARY KEY (holder, request_id)
) STRICT;
CREATE INDEX idempotency_keys_lease_id_idx ON idempotency_keys (lease_id);

-- Append-only: the store never updates or deletes a row. AUTOINCREMENT so
-- ids are never reused.
CREATE TABLE audit_events (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    time              TEXT NOT NULL,
    identity          TEXT NOT NULL,
    peer              TEXT,
    action            TEXT NOT NULL,
    outcome           TEXT NOT NULL CHECK (outcome IN ('allowed', 'denied', 'error')),
    reason            TEXT,
    policy_rule       TEXT,
    -- no foreign key: refusals have no lease and audit outlives leases
    lease_id          TEXT,
    organization      TEXT,
    scopes            TEXT,
    -- keyed HMAC-SHA256 of the token, hex; never the token
    token_fingerprint TEXT
) STRICT;

-- Small settings kept with the data, e.g. the deployment id.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
) STRICT;

-- The sealed upstream refresh token: one row, optimistic version.
CREATE TABLE upstream_credentials (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    version      INTEGER NOT NULL,
    sealed       TEXT NOT NULL,
    update_time  TEXT NOT NULL
) STRICT;
