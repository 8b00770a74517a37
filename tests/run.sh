#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, unit and integration tests (the real
# server on ephemeral ports, a real JWKS server, the real binary), and one pass of each benchmark
# in test mode so they never rot. Installs nothing outside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo test"
cargo test --locked --all-targets
