-- The upstream credential's story, for `token-broker upstream status`,
-- the credential metrics and /readyz, and the record of which configured
-- refresh token was adopted last.
-- source: how the current version was stored (config, login, stdin,
-- rotated). state: OK, or FAILING once Entra refused this version.
-- configured_digest: SHA-256 (hex) of the last upstream.refresh_token
-- value adopted from configuration, so a restart adopts a configured value
-- only when it changed; 'legacy' on a row stored before this migration,
-- whose configured value is recorded, not adopted, at the next start (the
-- stored rotation is newer than it).
ALTER TABLE upstream_credentials ADD COLUMN account TEXT;
ALTER TABLE upstream_credentials ADD COLUMN source TEXT NOT NULL DEFAULT 'rotated'
    CHECK (source IN ('config', 'login', 'stdin', 'rotated'));
ALTER TABLE upstream_credentials ADD COLUMN last_refresh_time TEXT;
ALTER TABLE upstream_credentials ADD COLUMN state TEXT NOT NULL DEFAULT 'OK'
    CHECK (state IN ('OK', 'FAILING'));
ALTER TABLE upstream_credentials ADD COLUMN last_error TEXT;
ALTER TABLE upstream_credentials ADD COLUMN configured_digest TEXT;
UPDATE upstream_credentials SET configured_digest = 'legacy', last_refresh_time = update_time;
