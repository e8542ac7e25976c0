-- Managed credentials (issue 17): long-lived PATs declared in the policy's
-- `credentials:` section, rotated every rotation_period with an overlap.
-- One row per version, written PENDING (the intent, claimed by the replica
-- that mints it) before the upstream create.
CREATE TABLE credential_versions (
    credential        TEXT NOT NULL,
    version           BIGINT NOT NULL,
    state             TEXT NOT NULL CHECK (state IN
        ('PENDING', 'CURRENT', 'PREVIOUS', 'REVOKING', 'REVOKED', 'FAILED')),
    organization      TEXT NOT NULL,
    scopes            TEXT NOT NULL,
    display_name      TEXT NOT NULL,
    authorization_id  UUID,
    -- the PAT sealed like a lease's (`v1:<key_id>:<base64>`), associated
    -- data `credential:<name>:<version>`; erased when revocation begins
    sealed_token      TEXT,
    create_time       TIMESTAMPTZ NOT NULL,
    update_time       TIMESTAMPTZ NOT NULL,
    valid_from        TIMESTAMPTZ NOT NULL,
    rotate_time       TIMESTAMPTZ NOT NULL,
    expire_time       TIMESTAMPTZ NOT NULL,
    -- when revocation is due (set when the version turns PREVIOUS)
    revoke_at         TIMESTAMPTZ,
    -- when revocation began
    revoke_time       TIMESTAMPTZ,
    attempts          INTEGER NOT NULL DEFAULT 0,
    next_attempt_time TIMESTAMPTZ,
    last_error        TEXT,
    claimed_by        TEXT,
    claimed_until     TIMESTAMPTZ,
    PRIMARY KEY (credential, version)
);

CREATE INDEX credential_versions_live_idx ON credential_versions (state)
    WHERE state IN ('PENDING', 'PREVIOUS', 'REVOKING');

-- Every credential the policy has named, and since when it is absent from
-- the policy (the retirement clock, `credentials_retire_after`).
CREATE TABLE managed_credentials (
    name          TEXT PRIMARY KEY,
    first_seen    TIMESTAMPTZ NOT NULL,
    absent_since  TIMESTAMPTZ,
    retired_time  TIMESTAMPTZ
);
