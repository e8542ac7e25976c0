-- Retention of credential versions (`leases.retention`): an engine pass
-- (every second per replica) no longer reads every version ever stored,
-- only the live ones (this index; CURRENT was missing from 0013's) and the
-- newest few of each credential (the primary key). The query spells the
-- predicate exactly like this, so both backends can use the partial index.
CREATE INDEX credential_versions_in_use_idx ON credential_versions (credential, version)
    WHERE state IN ('PENDING', 'CURRENT', 'PREVIOUS', 'REVOKING');

-- Superseded by the index above (no query filtered on these states alone).
DROP INDEX credential_versions_live_idx;
