-- Fills audit_events (of a database `token-broker migrate` set up) with
-- :rows rows, one every 30 s from 2025-12-01, ids 1..:rows; time rises
-- with id as in a real trail. Chain MACs are random hex: the listing does
-- not read them (`audit verify` on this database reports a broken chain).
-- psql -v rows=1000000 -f bench/audit-rows.sql
INSERT INTO audit_events (id, time, identity, peer, action, outcome, reason, policy_rule,
                          lease_id, organization, scopes, token_fingerprint, mac, caller_detail)
OVERRIDING SYSTEM VALUE
SELECT g,
       timestamptz '2025-12-01 00:00:00+00' + g * interval '30 seconds',
       CASE
         WHEN a IN (13, 14, 15, 19) THEN 'system:token-broker'
         WHEN a = 16 THEN '-'
         WHEN g % 50000 = 2 THEN 'apikey:rare'
         WHEN h < 400 THEN 'apikey:ci'
         WHEN h < 700 THEN 'apikey:svc-' || (h % 100)
         ELSE 'k8s:system:serviceaccount:ns-' || (h % 30) || ':sa-' || (h % 7)
       END,
       '10.0.' || (h % 250) || '.' || (g % 250) || ':' || (40000 + g % 20000),
       CASE
         WHEN a <= 5 THEN 'lease.create'
         WHEN a <= 9 THEN 'lease.renew'
         WHEN a <= 12 THEN 'lease.revoke'
         WHEN a <= 15 THEN 'lease.expire'
         WHEN a = 16 THEN 'authenticate'
         WHEN a = 17 THEN 'admin.list_audit_events'
         WHEN a = 18 THEN 'admin.list_leases'
         ELSE 'pat.revoke_orphan'
       END,
       CASE WHEN a = 16 THEN 'denied' ELSE 'allowed' END,
       CASE WHEN a = 16 THEN 'UNKNOWN_API_KEY' WHEN a = 19 THEN 'ORPHAN_NO_LEASE' END,
       CASE WHEN a <= 9 THEN 'ci' END,
       -- 25 leases per 100 rows: a lease's rows sit close together
       CASE WHEN a <= 15 THEN md5('lease-' || ((g / 100) * 25 + g % 25))::uuid END,
       CASE WHEN a <= 15 OR a = 19 THEN 'fabrikam' END,
       CASE WHEN a <= 15 THEN 'vso.code_write' END,
       CASE WHEN a <= 5 THEN md5('fp' || g) || md5('fq' || g) END,
       md5('mac' || g) || md5('mad' || g),
       NULL
-- a picks the action, h the caller: independent pseudo-random draws
FROM (SELECT g, (hashint8extended(g, 1) & 1048575) % 20 AS a,
             (hashint8extended(g, 2) & 1048575) % 1000 AS h
      FROM generate_series(1::bigint, :rows) AS g) AS s;
ANALYZE audit_events;
