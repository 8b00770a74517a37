#!/usr/bin/env bash
# Calls a real meshauthz server with grpcurl, using only the .proto files in proto/. This shows
# that those files are enough for a client to call envoy.service.auth.v3.Authorization/Check.
#
#   MESHAUTHZ_BIN=target/debug/meshauthz GRPCURL=/path/to/grpcurl tests/proto_grpcurl.sh
#
# The script starts the server with the bundled config (config/meshauthz.yaml, example shop
# policy) on free loopback ports and checks three things:
#   - grpcurl can parse proto/ and describe the service;
#   - GET /api/products/1 from spiffe://cluster.local/ns/shop/sa/frontend is allowed, with an
#     okResponse that sets x-meshauthz-peer;
#   - DELETE on the same path is denied, with a deniedResponse of Forbidden (403) and the body
#     {"error":"forbidden"}.
# It stops the server on exit. It exits non-zero, with a FAIL: message, on any failure.
# Needs bash and python3 (to pick free ports and to poll /readyz). Builds nothing.
set -euo pipefail

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PROTO_DIR="$ROOT/proto"
CONFIG="$ROOT/config/meshauthz.yaml"

[[ -n "${MESHAUTHZ_BIN:-}" ]] || fail "set MESHAUTHZ_BIN to the meshauthz binary (e.g. target/debug/meshauthz)"
[[ -n "${GRPCURL:-}" ]] || fail "set GRPCURL to the grpcurl binary"
[[ -x "$MESHAUTHZ_BIN" ]] || fail "MESHAUTHZ_BIN=$MESHAUTHZ_BIN is not an executable file"
command -v "$GRPCURL" >/dev/null 2>&1 || fail "GRPCURL=$GRPCURL is not an executable"
command -v python3 >/dev/null 2>&1 || fail "python3 is needed to pick free ports"
[[ -f "$PROTO_DIR/envoy/service/auth/v3/external_auth.proto" ]] || fail "no proto files under $PROTO_DIR"
[[ -f "$CONFIG" ]] || fail "no config at $CONFIG"

PROTO_ARGS=(-import-path "$PROTO_DIR" -proto envoy/service/auth/v3/external_auth.proto)
PRINCIPAL="spiffe://cluster.local/ns/shop/sa/frontend"

# --- the proto files parse (no server needed)
if ! out=$("$GRPCURL" "${PROTO_ARGS[@]}" describe envoy.service.auth.v3.Authorization 2>&1); then
  fail "grpcurl could not parse proto/ (describe envoy.service.auth.v3.Authorization):
$out"
fi
grep -q 'rpc Check ( .envoy.service.auth.v3.CheckRequest ) returns ( .envoy.service.auth.v3.CheckResponse )' <<<"$out" \
  || fail "describe did not show the Check method:
$out"
echo "ok: proto/ parses; grpcurl describes envoy.service.auth.v3.Authorization/Check"

# --- start the server on two free loopback ports
# Bind both sockets before closing either, so the two ports differ. Another process could still
# take a port between here and the server's bind. That is unlikely, and it shows up as a startup
# failure below.
ports=$(python3 -c '
import socket
socks = []
for _ in range(2):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(*(s.getsockname()[1] for s in socks))
for s in socks:
    s.close()
') || fail "could not pick free ports with python3"
read -r GRPC_PORT HTTP_PORT <<<"$ports"
[[ -n "$GRPC_PORT" && -n "$HTTP_PORT" ]] || fail "could not pick free ports (got: $ports)"
GRPC_ADDR="127.0.0.1:$GRPC_PORT"
HTTP_ADDR="127.0.0.1:$HTTP_PORT"

LOG="$(mktemp -t meshauthz-proto-grpcurl.XXXXXX)"
SERVER_PID=""

cleanup() {
  local rc=$?
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    # The server drains in-flight requests on SIGTERM. Give it 10 s, then SIGKILL.
    for _ in $(seq 1 100); do
      kill -0 "$SERVER_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  if [[ $rc -ne 0 && -s "$LOG" ]]; then
    echo "--- server log (last 40 lines) ---" >&2
    tail -n 40 "$LOG" >&2
  fi
  rm -f "$LOG"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$MESHAUTHZ_BIN" serve --config "$CONFIG" --text-logs \
  --grpc-addr "$GRPC_ADDR" --http-addr "$HTTP_ADDR" >"$LOG" 2>&1 &
SERVER_PID=$!

# Wait until /readyz answers 200 (policy loaded, JWKS fetched), at most 30 s.
ready=""
for _ in $(seq 1 150); do
  kill -0 "$SERVER_PID" 2>/dev/null || fail "meshauthz exited during startup (port taken, or a config error?)"
  if python3 -c '
import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=1).status == 200 else 1)
except Exception:
    sys.exit(1)
' "http://$HTTP_ADDR/readyz"; then
    ready=1
    break
  fi
  sleep 0.2
done
[[ -n "$ready" ]] || fail "meshauthz was not ready on http://$HTTP_ADDR/readyz within 30 s"
echo "ok: meshauthz is ready (grpc=$GRPC_ADDR http=$HTTP_ADDR)"

# check METHOD: Check for METHOD /api/products/1 from the frontend workload. Prints grpcurl's
# JSON output.
check() {
  local method=$1
  "$GRPCURL" -plaintext "${PROTO_ARGS[@]}" -d @ "$GRPC_ADDR" \
    envoy.service.auth.v3.Authorization/Check <<EOF
{
  "attributes": {
    "source": {
      "address": {"socketAddress": {"address": "10.0.0.7", "portValue": 43210}},
      "principal": "$PRINCIPAL"
    },
    "destination": {
      "address": {"socketAddress": {"address": "10.0.0.9", "portValue": 8080}}
    },
    "request": {
      "http": {
        "id": "proto-grpcurl-$method",
        "method": "$method",
        "path": "/api/products/1",
        "host": "catalog.shop.svc.cluster.local",
        "scheme": "http",
        "protocol": "HTTP/1.1",
        "headers": {"user-agent": "grpcurl"}
      }
    }
  }
}
EOF
}

# expect TEXT OUTPUT WHAT: fail unless OUTPUT contains the literal TEXT.
expect() {
  grep -qF -- "$1" <<<"$2" || fail "$3: expected the output to contain $1, got:
$2"
}

# --- allowed: GET /api/products/1
out=$(check GET 2>&1) || fail "grpcurl Check (GET) failed:
$out"
expect '"okResponse"' "$out" "GET /api/products/1"
expect '"key": "x-meshauthz-peer"' "$out" "GET /api/products/1"
expect "\"value\": \"$PRINCIPAL\"" "$out" "GET /api/products/1"
if grep -qF '"deniedResponse"' <<<"$out"; then fail "GET /api/products/1: unexpected deniedResponse:
$out"; fi
echo "ok: GET /api/products/1 -> okResponse with x-meshauthz-peer: $PRINCIPAL"

# --- denied: DELETE /api/products/1
out=$(check DELETE 2>&1) || fail "grpcurl Check (DELETE) failed:
$out"
expect '"deniedResponse"' "$out" "DELETE /api/products/1"
expect '"code": "Forbidden"' "$out" "DELETE /api/products/1"
expect '"body": "{\"error\":\"forbidden\"}"' "$out" "DELETE /api/products/1"
expect '"code": 7' "$out" "DELETE /api/products/1 (google.rpc.Status PERMISSION_DENIED)"
if grep -qF '"okResponse"' <<<"$out"; then fail "DELETE /api/products/1: unexpected okResponse:
$out"; fi
echo 'ok: DELETE /api/products/1 -> deniedResponse Forbidden (403), body {"error":"forbidden"}'

echo "PASS: proto/ works with grpcurl against meshauthz"
