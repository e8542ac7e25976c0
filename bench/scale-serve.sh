#!/usr/bin/env bash
# Scale check of `token-broker serve` (BENCHMARKS.md, "Scale"): on a
# PostgreSQL database already filled by bench/lease-rows.sql, starts a
# standalone emulator, gives every lease its PAT there (bench/upstream_pats.py),
# times spawn-to-SERVING of `serve` (bench/health_time.py), then runs one
# `serve` and prints its VmRSS/VmHWM right after SERVING, after its first
# background pass and orphan sweep, and after a 16-client `token-broker bench`.
#
#   DB=postgres://postgres@127.0.0.1:5432/tb_scale BIN=target/release/token-broker \
#     bench/scale-serve.sh
set -euo pipefail
RUNS=${RUNS:-10}
here=$(dirname "$0")
. "$here/scale-env.sh"

"$BIN" emulator --listen "$EMU" > "$WORK/emulator.log" 2>&1 &
EMU_PID=$!
SERVE_PID=
cleanup() {
  [ -n "$SERVE_PID" ] && kill "$SERVE_PID" 2>/dev/null && wait "$SERVE_PID" || true
  kill "$EMU_PID" 2>/dev/null || true
}
trap cleanup EXIT
sleep 0.5

echo "== leases: $(psql -X -At "$DB" -c "SELECT state || ' ' || count(*) FROM leases GROUP BY state")"
python3 "$here/upstream_pats.py" --database "$DB" --emulator "http://$EMU" | tail -1

echo "== spawn to SERVING, $RUNS runs"
python3 "$here/health_time.py" --addr "$GRPC" --runs "$RUNS" --log "$WORK/serve-runs.log" -- "$BIN" serve

rss() { echo "$1: $(grep -E '^(VmRSS|VmHWM)' /proc/$SERVE_PID/status | tr -s ' \t' ' ' | paste -sd' ')"; }
echo "== memory of one serve"
# The timing runs above claimed the orphan sweep (its claim and its interval
# last 10 minutes): make it due again, so this process sweeps at once.
psql -X -q "$DB" -c "DELETE FROM background_jobs"
"$BIN" serve > "$WORK/serve.log" 2>&1 &
SERVE_PID=$!
wait_serving
rss "serving"
until grep -q "orphan sweep done" "$WORK/serve.log"; do sleep 0.2; done
grep -E "serving gRPC|orphan sweep done" "$WORK/serve.log" | cut -c1-27,80-400
rss "after the first pass and sweep"
sleep 20
rss "idle 20 s later (another reaper pass)"
TOKEN_BROKER_ADDR=http://$GRPC TOKEN_BROKER_API_KEY=$API_KEY \
  "$BIN" bench --concurrency 16 --duration 10s --upstream "http://$EMU"
rss "after bench (16 clients, 10 s)"
echo "logs in $WORK"
