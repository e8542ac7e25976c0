#!/usr/bin/env python3
"""Gives every ACTIVE lease of a broker database a live PAT in a running
`token-broker emulator`, as production has one per live lease, and records
each PAT's authorizationId on its lease row, so the orphan sweep lists them
all and finds each one owned (nothing is revoked).

    python3 bench/upstream_pats.py --database postgres://postgres@127.0.0.1:5432/tb_scale \
        --emulator http://127.0.0.1:8091

Reads the leases with psql, creates the PATs through the emulator's PAT API
(refresh-token grant with the emulator's default refresh token, as `dev`
uses), then updates authorization_id with one COPY and UPDATE. Standard
library only.
"""

import argparse
import http.client
import json
import subprocess
import sys
import time
import urllib.parse

REFRESH_TOKEN = "emulator-default-refresh-token"
API_VERSION = "7.1-preview.1"


def psql(database: str, *args: str, stdin: str | None = None) -> str:
    return subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", database, *args],
        input=stdin, stdout=subprocess.PIPE, text=True, check=True,
    ).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", required=True)
    parser.add_argument("--emulator", default="http://127.0.0.1:8091")
    args = parser.parse_args()
    url = urllib.parse.urlsplit(args.emulator)
    conn = http.client.HTTPConnection(url.hostname, url.port)

    form = urllib.parse.urlencode({
        "grant_type": "refresh_token", "refresh_token": REFRESH_TOKEN,
        "client_id": "00000000-0000-0000-0000-000000000000",
        "scope": "499b84ac-1321-427f-aa17-267ca6975798/.default offline_access",
    })
    conn.request("POST", "/organizations/oauth2/v2.0/token", form,
                 {"Content-Type": "application/x-www-form-urlencoded"})
    answer = conn.getresponse()
    token = json.loads(answer.read())["access_token"]

    leases = [line.split("|") for line in psql(
        args.database, "-c",
        "SELECT id, organization, display_name FROM leases WHERE state = 'ACTIVE' ORDER BY id",
    ).splitlines()]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json",
               "X-TFS-FedAuthRedirect": "Suppress"}
    # 300 days: the emulator keeps no PAT past a year.
    valid_to = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 300 * 86400))
    started = time.monotonic()
    rows = []
    for i, (lease_id, org, display_name) in enumerate(leases):
        body = json.dumps({"displayName": display_name, "scope": "vso.code_write",
                           "validTo": valid_to, "allOrgs": False})
        conn.request("POST", f"/{org}/_apis/tokens/pats?api-version={API_VERSION}", body, headers)
        answer = conn.getresponse()
        created = json.loads(answer.read())
        pat = created.get("patToken")
        if answer.status != 200 or not pat:
            sys.exit(f"create for lease {lease_id} failed: {answer.status} {created}")
        rows.append(f"{lease_id}\t{pat['authorizationId']}\n")
        if (i + 1) % 10000 == 0:
            print(f"{i + 1} PATs ({time.monotonic() - started:.0f} s)", flush=True)
    psql(args.database,
         "-c", "CREATE TEMP TABLE pat_ids (lease_id uuid, authorization_id uuid)",
         "-c", "COPY pat_ids FROM STDIN",
         "-c", "UPDATE leases SET authorization_id = p.authorization_id FROM pat_ids p "
               "WHERE leases.id = p.lease_id",
         stdin="".join(rows))
    print(f"{len(rows)} PATs created and recorded in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
