-- token-broker schema v1 (PostgreSQL). DESIGN.md section 8.
-- Times are TIMESTAMPTZ, always bound from the application (never now()).

CREATE TABLE leases (
    id                UUID PRIMARY KEY,
    -- the holder's typed identity text, e.g. apikey:ci
    holder            TEXT NOT NULL,
    organization      TEXT NOT NULL,
    -- space-separated, sorted scope names (upstream's form)
    scopes            TEXT NOT NULL,
    -- upstream displayName <prefix>:<deployment id>:<lease id>
    display_name      TEXT NOT NULL,
    authorization_id  UUID,
    -- crypto::Sealed text form v1:<key_id>:<base64>
    sealed_token      TEXT,
    state             TEXT NOT NULL CHECK (state IN
                        ('PENDING', 'ACTIVE', 'REVOKING', 'REVOKED', 'EXPIRED', 'FAILED', 'REVOKE_FAILED')),
    create_time       TIMESTAMPTZ NOT NULL,
    update_time       TIMESTAMPTZ NOT NULL,
    expire_time       TIMESTAMPTZ NOT NULL,
    max_expire_time   TIMESTAMPTZ NOT NULL,
    revoke_time       TIMESTAMPTZ,
    upstream_valid_to TIMESTAMPTZ,
    attempts          INTEGER NOT NULL DEFAULT 0,
    next_attempt_time TIMESTAMPTZ,
    last_error        TEXT,
    claimed_by        TEXT,
    claimed_until     TIMESTAMPTZ,
    CONSTRAINT leases_display_name_key UNIQUE (display_name)
);

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
    request_id  UUID NOT NULL,
    -- hex SHA-256 of the normalized request parameters
    fingerprint TEXT NOT NULL,
    lease_id    UUID NOT NULL REFERENCES leases (id),
    create_time TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (holder, request_id)
);
CREATE INDEX idempotency_keys_lease_id_idx ON idempotency_keys (lease_id);

-- Append-only: the store never updates or deletes a row.
CREATE TABLE audit_events (
    id                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time              TIMESTAMPTZ NOT NULL,
    identity          TEXT NOT NULL,
    peer              TEXT,
    action            TEXT NOT NULL,
    outcome           TEXT NOT NULL CHECK (outcome IN ('allowed', 'denied', 'error')),
    reason            TEXT,
    policy_rule       TEXT,
    -- no foreign key: refusals have no lease and audit outlives leases
    lease_id          UUID,
    organization      TEXT,
    scopes            TEXT,
    -- keyed HMAC-SHA256 of the token, hex; never the token
    token_fingerprint TEXT
);

-- Small settings kept with the data, e.g. the deployment id.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- The sealed upstream refresh token: one row, optimistic version.
CREATE TABLE upstream_credentials (
    id           SMALLINT PRIMARY KEY CHECK (id = 1),
    version      BIGINT NOT NULL,
    sealed       TEXT NOT NULL,
    update_time  TIMESTAMPTZ NOT NULL
);
