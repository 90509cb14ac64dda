"""Helpers for the offline deployment checks (kustomize render, schema validation,
manifest <-> server drift). Used by tests/deploy; no third-party imports beyond PyYAML.

Tools (kubectl/kustomize, hadolint, kubernetes-validate, promql-parser) live in
.tools/deploy-venv, installed by tests/deploy/install_tools.sh, and are called as
subprocesses so they never mix with the project's own environment.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import posixpath
import re
import shlex
import subprocess
from collections.abc import Callable, Iterable, Iterator

import yaml

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
K8S = REPO / "k8s"
DOCKERFILE = REPO / "Dockerfile.gpu"
TOOLS = REPO / ".tools" / "deploy-venv" / "bin"
KUBECTL = TOOLS / "kubectl"
HADOLINT = TOOLS / "hadolint"
TOOLS_PY = TOOLS / "python"

# Kubernetes versions the manifests must validate against (oldest supported, newest).
K8S_VERSIONS = ("1.31", "1.37")
SERVER_IMAGE = "avatar-llm-serve"
# Series Prometheus itself creates for every scrape target (not exported by the server).
PROMETHEUS_SYNTHETIC_SERIES = frozenset({"up"})
# Components an overlay already includes or that are not standalone add-ons.
NON_ADDON_COMPONENTS = frozenset({"nvidia-gpu", "example-secret"})
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet")


def ensure_tools() -> None:
    subprocess.run(["bash", str(HERE / "install_tools.sh")], check=True, timeout=600)


# ---------------------------------------------------------------- rendering
def kustomize_build(path: pathlib.Path) -> list[dict]:
    proc = subprocess.run(
        [str(KUBECTL), "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kustomize build {path} failed:\n{proc.stderr}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def overlays(k8s: pathlib.Path = K8S) -> list[str]:
    return sorted(
        p.name for p in (k8s / "overlays").iterdir() if (p / "kustomization.yaml").exists()
    )


def addon_components(k8s: pathlib.Path = K8S) -> list[str]:
    return sorted(
        p.name
        for p in (k8s / "components").iterdir()
        if (p / "kustomization.yaml").exists() and p.name not in NON_ADDON_COMPONENTS
    )


def build_with_component(
    component: str, workdir: pathlib.Path, k8s: pathlib.Path = K8S, overlay: str = "gpu"
) -> list[dict]:
    """Render `overlay` plus one optional component, as a user overlay would."""
    d = workdir / f"{overlay}+{component}"
    d.mkdir(parents=True, exist_ok=True)
    rel = lambda p: os.path.relpath(p, d)  # noqa: E731
    (d / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [rel(k8s / "overlays" / overlay)],
                "components": [rel(k8s / "components" / component)],
            }
        )
    )
    return kustomize_build(d)


def render_all(workdir: pathlib.Path, k8s: pathlib.Path = K8S) -> dict[str, list[dict]]:
    out = {f"overlay:{o}": kustomize_build(k8s / "overlays" / o) for o in overlays(k8s)}
    for c in addon_components(k8s):
        out[f"gpu+{c}"] = build_with_component(c, workdir, k8s)
    return out


# ---------------------------------------------------------------- tool-side calls
def _toolside(args: list[str], payload) -> list[dict]:
    proc = subprocess.run(
        [str(TOOLS_PY), str(HERE / "_toolside.py"), *args],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"_toolside {args} failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


def validate_objects(objs: list[dict], k8s_version: str) -> list[dict]:
    return _toolside(["validate", k8s_version], objs)


def validate_targets(targets: dict[str, list[dict]], k8s_version: str) -> dict[str, list[dict]]:
    """``validate_objects`` of every target in one tool process: each start loads the version's
    whole schema (about half a second), once per target made a dozen."""
    flat = [obj for objs in targets.values() for obj in objs]
    results = iter(validate_objects(flat, k8s_version))
    return {t: [next(results) for _ in objs] for t, objs in targets.items()}


_PROMQL: dict[str, dict] = {}  # expr -> its analysis: the targets share most expressions


def analyze_promql(exprs: list[str]) -> list[dict]:
    missing = [e for e in dict.fromkeys(exprs) if e not in _PROMQL]
    if missing:  # one tool process for what is new, not one per target
        _PROMQL.update(zip(missing, _toolside(["promql"], missing), strict=True))
    return [_PROMQL[e] for e in exprs]


# ---------------------------------------------------------------- object walking
def pod_specs(objs: Iterable[dict]) -> Iterator[tuple[str, dict, dict]]:
    """(where, pod template, pod spec) for every pod template in the rendered objects."""
    for o in objs:
        kind, name = o.get("kind"), o.get("metadata", {}).get("name")
        spec = o.get("spec") or {}
        if kind in WORKLOAD_KINDS:
            tmpl = spec.get("template") or {}
            yield f"{kind}/{name}", tmpl, tmpl.get("spec") or {}
        elif kind == "LeaderWorkerSet":
            lwt = spec.get("leaderWorkerTemplate") or {}
            for role in ("leaderTemplate", "workerTemplate"):
                if role in lwt:
                    yield f"{kind}/{name}.{role}", lwt[role], lwt[role].get("spec") or {}


def runtime_pod_labels(where: str, tmpl: dict) -> dict[str, str]:
    """Template labels plus those a controller adds to the pods (LWS worker index)."""
    labels = dict((tmpl.get("metadata") or {}).get("labels") or {})
    if where.endswith(".leaderTemplate"):
        labels["leaderworkerset.sigs.k8s.io/worker-index"] = "0"
    elif where.endswith(".workerTemplate"):
        labels["leaderworkerset.sigs.k8s.io/worker-index"] = "1"  # 1..size-1
    return labels


def server_containers(objs: Iterable[dict]) -> Iterator[tuple[str, dict, dict]]:
    """(where, pod spec, container) for containers running the avatar-llm-serve image."""
    for where, _tmpl, ps in pod_specs(objs):
        for c in ps.get("containers", []) + ps.get("initContainers", []):
            if SERVER_IMAGE in str(c.get("image", "")):
                yield f"{where}/{c.get('name')}", ps, c


def find(objs: Iterable[dict], kind: str, name: str | None = None) -> list[dict]:
    return [
        o
        for o in objs
        if o.get("kind") == kind and (name is None or o.get("metadata", {}).get("name") == name)
    ]


def container_env(c: dict, objs: list[dict]) -> dict[str, str | None]:
    """Env var name -> literal value (None when from a secret/fieldRef or unknown)."""
    env: dict[str, str | None] = {}
    for src in c.get("envFrom", []):
        prefix = src.get("prefix", "")
        for ref_key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
            if ref_key in src:
                ref = src[ref_key]["name"]
                found = find(objs, kind, ref)
                if not found:
                    raise AssertionError(
                        f"envFrom {kind} {ref!r} is not rendered; its keys cannot be checked"
                    )
                for k, v in (found[0].get("data") or {}).items():
                    env[prefix + k] = v if kind == "ConfigMap" else None
                for k in found[0].get("stringData") or {}:
                    env[prefix + k] = None
    for e in c.get("env", []):
        env[e["name"]] = e.get("value") if "valueFrom" not in e else None
    return env


_SHELL_SEP = re.compile(r"(?:&&|\|\||[;|&\n])")


def serve_flags(c: dict) -> list[str]:
    """Long flags passed to `python -m serve` by a container.

    Without `command` the image ENTRYPOINT (python -m serve) gets `args` directly.
    With a command (e.g. a bash -c script) every `-m serve` invocation in the joined
    command line is parsed up to the next shell separator.
    """

    def longflags(tokens: Iterable[str]) -> list[str]:
        return [t.split("=", 1)[0] for t in tokens if t.startswith("--")]

    if not c.get("command"):
        return longflags(c.get("args", []))
    text = " ".join(c.get("command", []) + c.get("args", [])).replace("\\\n", " ")
    flags: list[str] = []
    for m in re.finditer(r"-m\s+serve\b", text):
        segment = _SHELL_SEP.split(text[m.end() :], maxsplit=1)[0]
        flags += longflags(shlex.split(segment, posix=True))
    return flags


def probes(c: dict) -> dict[str, dict]:
    return {k: c[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in c}


def resolve_port(c: dict, port) -> int | None:
    if isinstance(port, int):
        return port
    for p in c.get("ports", []):
        if p.get("name") == port:
            return p.get("containerPort")
    return None


def prestop_sleep_seconds(c: dict) -> int:
    pre = (c.get("lifecycle") or {}).get("preStop") or {}
    if "sleep" in pre:
        return int(pre["sleep"]["seconds"])
    cmd = (pre.get("exec") or {}).get("command") or []
    if cmd and os.path.basename(cmd[0]) == "sleep":
        return int(float(cmd[1]))
    return 0


# ---------------------------------------------------------------- PromQL sources
GRAFANA_VARS = re.compile(r"\$\{?(__rate_interval|__interval|__range)\}?")
LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.*?)\s*,\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$", re.S)


def _grafana_to_promql(expr: str) -> str:
    expr = GRAFANA_VARS.sub("5m", expr)
    m = LABEL_VALUES.match(expr)
    if m:  # label_values(<selector>, label) -> <selector>
        expr = m.group(1)
    return expr


def dashboard_exprs(dashboard: dict) -> list[str]:
    out: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if (k == "expr" and isinstance(v, str)) or (
                    k == "query" and isinstance(v, str) and "label_values(" in v
                ):
                    out.append(_grafana_to_promql(v))
                else:
                    walk(v)
        elif isinstance(node, list):
            for x in node:
                walk(x)

    walk(dashboard)
    return out


def dashboards(objs: Iterable[dict]) -> Iterator[tuple[str, dict]]:
    for cm in find(objs, "ConfigMap"):
        for key, val in (cm.get("data") or {}).items():
            if key.endswith(".json"):
                doc = json.loads(val)
                if isinstance(doc, dict) and "panels" in doc:
                    yield f"ConfigMap/{cm['metadata']['name']}/{key}", doc


def adapter_rule_files(k8s: pathlib.Path) -> list[pathlib.Path]:
    """Helm values files for prometheus-adapter shipped next to the manifests."""
    out = []
    for p in sorted(k8s.rglob("*.yaml")):
        try:
            doc = yaml.safe_load(p.read_text())
        except yaml.YAMLError:
            continue
        if (
            isinstance(doc, dict)
            and isinstance(doc.get("rules"), dict)
            and "custom" in doc["rules"]
        ):
            out.append(p)
    return out


def adapter_rules(path: pathlib.Path) -> list[tuple[str, str, list[str]]]:
    """(exposed metric name, description, PromQL exprs) per prometheus-adapter rule."""
    rules = []
    for r in yaml.safe_load(path.read_text())["rules"]["custom"]:
        series = r["seriesQuery"]
        m = re.match(r"\s*([A-Za-z_:][A-Za-z0-9_:]*)", series)
        series_name = m.group(1) if m else ""
        name = series_name
        if "name" in r:
            name = re.sub(
                r["name"].get("matches", "^(.*)$"),
                r["name"].get("as", "$1").replace("$", "\\"),
                series_name,
            )
        q = (
            r.get("metricsQuery", "")
            .replace("<<.Series>>", series_name)
            .replace("<<.LabelMatchers>>", 'namespace="x",pod="y"')
            .replace("<<.GroupBy>>", "pod")
        )
        rules.append((name, f"{path.name}:{series_name}", [series, q] if q else [series]))
    return rules


def promql_sources(objs: list[dict], k8s: pathlib.Path = K8S) -> list[tuple[str, str]]:
    """(where, PromQL expression) for everything that queries the server's metrics."""
    src: list[tuple[str, str]] = []
    for pr in find(objs, "PrometheusRule"):
        for g in pr["spec"].get("groups", []):
            for r in g.get("rules", []):
                src.append(
                    (
                        f"PrometheusRule/{pr['metadata']['name']}/"
                        f"{r.get('alert') or r.get('record')}",
                        str(r["expr"]),
                    )
                )
    for so in find(objs, "ScaledObject"):
        for t in so["spec"].get("triggers", []):
            if t.get("type") == "prometheus":
                src.append(
                    (
                        f"ScaledObject/{so['metadata']['name']}/{t.get('name', '?')}",
                        t["metadata"]["query"],
                    )
                )
    for where, dash in dashboards(objs):
        src += [(where, e) for e in dashboard_exprs(dash)]
    if find(objs, "HorizontalPodAutoscaler"):
        for f in adapter_rule_files(k8s):
            for _name, where, exprs in adapter_rules(f):
                src += [(where, e) for e in exprs]
    return src


def recorded_series(objs: list[dict]) -> set[str]:
    return {
        r["record"]
        for pr in find(objs, "PrometheusRule")
        for g in pr["spec"].get("groups", [])
        for r in g.get("rules", [])
        if "record" in r
    }


def hpa_metric_names(objs: list[dict]) -> list[tuple[str, str]]:
    out = []
    for h in find(objs, "HorizontalPodAutoscaler"):
        for m in h["spec"].get("metrics", []):
            body = m.get(m["type"][0].lower() + m["type"][1:]) or {}
            if "metric" in body:
                out.append(
                    (f"HorizontalPodAutoscaler/{h['metadata']['name']}", body["metric"]["name"])
                )
    return out


def epp_metric_flags(objs: list[dict]) -> list[tuple[str, str]]:
    """Metric names other components scrape from the server, given as --*-metric=NAME."""
    out = []
    for where, _t, ps in pod_specs(objs):
        for c in ps.get("containers", []):
            for a in c.get("args", []):
                m = re.match(r"--[a-z0-9-]+-metric=(.+)", str(a))
                if m and m.group(1).strip('"'):
                    out.append((f"{where}/{c['name']} {a.split('=')[0]}", m.group(1).strip('"')))
    return out


# ---------------------------------------------------------------- persona adapters (LoRA)
LORA_MODULE_KEYS = frozenset({"name", "path", "base_model_name"})  # vLLM's LoRAModulePath
# Settings that mean nothing (or fail) without AVATAR_ENABLE_LORA=true.
LORA_SETTINGS = (
    "AVATAR_LORA_MODULES",
    "AVATAR_LORA_ADAPTER_ROOT",
    "AVATAR_MAX_LORAS",
    "AVATAR_MAX_LORA_RANK",
    "AVATAR_MAX_CPU_LORAS",
)
_TRUE, _FALSE = frozenset({"1", "true", "yes", "on"}), frozenset({"0", "false", "no", "off"})


def lora_modules(value: str) -> list[dict]:
    """AVATAR_LORA_MODULES as the server reads it: a JSON array of {"name", "path",
    "base_model_name"?} objects (or one such object), or comma-separated name=path items.
    ValueError if neither."""
    text = value.strip()
    if text.startswith(("[", "{")):
        items = json.loads(text)  # json.JSONDecodeError is a ValueError
        items = items if isinstance(items, list) else [items]
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise ValueError(f"[{i}] is not an object: {item!r}")
            if unknown := set(item) - LORA_MODULE_KEYS:
                raise ValueError(f"[{i}] unknown keys {sorted(unknown)}")
            if not all(isinstance(item.get(k), str) and item[k] for k in ("name", "path")):
                raise ValueError(f"[{i}] needs a non-empty name and path: {item!r}")
        return items
    out = []
    for item in text.split(","):
        name, sep, path = (p.strip() for p in item.partition("="))
        if not (sep and name and path):
            raise ValueError(f"{item.strip()!r} is not name=path")
        out.append({"name": name, "path": path})
    return out


def _under(path: str, root: str, strict: bool = False) -> bool:
    root = root.rstrip("/") or "/"
    return (not strict and path == root) or path.startswith(root.rstrip("/") + "/")


def lora_problems(env: dict[str, str | None], pod_spec: dict, c: dict, ranks) -> list[str]:
    """Ways one server container's persona (LoRA) settings would fail or surprise a user.
    Empty = fine, including a container that serves no adapters. `ranks`: the ranks
    vLLM accepts for --max-lora-rank."""
    problems: list[str] = []

    def flag(name: str) -> bool:
        word = (env.get(name) or "false").strip().lower()
        if word not in _TRUE | _FALSE:
            problems.append(f"{name}={env[name]!r} is not a boolean")
        return word in _TRUE

    enabled = flag("AVATAR_ENABLE_LORA")
    runtime = flag("AVATAR_ALLOW_RUNTIME_LORA_UPDATING") or flag("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
    if not enabled:
        used = [n for n in LORA_SETTINGS if env.get(n)] + (["runtime updating"] if runtime else [])
        if used:
            problems.append(f"{used} set without AVATAR_ENABLE_LORA=true")
        return problems

    raw_root = env.get("AVATAR_LORA_ADAPTER_ROOT")
    root = posixpath.normpath(raw_root) if raw_root else None
    if not root:
        problems.append("AVATAR_ENABLE_LORA without AVATAR_LORA_ADAPTER_ROOT (no adapter volume)")
    else:
        mounts = [m for m in c.get("volumeMounts", []) if _under(root, m["mountPath"])]
        if not mounts:
            problems.append(f"adapter root {root} is not on a mounted volume")
        else:
            m = max(mounts, key=lambda m: len(m["mountPath"]))
            vol = next((v for v in pod_spec.get("volumes", []) if v["name"] == m["name"]), {})
            if m.get("readOnly") is not True:
                problems.append(f"adapter volume {m['name']} mounted writable at {m['mountPath']}")
            if not ("persistentVolumeClaim" in vol or "image" in vol):
                problems.append(f"adapter volume {m['name']} is neither a PVC nor an image volume")

    try:
        max_loras = int(env.get("AVATAR_MAX_LORAS") or 1)  # vLLM's defaults
        rank = int(env.get("AVATAR_MAX_LORA_RANK") or 16)
        cpu_loras = int(env.get("AVATAR_MAX_CPU_LORAS") or max_loras)
    except ValueError as e:
        return [*problems, f"LoRA limit is not an integer: {e}"]
    if rank not in ranks:
        problems.append(f"AVATAR_MAX_LORA_RANK={rank} is not one vLLM accepts {sorted(ranks)}")
    if not 1 <= max_loras <= cpu_loras:
        problems.append(f"need 1 <= AVATAR_MAX_LORAS ({max_loras}) <= AVATAR_MAX_CPU_LORAS")

    personas = []
    if env.get("AVATAR_LORA_MODULES"):
        try:
            personas = lora_modules(env["AVATAR_LORA_MODULES"])
        except ValueError as e:
            problems.append(f"AVATAR_LORA_MODULES does not parse: {e}")
    served = [
        s.strip()
        for s in (env.get("AVATAR_SERVED_MODEL_NAME") or env.get("AVATAR_MODEL") or "").split(",")
        if s.strip()
    ]
    names = [p["name"] for p in personas]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"persona names listed twice: {dup}")
    paths = [posixpath.normpath(p["path"]) for p in personas]
    if dup := sorted({x for x in paths if paths.count(x) > 1}):
        problems.append(f"personas share an adapter directory: {dup}")
    if clash := sorted(set(names) & set(served)):
        problems.append(f"persona names equal to the served base model: {clash}")
    for p in personas:
        path = p["path"]
        if not posixpath.isabs(path) or posixpath.normpath(path) != path.rstrip("/"):
            problems.append(f"persona {p['name']}: path {path!r} is not absolute and normal")
        elif root and not _under(path, root, strict=True):
            problems.append(f"persona {p['name']}: path {path} is not under {root}")
        base = p.get("base_model_name")
        if base is not None and served and base not in served:
            problems.append(f"persona {p['name']}: base_model_name {base!r} is not served {served}")
    if len(personas) > cpu_loras:
        problems.append(
            f"{len(personas)} static personas but AVATAR_MAX_CPU_LORAS={cpu_loras}: the rest "
            "are re-read from the volume whenever they come back"
        )
    if runtime:
        args = c.get("args", [])
        count = env.get("AVATAR_API_SERVER_COUNT") or "1"
        if "--api-server-count" in args:
            count = args[args.index("--api-server-count") + 1]
        if int(count) > 1:
            problems.append(f"runtime LoRA updating with {count} API servers (the server refuses)")
    return problems


def epp_configs(objs: Iterable[dict]) -> Iterator[tuple[str, dict, str, str]]:
    """(where, parsed config, ConfigMap name, key) for every EndpointPickerConfig in a ConfigMap."""
    for cm in find(objs, "ConfigMap"):
        for key, val in (cm.get("data") or {}).items():
            if key.endswith((".yaml", ".yml")):
                doc = yaml.safe_load(val)
                if isinstance(doc, dict) and doc.get("kind") == "EndpointPickerConfig":
                    name = cm["metadata"]["name"]
                    yield f"ConfigMap/{name}/{key}", doc, name, key


# ---------------------------------------------------------------- the server contract
@dataclasses.dataclass
class ServerContract:
    env_ok: Callable[[str], bool]
    cli_flags: set[str]
    metrics: set[str]
    routes: set[str]
    port: int
    # sample name -> label -> every value the server exports for it, for the labels whose
    # values it writes from the first scrape (e.g. the rejection reasons, the SLO outcomes)
    label_values: dict[str, dict[str, set[str]]] = dataclasses.field(default_factory=dict)


class ContractUnavailable(Exception):
    pass


def load_contract() -> ServerContract:
    """What the server really reads/serves/exports, from the serve package itself."""
    try:
        from serve import cli, telemetry
        from serve import settings as s
        from serve.app import create_app
        from serve.engine.fake import FakeEngine
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "serve":
            raise ContractUnavailable(
                f"serve API not importable yet ({e}); drift cannot be checked"
            ) from e
        raise
    settings = s.Settings()
    app = create_app(settings, FakeEngine())
    # /metrics serves the app's own registry plus the process-wide one (vLLM's).
    metrics = telemetry.exported_metric_names(app.state.metrics.registry)
    metrics |= telemetry.exported_metric_names()
    if not any(m.startswith("vllm:") for m in metrics):
        # vLLM registers its vllm:* collectors only when a real engine starts, which a
        # test with FakeEngine never does: take the names the installed vLLM defines.
        metrics |= vllm_defined_metric_names()
    return ServerContract(
        env_ok=cli.is_known_env_var,  # serve.cli is the one reader of flags and env
        cli_flags=set(cli.known_cli_flags()),
        metrics=metrics,
        routes={getattr(r, "path", None) for r in app.routes} - {None},
        port=int(settings.port),
        label_values=exported_label_values(app.state.metrics.registry),
    )


def exported_label_values(registry) -> dict[str, dict[str, set[str]]]:
    """The label values of every labelled sample the server exports before any request:
    the families that write all their label values up front (so that rate() works from the
    first scrape). A family whose samples appear only with traffic has no entry."""
    out: dict[str, dict[str, set[str]]] = {}
    for family in registry.collect():
        for sample in family.samples:
            for label, value in sample.labels.items():
                out.setdefault(sample.name, {}).setdefault(label, set()).add(value)
    return out


LITERAL_ALTERNATION = re.compile(r"[A-Za-z0-9_:.-]+(\|[A-Za-z0-9_:.-]+)*")


def label_matcher_problems(
    metric: str, label: str, op: str, value: str, contract: ServerContract
) -> list[str]:
    """A matcher on a label whose values the server enumerates must name values it exports:
    `=` one of them; `=~` each alternative of a literal alternation, any other regex at
    least one. Negative matchers and labels the server does not enumerate pass."""
    known = contract.label_values.get(metric, {}).get(label)
    kind = op.rsplit(".", 1)[-1]
    if not known or kind not in ("Equal", "Re"):
        return []
    where = f"{metric}{{{label}}}"
    if kind == "Equal":
        return [] if value in known else [f"{where} = {value!r}: not a value the server exports"]
    if LITERAL_ALTERNATION.fullmatch(value):
        unknown = [v for v in value.split("|") if v not in known]
        return [f"{where} =~ {value!r}: {v!r} is not a value the server exports" for v in unknown]
    try:
        pattern = re.compile(value)
    except re.error:
        return []  # the PromQL parse check reports a bad regex
    if not any(pattern.fullmatch(v) for v in known):
        return [f"{where} =~ {value!r}: matches no value the server exports"]
    return []


def vllm_defined_metric_names() -> set[str]:
    """vllm:* sample names defined in the installed vLLM's metrics code (static scan, no import).

    The metric kind is not known from the literal, so the counter (_total) and histogram
    (_bucket/_sum/_count) sample names are accepted alongside the base name.
    """
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return set()
    names: set[str] = set()
    for root in spec.submodule_search_locations:
        for f in pathlib.Path(root).rglob("*.py"):
            if "metrics" not in str(f.relative_to(root)):
                continue
            for n in re.findall(r"""["'](vllm:[a-z0-9_]+)["']""", f.read_text(errors="replace")):
                names |= {n, n + "_total", n + "_bucket", n + "_sum", n + "_count"}
    return names


def check_drift(objs: list[dict], contract: ServerContract, k8s: pathlib.Path = K8S) -> list[str]:
    """Every way the rendered manifests disagree with the server. Empty = in sync."""
    problems: list[str] = []
    for where, _ps, c in server_containers(objs):
        env = container_env(c, objs)
        for name in env:
            if not contract.env_ok(name):
                problems.append(f"{where}: env {name} is not a setting the server reads")
        for flag in serve_flags(c):
            if flag not in contract.cli_flags:
                problems.append(f"{where}: flag {flag} is not accepted by `python -m serve`")
        port = int(env["AVATAR_PORT"]) if env.get("AVATAR_PORT") else contract.port
        flags = c.get("args", [])
        if "--port" in flags:
            port = int(flags[flags.index("--port") + 1])
        for kind, p in probes(c).items():
            get = p.get("httpGet")
            if not get:
                continue
            if get["path"] not in contract.routes:
                problems.append(f"{where}: {kind} path {get['path']} is not a route of the app")
            if resolve_port(c, get["port"]) != port:
                problems.append(f"{where}: {kind} port {get['port']} is not the server port {port}")
        if c.get("ports") and port not in [p.get("containerPort") for p in c["ports"]]:
            problems.append(
                f"{where}: containerPorts {c['ports']} do not include the server port {port}"
            )
    for sm in find(objs, "ServiceMonitor"):
        for ep in sm["spec"]["endpoints"]:
            if ep.get("path", "/metrics") not in contract.routes:
                problems.append(
                    f"ServiceMonitor/{sm['metadata']['name']}: path {ep.get('path')} is not a route"
                )

    allowed = contract.metrics | PROMETHEUS_SYNTHETIC_SERIES | recorded_series(objs)
    sources = promql_sources(objs, k8s)
    for (where, expr), res in zip(sources, analyze_promql([e for _, e in sources]), strict=True):
        if res["error"]:
            problems.append(f"{where}: PromQL does not parse: {res['error']}: {expr!r}")
        for m in res["metrics"]:
            if m not in allowed:
                problems.append(f"{where}: metric {m} is not exported by the server")
        for metric, label, op, value in res["matchers"]:
            problems += [
                f"{where}: {p}" for p in label_matcher_problems(metric, label, op, value, contract)
            ]
    adapter_names = {n for f in adapter_rule_files(k8s) for n, _, _ in adapter_rules(f)}
    for where, name in hpa_metric_names(objs):
        if name not in allowed and name not in adapter_names:
            problems.append(
                f"{where}: metric {name} is neither exported nor defined by an adapter rule"
            )
    for where, name in epp_metric_flags(objs):
        if name not in allowed:
            problems.append(f"{where}: metric {name} is not exported by the server")
    return problems


# ---------------------------------------------------------------- Dockerfile
def dockerfile_instructions(path: pathlib.Path = DOCKERFILE) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_env(path: pathlib.Path = DOCKERFILE) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in dockerfile_instructions(path):
        if word == "ENV":
            for tok in shlex.split(rest):
                k, _, v = tok.partition("=")
                env[k] = v
    return env
