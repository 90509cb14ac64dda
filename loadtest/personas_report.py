"""The checks and tables of ``loadtest.personas``: which model each level's requests reached,
how many adapters ran together, the ratios personas/base over rounds, personas.md and the
closing summary."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from loadtest.compare_report import FRONT_END_LABEL, absolute, cell, ratios

MODES = ("base", "personas")
# Our server's per-request histogram, labelled with the `model` the request asked for (the
# base model or a persona): its count tells where a level's requests went.
BY_MODEL = "avatar_e2e_request_latency_seconds_count"
# vLLM's gauge, set to the current time at every engine step under the labels of that step's
# running adapters ("a,b,c"); a label set seen during a level carries a time within it.
LORA_INFO = "vllm:lora_requests_info"
# (label in compare_report's tables, header here, digits)
COLUMNS = (
    ("output tok/s", "tok/s", 0),
    ("TTFT p50", "TTFT p50 ms", 1),
    ("TTFT p99", "TTFT p99 ms", 1),
    ("ITL p50", "ITL p50 ms", 2),
    ("ITL p99", "ITL p99 ms", 2),
    (FRONT_END_LABEL, "front-end CPU µs/tok", 0),
)


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    if not text:
        return []
    return [
        (dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


def served_requests(before: str, after: str) -> dict[str, int]:
    """Requests finished between two scrapes, per ``model`` label (those with any)."""
    counts: dict[str, float] = {}
    for sign, text in ((-1, before), (1, after)):
        for labels, value in _samples(text, BY_MODEL):
            model = labels.get("model", "?")
            counts[model] = counts.get(model, 0.0) + sign * value
    return {m: round(v) for m, v in sorted(counts.items()) if round(v) > 0}


def adapters_together(after: str, since: float) -> int | None:
    """The most adapters that ran in one engine step since ``since`` (wall-clock seconds);
    None when the server exports no ``vllm:lora_requests_info``."""
    samples = _samples(after, LORA_INFO)
    if not samples:
        return None
    sets = [
        {a for a in labels.get("running_lora_adapters", "").split(",") if a}
        for labels, stamp in samples
        if stamp >= since
    ]
    return max((len(s) for s in sets), default=0)


def check_level(level: dict[str, Any], mode: str, base: str, names: Sequence[str]) -> list[str]:
    """What is wrong with where a level's requests went (empty when all is right)."""
    served = level.get("served") or {}
    if not served:
        return ["no per-model request counts on /metrics: routing not checked"]
    problems = []
    if mode == "base" and set(served) != {base}:
        problems.append(f"base level reached other models: {served}")
    if mode == "personas":
        if served.get(base):
            problems.append(f"{served[base]} persona-level requests were served by the base model")
        if missing := [n for n in names if n not in served]:
            problems.append(f"adapters that got no request: {missing}")
    return problems


def build_report(
    meta: dict[str, Any], results: dict[str, list[list[dict[str, Any]]]], cut: bool
) -> dict[str, Any]:
    """Ratios and absolute spreads over the rounds both modes completed."""
    done = min(len(results[m]) for m in MODES)
    paired = {m: results[m][:done] for m in MODES}
    together: dict[str, dict[str, list[int | None]]] = {}
    for mode in MODES:
        for levels in paired[mode]:
            for lv in levels:
                key = f"{lv['level']:g}"
                together.setdefault(mode, {}).setdefault(key, []).append(
                    lv.get("adapters_together")
                )
    return {
        "meta": meta | {"rounds_done": done, "cut_by_budget": cut},
        "ratios": {"personas_vs_base": ratios(paired, "personas", "base") if done else {}},
        "absolute": absolute(paired),
        "adapters_together": together,
        "warnings": [
            f"{mode} round {r} level {lv['level']:g}: {w}"
            for mode in MODES
            for r, levels in enumerate(results[mode], 1)
            for lv in levels
            for w in lv["warnings"]
        ],
        "results": results,
    }


def _per_level(meta: dict[str, Any]) -> str:
    if meta.get("duration"):
        return f"{meta['duration']:g} s per level and mode"
    counts = meta.get("num_requests") or []
    return "/".join(str(n) for n in counts) + " requests per level and mode"


def _together(report: dict[str, Any], level: str) -> str:
    seen = (report["adapters_together"].get("personas") or {}).get(level) or []
    known = [v for v in seen if v is not None]
    if not known:
        return "-"
    lo, hi = min(known), max(known)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _ratio(s: dict[str, float] | None) -> str:
    if not s:
        return "-"
    spread = "" if s["n"] == 1 else f" ({s['min']:.2f}-{s['max']:.2f})"
    return f"{s['median']:.2f}x{spread}"


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The short table printed last: absolute figures, ratios with spread, adapters."""
    meta = report["meta"]
    lines = [
        f"personas vs base: {meta['personas']} rank-{meta['rank']} adapters on {meta['model']}, "
        f"{meta['rounds_done']} round(s); median (min-max) over rounds",
        f"{'mode':<9} {meta['mode'][:4]:>5} "
        + " ".join(f"{head:>22}" for _, head, _ in COLUMNS[:4]),
    ]
    for mode in MODES:
        for level, per in (report["absolute"].get(mode) or {}).items():
            lines.append(
                f"{mode:<9} {level:>5} "
                + " ".join(f"{cell(per.get(lab), d):>22}" for lab, _, d in COLUMNS[:4])
            )
    for level, per in report["ratios"]["personas_vs_base"].items():
        parts = [f"{head.split(' ms')[0]} {_ratio(per.get(lab))}" for lab, head, _ in COLUMNS[:4]]
        lines.append(f"personas/base {meta['mode'][:4]} {level}: " + ", ".join(parts))
    for level in report["ratios"]["personas_vs_base"]:
        lines.append(
            f"adapters running together (most in one engine step), {meta['mode'][:4]} {level}: "
            f"{_together(report, level)} of {meta['personas']}"
        )
    if meta.get("cut_by_budget"):
        lines.append(f"cut by --budget-s after {meta['rounds_done']} of {meta['rounds']} rounds")
    lines += [f"WARNING: {w}" for w in report["warnings"]]
    return lines


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    heads = [head for _, head, _ in COLUMNS]
    lines = [
        f"# Persona adapters vs the base model ({meta['rounds_done']} rounds, {meta['mode']})",
        "",
        f"Model `{meta['model']}`; {meta['personas']} LoRA adapters of rank {meta['rank']} "
        f"on {', '.join(meta['targets'])} (random, seeds {meta['seeds']}), served by one "
        f"server: `{' '.join(meta['server_flags'])}`. Workload: seed {meta['seed']}, turns "
        f"{meta['turns']}, max_tokens {meta['max_tokens']}, ignore_eos {meta['ignore_eos']}, "
        f"{_per_level(meta)}. Order: {meta['order']}.",
        "",
        "- **base**: every request asks for the base model (on the same LoRA-enabled server).",
        "- **personas**: each conversation asks for the adapter named after its persona "
        "(`loadtest.workload.route_to_personas`), so the engine batches the adapters together.",
        "",
        "## personas / base",
        "",
        "Ratio within each round, median (min-max) over rounds. Latency and CPU: below 1 is "
        "better; tok/s: above 1 is better.",
        "",
        f"| {meta['mode']} | " + " | ".join(heads) + " | adapters together |",
        "|---" * (len(heads) + 2) + "|",
    ]
    for level, per in report["ratios"]["personas_vs_base"].items():
        lines.append(
            f"| {level} | "
            + " | ".join(cell(per.get(lab)) for lab, _, _ in COLUMNS)
            + f" | {_together(report, level)} of {meta['personas']} |"
        )
    lines += [
        "",
        "## Absolute values",
        "",
        "Median (min-max) over rounds.",
        "",
        f"| mode | {meta['mode']} | " + " | ".join(heads) + " |",
        "|---" * (len(heads) + 2) + "|",
    ]
    for mode in MODES:
        for level, per in (report["absolute"].get(mode) or {}).items():
            lines.append(
                f"| {mode} | {level} | "
                + " | ".join(cell(per.get(lab), d) for lab, _, d in COLUMNS)
                + " |"
            )
    if meta.get("cut_by_budget"):
        lines += ["", f"Cut by the time budget after {meta['rounds_done']} round(s)."]
    if report["warnings"]:
        lines += ["", "## Warnings", "", *[f"- {w}" for w in report["warnings"]]]
    return "\n".join(lines) + "\n"
