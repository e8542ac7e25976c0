-- Fills leases (of a database `token-broker migrate` set up) with :rows
-- ACTIVE leases that expire in 2099, so no background pass has work: 20
-- organizations, 50 holders, a display name in the broker's form under the
-- deployment id :'deployment' (also stored in meta, so the broker adopts
-- it), and a value the size of a sealed token (v1:<key id>:<base64 of 112
-- bytes>, what an 84-character PAT seals to: nonce, ciphertext, tag). The
-- values are not ciphertext: nothing at start or in the background opens
-- them. bench/upstream_pats.py then gives each lease its PAT upstream.
-- psql -v rows=100000 -v deployment=0123456789abcdef0123456789abcdef -f bench/lease-rows.sql
INSERT INTO meta (key, value) VALUES ('deployment_id', :'deployment')
ON CONFLICT (key) DO NOTHING;
INSERT INTO leases (id, holder, organization, scopes, display_name, authorization_id,
                    sealed_token, state, create_time, update_time, expire_time,
                    max_expire_time, upstream_valid_to, attempts)
SELECT id,
       'apikey:svc-' || (g % 50),
       'org-' || (g % 20),
       'vso.code_write',
       'token-broker:' || :'deployment' || ':' || id,
       md5('pat' || g)::uuid,
       'v1:k2026:' || replace(encode(decode(md5('a' || g) || md5('b' || g) || md5('c' || g)
                                            || md5('d' || g) || md5('e' || g) || md5('f' || g)
                                            || md5('g' || g), 'hex'), 'base64'), E'\n', ''),
       'ACTIVE',
       t, t, timestamptz '2099-01-01 00:00:00+00', timestamptz '2099-01-01 08:00:00+00',
       timestamptz '2099-01-01 00:05:00+00', 0
FROM (SELECT g, md5('lease' || g)::uuid AS id,
             timestamptz '2026-11-01 00:00:00+00' + g * interval '1 second' AS t
      FROM generate_series(1, :rows) AS g) AS s;
ANALYZE leases;
