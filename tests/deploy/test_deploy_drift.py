"""Manifests and server agree: env vars, CLI flags, probe paths/ports, metric names.

The server side comes from the serve package (cli.is_known_env_var/known_cli_flags,
telemetry.exported_metric_names, app.create_app routes); the manifest side is parsed
from the rendered kustomize output, the dashboard JSON and every PromQL expression.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil

import deploylib as dl
import pytest
import yaml


def test_manifests_match_server(rendered, contract):
    problems = [
        f"[{t}] {p}" for t, objs in rendered.items() for p in dl.check_drift(objs, contract)
    ]
    assert not problems, "manifests drifted from the server:\n" + "\n".join(problems)


def test_dockerfile_matches_server(tools, contract):
    env = dl.dockerfile_env()
    bad_env = [
        k for k in env if k.startswith(("AVATAR_", "HF_", "VLLM_")) and not contract.env_ok(k)
    ]
    assert not bad_env, f"Dockerfile sets env the server does not read: {bad_env}"
    ins = dl.dockerfile_instructions()
    hc = " ".join(rest for w, rest in ins if w == "HEALTHCHECK")
    paths = {p for p in contract.routes if p != "/" and f"{p}'" in hc}
    assert paths == {"/health"}, f"HEALTHCHECK must probe /health (a route of the app): {hc}"
    exposed = {int(rest.split("/")[0]) for w, rest in ins if w == "EXPOSE"}
    assert exposed == {int(env.get("AVATAR_PORT", contract.port))} == {contract.port}


def _server_settings_problems(objs: list[dict], scratch) -> list[str]:
    """Start-up errors the server's own parser (serve.cli.parse_settings) reports for each
    server container's rendered env and args: values, not just names (a pod that would
    exit at start-up). Secrets get placeholders; the adapter root, which the server wants
    to exist, points at a scratch folder."""
    from serve import cli

    problems = []
    for where, _ps, c in dl.server_containers(objs):
        env = {k: ("placeholder" if v is None else v) for k, v in dl.container_env(c, objs).items()}
        if "AVATAR_LORA_ADAPTER_ROOT" in env:
            env["AVATAR_LORA_ADAPTER_ROOT"] = str(scratch)
        argv = [] if c.get("command") else [str(a) for a in c.get("args", [])]
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                cli.parse_settings(argv, env)
        except SystemExit:
            problems.append(f"{where}: {err.getvalue().strip().splitlines()[-1]}")
    return problems


def test_server_accepts_rendered_settings(rendered, contract, tmp_path):
    problems = [
        f"[{t}] {p}"
        for t, objs in rendered.items()
        for p in _server_settings_problems(objs, tmp_path)
    ]
    assert not problems, "the server would refuse to start:\n" + "\n".join(problems)


def test_server_settings_check_catches_bad_values(rendered, contract, tmp_path):
    objs = copy.deepcopy(rendered["overlay:gpu-personas"])
    (cm,) = [cm for cm in dl.find(objs, "ConfigMap") if "AVATAR_LOG_LEVEL" in cm["data"]]
    cm["data"]["AVATAR_LOG_LEVEL"] = "info"  # vLLM's choices are upper case
    problems = _server_settings_problems(objs, tmp_path)
    assert any("AVATAR_LOG_LEVEL" in p for p in problems), problems


# ------------------------------------------------ the checker must catch drift
@pytest.fixture()
def k8s_copy(tools, tmp_path):
    dst = tmp_path / "k8s"
    shutil.copytree(dl.K8S, dst)
    return dst


def _edit_yaml(path, fn):
    docs = list(yaml.safe_load_all(path.read_text()))
    fn(docs)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


def test_drift_detects_bogus_env_var(k8s_copy, tmp_path, contract):
    _edit_yaml(
        k8s_copy / "base" / "kustomization.yaml",
        lambda d: d[0]["configMapGenerator"][0]["literals"].append("AVATAR_MAX_TOKENS_PER_DAY=5"),
    )
    objs = dl.kustomize_build(k8s_copy / "overlays" / "gpu")
    problems = dl.check_drift(objs, contract, k8s_copy)
    assert any("AVATAR_MAX_TOKENS_PER_DAY" in p for p in problems), problems


def test_drift_detects_bogus_flag_probe_and_port(k8s_copy, contract):
    def mutate(docs):
        c = docs[0]["spec"]["template"]["spec"]["containers"][0]
        c["args"] = ["--tensor-parallel-sizes", "4"]
        c["readinessProbe"]["httpGet"]["path"] = "/readyz"
        c["ports"][0]["containerPort"] = 8080

    _edit_yaml(k8s_copy / "base" / "deployment.yaml", mutate)
    problems = dl.check_drift(dl.kustomize_build(k8s_copy / "overlays" / "gpu"), contract, k8s_copy)
    text = "\n".join(problems)
    assert "--tensor-parallel-sizes" in text and "/readyz" in text and "server port 8000" in text, (
        text
    )


def test_drift_detects_bogus_metric_in_alert_autoscaler_and_dashboard(k8s_copy, tmp_path, contract):
    comp = k8s_copy / "components"
    _edit_yaml(
        comp / "alerts" / "prometheusrule.yaml",
        lambda d: d[0]["spec"]["groups"][0]["rules"][0].__setitem__(
            "expr", "avatar_ttft_seconds_p99 > 0.5"
        ),
    )
    _edit_yaml(
        comp / "keda" / "scaledobject.yaml",
        lambda d: d[0]["spec"]["triggers"][0]["metadata"].__setitem__(
            "query", "sum(vllm:num_requests_queued)"
        ),
    )
    dash_path = comp / "dashboard" / "avatar-llm-dashboard.json"
    dash = json.loads(dash_path.read_text())
    dash["panels"][0]["targets"][0]["expr"] = (
        "sum(rate(avatar_tokens_generated_total[$__rate_interval]))"
    )
    dash_path.write_text(json.dumps(dash))
    found = []
    for c in ("alerts", "keda", "dashboard"):
        found += dl.check_drift(dl.build_with_component(c, tmp_path, k8s_copy), contract, k8s_copy)
    text = "\n".join(found)
    for bogus in (
        "avatar_ttft_seconds_p99",
        "vllm:num_requests_queued",
        "avatar_tokens_generated_total",
    ):
        assert bogus in text, text


def test_contract_enumerates_refusal_reasons_and_slo_outcomes(contract):
    reasons = contract.label_values["avatar_requests_rejected_total"]["reason"]
    assert {"overload", "queue_timeout", "slo_unattainable", "slo_expired"} <= reasons
    assert contract.label_values["avatar_slo_ttft_requests_total"]["outcome"] == {"met", "missed"}


def test_drift_detects_unknown_label_values(k8s_copy, tmp_path, contract):
    """A misspelt reason or outcome matches no series: the rule or panel would stay silent."""
    comp = k8s_copy / "components"
    _edit_yaml(
        comp / "alerts" / "prometheusrule.yaml",
        lambda d: d[0]["spec"]["groups"][0]["rules"][0].__setitem__(
            "expr",
            'sum(rate(avatar_requests_rejected_total{reason=~"overload|slo_unattainble"}[5m]))'
            ' > 0 or sum(rate(avatar_slo_ttft_requests_total{outcome="mised"}[5m])) > 0'
            ' or sum(rate(avatar_requests_rejected_total{reason=~"slo_x.*"}[5m])) > 0',
        ),
    )
    _edit_yaml(
        comp / "keda" / "scaledobject.yaml",
        lambda d: d[0]["spec"]["triggers"][0]["metadata"].__setitem__(
            "query", 'sum(rate(avatar_requests_rejected_total{reason="queue-timeout"}[2m]))'
        ),
    )
    found = []
    for c in ("alerts", "keda"):
        found += dl.check_drift(dl.build_with_component(c, tmp_path, k8s_copy), contract, k8s_copy)
    text = "\n".join(found)
    for bogus in ("'slo_unattainble'", "'mised'", "'slo_x.*'", "'queue-timeout'"):
        assert bogus in text, (bogus, text)
    assert "'overload' is not" not in text, text


def test_label_matcher_check_rules():
    c = dl.ServerContract(
        env_ok=lambda n: True,
        cli_flags=set(),
        metrics=set(),
        routes=set(),
        port=8000,
        label_values={"r_total": {"reason": {"a", "b_c"}}},
    )
    check = lambda op, v, label="reason", m="r_total": dl.label_matcher_problems(m, label, op, v, c)  # noqa: E731
    assert check("MatchOp.Equal", "a") == []
    assert check("MatchOp.Equal", "z")
    assert check("MatchOp.Re", "a|b_c") == []
    assert len(check("MatchOp.Re", "a|z|y")) == 2
    assert check("MatchOp.Re", "b_.*") == []
    assert check("MatchOp.Re", "z.*")
    assert check("MatchOp.NotEqual", "z") == []  # a negative matcher excludes, never misses
    assert check("MatchOp.Equal", "z", label="pod") == []  # a label the server does not enumerate
    assert check("MatchOp.Equal", "z", m="other") == []


def test_drift_checker_without_server_reports_everything(rendered):
    """Independent of serve: against an empty contract every reference is reported."""
    empty = dl.ServerContract(
        env_ok=lambda n: False, cli_flags=set(), metrics=set(), routes=set(), port=8000
    )
    text = "\n".join(p for objs in rendered.values() for p in dl.check_drift(objs, empty))
    for expected in (
        "env AVATAR_MODEL",
        "env HF_HOME",
        "flag --tensor-parallel-size",
        "flag --distributed-executor-backend",
        "path /ready",
        "path /health",
        "metric avatar_time_to_first_token_seconds_bucket",
        "metric avatar_requests_waiting",
        "metric vllm:kv_cache_usage_perc",
        "metric avatar_requests_rejected_total",
        "prometheus-adapter-rules.yaml:avatar_time_to_first_token_seconds_bucket",
    ):
        assert expected in text, f"{expected!r} not reported:\n{text[:3000]}"
    assert "metric up " not in text  # Prometheus' own series is not the server's


# ------------------------------------------------ extractor unit tests
def test_serve_flags_from_entrypoint_args_and_shell_scripts():
    assert dl.serve_flags({"args": ["--model", "m", "--dtype=bfloat16", "x"]}) == [
        "--model",
        "--dtype",
    ]
    script = (
        "ray start --head --port=6379\nuntil x; do sleep 5; done\n"
        "exec python -m serve --port 8000 \\\n  --enable-prefix-caching; echo --not-serve"
    )
    assert dl.serve_flags({"command": ["/bin/bash", "-c"], "args": [script]}) == [
        "--port",
        "--enable-prefix-caching",
    ]
    assert dl.serve_flags({"command": ["ray"], "args": ["start", "--block"]}) == []


def test_promql_extraction(tools):
    res = dl.analyze_promql(
        [
            'histogram_quantile(0.99, sum by (le) (rate(a_bucket{job="x"}[5m]))) > 0.5 or up == 0',
            "sum(vllm:num_requests_waiting) / count(b)",
            '{__name__="c_total"}',
            "sum(rate(x[5m]",
        ]
    )
    assert res[0]["metrics"] == ["a_bucket", "up"]
    assert ["a_bucket", "job", "MatchOp.Equal", "x"] in res[0]["matchers"]
    assert res[1]["metrics"] == ["b", "vllm:num_requests_waiting"]
    assert res[2]["metrics"] == ["c_total"]
    assert res[3]["error"]


def test_grafana_exprs_are_made_parseable():
    dash = {
        "panels": [{"targets": [{"expr": "rate(m_total[$__rate_interval])"}]}],
        "templating": {"list": [{"query": {"query": "label_values(g, namespace)"}}]},
    }
    assert dl.dashboard_exprs(dash) == ["rate(m_total[5m])", "g"]


def test_container_env_resolves_envfrom():
    objs = [{"kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"A": "1"}}]
    c = {
        "envFrom": [{"configMapRef": {"name": "cfg"}}],
        "env": [{"name": "B", "valueFrom": {"secretKeyRef": {"name": "s", "key": "B"}}}],
    }
    assert dl.container_env(c, objs) == {"A": "1", "B": None}
    with pytest.raises(AssertionError):
        dl.container_env({"envFrom": [{"configMapRef": {"name": "missing"}}]}, objs)
    assert copy.deepcopy(objs) == objs
