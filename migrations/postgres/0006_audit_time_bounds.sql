-- Time filters of the audit listing on a long trail (BENCHMARKS.md, "Scale").
-- Ids follow commit order and times nearly so, but not strictly (an
-- append's time is taken before it waits its turn; a retried append keeps
-- its first time), so the planner can neither start an id-ordered scan at a
-- time bound nor stop it at one: on a million rows a page of "time >= last
-- week" scanned most of the trail.
-- time_high: the greatest time of this row and of every row before it. It
-- never decreases with id, so a time bound becomes an id bound through its
-- index. late: the row's time trails the time_high before it by more than
-- the listing's slack (src/store/sql.rs, AUDIT_LATE_SLACK); such rows may
-- lie outside those id bounds and are found by time through their own
-- index. Rows written before this migration are numbered from their order
-- (late when any earlier row has a later time); a row written by anything
-- but the store gets no time_high and counts as late.
ALTER TABLE audit_events ADD COLUMN time_high TIMESTAMPTZ;
-- Default false while the rows are numbered, so the row versions the
-- UPDATE leaves behind (until vacuumed) stay out of the late index.
ALTER TABLE audit_events ADD COLUMN late BOOLEAN NOT NULL DEFAULT FALSE;
UPDATE audit_events AS a
   SET time_high = r.time_high, late = a.time < r.time_high
  FROM (SELECT id, max(time) OVER (ORDER BY id) AS time_high FROM audit_events) AS r
 WHERE a.id = r.id;
ALTER TABLE audit_events ALTER COLUMN late SET DEFAULT TRUE;
CREATE INDEX audit_events_time_high_idx ON audit_events (time_high, id);
CREATE INDEX audit_events_late_time_idx ON audit_events (time) WHERE late;
-- Superseded by the two above.
DROP INDEX audit_events_time_idx;
-- An identity and an action together: each alone may match most of the
-- trail and the other none of it (what a caller did of one action).
CREATE INDEX audit_events_identity_action_id_idx ON audit_events (identity, action, id);
-- Statistics for the new columns now, not at the next autovacuum: without
-- them the planner takes late rows for common and scans for them by id.
ANALYZE audit_events;
