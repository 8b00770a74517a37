#!/usr/bin/env bash
# Short runs of every cargo-fuzz target (libFuzzer + AddressSanitizer) from the seed corpora in
# fuzz/seeds/, as part of the test command. Longer runs: FUZZ_SECONDS=600 tests/fuzz.sh [TARGET…]
#
# cargo-fuzz is pinned and installed into .tools/cargo. The targets need nightly-only compiler flags
# (-Zsanitizer); this machine has only the pinned stable toolchain, so RUSTC_BOOTSTRAP=1 lets it
# accept them (the standard way to use sanitizers from a stable toolchain in CI).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
CARGO_FUZZ_VERSION=0.13.2
SECONDS_PER_TARGET=${FUZZ_SECONDS:-10}
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(path spiffe xfcc token check)

if ! .tools/cargo/bin/cargo-fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  cargo install --quiet --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION" --root .tools/cargo
fi
export PATH="$ROOT/.tools/cargo/bin:$PATH"
export RUSTC_BOOTSTRAP=1

cargo fuzz build -s address
passed=0
for t in "${TARGETS[@]}"; do
  scratch=$(mktemp -d)
  # New inputs go to the scratch corpus; the committed seeds stay as they are.
  if cargo fuzz run -s address "$t" "$scratch" "fuzz/seeds/$t" -- \
      -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 -max_len=4096 -print_final_stats=1 \
      > "$scratch.log" 2>&1; then
    runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$scratch.log" | grep -oE '[0-9]+$' || echo "?")
    echo "fuzz $t: ok, $runs executions in ${SECONDS_PER_TARGET}s"
    passed=$((passed + 1))
  else
    echo "fuzz $t: FAILED (crash input in fuzz/artifacts/$t/)"
    tail -40 "$scratch.log"
    rm -rf "$scratch" "$scratch.log"
    echo "fuzz: $passed passed, 1 failed"
    exit 1
  fi
  rm -rf "$scratch" "$scratch.log"
done
echo "fuzz: $passed passed, 0 failed"
