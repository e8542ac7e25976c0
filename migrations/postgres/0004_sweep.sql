-- Periodic deployment-wide jobs (issue 6: the orphan sweep). One row per
-- job; a replica runs a job after a committed compare-and-set claim
-- (claimed_by, claimed_until) taken when last_run_time is an interval old
-- and no live claim is held, so one replica runs it per interval.
CREATE TABLE background_jobs (
    name          TEXT PRIMARY KEY,
    claimed_by    TEXT,
    claimed_until TIMESTAMPTZ,
    -- start of the last finished run (UTC)
    last_run_time TIMESTAMPTZ
);

-- The sweep's organizations (SELECT DISTINCT organization) without a scan
-- of every lease ever issued.
CREATE INDEX leases_organization_idx ON leases (organization);
-- Admin listings filtered by state, newest first (e.g. admin list-failed:
-- state = REVOKE_FAILED), without walking every lease by create_time.
CREATE INDEX leases_state_create_time_idx ON leases (state, create_time DESC, id DESC);
