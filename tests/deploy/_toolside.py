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


def _crd_validator_class():
    """Draft 2020-12 plus the server's list-type set/map uniqueness check."""
    import crdschema
    import jsonschema

    def list_type(validator, value, instance, schema):
        for msg in crdschema.duplicate_list_items(
            value, schema.get("x-kubernetes-list-map-keys", []), schema.get("items", {}), instance
        ):
            yield jsonschema.ValidationError(msg)

    return jsonschema.validators.extend(
        jsonschema.Draft202012Validator, {crdschema.LIST_TYPE_KEYWORD: list_type}
    )


def _describe(errors, limit: int = 5) -> str | None:
    errs = sorted(errors, key=lambda e: [str(p) for p in e.absolute_path])
    text = "; ".join(
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errs[:limit]
    )
    return (text + (f" (+{len(errs) - limit} more)" if len(errs) > limit else "")) or None


def validate(version: str) -> list[dict]:
    """Built-in kinds: kubernetes-validate, strict. Custom resources: the upstream CRD
    in crds/ for their exact apiVersion and kind. Anything else is an error."""
    import crdschema
    import jsonschema
    import kubernetes_validate
    import referencing
    from kubernetes_validate.utils import SchemaNotFoundError

    objs = json.load(sys.stdin)
    crds = crdschema.load()
    # A CRD group or kind with an apiVersion/kind pair no CRD file defines is a custom
    # resource at a version we have no schema for, not a built-in: say so precisely.
    crd_names = {a.split("/")[0] for a, _ in crds} | {k for _, k in crds}
    defs, defs_res = _k8s_registry(version)
    registry = defs_res @ referencing.Registry()
    meta_ref = f"{defs['$id']}#/$defs/{crdschema.OBJECT_META}"
    validator_cls = _crd_validator_class()
    validators: dict = {}

    results = []
    for obj in objs:
        kind = obj.get("kind")
        name = (obj.get("metadata") or {}).get("name")
        key = (str(obj.get("apiVersion")), str(kind))
        group = key[0].split("/")[0] if "/" in key[0] else ""
        entry = {"kind": kind, "name": name, "error": None, "schema": None}
        crd = crds.get(key)
        try:
            if crd is not None:
                if not crd.served:
                    raise ValueError(f"crds/{crd.file}: version {key[0]} is not served")
                if key not in validators:
                    schema = crdschema.cr_schema(crd, meta_ref)
                    validators[key] = validator_cls(schema, registry=registry)
                entry["error"] = _describe(validators[key].iter_errors(obj))
                entry["schema"] = f"upstream CRD crds/{crd.file} {key[0]}"
            elif group in crd_names or key[1] in crd_names:
                have = sorted(f"{a} {k}" for a, k in crds if k == key[1] or a.startswith(group))
                entry["error"] = (
                    f"no schema for {key[0]} {key[1]}: no upstream CRD in tests/deploy/crds "
                    f"defines this version/kind (it has: {', '.join(have)})"
                )
            else:
                got = kubernetes_validate.validate(obj, version, strict=True)
                entry["schema"] = f"kubernetes {got} strict"
        except SchemaNotFoundError as e:
            entry["error"] = (
                f"no schema for {key[0]} {key[1]}: not a built-in kind of Kubernetes "
                f"{version} and no upstream CRD in tests/deploy/crds ({e.message})"
            )
        except jsonschema.ValidationError as e:
            entry["error"] = _describe([e])
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
