"""The upstream CRD copies in tests/deploy/crds/ are intact, and crdschema reads them.

The copies are what CI validates against (a clean clone has no shared folder beside it), so
they are pinned by SHA256SUMS, taken from the shared folder's files when they were copied (each
copy compared byte for byte with ``cmp`` then; see the README). A test that compared with the
shared folder itself could only skip in CI, so there is none.
"""

from __future__ import annotations

import hashlib
import re

import crdschema
import pytest

CRDS = crdschema.CRDS
NOT_UPSTREAM = {"README.md", "SHA256SUMS"}  # written here, not copied


def copied_files() -> list[str]:
    return sorted(
        p.relative_to(CRDS).as_posix()
        for p in CRDS.rglob("*")
        if p.is_file() and p.name not in NOT_UPSTREAM
    )


def recorded_sums() -> dict[str, str]:
    sums = {}
    for line in (CRDS / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        sums[name.lstrip("*")] = digest
    return sums


def test_copies_match_recorded_checksums():
    assert copied_files() == sorted(recorded_sums()), "SHA256SUMS must list every copied file"
    changed = [
        name
        for name, digest in recorded_sums().items()
        if hashlib.sha256((CRDS / name).read_bytes()).hexdigest() != digest
    ]
    assert not changed, f"upstream files edited (they must stay byte-identical): {changed}"


def test_readme_names_every_crd_and_the_licenses():
    readme = (CRDS / "README.md").read_text()
    unlisted = [n for n in copied_files() if f"`{n}`" not in readme]
    assert not unlisted, f"tests/deploy/crds/README.md does not list: {unlisted}"
    assert {"LICENSE-APACHE-2.0", "NOTICE-prometheus-operator"} <= set(copied_files())


def test_every_crd_version_converts():
    """Each served version becomes a JSON schema; an unhandled keyword would raise."""
    index = crdschema.load()
    assert {crd.file for crd in index.values()} == {
        n for n in copied_files() if n.endswith(".yaml")
    }
    for crd in index.values():
        schema = crdschema.cr_schema(crd, "urn:test#ObjectMeta")
        assert schema["properties"]["kind"] == {"const": crd.kind}
        assert schema["additionalProperties"] is False


# ------------------------------------------------ the CRD -> JSON schema conversion
def test_unknown_fields_are_rejected_unless_preserved():
    conv = crdschema.to_json_schema(
        {
            "type": "object",
            "properties": {
                "spec": {"type": "object", "properties": {"a": {"type": "string"}}},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "map": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        }
    )
    assert conv["additionalProperties"] is False
    assert conv["properties"]["spec"]["additionalProperties"] is False
    assert "additionalProperties" not in conv["properties"]["free"]
    assert conv["properties"]["map"]["additionalProperties"] == {"type": "string"}


def test_kubernetes_extensions_translated():
    conv = crdschema.to_json_schema(
        {
            "type": "object",
            "properties": {
                "port": {"x-kubernetes-int-or-string": True},
                "opt": {"type": "string", "nullable": True},
                "n": {"type": "integer", "minimum": 0, "exclusiveMinimum": True},
                "tmpl": {"type": "object", "x-kubernetes-embedded-resource": True},
                "rules": {
                    "type": "array",
                    "items": {"type": "string"},
                    "x-kubernetes-list-type": "set",
                    "x-kubernetes-validations": [{"rule": "self.size() > 0"}],
                },
            },
        }
    )
    p = conv["properties"]
    assert p["port"]["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    assert p["opt"]["type"] == ["string", "null"]
    assert p["n"] == {"type": "integer", "exclusiveMinimum": 0}
    assert set(p["tmpl"]["properties"]) == {"apiVersion", "kind", "metadata"}
    assert p["rules"]["x-kubernetes-list-type"] == "set"
    assert "x-kubernetes-validations" not in p["rules"]


def test_unhandled_keyword_fails_loudly():
    with pytest.raises(crdschema.UnsupportedSchema, match="patternProperties"):
        crdschema.to_json_schema({"type": "object", "patternProperties": {"^a": {}}})


def test_re2_inline_flags_rewritten():
    pat = crdschema.re2_pattern("^(?i)(abort|warn)?$")  # prometheus-operator, Go RE2 syntax
    assert re.search(pat, "WARN") and re.search(pat, "") and not re.search(pat, "stop")


def test_duplicate_list_items():
    items = {"properties": {"protocol": {"type": "string", "default": "TCP"}}}
    dup = [{"port": 80}, {"port": 80, "protocol": "TCP"}, {"port": 80, "protocol": "UDP"}]
    msgs = list(crdschema.duplicate_list_items("map", ["port", "protocol"], items, dup))
    assert len(msgs) == 1 and msgs[0].startswith("[1]: duplicate key")
    assert list(crdschema.duplicate_list_items("set", [], {}, ["a", "b", "a"]))
    assert not list(crdschema.duplicate_list_items("atomic", [], {}, ["a", "a"]))
