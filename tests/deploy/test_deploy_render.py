"""Every overlay and optional component renders and validates against pinned schemas."""

from __future__ import annotations

import copy

import deploylib as dl
import pytest

EXPECTED_OVERLAYS = {"gpu", "gpu-tp", "cpu-demo", "multinode"}


def test_expected_overlays_exist():
    assert set(dl.overlays()) >= EXPECTED_OVERLAYS


def test_every_target_renders(rendered):
    assert {f"overlay:{o}" for o in dl.overlays()} | {
        f"gpu+{c}" for c in dl.addon_components()
    } == set(rendered)
    for name, objs in rendered.items():
        assert objs, f"{name} rendered nothing"
        for o in objs:
            assert o.get("apiVersion") and o.get("kind") and o.get("metadata", {}).get("name"), (
                name,
                o,
            )


def test_components_add_what_they_promise(rendered):
    kinds = {t: {o["kind"] for o in objs} for t, objs in rendered.items()}
    assert "ScaledObject" in kinds["gpu+keda"]
    assert "HorizontalPodAutoscaler" in kinds["gpu+hpa"]
    assert "ServiceMonitor" in kinds["gpu+monitoring"]
    assert "PrometheusRule" in kinds["gpu+alerts"]
    assert {"InferencePool", "HTTPRoute"} <= kinds["gpu+inference-gateway"]
    assert "LeaderWorkerSet" in kinds["overlay:multinode"]
    assert "Deployment" not in kinds["overlay:multinode"]


@pytest.mark.parametrize("k8s_version", dl.K8S_VERSIONS)
def test_schema_valid_strict(rendered, k8s_version):
    errors = []
    for target, objs in rendered.items():
        for r in dl.validate_objects(objs, k8s_version):
            if r["error"]:
                errors.append(f"{target}: {r['kind']}/{r['name']}: {r['error']}")
    assert not errors, "\n".join(errors)


def test_validator_rejects_unknown_and_mistyped_fields(rendered):
    """The validation is strict for built-in kinds and for the CRD schemas alike."""
    objs = rendered["overlay:multinode"] + rendered["gpu+keda"] + rendered["gpu+inference-gateway"]
    broken = []
    for o in objs:
        o = copy.deepcopy(o)
        if o["kind"] == "Service":
            o["spec"]["ports"][0]["targetPortt"] = "http"
        elif o["kind"] == "Deployment":
            o["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] = {
                "x": 1
            }
        elif o["kind"] == "LeaderWorkerSet":  # via $ref into the core PodTemplateSpec schema
            o["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0][
                "envv"
            ] = []
        elif o["kind"] == "ScaledObject":
            o["spec"]["minReplicaCount"] = "one"
        elif o["kind"] == "InferencePool":
            o["spec"]["targetPortNumber"] = 8000
        elif o["kind"] == "HTTPRoute":
            o["spec"]["rules"][0]["backendRefs"][0]["weight"] = -1
        else:
            continue
        broken.append(o)
    results = dl.validate_objects(broken, dl.K8S_VERSIONS[0])
    assert {r["kind"] for r in results} >= {
        "Service",
        "Deployment",
        "LeaderWorkerSet",
        "ScaledObject",
        "InferencePool",
        "HTTPRoute",
    }
    accepted = [f"{r['kind']}/{r['name']}" for r in results if not r["error"]]
    assert not accepted, f"validator accepted broken objects: {accepted}"


def test_unknown_kind_is_an_error_not_a_skip():
    res = dl.validate_objects(
        [{"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "x"}}],
        dl.K8S_VERSIONS[0],
    )
    assert res[0]["error"] and "no schema" in res[0]["error"]
