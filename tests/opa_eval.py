"""Evaluate a Rego query with OPA's own Go engine, one input per line.

Why this exists: meshauthz evaluates policies with regorus, a reimplementation of Rego.
This script gives the reference answer for the same policy directory and inputs, so a
test can diff regorus' decisions against OPA's. It uses the PyPI package
`opa-golib-python-bindings` (import `opa_bindings`), which embeds OPA's
`github.com/open-policy-agent/opa/v1/rego` as a Go shared library; nothing is fetched
at run time.

    python tests/opa_eval.py --policies DIR --query data.envoy.authz.result \
        < inputs.jsonl > results.jsonl

DIR is read with meshauthz's loader rules (src/policy/loader.rs): every `*.rego` except
`*_test.rego` is a module; every `*.json` / `*.yaml` / `*.yml` is a data document mounted
at `data.<its directory relative to DIR>`; names starting with `.` are skipped; symlinks
are followed. YAML is parsed by OPA's own `yaml.unmarshal`, so no YAML library is needed.

Each stdin line is one JSON input document (blank lines are skipped); each output line is
`{"result": <value>}`, `{"undefined": true}` or `{"error": "<message>"}` (sets come out as
arrays). A policy or data file that does not parse or compile is reported on stderr with
exit status 1. Modules are parsed as Rego v1 (OPA 1.x's default; v0 syntax is rejected).
"""

import argparse
import json
import os
import sys

from opa_bindings import OpaEngine, OpaError, OpaUndefinedError


def load(engine, root):
    """Adds the modules and data documents under `root` to `engine`."""
    yaml_engine = None  # a separate engine, so parsing YAML never compiles the policies
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        mount = [] if rel == "." else rel.split(os.sep)
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if name.startswith(".") or name.endswith("_test.rego"):
                continue
            if name.endswith(".rego"):
                with open(path, encoding="utf-8") as f:
                    engine.add_policy(os.path.relpath(path, root), f.read())
                continue
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if name.endswith(".json"):
                value = json.loads(text)
            elif name.endswith((".yaml", ".yml")):
                yaml_engine = yaml_engine or OpaEngine()
                value = yaml_engine.eval_query("x = yaml.unmarshal(input)", text)[0]["x"]
            else:
                continue
            for key in reversed(mount):  # nest by hand: add_data's dotted path can't hold a "."
                value = {key: value}
            engine.add_data(value)
    engine.eval_query("true")  # compiles every module now, so a compile error fails the load


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", required=True, help="policy directory")
    ap.add_argument("--query", required=True, help="a data reference, e.g. data.envoy.authz.result")
    args = ap.parse_args()
    if args.query != "data" and not args.query.startswith("data."):
        ap.error("--query must be `data` or start with `data.`")
    path = args.query[len("data."):]  # eval_document takes the path without "data."

    engine = OpaEngine()
    try:
        load(engine, args.policies)
    except (OpaError, OSError, ValueError) as e:
        print(f"opa_eval: loading {args.policies}: {e}", file=sys.stderr)
        return 1

    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            out = {"result": engine.eval_document(path, json.loads(line))}
        except OpaUndefinedError:
            out = {"undefined": True}
        except OpaError as e:
            out = {"error": str(e)}
        except ValueError as e:
            out = {"error": f"input is not JSON: {e}"}
        sys.stdout.write(json.dumps(out, sort_keys=True) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
