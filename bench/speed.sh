#!/usr/bin/env bash
# The speed runs of BENCHMARKS.md: a standalone emulator (zero latency, no
# state file) and `token-broker dev --upstream` on a fresh PostgreSQL
# database, then `token-broker bench` against them, each run with the
# database's own ceiling (--baseline) in the same invocation:
#   - CreateLease alone (--mix create=1) at 1 and at 16 clients: its ratio to
#     the write baseline;
#   - GetLease at 16 clients (--mix create=1,get=200): its ratio to the read
#     baseline and its p99;
#   - the default mix at 16 clients, for comparison with earlier runs.
#
#   PG=postgres://postgres@127.0.0.1:5432 BIN=target/release/token-broker bench/speed.sh
#
# Refuses to start when the emulator or gRPC address is already taken.
set -euo pipefail
if [ $# -gt 0 ]; then
  # It takes no arguments; settings come from the environment.
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
PG=${PG:-postgres://postgres@127.0.0.1:5432}
BIN=${BIN:-target/release/token-broker}
EMU=${EMU:-127.0.0.1:8091}
GRPC=${GRPC:-127.0.0.1:50051}
DURATION=${DURATION:-10s}
DB_NAME=tb_bench_speed
for addr in "$EMU" "$GRPC"; do
  if (exec 3<>"/dev/tcp/${addr%:*}/${addr##*:}") 2>/dev/null; then
    echo "something already listens on $addr: set EMU / GRPC to free addresses" >&2
    exit 1
  fi
done
WORK=$(mktemp -d /tmp/tb-speed.XXXXXX)
psql -X -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $DB_NAME" -c "CREATE DATABASE $DB_NAME"
DB=$PG/$DB_NAME

"$BIN" emulator --listen "$EMU" > "$WORK/emulator.log" 2>&1 &
EMU_PID=$!
DEV_PID=
cleanup() {
  [ -n "$DEV_PID" ] && kill "$DEV_PID" 2>/dev/null || true
  kill "$EMU_PID" 2>/dev/null || true
}
trap cleanup EXIT

export TOKEN_BROKER_DEV_API_KEY
TOKEN_BROKER_DEV_API_KEY=$("$BIN" apikey generate dev 2>/dev/null | head -1)
(cd "$WORK" && exec "$BIN" dev --listen "$GRPC" --upstream "http://$EMU" --database-url "$DB") \
  > "$WORK/dev.log" 2>&1 &
DEV_PID=$!
until grep -q "serving gRPC" "$WORK/dev.log" 2>/dev/null; do
  kill -0 "$DEV_PID" || { cat "$WORK/dev.log"; exit 1; }
  sleep 0.2
done

export TOKEN_BROKER_ADDR=http://$GRPC TOKEN_BROKER_API_KEY=$TOKEN_BROKER_DEV_API_KEY
run() {
  echo "== bench $*"
  "$BIN" bench --duration "$DURATION" --baseline "$DB" --upstream "http://$EMU" "$@"
}
run --concurrency 1 --mix create=1
run --concurrency 16 --mix create=1
run --concurrency 16 --mix create=1,get=200
run --concurrency 16
echo "logs in $WORK"
