#!/usr/bin/env python3
"""Times `token-broker audit list` pages against a running broker, each
case several times, and prints min / median / max wall milliseconds per
call (process start to exit: the CLI's own start and connection included)
and the events the page held.

    TOKEN_BROKER_ADDR=... TOKEN_BROKER_API_KEY=... FINGERPRINT_KEY=<base64> \
        python3 bench/audit_list_times.py --bin target/release/token-broker --runs 7

FINGERPRINT_KEY is the broker's keys.fingerprint: with it the script makes
the page token of a deep page (a1|<after id>, bound to the filter by the
keyed MAC of src/leases/page_token.rs), as paging that far would take
thousands of calls.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import statistics
import subprocess
import time

# (name, filter, after id for a made page token or None)
CASES = [
    ("first page, no filter", "", None),
    ("deep page (after id 900000), no filter", "", 900000),
    ("identity, 300k rows", 'identity = "apikey:ci"', None),
    ("identity, 12 rows", 'identity = "apikey:rare"', None),
    ("identity, deep page (after id 900000)", 'identity = "apikey:ci"', 900000),
    ("action, 50k rows", 'action = "authenticate"', None),
    ("action, deep page (after id 900000)", 'action = "authenticate"', 900000),
    ("lease", 'lease = "leases/{lease}"', None),
    ("time, 1 day near the start", 'time >= "2025-12-02T00:00:00Z" AND time < "2025-12-03T00:00:00Z"', None),
    ("time, 1 day near the end", 'time >= "2026-11-10T00:00:00Z" AND time < "2026-11-11T00:00:00Z"', None),
    ("time, since near the start", 'time >= "2025-12-02T00:00:00Z"', None),
    ("time, since near the end", 'time >= "2026-11-01T00:00:00Z"', None),
    ("time, since mid-trail", 'time >= "2026-06-01T00:00:00Z"', None),
    ("time, before near the start", 'time < "2025-12-03T00:00:00Z"', None),
    ("time, 1 month near the end", 'time >= "2026-10-01T00:00:00Z" AND time < "2026-11-01T00:00:00Z"', None),
    ("time, last page of 1 month near the start", 'time >= "2025-12-01T00:00:00Z" AND time < "2026-01-01T00:00:00Z"', 89270),
    ("matches nothing: identity", 'identity = "apikey:nobody"', None),
    ("matches nothing: time after the trail", 'time >= "2027-01-01T00:00:00Z"', None),
    ("matches nothing: identity and action", 'identity = "apikey:ci" AND action = "authenticate"', None),
    ("identity and time, 1 day near the end", 'identity = "apikey:ci" AND time >= "2026-11-10T00:00:00Z" AND time < "2026-11-11T00:00:00Z"', None),
]


def rfc3339_micros(text: str) -> str:
    from datetime import datetime
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return str(int(t.timestamp()) * 1_000_000 + t.microsecond)


def binding(filter_text: str) -> str:
    """What a page token is bound to (AuditQuery::binding), for the filters above."""
    fields = {"start": "", "end": "", "identity": "", "action": "", "lease": ""}
    for term in filter(None, (t.strip() for t in filter_text.split(" AND "))):
        name, op, value = term.split(" ", 2)
        value = value.strip('"')
        if name == "time":
            fields["start" if op == ">=" else "end"] = rfc3339_micros(value)
        elif name == "lease":
            fields["lease"] = value.removeprefix("leases/")
        else:
            fields[name] = value
    return "\n".join(f"{k}={v}" for k, v in fields.items())


def page_token(key: bytes, filter_text: str, after_id: int) -> str:
    payload = f"a1|{after_id}"
    text = f"tokenbroker.audit_page_token.v1\n{binding(filter_text)}\n{payload}"
    mac = hmac.new(key, text.encode(), hashlib.sha256).hexdigest()[:32]
    return base64.urlsafe_b64encode(f"{payload}|{mac}".encode()).decode().rstrip("=")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", default="target/release/token-broker")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--lease", required=True, help="a lease id in the trail")
    args = parser.parse_args()
    key = base64.b64decode(os.environ["FINGERPRINT_KEY"])
    print(f"| case | filter | events | min ms | median ms | max ms |")
    print(f"|---|---|---:|---:|---:|---:|")
    for name, filter_text, after in CASES:
        filter_text = filter_text.format(lease=args.lease)
        command = [args.bin, "audit", "list", "--output", "json", "--filter", filter_text]
        if after is not None:
            command += ["--page-token", page_token(key, filter_text, after)]
        times, events = [], None
        for _ in range(args.runs):
            start = time.perf_counter()
            out = subprocess.run(command, capture_output=True, text=True)
            times.append((time.perf_counter() - start) * 1000)
            if out.returncode != 0:
                raise SystemExit(f"{name}: {out.stderr.strip()}")
            events = len(json.loads(out.stdout).get("auditEvents", []))
        times.sort()
        shown = filter_text.replace("|", "\\|") or "(none)"
        print(f"| {name} | `{shown}` | {events} | {times[0]:.1f} | "
              f"{statistics.median(times):.1f} | {times[-1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
