#!/usr/bin/env bash
# Soak benchmark (not a CI test): the release binary under a fixed open-loop rate for 10 minutes
# while the issuer rotates its signing keys (new kids, used at once) and the policy is reloaded
# every PERIOD seconds. Every answer is checked against the bundled policy's expected decision.
# Writes bench-results/soak.md; exits non-zero on any error, wrong decision or failed reload, or
# when the server's anonymous RSS in the second half rises more than 1 MiB above the first
# half's peak (bounded caches fill in the first half; after that memory must stay flat).
#
#   benches/soak.sh                          # 600 s at 2,000 checks/s, rotation + reload every 5 s
#   SECONDS_TOTAL=3600 RATE=5000 benches/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TOTAL=${SECONDS_TOTAL:-600}
RATE=${RATE:-2000}
PERIOD=${PERIOD:-5}
mkdir -p bench-results
echo "== building release binaries"
cargo build --release --locked -q
cargo bench --bench loadgen --no-run -q 2>/dev/null
echo "== soak: ${SECONDS_TOTAL} s at ${RATE} checks/s, key rotation + policy reload every ${PERIOD} s"
cargo bench --bench loadgen -q -- soak --server-bin target/release/meshauthz \
  --seconds "$SECONDS_TOTAL" --rate "$RATE" --period "$PERIOD" | tee bench-results/soak.md
