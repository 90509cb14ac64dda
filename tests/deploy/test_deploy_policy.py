"""Operational requirements of the rendered manifests (GPU, probes, shutdown, security...)."""

from __future__ import annotations

import re

import deploylib as dl
import pytest

GPU = "nvidia.com/gpu"


def _server_targets(rendered):
    for target, objs in rendered.items():
        for where, ps, c in dl.server_containers(objs):
            yield target, objs, where, ps, c


def _qty_gib(q: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti)?", str(q))
    assert m, q
    return (
        float(m.group(1))
        * {"Ki": 2**-20, "Mi": 2**-10, "Gi": 1, "Ti": 2**10, None: 2**-30}[m.group(2)]
    )


def test_every_target_runs_the_server(rendered):
    for target, objs in rendered.items():
        assert list(dl.server_containers(objs)), f"{target}: no avatar-llm-serve container"


@pytest.mark.parametrize(
    "overlay,gpus",
    [("gpu", 1), ("gpu-tp", 4), ("multinode", 8), ("cpu-demo", 0), ("gpu-personas", 1)],
)
def test_gpu_requests(rendered, overlay, gpus):
    for where, ps, c in dl.server_containers(rendered[f"overlay:{overlay}"]):
        req, lim = c["resources"].get("requests", {}), c["resources"].get("limits", {})
        assert str(req.get(GPU, 0)) == str(lim.get(GPU, 0)) == str(gpus), where
        if gpus:
            assert ps["nodeSelector"].get(f"{GPU}.present") == "true", where
            assert any(
                t.get("key") == GPU and t.get("effect") == "NoSchedule" for t in ps["tolerations"]
            ), where
        else:
            assert not ps.get("tolerations") and GPU not in str(ps.get("nodeSelector")), where


def test_tensor_parallel_matches_gpus(rendered):
    for target, objs, where, _ps, c in _server_targets(rendered):
        env = dl.container_env(c, objs)
        args = c.get("args", [])
        tp = (
            int(args[args.index("--tensor-parallel-size") + 1])
            if "--tensor-parallel-size" in args
            else int(env.get("AVATAR_TENSOR_PARALLEL_SIZE") or 1)
        )
        gpus = int(c["resources"].get("limits", {}).get(GPU, 0))
        if gpus:
            assert tp == gpus, f"{target} {where}: tensor parallel {tp} != {gpus} GPUs"


def test_resources_requests_and_shm(rendered):
    for target, _objs, where, ps, c in _server_targets(rendered):
        req, lim = c["resources"]["requests"], c["resources"]["limits"]
        assert "cpu" in req and "memory" in req, where
        assert "cpu" not in lim, f"{where}: CPU limits throttle token generation"
        vols = {v["name"]: v for v in ps["volumes"]}
        shm = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert shm, f"{target} {where}: /dev/shm not mounted"
        ed = vols[shm[0]["name"]].get("emptyDir", {})
        assert ed.get("medium") == "Memory", where
        # memory-backed emptyDir is charged to the pod: it must fit in the limit
        assert _qty_gib(ed["sizeLimit"]) < _qty_gib(lim["memory"]), where


# Kinds the overlays render that have no namespace.
CLUSTER_SCOPED = frozenset({"Namespace", "ClusterRole", "ClusterRoleBinding"})


def test_overlay_objects_share_the_overlay_namespace(rendered):
    """An object an overlay adds without its namespace lands in `default` (or the kubectl
    context's): a PVC there leaves the server pods Pending on a claim they cannot see."""
    for overlay in dl.overlays():
        objs = rendered[f"overlay:{overlay}"]
        (ns,) = dl.find(objs, "Namespace")
        stray = [
            f"{o['kind']}/{o['metadata']['name']}"
            for o in objs
            if o["kind"] not in CLUSTER_SCOPED
            and o["metadata"].get("namespace") != ns["metadata"]["name"]
        ]
        assert not stray, f"{overlay}: not in namespace {ns['metadata']['name']}: {stray}"


def test_model_cache_on_pvc_and_hf_home(rendered):
    for target, objs, where, ps, c in _server_targets(rendered):
        env = dl.container_env(c, objs)
        vols = {v["name"]: v for v in ps["volumes"]}
        hf_home = env.get("HF_HOME")
        assert hf_home, f"{target} {where}: HF_HOME not set"
        mount = [
            m for m in c["volumeMounts"] if hf_home.startswith(m["mountPath"].rstrip("/") + "/")
        ]
        assert mount, f"{where}: HF_HOME {hf_home} is not on a mounted volume"
        vol = vols[mount[0]["name"]]
        if target == "overlay:cpu-demo":
            assert "emptyDir" in vol
        else:
            claim = vol["persistentVolumeClaim"]["claimName"]
            assert dl.find(objs, "PersistentVolumeClaim", claim), (
                f"{target}: PVC {claim} not rendered"
            )


def test_secrets_come_from_secret_refs_only(rendered):
    for target, objs, where, _ps, c in _server_targets(rendered):
        for e in c.get("env", []):
            if e["name"] in ("HF_TOKEN", "AVATAR_API_KEY"):
                assert "secretKeyRef" in e.get("valueFrom", {}), (
                    f"{where}: {e['name']} must come from a Secret"
                )
        for cm in dl.find(objs, "ConfigMap"):
            leaked = {"HF_TOKEN", "AVATAR_API_KEY"} & set(cm.get("data") or {})
            assert not leaked, f"{target}: {leaked} in ConfigMap {cm['metadata']['name']}"
        if target != "overlay:cpu-demo":
            assert not dl.find(objs, "Secret"), (
                f"{target}: production overlays must not ship a Secret"
            )


def test_example_secret_holds_placeholders_only(rendered):
    import base64

    secrets = dl.find(rendered["overlay:cpu-demo"], "Secret")
    assert secrets
    for s in secrets:
        for k, v in (s.get("data") or {}).items():
            val = base64.b64decode(v).decode()
            assert val == "" or "change-me" in val, f"{k} looks like a real credential"


def test_probes(rendered):
    for _target, _objs, where, _ps, c in _server_targets(rendered):
        p = dl.probes(c)
        if "workerTemplate" in where:  # Ray workers serve no HTTP
            assert not p, where
            continue
        assert p["readinessProbe"]["httpGet"]["path"] == "/ready", where
        assert p["livenessProbe"]["httpGet"]["path"] == "/health", where
        s = p["startupProbe"]
        assert s["periodSeconds"] * s["failureThreshold"] >= 30 * 60, (
            f"{where}: startup must tolerate 30 min"
        )


def test_graceful_shutdown_budget(rendered):
    for target, objs, where, ps, c in _server_targets(rendered):
        if "workerTemplate" in where:
            continue
        env = dl.container_env(c, objs)
        drain = float(env.get("AVATAR_DRAIN_TIMEOUT") or 30)
        pre = dl.prestop_sleep_seconds(c)
        assert pre > 0, f"{where}: no preStop sleep"
        grace = ps.get("terminationGracePeriodSeconds", 30)
        assert grace > pre + drain, (
            f"{target} {where}: grace {grace}s <= preStop {pre}s + drain {drain}s"
        )


def test_security_context(rendered):
    for _target, _objs, where, ps, c in _server_targets(rendered):
        psc, csc = ps["securityContext"], c["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 1000, where
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert csc["allowPrivilegeEscalation"] is False, where
        assert csc["capabilities"]["drop"] == ["ALL"] and not csc["capabilities"].get("add"), where
        assert csc.get("privileged") is not True, where
        assert ps.get("automountServiceAccountToken") is False, where
        # Service links inject AVATAR_LLM_* env vars that collide with the settings prefix.
        assert ps.get("enableServiceLinks") is False, where
        if csc.get("readOnlyRootFilesystem"):
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert {"/tmp", "/home/avatar"} <= mounts, (
                f"{where}: read-only root needs writable /tmp and HOME"
            )


def test_image_pinned(rendered):
    for target, objs in rendered.items():
        for where, _t, ps in dl.pod_specs(objs):
            for c in ps.get("containers", []):
                img = c["image"]
                assert "/" in img, f"{where}: image {img} has no registry"
                _name, _, tag = img.rpartition(":") if "@" not in img else (img, "", "digest")
                assert "@sha256:" in img or (tag and tag != "latest" and "/" not in tag), (
                    f"{target} {where}: image {img} not pinned"
                )


def test_spread_across_nodes(rendered):
    for target, objs in rendered.items():
        for d in dl.find(objs, "Deployment", "avatar-llm"):
            tsc = d["spec"]["template"]["spec"]["topologySpreadConstraints"]
            keys = {t["topologyKey"] for t in tsc}
            assert "kubernetes.io/hostname" in keys, target
            labels = d["spec"]["template"]["metadata"]["labels"]
            for t in tsc:
                assert t["labelSelector"]["matchLabels"].items() <= labels.items(), target


def test_service_pdb_and_monitor_select_server_pods(rendered):
    for target, objs in rendered.items():
        templates = [
            (dl.runtime_pod_labels(w, t), t)
            for w, t, ps in dl.pod_specs(objs)
            if any(dl.SERVER_IMAGE in c["image"] for c in ps["containers"])
        ]

        def selects(sel, templates=templates):
            return [t for labels, t in templates if sel.items() <= labels.items()]

        svc = dl.find(objs, "Service", "avatar-llm")[0]
        picked = selects(svc["spec"]["selector"])
        assert picked, f"{target}: Service selects no server pod"
        assert all(dl.probes(t["spec"]["containers"][0]) for t in picked), (
            f"{target}: Service selects pods that serve no HTTP"
        )
        pdb = dl.find(objs, "PodDisruptionBudget", "avatar-llm")[0]
        assert selects(pdb["spec"]["selector"]["matchLabels"]), f"{target}: PDB selects nothing"
        port_names = {p["name"] for p in svc["spec"]["ports"]}
        for sm in dl.find(objs, "ServiceMonitor"):
            assert (
                sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
            ), target
            assert {ep["port"] for ep in sm["spec"]["endpoints"]} <= port_names, target


def test_autoscalers_target_rendered_workload_and_own_replicas(rendered):
    for target, objs in rendered.items():
        scalers = [
            (o, o["spec"]["scaleTargetRef"])
            for o in objs
            if o["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")
        ]
        for o, ref in scalers:
            tgt = dl.find(objs, ref.get("kind", "Deployment"), ref["name"])
            assert tgt, f"{target}: {o['kind']} targets missing {ref}"
            assert "replicas" not in tgt[0]["spec"], (
                f"{target}: autoscaled workload must not set replicas"
            )
            assert (o["spec"].get("minReplicaCount") or o["spec"].get("minReplicas")) >= 1, (
                "GPU replicas take minutes to start: never scale to zero"
            )
        if scalers:
            assert all(
                o["kind"] != "HorizontalPodAutoscaler" or "metrics" in o["spec"] for o, _ in scalers
            )
            assert not any(
                m.get("type") == "Resource"
                for o, _ in scalers
                for m in o["spec"].get("metrics", [])
            ), "scale on load, not CPU"


def test_dashboard_has_grafana_sidecar_label_and_panels(rendered):
    objs = rendered["gpu+dashboard"]
    dashes = list(dl.dashboards(objs))
    assert dashes
    cm = dl.find(objs, "ConfigMap", "avatar-llm-dashboard")[0]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    titles = " ".join(p["title"].lower() for _, d in dashes for p in d["panels"])
    for word in (
        "first token",
        "inter-token",
        "throughput",
        "running",
        "waiting",
        "kv-cache",
        "rejected",
    ):
        assert word in titles, word


def test_alerts_cover_required_conditions(rendered):
    rules = [
        r
        for pr in dl.find(rendered["gpu+alerts"], "PrometheusRule")
        for g in pr["spec"]["groups"]
        for r in g["rules"]
    ]
    exprs = {r["alert"]: r["expr"] for r in rules}
    assert any(
        "avatar_time_to_first_token_seconds_bucket" in e and "0.99" in e for e in exprs.values()
    )
    assert any("avatar_requests_total" in e for e in exprs.values())
    assert any("avatar_engine_alive" in e for e in exprs.values())
    assert any(
        "avatar_requests_rejected_total" in e or "avatar_requests_waiting" in e
        for e in exprs.values()
    )
    for r in rules:
        assert r.get("for") and r["labels"].get("severity") and r["annotations"].get("summary"), r[
            "alert"
        ]


# Refusals that say "this replica has no capacity now": the autoscalers and the saturation
# alert must see every one. draining is a pod going away, not load.
CAPACITY_REFUSALS = {"overload", "queue_timeout", "slo_unattainable", "slo_expired"}


def _regex_alternatives(expr: str, metric: str, label: str) -> list[set[str]]:
    """The literal alternatives of each `label=~"a|b"` matcher on `metric` in expr."""
    out = []
    for sel in re.findall(metric + r"\{([^}]*)\}", expr):
        for m in re.finditer(label + r'\s*=~\s*"([^"]*)"', sel):
            out.append(set(m.group(1).split("|")))
    return out


def test_capacity_refusals_are_the_servers():
    from typing import get_args

    from serve.errors import RefusalReason

    assert set(get_args(RefusalReason)) - {"draining"} == CAPACITY_REFUSALS, (
        "a new refusal reason: decide whether the autoscalers and the saturation alert count it"
    )


def test_saturation_signals_include_slo_refusals(rendered):
    """With deadline-aware admission a saturated replica refuses budgeted requests at once
    instead of queueing them: the queue-depth and TTFT signals stay calm, only the refusals
    show the load."""
    rules = {
        r["alert"]: r["expr"]
        for pr in dl.find(rendered["gpu+alerts"], "PrometheusRule")
        for g in pr["spec"]["groups"]
        for r in g["rules"]
    }
    sat = _regex_alternatives(
        rules["AvatarLLMQueueSaturated"], "avatar_requests_rejected_total", "reason"
    )
    assert sat == [CAPACITY_REFUSALS], sat

    queries = [
        t["metadata"]["query"]
        for so in dl.find(rendered["gpu+keda"], "ScaledObject")
        for t in so["spec"]["triggers"]
        if t["type"] == "prometheus"
    ]
    assert any(
        CAPACITY_REFUSALS in _regex_alternatives(q, "avatar_requests_rejected_total", "reason")
        for q in queries
    ), queries

    hpa_metrics = {n for _, n in dl.hpa_metric_names(rendered["gpu+hpa"])}
    adapter = {
        name: exprs for f in dl.adapter_rule_files(dl.K8S) for name, _, exprs in dl.adapter_rules(f)
    }
    refusal_rules = [
        n
        for n in hpa_metrics
        if any(
            CAPACITY_REFUSALS in _regex_alternatives(e, "avatar_requests_rejected_total", "reason")
            for e in adapter.get(n, [])
        )
    ]
    assert refusal_rules, (hpa_metrics, adapter)


def test_alerts_watch_ttft_budget_attainment(rendered):
    exprs = [
        r["expr"]
        for pr in dl.find(rendered["gpu+alerts"], "PrometheusRule")
        for g in pr["spec"]["groups"]
        for r in g["rules"]
    ]
    slo = [e for e in exprs if "avatar_slo_ttft_requests_total" in e]
    # met vs missed among admitted requests, and attainment with the SLO refusals counted
    assert any('outcome="missed"' in e for e in slo), slo
    assert any(
        'outcome="met"' in e
        and {"slo_unattainable", "slo_expired"}
        in _regex_alternatives(e, "avatar_requests_rejected_total", "reason")
        for e in slo
    ), slo


def test_alerts_watch_each_pods_event_loop_lag(rendered):
    """A front end whose loop runs late delays every refusal past the time a voice platform can
    retry elsewhere, while the engine's own signals stay calm: the alert must see each pod."""
    rules = {
        r["alert"]: r
        for pr in dl.find(rendered["gpu+alerts"], "PrometheusRule")
        for g in pr["spec"]["groups"]
        for r in g["rules"]
    }
    lag = [r for r in rules.values() if "avatar_event_loop_lag_seconds_bucket" in r["expr"]]
    assert len(lag) == 1, list(rules)
    expr = lag[0]["expr"]
    assert "histogram_quantile(0.99" in expr and "> 0.05" in expr, expr
    assert re.search(r"by \(([^)]*\bpod\b[^)]*)\)", expr), expr


def test_dashboard_shows_ttft_budget_outcomes(rendered):
    exprs = [e for _, d in dl.dashboards(rendered["gpu+dashboard"]) for e in dl.dashboard_exprs(d)]
    assert any("avatar_slo_ttft_requests_total" in e and "by (outcome)" in e for e in exprs)
    assert any("avatar_requests_rejected_total" in e and "by (reason)" in e for e in exprs)
