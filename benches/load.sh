#!/usr/bin/env bash
# Load benchmark for meshauthz's gRPC Check, on this machine, in one go. Writes a Markdown table
# to bench-results/load.md (and raw JSON lines to bench-results/load.jsonl).
#
#   benches/load.sh                 # default: 10 s per measurement
#   DURATION=30 benches/load.sh     # longer runs
#   WORKERS="1 2 4" benches/load.sh # scaling points on a bigger machine
#
# Builds release binaries first. The load generator (benches/loadgen.rs) runs on the same machine,
# so on 2 cores it competes with the server for CPU: the figures are conservative.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DURATION=${DURATION:-10}
WORKERS=${WORKERS:-"1 2"}
RATES=${RATES:-"1000 5000 10000"}
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

echo "== bundled policy"
CURRENT="$WORK/bundled"; loadgen setup --dir "$CURRENT"
start_server "$CURRENT"
sleep 1
IDLE_RSS=$(rss_kib "$SERVER_PID")
measure "max throughput" --concurrency 64 --connections 4
for r in $RATES; do measure "fixed $r rps" --rate "$r" --connections 4; done
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
    print(f"| {r['label']} | {r['mode']} | {r['requests']} | {r['rps']:.0f} | {r['p50_us']} | {r['p90_us']} | "
          f"{r['p99_us']} | {r['p999_us']} | {r['errors']} | {r['wrong_decisions']} | {r['rss_peak_kib']/1024:.1f} | "
          f"{r['lag_p99_us'] if r['mode'] == 'open' else '-'} |")
print(f"\nIdle RSS: {idle/1024:.1f} MiB with the bundled policy, {idle1k/1024:.1f} MiB with 1,000 role bindings.")
PY
cat "$OUT/load.md"
