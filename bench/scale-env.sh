# Sourced by bench/scale-*.sh: keys, a policy and an API key for one
# `token-broker serve` on $DB, in a fresh directory $WORK, as TOKEN_BROKER_*
# variables. The API key ($API_KEY, identity apikey:bench) is an admin and
# may lease vso.code_write in fabrikam. Upstream is the emulator at $EMU.
# Refuses to start when $EMU or $GRPC already answer (another broker).
DB=${DB:?postgres URL of the database}
BIN=${BIN:-target/release/token-broker}
EMU=${EMU:-127.0.0.1:8091}
GRPC=${GRPC:-127.0.0.1:50051}
for addr in "$EMU" "$GRPC"; do
  if (exec 3<>"/dev/tcp/${addr%:*}/${addr##*:}") 2>/dev/null; then
    echo "something already listens on $addr: set EMU / GRPC to free addresses" >&2
    exit 1
  fi
done
WORK=$(mktemp -d /tmp/tb-scale.XXXXXX)

key() { head -c 32 /dev/urandom | base64; }
FINGERPRINT_KEY=$(key)
cat > "$WORK/keys.toml" <<KEYS
active = "k2026"
fingerprint = "$FINGERPRINT_KEY"
audit_chain = "$(key)"
[sealing]
k2026 = "$(key)"
KEYS
chmod 600 "$WORK/keys.toml" # a keys file readable by others is refused
cat > "$WORK/policy.yaml" <<'POLICY'
admins: ["apikey:bench"]
rules:
  - name: bench
    identities: ["apikey:bench"]
    organizations: ["fabrikam"]
    scopes: ["vso.code_write"]
    default_ttl: 1h
    max_ttl: 8h
POLICY
API_KEY=$("$BIN" apikey generate bench 2>/dev/null | head -1)
API_KEY_SHA=$(printf '%s' "$API_KEY" | sha256sum | cut -d' ' -f1)

export TOKEN_BROKER_DATABASE__URL=$DB
export TOKEN_BROKER_GRPC__LISTEN=$GRPC
export TOKEN_BROKER_KEYS__FILE=$WORK/keys.toml
export TOKEN_BROKER_POLICY__FILE=$WORK/policy.yaml
export TOKEN_BROKER_AUTH__API_KEYS="[{ name = \"bench\", sha256 = \"$API_KEY_SHA\" }]"
export TOKEN_BROKER_UPSTREAM__REFRESH_TOKEN=emulator-default-refresh-token
export TOKEN_BROKER_UPSTREAM__AZURE_DEVOPS__BASE_URL=http://$EMU
export TOKEN_BROKER_UPSTREAM__ENTRA__AUTHORITY=http://$EMU
export TOKEN_BROKER_UPSTREAM__ENTRA__CLIENT_ID=00000000-0000-0000-0000-000000000000

# Waits until the broker at $GRPC answers SERVING.
wait_serving() {
  until python3 - "$GRPC" 2>/dev/null <<'PY'
import sys, grpc
from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g
try:
    ok = g.HealthStub(grpc.insecure_channel(sys.argv[1])).Check(h.HealthCheckRequest(), timeout=0.5).status == 1
except grpc.RpcError:
    ok = False
sys.exit(0 if ok else 1)
PY
  do sleep 0.05; done
}
