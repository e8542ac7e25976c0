-- Audit ids are never reused (issue 15 item 2). The highest audit id ever
-- written, kept beside the table: an append numbers its rows above both it
-- and the newest row (src/store/postgres.rs, LAST_AUDIT_ID), so rows
-- appended after the newest rows were deleted leave a gap (which `audit
-- verify` names) instead of taking the deleted ids, and a chain head
-- published before the deletion no longer matches any row. Kept by a
-- trigger, so every insert counts, whoever writes it (also a replica of an
-- older release during a rollout). Transactional: a rolled-back append
-- leaves no gap. A database writer can lower it too; a replica's memory of
-- its last row and published heads catch that (docs/audit-chain.md).
CREATE TABLE audit_id_high (
    one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    id BIGINT NOT NULL
);
INSERT INTO audit_id_high (one, id) SELECT TRUE, COALESCE(max(id), 0) FROM audit_events;

CREATE FUNCTION audit_id_high_record() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE audit_id_high SET id = GREATEST(id, (SELECT max(id) FROM audit_new_rows));
    RETURN NULL;
END
$$;

CREATE TRIGGER audit_id_high_record AFTER INSERT ON audit_events
    REFERENCING NEW TABLE AS audit_new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION audit_id_high_record();
