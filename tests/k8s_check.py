"""Checks on the Helm chart's rendered manifests and the Istio files, for tests/k8s.sh.

Run with the project venv's python (PyYAML from tests/requirements.txt):

  k8s_check.py split RENDER CORE_OUT          core kinds to CORE_OUT (for kubernetes-validate)
  k8s_check.py crds RENDER                    ServiceMonitor fields (not in the core schemas)
  k8s_check.py invariants RENDER              the chart's production defaults and wiring
  k8s_check.py policies RENDER CHART [VALUES] every policy file survives the ConfigMap encoding
  k8s_check.py materialize RENDER ROOT [VOLUME=DIR ...]
                                              write the files as the pod sees them under ROOT
  k8s_check.py istio ISTIO_DIR RENDER         Istio resources, and that they match the chart
  k8s_check.py docker REPO [IMAGE_ROOT]       the Dockerfile's build context has what cargo needs;
                                              the final stage's COPYs of it laid out under IMAGE_ROOT

Each prints what it checked and exits 1 on the first problem.
"""

import json
import os
import re
import sys
import tomllib

import yaml

# Kinds whose schemas kubernetes-validate does not ship; checked here instead.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

CONFIG_DIR = "/etc/meshauthz"


class CheckError(Exception):
    pass


def expect(cond, message):
    if not cond:
        raise CheckError(message)


def load_all(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def one(docs, kind, suffix=None):
    found = [
        d
        for d in docs
        if d["kind"] == kind and (suffix is None or d["metadata"]["name"].endswith(suffix))
    ]
    expect(len(found) == 1, f"expected one {kind}{' *' + suffix if suffix else ''}, found {len(found)}")
    return found[0]


def maybe(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    expect(len(found) <= 1, f"more than one {kind}")
    return found[0] if found else None


def container(deploy):
    containers = deploy["spec"]["template"]["spec"]["containers"]
    expect(len(containers) == 1, "the Deployment should run exactly one container")
    return containers[0]


def volume(deploy, name):
    for v in deploy["spec"]["template"]["spec"].get("volumes", []):
        if v["name"] == name:
            return v
    raise CheckError(f"no volume {name}")


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def cmd_split(render, out):
    docs = load_all(render)
    core = [d for d in docs if (d["apiVersion"], d["kind"]) not in CRD_KINDS]
    with open(out, "w", encoding="utf-8") as f:
        yaml.safe_dump_all(core, f, sort_keys=False)
    print(f"ok: {len(core)} core documents, {len(docs) - len(core)} custom resources")


def cmd_crds(render):
    docs = load_all(render)
    sm = maybe(docs, "ServiceMonitor")
    if sm is None:
        print("ok: no custom resources rendered")
        return
    expect(sm["apiVersion"] == "monitoring.coreos.com/v1", "ServiceMonitor apiVersion")
    svc = one(docs, "Service")
    spec = sm["spec"]
    expect(
        selects(spec["selector"]["matchLabels"], svc["metadata"]["labels"]),
        "ServiceMonitor selector does not match the Service's labels",
    )
    expect(
        spec.get("namespaceSelector", {}).get("matchNames") == [svc["metadata"]["namespace"]],
        "ServiceMonitor namespaceSelector should name the release namespace",
    )
    endpoints = spec["endpoints"]
    expect(len(endpoints) == 1, "one scrape endpoint")
    ep = endpoints[0]
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    expect(ep["port"] == "http" and "http" in port_names, "scrape the Service port named http")
    expect(ep["path"] == "/metrics", "scrape /metrics")
    for key in ("interval", "scrapeTimeout"):
        expect(isinstance(ep.get(key), str) and ep[key][-1] in "smh", f"endpoint {key} is a duration")
    expect(set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "tlsConfig"},
           f"unexpected endpoint keys {sorted(ep)}")
    print("ok: ServiceMonitor selects the Service and scrapes http /metrics")


def cmd_invariants(render):
    docs = load_all(render)
    deploy = one(docs, "Deployment")
    svc = one(docs, "Service")
    config_cm = one(docs, "ConfigMap", "-config")
    policies_cm = one(docs, "ConfigMap", "-policies")
    pod = deploy["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    pod_spec = pod["spec"]
    c = container(deploy)
    config = yaml.safe_load(config_cm["data"]["meshauthz.yaml"])

    expect(selects(deploy["spec"]["selector"]["matchLabels"], pod_labels), "Deployment selector")
    expect(selects(svc["spec"]["selector"], pod_labels), "Service selector does not match the pods")

    # Ports: named, appProtocol for Istio, and the config listening where the pod says.
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    expect(set(ports) == {"grpc", "http"}, f"Service ports {sorted(ports)}")
    expect(ports["grpc"]["appProtocol"] == "grpc", "grpc appProtocol")
    expect(ports["http"]["appProtocol"] == "http", "http appProtocol")
    cports = {p["name"]: p["containerPort"] for p in c["ports"]}
    expect(config["server"]["grpc_addr"].endswith(f":{cports['grpc']}"), "grpc_addr vs containerPort")
    expect(config["server"]["http_addr"].endswith(f":{cports['http']}"), "http_addr vs containerPort")
    for name in ("grpc", "http"):
        expect(ports[name]["targetPort"] == name, f"Service {name} targets the named port")

    # Hardening.
    psc = pod_spec["securityContext"]
    expect(psc.get("runAsNonRoot") is True, "runAsNonRoot")
    expect(psc.get("runAsUser") == 65532 and psc.get("runAsGroup") == 65532, "uid/gid 65532")
    expect(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "seccomp RuntimeDefault")
    sc = c["securityContext"]
    expect(sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem")
    expect(sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation false")
    expect(sc.get("capabilities", {}).get("drop") == ["ALL"], "capabilities drop ALL")
    expect(pod_spec.get("automountServiceAccountToken") is False, "no API token in the pod")

    # Probes and resources.
    expect(c["livenessProbe"]["httpGet"]["path"] == "/healthz", "liveness /healthz")
    expect(c["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness /readyz")
    for probe in ("livenessProbe", "readinessProbe"):
        expect(c[probe]["httpGet"]["port"] == "http", f"{probe} on port http")
    res = c["resources"]
    expect("cpu" in res["requests"] and "memory" in res["requests"], "requests cpu and memory")
    expect("memory" in res["limits"], "a memory limit")
    expect("cpu" not in res.get("limits", {}), "no CPU limit (throttling is latency)")

    # Shutdown: the kubelet waits longer than preStop + shutdown_grace.
    grace = config["server"].get("shutdown_grace", "10s")
    expect(grace.endswith("s") and grace[:-1].isdigit(), f"test expects whole seconds, got {grace}")
    pre = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    tgps = pod_spec["terminationGracePeriodSeconds"]
    expect(tgps > pre + int(grace[:-1]), f"terminationGracePeriodSeconds {tgps} <= {pre} + {grace}")

    # Istio: out of the mesh, on purpose.
    expect(pod["metadata"]["annotations"].get("sidecar.istio.io/inject") == "false",
           "sidecar.istio.io/inject annotation")
    expect(pod_labels.get("sidecar.istio.io/inject") == "false", "sidecar.istio.io/inject label")

    # Config changes roll the pods; policy changes hot reload (no checksum, a watched volume).
    annotations = pod["metadata"]["annotations"]
    expect(any(k == "checksum/config" for k in annotations), "checksum/config annotation")
    expect(not any("polic" in k for k in annotations), "no policy checksum annotation")
    expect(config["policy"]["paths"] == ["policies"], "policy.paths is the mounted directory")
    expect(config["policy"].get("watch", True) is True, "policy.watch on (hot reload)")
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    expect(mounts["policies"]["mountPath"] == f"{CONFIG_DIR}/policies", "policy mount path")
    expect("subPath" not in mounts["policies"], "a subPath mount would never update")
    expect(c["args"][:3] == ["serve", "--config", f"{CONFIG_DIR}/meshauthz.yaml"], "container args")
    expect(all(m.get("readOnly") for m in c["volumeMounts"]), "every mount read-only")
    pv = volume(deploy, "policies")["configMap"]
    expect(pv["name"] == policies_cm["metadata"]["name"], "policy volume names the policy ConfigMap")
    expect(sorted(i["key"] for i in pv["items"]) == sorted(policies_cm["data"]),
           "every policy ConfigMap key is mounted")

    # Spreading and disruption.
    tsc = pod_spec.get("topologySpreadConstraints", [])
    expect({t["topologyKey"] for t in tsc} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"},
           "spread across zones and hosts")
    expect(all(t["whenUnsatisfiable"] == "ScheduleAnyway" for t in tsc), "ScheduleAnyway")
    pdb = maybe(docs, "PodDisruptionBudget")
    if pdb:
        expect(selects(pdb["spec"]["selector"]["matchLabels"], pod_labels), "PDB selector")
    hpa = maybe(docs, "HorizontalPodAutoscaler")
    if hpa:
        expect("replicas" not in deploy["spec"], "with an HPA the Deployment leaves replicas to it")
        expect(hpa["spec"]["scaleTargetRef"]["name"] == deploy["metadata"]["name"], "HPA target")
    else:
        expect(deploy["spec"]["replicas"] >= 2, "at least two replicas")
    netpol = maybe(docs, "NetworkPolicy")
    if netpol:
        expect(selects(netpol["spec"]["podSelector"]["matchLabels"], pod_labels), "NetworkPolicy selector")
        opened = {p["port"] for rule in netpol["spec"]["ingress"] for p in rule["ports"]}
        expect(opened == {"grpc", "http"}, f"NetworkPolicy opens {sorted(opened)}")
        http_authz = config["server"].get("http_authz", {}).get("enabled", False)
        client_ports = {p["port"] for p in netpol["spec"]["ingress"][0]["ports"]}
        expect(("http" in client_ports) == http_authz, "clients reach http exactly when http_authz is on")
    print(f"ok: {deploy['metadata']['name']}: selectors, ports, hardening, probes, shutdown, reload wiring")


def rendered_policy_files(docs):
    """Policy files as the pod sees them: path under the policy root -> content."""
    deploy = one(docs, "Deployment")
    cm = one(docs, "ConfigMap", "-policies")
    items = volume(deploy, "policies")["configMap"]["items"]
    return {i["path"]: cm["data"][i["key"]] for i in items}


def cmd_policies(render, chart, values=None):
    docs = load_all(render)
    vals = {}
    if values:
        with open(values, encoding="utf-8") as f:
            vals = yaml.safe_load(f) or {}
    with open(os.path.join(chart, "values.yaml"), encoding="utf-8") as f:
        defaults = yaml.safe_load(f)
    expected = {}
    src = vals.get("policiesFromFiles", defaults["policiesFromFiles"])
    if src:
        base = os.path.join(chart, src)
        for d, _, files in os.walk(base):
            for name in files:
                full = os.path.join(d, name)
                with open(full, encoding="utf-8", newline="") as f:
                    expected[os.path.relpath(full, base)] = f.read()
    expected.update(vals.get("policies") or {})
    got = rendered_policy_files(docs)
    expect(sorted(got) == sorted(expected), f"policy files {sorted(got)} != {sorted(expected)}")
    for path, content in expected.items():
        expect(got[path] == content, f"{path}: content changed in the ConfigMap encoding")
    print(f"ok: {len(got)} policy files byte for byte at their paths")


def write_atomic_volume(mount_dir, payload):
    """Lays a volume out as the kubelet's AtomicWriter does: the files in a timestamped
    directory, a ..data symlink to it, and one symlink per top-level entry."""
    stamp = "..2026_01_01_00_00_00.000000000"
    for path, content in payload.items():
        target = os.path.join(mount_dir, stamp, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w", encoding="utf-8", newline="") as f:
            f.write(content)
    os.symlink(stamp, os.path.join(mount_dir, "..data"))
    for top in sorted({p.split("/")[0] for p in payload}):
        os.symlink(os.path.join("..data", top), os.path.join(mount_dir, top))


def cmd_materialize(render, root, externals):
    """Writes every volume mount of the container under ROOT. ConfigMaps come from the render;
    volumes whose source is not rendered (secrets, other teams' ConfigMaps) from VOLUME=DIR."""
    docs = load_all(render)
    deploy = one(docs, "Deployment")
    c = container(deploy)
    cms = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    ext = {}
    for arg in externals:
        name, _, d = arg.partition("=")
        files = {}
        for n in os.listdir(d):
            with open(os.path.join(d, n), encoding="utf-8", newline="") as f:
                files[n] = f.read()
        ext[name] = files
    for m in c["volumeMounts"]:
        v = volume(deploy, m["name"])
        if "configMap" in v and v["configMap"]["name"] in cms:
            data, src = cms[v["configMap"]["name"]], v["configMap"]
        elif v["name"] in ext:
            data, src = ext[v["name"]], v.get("configMap") or v.get("secret")
        else:
            raise CheckError(f"volume {v['name']}: no rendered ConfigMap and no VOLUME=DIR given")
        if "items" in src:
            payload = {i["path"]: data[i["key"]] for i in src["items"]}
        else:
            payload = dict(data)
        dest = root + m["mountPath"]
        if "subPath" in m:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "w", encoding="utf-8", newline="") as f:
                f.write(payload[m["subPath"]])
        else:
            os.makedirs(dest, exist_ok=True)
            write_atomic_volume(dest, payload)
        print(f"ok: {m['mountPath']} ({len(payload)} files)")


def cmd_istio(istio_dir, render):
    docs = load_all(render)
    svc = one(docs, "Service")
    config = yaml.safe_load(one(docs, "ConfigMap", "-config")["data"]["meshauthz.yaml"])
    svc_host = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"
    svc_ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}

    (ap,) = load_all(os.path.join(istio_dir, "authorization-policy.yaml"))
    expect(ap["apiVersion"] == "security.istio.io/v1", "AuthorizationPolicy apiVersion")
    expect(ap["kind"] == "AuthorizationPolicy", "AuthorizationPolicy kind")
    spec = ap["spec"]
    expect(spec["action"] == "CUSTOM", "action CUSTOM")
    expect(spec["provider"]["name"] == "meshauthz", "provider meshauthz")
    expect(spec["selector"]["matchLabels"] == {"app": "backend"}, "selects app: backend")
    expect(ap["metadata"]["namespace"] == "shop", "namespace shop")
    rules = spec["rules"]
    expect(isinstance(rules, list) and rules, "CUSTOM needs rules (without them nothing is checked)")
    not_paths = rules[0]["to"][0]["operation"]["notPaths"]
    expect(sorted(not_paths) == ["/healthz", "/readyz"], "health paths skip the check")
    print("ok: authorization-policy.yaml")

    def provider(file, key):
        (doc,) = load_all(os.path.join(istio_dir, file))
        providers = doc["spec"]["meshConfig"]["extensionProviders"]
        expect(len(providers) == 1, f"{file}: one provider")
        p = providers[0]
        expect(p["name"] == spec["provider"]["name"], f"{file}: the name the AuthorizationPolicy uses")
        expect(set(p) == {"name", key}, f"{file}: only {key}")
        e = p[key]
        expect(e["service"] == svc_host, f"{file}: service {e['service']} != the chart's {svc_host}")
        expect(e["failOpen"] is False, f"{file}: failOpen false")
        expect(e["statusOnError"] == "403", f"{file}: statusOnError \"403\" (a string)")
        expect(e["timeout"] == "250ms", f"{file}: explicit timeout")
        return e

    g = provider("extension-provider.yaml", "envoyExtAuthzGrpc")
    expect(g["port"] == svc_ports["grpc"], "gRPC provider port is the Service's grpc port")
    print("ok: extension-provider.yaml")

    h = provider("extension-provider-http.yaml", "envoyExtAuthzHttp")
    expect(h["port"] == svc_ports["http"], "HTTP provider port is the Service's http port")
    prefix = config["server"].get("http_authz", {}).get("path_prefix", "/authz")
    expect(h["pathPrefix"] == prefix, "pathPrefix is meshauthz's http_authz.path_prefix")
    expect(h["includeRequestHeadersInCheck"] == ["authorization", "x-forwarded-client-cert"],
           "token and XFCC sent to meshauthz")
    expect(h["headersToUpstreamOnAllow"] == ["x-jwt-sub", "x-meshauthz-peer"], "identity headers upstream")
    expect(h["headersToDownstreamOnDeny"] == ["www-authenticate", "content-type"], "denial headers")
    print("ok: extension-provider-http.yaml")


def dockerignore_regex(pattern):
    """A .dockerignore pattern as a regex (Go filepath.Match plus '**', as BuildKit reads it)."""
    out = ""
    i = 0
    pattern = pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + "$")


def cmd_docker(repo, image_root=None):
    """Which files the build context holds (.dockerignore: the last matching pattern wins, and a
    pattern matching a parent directory matches the file), then: every COPY source is in it, and
    so is every target Cargo.toml declares, or `cargo build` fails inside the image build. With
    IMAGE_ROOT, the final stage's files from the context are written there (to validate the
    image's bundled config)."""
    rules = []
    with open(os.path.join(repo, ".dockerignore"), encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                neg = line.startswith("!")
                rules.append((neg, dockerignore_regex(line.lstrip("!"))))

    def included(path):
        parts = path.split("/")
        keep = True
        for neg, rx in rules:
            if any(rx.match("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
                keep = neg
        return keep

    files = []
    for d, dirs, names in os.walk(repo):
        dirs[:] = [x for x in dirs if x not in (".git", "target", ".venv", ".tools")]
        files += [os.path.relpath(os.path.join(d, n), repo) for n in names]
    context = {f for f in files if included(f)}
    expect(not any(f.startswith(("tests/", "k8s/")) for f in context), "tests/ or k8s/ in the context")

    copied = []
    final_stage = []  # (source, destination) of the last stage's COPYs from the context
    with open(os.path.join(repo, "Dockerfile"), encoding="utf-8") as f:
        for line in f:
            words = line.split()
            if words[:1] == ["FROM"]:
                final_stage = []
            if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
                copied += words[1:-1]
                final_stage += [(src, words[-1]) for src in words[1:-1]]
    for src in copied:
        expect(any(f == src or f.startswith(src.rstrip("/") + "/") for f in context),
               f"COPY {src}: nothing of it in the build context")

    def in_image(path):
        return path in context and any(path == c or path.startswith(c.rstrip("/") + "/") for c in copied)

    with open(os.path.join(repo, "Cargo.toml"), "rb") as f:
        manifest = tomllib.load(f)
    needed = ["Cargo.toml", "Cargo.lock", "src/main.rs", "src/lib.rs"]
    defaults = {"bench": "benches", "test": "tests", "example": "examples", "bin": "src/bin"}
    for kind, folder in defaults.items():
        for t in manifest.get(kind, []):
            needed.append(t.get("path", f"{folder}/{t['name']}.rs"))
    for path in needed:
        expect(in_image(path), f"{path} (Cargo.toml needs it) is not copied into the build stage")
    print(f"ok: {len(context)} files in the build context; {len(needed)} files cargo needs are copied")
    # The bundled config binds loopback (its demo key is public); the image must say 0.0.0.0.
    with open(os.path.join(repo, "Dockerfile"), encoding="utf-8") as f:
        cmd = [json.loads(l[len("CMD"):]) for l in f if l.startswith("CMD ")]
    expect(cmd and "--grpc-addr" in cmd[-1] and "0.0.0.0:9191" in cmd[-1]
           and "--http-addr" in cmd[-1] and "0.0.0.0:8181" in cmd[-1],
           f"the image's CMD must bind 0.0.0.0 explicitly: {cmd}")
    if image_root:
        n = 0
        for src, dest in final_stage:
            src = src.rstrip("/")
            for path in sorted(context):
                if path == src or path.startswith(src + "/"):
                    target = image_root + dest.rstrip("/") + path[len(src):]
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    with open(os.path.join(repo, path), "rb") as fin, open(target, "wb") as fout:
                        fout.write(fin.read())
                    n += 1
        print(f"ok: {n} files of the final stage under {image_root}")


def main(argv):
    cmds = {
        "split": lambda a: cmd_split(a[0], a[1]),
        "crds": lambda a: cmd_crds(a[0]),
        "invariants": lambda a: cmd_invariants(a[0]),
        "policies": lambda a: cmd_policies(a[0], a[1], a[2] if len(a) > 2 else None),
        "materialize": lambda a: cmd_materialize(a[0], a[1], a[2:]),
        "istio": lambda a: cmd_istio(a[0], a[1]),
        "docker": lambda a: cmd_docker(a[0], a[1] if len(a) > 1 else None),
    }
    if len(argv) < 2 or argv[1] not in cmds:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        cmds[argv[1]](argv[2:])
    except (CheckError, KeyError) as e:
        print(f"FAIL: {argv[1]}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
