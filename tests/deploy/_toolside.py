"""Checks run with the pinned tools venv (.tools/deploy-venv), not the project venv.

Invoked by tests/deploy as a subprocess so the project's own dependencies never mix
with kubernetes-validate/promql-parser. Reads JSON on stdin, writes JSON on stdout.

  python _toolside.py validate <k8s-version>   stdin: [object, ...]
      -> [{"kind", "name", "error"|null, "schema"}]
  python _toolside.py promql                   stdin: [expr, ...]
      -> [{"expr", "metrics": [...], "matchers": [[metric, label, op, value]...], "error"|null}]
"""

from __future__ import annotations

import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent


def _k8s_registry(version: str):
    import importlib_resources
    import kubernetes_validate.utils as kvu
    import referencing
    import referencing.jsonschema

    avail = [v for v in kvu.all_versions() if kvu.major_minor(v) == kvu.major_minor(version)]
    if not avail:
        raise SystemExit(f"kubernetes-validate has no schemas for {version}")
    defs_path = importlib_resources.files("kubernetes_validate").joinpath(
        f"kubernetes-json-schema/v{avail[-1]}-local-strict/_definitions.json"
    )
    defs = json.loads(defs_path.read_text())
    res = referencing.Resource.from_contents(
        defs, default_specification=referencing.jsonschema.DRAFT202012
    )
    return defs, res


def validate(version: str) -> list[dict]:
    import jsonschema
    import kubernetes_validate
    import referencing
    import yaml
    from kubernetes_validate.utils import SchemaNotFoundError

    objs = json.load(sys.stdin)
    crd = yaml.safe_load((HERE / "crd_schemas.yaml").read_text())
    defs, defs_res = _k8s_registry(version)
    registry = defs_res @ referencing.Registry()
    base = defs["$id"]  # https://kubernetes.io/api/_definitions.json

    def rewrite(node):
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if k == "$ref" and isinstance(v, str) and v.startswith("k8s:"):
                    out[k] = f"{base}#/$defs/{v[4:]}"
                else:
                    out[k] = rewrite(v)
            return out
        if isinstance(node, list):
            return [rewrite(x) for x in node]
        return node

    results = []
    for obj in objs:
        kind = obj.get("kind")
        name = (obj.get("metadata") or {}).get("name")
        key = f"{obj.get('apiVersion')}/{kind}"
        entry = {"kind": kind, "name": name, "error": None, "schema": None}
        try:
            if key in crd:
                schema = rewrite(crd[key])
                schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
                v = jsonschema.Draft202012Validator(schema, registry=registry)
                errs = sorted(v.iter_errors(obj), key=lambda e: list(e.absolute_path))
                if errs:
                    e = errs[0]
                    raise jsonschema.ValidationError(
                        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                    )
                entry["schema"] = f"crd_schemas.yaml:{key}"
            else:
                got = kubernetes_validate.validate(obj, version, strict=True)
                entry["schema"] = f"kubernetes {got} strict"
        except SchemaNotFoundError as e:
            entry["error"] = f"no schema for {key}: {e.message}"
        except jsonschema.ValidationError as e:
            path = ".".join(str(p) for p in e.absolute_path)
            entry["error"] = f"{path}: {e.message}" if path else e.message
        except Exception as e:
            entry["error"] = f"{type(e).__name__}: {e}"
        results.append(entry)
    return results


def promql() -> list[dict]:
    import promql_parser as pp

    out = []
    for expr in json.load(sys.stdin):
        item = {"expr": expr, "metrics": [], "matchers": [], "error": None}
        try:
            ast = pp.parse(expr)
        except Exception as e:
            item["error"] = str(e)
            out.append(item)
            continue
        metrics: set[str] = set()
        stack = [ast]
        while stack:
            node = stack.pop()
            if isinstance(node, pp.MatrixSelector):
                stack.append(node.vector_selector)
            elif isinstance(node, pp.VectorSelector):
                name = node.name
                for m in node.matchers.matchers:
                    if (
                        m.name == "__name__"
                        and str(m.op).endswith("Equal")
                        and "Not" not in str(m.op)
                    ):
                        name = m.value
                    else:
                        item["matchers"].append([name, m.name, str(m.op), m.value])
                if name:
                    metrics.add(name)
            elif isinstance(node, pp.Call):
                stack.extend(a for a in node.args if isinstance(a, pp.Expr))
            elif isinstance(node, pp.BinaryExpr):
                stack.extend([node.lhs, node.rhs])
            elif isinstance(node, (pp.AggregateExpr, pp.UnaryExpr, pp.ParenExpr, pp.SubqueryExpr)):
                stack.append(node.expr)
                if isinstance(node, pp.AggregateExpr) and isinstance(node.param, pp.Expr):
                    stack.append(node.param)
        item["metrics"] = sorted(metrics)
        out.append(item)
    return out


def main() -> None:
    cmd = sys.argv[1]
    if cmd == "validate":
        json.dump(validate(sys.argv[2]), sys.stdout)
    elif cmd == "promql":
        json.dump(promql(), sys.stdout)
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
