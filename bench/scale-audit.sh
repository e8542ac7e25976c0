#!/usr/bin/env bash
# Scale check of the audit listing (BENCHMARKS.md, "Scale"): on a PostgreSQL
# database whose audit_events bench/audit-rows.sql filled, starts `serve`
# and times `token-broker audit list` pages (bench/audit_list_times.py).
#
#   DB=postgres://postgres@127.0.0.1:5432/tb_scale_audit BIN=target/release/token-broker \
#     bench/scale-audit.sh
set -euo pipefail
here=$(dirname "$0")
. "$here/scale-env.sh"
"$BIN" serve > "$WORK/serve.log" 2>&1 &
SERVE_PID=$!
trap 'kill $SERVE_PID 2>/dev/null; wait $SERVE_PID || true' EXIT
wait_serving
LEASE=$(psql -X -At "$DB" -c "SELECT lease_id FROM audit_events WHERE id = 500001")
TOKEN_BROKER_ADDR=http://$GRPC TOKEN_BROKER_API_KEY=$API_KEY FINGERPRINT_KEY=$FINGERPRINT_KEY \
  python3 "$here/audit_list_times.py" --bin "$BIN" --runs "${RUNS:-7}" --lease "$LEASE"
echo "logs in $WORK"
