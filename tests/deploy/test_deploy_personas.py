"""Persona adapters (LoRA personas over one base model): the adapter volume, the server's
LoRA settings, the persona list, and the endpoint picker's LoRA-affinity routing."""

from __future__ import annotations

import copy
import json
import os
import typing

import deploylib as dl
import pytest
import yaml

PERSONA_TARGETS = ("overlay:gpu-personas", "gpu+personas", "gpu+personas-image")
ADAPTER_ROOT = "/adapters"
# The endpoint picker the inference-gateway component pins, and the plugin types its runner
# registers (read in GIE's source, cmd/epp/runner registerInTreePlugins). Re-check both on an
# upgrade: an unknown type stops the EPP at start-up, and so does every route through it.
EPP_IMAGE = "registry.k8s.io/gateway-api-inference-extension/epp:v1.0.1"
EPP_PLUGIN_TYPES = frozenset(
    {
        "single-profile-handler",
        "queue-scorer",
        "kv-cache-utilization-scorer",
        "prefix-cache-scorer",
        "lora-affinity-scorer",
        "max-score-picker",
        "random-picker",
    }
)
LORA_SCORER = "lora-affinity-scorer"
LORA_INFO_FLAG = "--lora-info-metric=vllm:lora_requests_info"


@pytest.fixture(scope="module")
def ranks() -> set[int]:
    """The --max-lora-rank values the installed vLLM accepts."""
    from vllm.config.lora import MaxLoRARanks

    return set(typing.get_args(MaxLoRARanks))


def _servers(objs):
    servers = list(dl.server_containers(objs))
    assert servers, "no server container"
    return servers


# ------------------------------------------------ the adapter volume and settings
@pytest.mark.parametrize("target", PERSONA_TARGETS)
def test_adapters_come_from_a_read_only_volume(rendered, ranks, target):
    objs = rendered[target]
    for where, ps, c in _servers(objs):
        env = dl.container_env(c, objs)
        assert env.get("AVATAR_ENABLE_LORA") == "true", where
        assert env.get("AVATAR_LORA_ADAPTER_ROOT") == ADAPTER_ROOT, where
        assert dl.lora_problems(env, ps, c, ranks) == [], where
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == ADAPTER_ROOT]
        # No other mount of the same volume may be writable either.
        assert all(m.get("readOnly") for m in c["volumeMounts"] if m["name"] == mount["name"])
        (vol,) = [v for v in ps["volumes"] if v["name"] == mount["name"]]
        if target == "gpu+personas-image":
            ref = vol["image"]["reference"]
            assert "@sha256:" in ref or ref.rpartition(":")[2] not in ("", "latest"), ref
            assert vol["image"].get("pullPolicy") == "IfNotPresent", vol
            assert not dl.find(objs, "PersistentVolumeClaim", "avatar-llm-adapters")
        else:
            claim = vol["persistentVolumeClaim"]
            assert claim.get("readOnly") is True, vol  # the kubelet then never chowns it
            assert dl.find(objs, "PersistentVolumeClaim", claim["claimName"]), claim


def test_lora_settings_are_consistent_everywhere(rendered, ranks):
    """No target sets a LoRA setting without LoRA on, or breaks a rule below."""
    problems = [
        f"[{t}] {where}: {p}"
        for t, objs in rendered.items()
        for where, ps, c in dl.server_containers(objs)
        for p in dl.lora_problems(dl.container_env(c, objs), ps, c, ranks)
    ]
    assert not problems, "\n".join(problems)


def test_persona_list(rendered):
    """The example overlay's personas parse, live on the volume and name the served base."""
    objs = rendered["overlay:gpu-personas"]
    for where, _ps, c in _servers(objs):
        env = dl.container_env(c, objs)
        personas = dl.lora_modules(env["AVATAR_LORA_MODULES"])
        assert {p["name"] for p in personas} >= {"receptionist", "tutor", "guide"}, personas
        for p in personas:
            assert p["path"].startswith(ADAPTER_ROOT + "/"), (where, p)
            # Explicit, so renaming the served model without the list fails here, not in
            # a pod (the server refuses an unknown base_model_name at start-up).
            assert p["base_model_name"] == env["AVATAR_SERVED_MODEL_NAME"], (where, p)


def test_lora_modules_forms():
    assert dl.lora_modules(" a=/adapters/a, b = /adapters/b ") == [
        {"name": "a", "path": "/adapters/a"},
        {"name": "b", "path": "/adapters/b"},
    ]
    assert dl.lora_modules('[{"name": "a", "path": "/adapters/a", "base_model_name": "m"}]') == [
        {"name": "a", "path": "/adapters/a", "base_model_name": "m"}
    ]
    assert dl.lora_modules('{"name": "a", "path": "/adapters/a"}') == [
        {"name": "a", "path": "/adapters/a"}
    ]
    for bad in ("a", "a=", "=/x", '[{"name": "a"}]', '["a=/x"]', '[{"name": "a", "path": '):
        with pytest.raises(ValueError):
            dl.lora_modules(bad)


def _set(**kv):
    return lambda env, ps, c: env.update(kv)


def _modules(*items):
    return _set(AVATAR_LORA_MODULES=",".join(items))


def _json(**item):
    return _set(AVATAR_LORA_MODULES=json.dumps([{"name": "a", "path": "/adapters/a", **item}]))


def _writable_mount(env, ps, c):
    for m in c["volumeMounts"]:
        m.pop("readOnly", None)


def _empty_dir_volume(env, ps, c):
    for v in ps["volumes"]:
        if v["name"] == "adapters":
            v.pop("persistentVolumeClaim")
            v["emptyDir"] = {}


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (_modules("receptionist=/cache/receptionist"), "not under /adapters"),
        (_modules("receptionist=receptionist"), "not absolute"),
        (_modules("receptionist=/adapters/../cache/x"), "not absolute and normal"),
        (_modules("receptionist"), "does not parse"),
        (_modules("a=/adapters/a", "a=/adapters/b"), "listed twice"),
        (_modules("a=/adapters/x", "b=/adapters/x"), "share an adapter directory"),
        (_modules("llama-3.1-8b-instruct=/adapters/x"), "equal to the served base"),
        (_modules(*(f"p{i}=/adapters/p{i}" for i in range(17))), "static personas"),
        (_json(base_model_name="llama"), "is not served"),
        (_json(base_model="llama-3.1-8b-instruct"), "unknown keys"),
        (_set(AVATAR_MAX_LORA_RANK="12"), "not one vLLM accepts"),
        (_set(AVATAR_MAX_CPU_LORAS="2"), "<= AVATAR_MAX_CPU_LORAS"),
        (_set(AVATAR_ENABLE_LORA="false"), "without AVATAR_ENABLE_LORA"),
        (_set(AVATAR_ENABLE_LORA="ture"), "not a boolean"),
        (_set(AVATAR_LORA_ADAPTER_ROOT=None), "without AVATAR_LORA_ADAPTER_ROOT"),
        (_set(AVATAR_LORA_ADAPTER_ROOT="/data"), "not on a mounted volume"),
        (_set(AVATAR_ALLOW_RUNTIME_LORA_UPDATING="on", AVATAR_API_SERVER_COUNT="2"), "API servers"),
        (_set(VLLM_ALLOW_RUNTIME_LORA_UPDATING="1", AVATAR_API_SERVER_COUNT="4"), "API servers"),
        (_writable_mount, "mounted writable"),
        (_empty_dir_volume, "neither a PVC nor an image"),
    ],
)
def test_lora_checks_catch_misconfigurations(rendered, ranks, mutate, expected):
    """Each rule above fails on the mistake it is there for (a scratch copy of the overlay)."""
    objs = rendered["overlay:gpu-personas"]
    (_where, ps, c) = _servers(objs)[0]
    env = dl.container_env(c, objs)
    ps, c = copy.deepcopy(ps), copy.deepcopy(c)
    assert dl.lora_problems(env, ps, c, ranks) == []
    mutate(env, ps, c)
    env = {k: v for k, v in env.items() if v is not None}
    problems = dl.lora_problems(env, ps, c, ranks)
    assert any(expected in p for p in problems), problems


# ------------------------------------------------ routing personas (inference gateway)
def _epp(objs):
    (dep,) = dl.find(objs, "Deployment", "avatar-llm-epp")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return dep["spec"]["template"]["spec"], c


def test_epp_config_scores_lora_affinity(rendered):
    objs = rendered["gpu+inference-gateway"]
    ps, c = _epp(objs)
    assert c["image"] == EPP_IMAGE, "new EPP release: re-check EPP_PLUGIN_TYPES against it"
    assert LORA_INFO_FLAG in c["args"], c["args"]
    # The config the EPP reads is the rendered ConfigMap key behind --config-file.
    (path,) = [a.split("=", 1)[1] for a in c["args"] if a.startswith("--config-file=")]
    (mount,) = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    (vol,) = [v for v in ps["volumes"] if v["name"] == mount["name"]]
    key = os.path.relpath(path, mount["mountPath"])
    configs = {(name, k): cfg for _w, cfg, name, k in dl.epp_configs(objs)}
    cfg = configs[(vol["configMap"]["name"], key)]

    plugins = {p.get("name", p["type"]): p["type"] for p in cfg["plugins"]}
    assert len(plugins) == len(cfg["plugins"]), "plugin names must be unique"
    assert set(plugins.values()) <= EPP_PLUGIN_TYPES, set(plugins.values()) - EPP_PLUGIN_TYPES
    assert cfg["schedulingProfiles"]
    for profile in cfg["schedulingProfiles"]:
        refs = {r["pluginRef"]: r.get("weight", 1) for r in profile["plugins"]}
        assert set(refs) <= set(plugins), f"{profile['name']}: unknown pluginRef"
        lora = [w for ref, w in refs.items() if plugins[ref] == LORA_SCORER]
        assert lora and all(w > 0 for w in lora), f"{profile['name']}: no LoRA affinity"


def test_epp_checks_catch_a_missing_lora_scorer(rendered):
    """The check above fails if the scorer is declared but left out of the profile."""
    objs = copy.deepcopy(rendered["gpu+inference-gateway"])
    for _w, cfg, name, key in dl.epp_configs(objs):
        for profile in cfg["schedulingProfiles"]:
            profile["plugins"] = [r for r in profile["plugins"] if r["pluginRef"] != LORA_SCORER]
        (cm,) = dl.find(objs, "ConfigMap", name)
        cm["data"][key] = yaml.safe_dump(cfg)
    with pytest.raises(AssertionError, match="no LoRA affinity"):
        test_epp_config_scores_lora_affinity({"gpu+inference-gateway": objs})


def test_personas_behind_the_gateway(tools, tmp_path, ranks):
    """gpu-personas plus inference-gateway: renders, validates, and the pool holds the pods."""
    objs = dl.build_with_component("inference-gateway", tmp_path, overlay="gpu-personas")
    for v in dl.K8S_VERSIONS:
        errors = [r for r in dl.validate_objects(objs, v) if r["error"]]
        assert not errors, errors
    (pool,) = dl.find(objs, "InferencePool")
    (server,) = dl.find(objs, "Deployment", "avatar-llm")
    labels = server["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for _where, ps, c in _servers(objs):
        env = dl.container_env(c, objs)
        assert dl.lora_modules(env["AVATAR_LORA_MODULES"])
        assert dl.lora_problems(env, ps, c, ranks) == []
        assert pool["spec"]["targetPorts"] == [{"number": int(env["AVATAR_PORT"])}]


def test_image_volume_is_pinned_through_images(tools, tmp_path):
    """`kustomize edit set image` rewrites the adapters image, as docs/deploy.md says."""
    d = tmp_path / "mine"
    d.mkdir()
    rel = lambda p: os.path.relpath(p, d)  # noqa: E731
    digest = "sha256:" + "ab" * 32
    (d / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [rel(dl.K8S / "overlays" / "gpu")],
                "components": [rel(dl.K8S / "components" / "personas-image")],
                "images": [
                    {
                        "name": "registry.example.com/avatar/avatar-llm-personas",
                        "newName": "registry.example.com/me/personas",
                        "digest": digest,
                    }
                ],
            }
        )
    )
    (dep,) = dl.find(dl.kustomize_build(d), "Deployment", "avatar-llm")
    (vol,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if "image" in v]
    assert vol["image"]["reference"] == f"registry.example.com/me/personas@{digest}"
