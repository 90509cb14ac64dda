"""Every overlay and optional component renders and validates against pinned schemas:
built-in kinds against the Kubernetes OpenAPI schemas, custom resources against the
upstream CRDs in tests/deploy/crds/ (see crdschema.py)."""

from __future__ import annotations

import copy
import shutil

import crdschema
import deploylib as dl
import pytest
import yaml

EXPECTED_OVERLAYS = {"gpu", "gpu-tp", "cpu-demo", "multinode", "gpu-personas"}


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
    adapters = ("PersistentVolumeClaim", "avatar-llm-adapters")
    assert dl.find(rendered["gpu+personas"], *adapters)
    assert dl.find(rendered["overlay:gpu-personas"], *adapters)
    assert not dl.find(rendered["gpu+personas-image"], *adapters)  # an image volume instead
    assert "LeaderWorkerSet" in kinds["overlay:multinode"]
    assert "Deployment" not in kinds["overlay:multinode"]


@pytest.fixture(scope="module")
def validated(rendered) -> dict[str, dict[str, list[dict]]]:
    """k8s version -> target -> per-object validation results."""
    return {v: dl.validate_targets(rendered, v) for v in dl.K8S_VERSIONS}


@pytest.mark.parametrize("k8s_version", dl.K8S_VERSIONS)
def test_schema_valid_strict(validated, k8s_version):
    errors = [
        f"{target}: {r['kind']}/{r['name']}: {r['error']}"
        for target, results in validated[k8s_version].items()
        for r in results
        if r["error"]
    ]
    assert not errors, "\n".join(errors)


def test_custom_resources_checked_against_upstream_crds(rendered, validated):
    """Each custom resource was validated with the CRD file for its exact apiVersion."""
    crds = crdschema.load()
    seen = set()
    for target, objs in rendered.items():
        for v in dl.K8S_VERSIONS:
            for o, r in zip(objs, validated[v][target], strict=True):
                crd = crds.get((o["apiVersion"], o["kind"]))
                if crd is not None:
                    assert r["schema"] == f"upstream CRD crds/{crd.file} {o['apiVersion']}", r
                    seen.add(o["kind"])
    assert seen >= {
        "ScaledObject",
        "ServiceMonitor",
        "PrometheusRule",
        "LeaderWorkerSet",
        "InferencePool",
        "HTTPRoute",
    }


def _break(o: dict) -> bool:
    """Put one unknown or mistyped field into `o`; False when its kind is not covered."""
    spec = o.get("spec", {})
    match o["kind"]:
        case "Service":
            spec["ports"][0]["targetPortt"] = "http"
        case "Deployment":
            spec["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] = {"x": 1}
        case "LeaderWorkerSet":  # the CRD inlines the whole pod template schema
            spec["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["envv"] = []
        case "ScaledObject":
            spec["minReplicaCount"] = "one"
        case "ServiceMonitor":
            spec["endpoints"][0]["interval"] = "15 seconds"  # not a Prometheus duration
        case "PrometheusRule":
            spec["groups"][0]["rules"][0]["exprr"] = "up"
        case "InferencePool":  # the v1alpha2 field name, gone in v1
            spec["targetPortNumber"] = 8000
        case "HTTPRoute":
            spec["rules"][0]["backendRefs"][0]["weight"] = -1
        case _:
            return False
    return True


def test_validator_rejects_unknown_and_mistyped_fields(rendered):
    """The validation is strict for built-in kinds and for the upstream CRDs alike."""
    targets = ["overlay:multinode"] + [
        f"gpu+{c}" for c in ("keda", "inference-gateway", "monitoring", "alerts")
    ]
    broken = [o for t in targets for o in map(copy.deepcopy, rendered[t]) if _break(o)]
    results = dl.validate_objects(broken, dl.K8S_VERSIONS[0])
    assert {r["kind"] for r in results} >= {
        "Service",
        "Deployment",
        "LeaderWorkerSet",
        "ScaledObject",
        "ServiceMonitor",
        "PrometheusRule",
        "InferencePool",
        "HTTPRoute",
    }
    accepted = [f"{r['kind']}/{r['name']}" for r in results if not r["error"]]
    assert not accepted, f"validator accepted broken objects: {accepted}"


def test_duplicate_keys_in_list_map_rejected(rendered):
    """x-kubernetes-list-type map: two containers with one name is an API-server error."""
    (lws,) = copy.deepcopy(dl.find(rendered["overlay:multinode"], "LeaderWorkerSet"))
    containers = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"]
    containers.append(copy.deepcopy(containers[0]))
    (res,) = dl.validate_objects([lws], dl.K8S_VERSIONS[0])
    assert res["error"] and "duplicate key" in res["error"], res


def test_unknown_kind_is_an_error_not_a_skip():
    res = dl.validate_objects(
        [{"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "x"}}],
        dl.K8S_VERSIONS[0],
    )
    assert res[0]["error"] and "no schema" in res[0]["error"]


@pytest.mark.parametrize(
    "api_version, kind",
    [
        ("inference.networking.x-k8s.io/v1alpha2", "InferencePool"),  # not copied: v1 is used
        ("gateway.networking.k8s.io/v1alpha9", "HTTPRoute"),
        ("keda.sh/v1alpha1", "ScaledJob"),
    ],
)
def test_custom_resource_without_upstream_crd_is_an_error(api_version, kind):
    res = dl.validate_objects(
        [{"apiVersion": api_version, "kind": kind, "metadata": {"name": "x"}, "spec": {}}],
        dl.K8S_VERSIONS[0],
    )
    assert res[0]["error"] and "no upstream CRD" in res[0]["error"], res


def test_wrong_field_in_a_manifest_file_fails(tools, tmp_path):
    """End to end: a typo in a component's YAML (scratch copy of k8s/) fails validation."""
    k8s = tmp_path / "k8s"
    shutil.copytree(dl.K8S, k8s)
    path = k8s / "components" / "keda" / "scaledobject.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["triggers"][0]["metricTyp"] = doc["spec"]["triggers"][0].pop("metricType")
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    objs = dl.build_with_component("keda", tmp_path / "work", k8s)
    results = dl.validate_objects(objs, dl.K8S_VERSIONS[0])
    (res,) = [r for r in results if r["kind"] == "ScaledObject"]
    assert res["error"] and "metricTyp" in res["error"], res
    assert not [r for r in results if r["error"] and r["kind"] != "ScaledObject"], results
