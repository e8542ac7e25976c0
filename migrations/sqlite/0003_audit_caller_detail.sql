-- Who exactly called (issue 5 item 1): for a Kubernetes service account,
-- the pod and uid claims of its token, as `pod=NAME pod_uid=UID sa_uid=UID
-- jti=ID` (absent claims left out). Covered by the chain MAC; NULL for
-- other callers and for rows written before this migration, which then
-- encode exactly as before (src/audit/chain.rs).
ALTER TABLE audit_events ADD COLUMN caller_detail TEXT;
