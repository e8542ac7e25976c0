-- The audit listing filters in SQL and pages by id (keyset), so a filtered
-- page stays cheap on a long trail. Each equality filter has an index that
-- also yields rows in id order from the page token on; a time range has its
-- own (ids follow commit order, so times rise with ids but not strictly).
CREATE INDEX audit_events_identity_id_idx ON audit_events (identity, id);
CREATE INDEX audit_events_action_id_idx ON audit_events (action, id);
CREATE INDEX audit_events_lease_id_id_idx ON audit_events (lease_id, id);
CREATE INDEX audit_events_time_idx ON audit_events (time);
