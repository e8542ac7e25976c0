-- "Whose token is this?" (issue 15 item 5): AdminService.LookupToken finds
-- a lease by its PAT's keyed fingerprint. The broker keeps no token in
-- clear and leases no fingerprint: the fingerprint of every issued PAT is
-- on its lease's `lease.create` audit row, written in the same transaction
-- that makes the lease ACTIVE (so every PAT ever handed out has one, also
-- for leases created before this migration), under the fingerprint key
-- `fingerprint_key_id` (NULL: `default`). Audit rows are never updated or
-- deleted, so the look-up outlives the sealed token. This index makes it
-- one index probe per fingerprint key instead of a scan of the trail.
CREATE INDEX audit_events_token_fingerprint_idx ON audit_events (token_fingerprint)
    WHERE token_fingerprint IS NOT NULL;
