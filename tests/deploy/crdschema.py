"""Upstream CustomResourceDefinitions (tests/deploy/crds/) turned into JSON schemas.

The CRD files are the source of truth for custom resources: a CR is validated against
the openAPIV3Schema of the CRD version its apiVersion names, the way the API server
does with strict field validation (what `kubectl apply` asks for by default):

- an object field the schema does not declare is an error (the server would prune it,
  and strict validation rejects it), unless x-kubernetes-preserve-unknown-fields;
- x-kubernetes-int-or-string, x-kubernetes-embedded-resource, nullable and the
  OpenAPI v3.0 boolean exclusiveMinimum/Maximum get their JSON-schema equivalents;
- x-kubernetes-list-type set/map: duplicate items/keys are errors (see
  LIST_TYPE_KEYWORD, applied by the validator in _toolside.py);
- the root `metadata` is checked against the core ObjectMeta schema, as the server does;
- Go RE2 patterns the `re` module reads differently are rewritten (`^(?i)x` -> `^(?i:x)`).

Not evaluated: x-kubernetes-validations (CEL rules) and `format`. Stricter than the
server on one point: a null for a non-nullable field fails here (the server drops it).
Any schema keyword not handled here is an error, so a new CRD cannot be half-checked.

Imported by _toolside.py (tools venv) and by the tests (project venv): PyYAML only.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re

import yaml

HERE = pathlib.Path(__file__).resolve().parent
CRDS = HERE / "crds"
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the LWS CRD is 1.3 MB

# Keywords copied as they are (descending into sub-schemas where they hold any).
_PLAIN = {
    "type", "format", "enum", "pattern", "required", "title",
    "minLength", "maxLength", "minItems", "maxItems", "uniqueItems",
    "minProperties", "maxProperties", "minimum", "maximum", "multipleOf",
    "default",  # kept: list-map keys fall back to their default, as on the server
}  # fmt: skip
_DROPPED = {"description", "example", "x-kubernetes-validations", "x-kubernetes-map-type"}
_X_HANDLED = {
    "nullable",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
}
LIST_TYPE_KEYWORD = "x-kubernetes-list-type"
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


@dataclasses.dataclass(frozen=True)
class CRDVersion:
    file: str  # relative to crds/
    api_version: str  # group/version
    kind: str
    served: bool
    schema: dict  # the version's openAPIV3Schema, as upstream wrote it


class UnsupportedSchema(ValueError):
    pass


def crd_files(root: pathlib.Path = CRDS) -> list[pathlib.Path]:
    return sorted(root.rglob("*.yaml"))


def load(root: pathlib.Path = CRDS) -> dict[tuple[str, str], CRDVersion]:
    """(apiVersion, kind) -> CRD version, for every version of every CRD under root."""
    index: dict[tuple[str, str], CRDVersion] = {}
    for path in crd_files(root):
        rel = path.relative_to(root).as_posix()
        docs = [d for d in yaml.load_all(path.read_text(), Loader=_LOADER) if d]
        for doc in docs:
            if (doc.get("apiVersion"), doc.get("kind")) != (
                "apiextensions.k8s.io/v1",
                "CustomResourceDefinition",
            ):
                raise UnsupportedSchema(f"{rel}: not an apiextensions.k8s.io/v1 CRD")
            spec = doc["spec"]
            for v in spec["versions"]:
                key = (f"{spec['group']}/{v['name']}", spec["names"]["kind"])
                if key in index:
                    raise UnsupportedSchema(f"{rel}: {key} also defined by {index[key].file}")
                index[key] = CRDVersion(
                    rel, key[0], key[1], bool(v.get("served")), v["schema"]["openAPIV3Schema"]
                )
    return index


def re2_pattern(pattern: str) -> str:
    """A Go RE2 pattern in a form Python's `re` reads the same way.

    RE2 allows flag groups like `(?i)` mid-pattern (flags apply to the rest of the
    enclosing group); Python only at the start. At top level, `(?i)rest` equals the
    scoped group `(?i:rest)`. Anything else `re` rejects is reported, not guessed at.
    """
    m = re.search(r"\(\?([imsU]+)\)", pattern)
    if m and m.start() > 0:
        before = pattern[: m.start()]
        depth = len(re.findall(r"(?<!\\)\(", before)) - len(re.findall(r"(?<!\\)\)", before))
        if depth == 0 and "U" not in m.group(1):
            pattern = f"{before}(?{m.group(1)}:{pattern[m.end() :]})"
    try:
        re.compile(pattern)
    except re.error as e:
        raise UnsupportedSchema(f"pattern {pattern!r}: {e}") from e
    return pattern


def to_json_schema(node: dict, where: str = "", structural: bool = True) -> dict:
    """One CRD (OpenAPI v3 structural) schema node as a JSON Schema 2020-12 node.

    `structural` is False inside anyOf/allOf/oneOf/not, where CRD schemas may only
    restate constraints: unknown-field strictness belongs to the structural node.
    """
    out: dict = {}
    for k, v in node.items():
        at = f"{where}.{k}" if where else k
        if k in _DROPPED or k in _X_HANDLED:
            continue
        if k in _PLAIN:
            out[k] = re2_pattern(v) if k == "pattern" else v
        elif k == "properties":
            out[k] = {n: to_json_schema(s, f"{at}.{n}", structural) for n, s in v.items()}
        elif k in ("items", "additionalProperties") and isinstance(v, dict):
            out[k] = to_json_schema(v, at, structural)
        elif k == "additionalProperties":
            out[k] = v
        elif k in ("anyOf", "allOf", "oneOf"):
            out[k] = [to_json_schema(s, f"{at}[{i}]", False) for i, s in enumerate(v)]
        elif k == "not":
            out[k] = to_json_schema(v, at, False)
        else:
            raise UnsupportedSchema(f"{at}: schema keyword {k!r} is not handled")
    if node.get(LIST_TYPE_KEYWORD) in ("set", "map"):
        out[LIST_TYPE_KEYWORD] = node[LIST_TYPE_KEYWORD]
        out["x-kubernetes-list-map-keys"] = node.get("x-kubernetes-list-map-keys", [])
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if node.get(bound) is True and limit in out:  # OpenAPI 3.0 boolean form
            out[bound] = out.pop(limit)
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out and "type" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if (
        structural
        and (node.get("type") == "object" or "properties" in node)
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False  # unknown fields: pruned, so strict rejects
    return out


def cr_schema(crd: CRDVersion, object_meta_ref: str) -> dict:
    """The JSON schema a custom resource of this CRD version must satisfy."""
    try:
        schema = to_json_schema(crd.schema)
    except UnsupportedSchema as e:
        raise UnsupportedSchema(f"{crd.file} {crd.api_version} {crd.kind}: {e}") from e
    props = schema.setdefault("properties", {})
    # The CRD's own metadata schema is at most a few extra limits; the server checks
    # the rest of ObjectMeta itself (names, labels, unknown fields).
    crd_meta = to_json_schema(crd.schema.get("properties", {}).get("metadata", {}), "", False)
    props["metadata"] = {"allOf": [{"$ref": object_meta_ref}, crd_meta]}
    props["apiVersion"] = {"const": crd.api_version}
    props["kind"] = {"const": crd.kind}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def duplicate_list_items(list_type: str, map_keys: list[str], items_schema: dict, instance):
    """Messages for items a set/map list holds twice (the server rejects them)."""
    if list_type not in ("set", "map") or not isinstance(instance, list):
        return  # atomic (the default): duplicates are allowed
    defaults = {
        k: (items_schema.get("properties", {}).get(k) or {}).get("default") for k in map_keys
    }
    seen: dict[str, int] = {}
    for i, item in enumerate(instance):
        if list_type == "map" and isinstance(item, dict):
            ident = json.dumps([item.get(k, defaults[k]) for k in map_keys])
            what = f"key {dict(zip(map_keys, json.loads(ident), strict=True))}"
        else:
            ident, what = json.dumps(item, sort_keys=True), f"value {item!r}"
        if ident in seen:
            yield f"[{i}]: duplicate {what} (also at [{seen[ident]}], list-type {list_type})"
        seen.setdefault(ident, i)
