-- Periodic deployment-wide jobs (issue 6: the orphan sweep). One row per
-- job; a replica runs a job after a compare-and-set claim (claimed_by,
-- claimed_until) taken when last_run_time is an interval old and no live
-- claim is held, so one replica runs it per interval. Times as in 0001.
CREATE TABLE background_jobs (
    name          TEXT PRIMARY KEY NOT NULL,
    claimed_by    TEXT,
    claimed_until TEXT,
    -- start of the last finished run (UTC)
    last_run_time TEXT
) STRICT;

-- The sweep's organizations (SELECT DISTINCT organization) without a scan
-- of every lease ever issued.
CREATE INDEX leases_organization_idx ON leases (organization);
-- Admin listings filtered by state, newest first (e.g. admin list-failed:
-- state = REVOKE_FAILED), without walking every lease by create_time.
CREATE INDEX leases_state_create_time_idx ON leases (state, create_time DESC, id DESC);
