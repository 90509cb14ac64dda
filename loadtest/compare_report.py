"""The tables of ``loadtest.compare``: absolute values and paired ratios over rounds, the
server CPU per output token, compare.md and compare.png."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.cpu import SUMMARY_KEY

# (key in the summary, stat, label, higher is better)
FRONT_END_LABEL = "front-end CPU µs/token"
RATIO_METRICS = (
    ("ttft_ms", "p50", "TTFT p50", False),
    ("ttft_ms", "p99", "TTFT p99", False),
    ("itl_ms", "p50", "ITL p50", False),
    ("itl_ms", "p99", "ITL p99", False),
    ("output_token_throughput", None, "output tok/s", True),
    # Set by compare on the servers' levels only: the raw engine has no front end.
    (SUMMARY_KEY, None, FRONT_END_LABEL, False),
)


def metric(summary: dict[str, Any], key: str, stat: str | None) -> float | None:
    """A figure of a level's summary; None where the target or its client has none."""
    value = summary.get(key) if stat is None else (summary.get(key) or {}).get(stat)
    return None if value is None else float(value)


def spread(values: Sequence[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def ratios(
    results: dict[str, list[list[dict[str, Any]]]], num: str, den: str
) -> dict[str, dict[str, dict[str, float]]]:
    """Per level and metric: ``num/den`` computed within each round, then spread over rounds.

    Pairing within a round (not dividing the means) keeps the round-to-round drift of a shared
    machine out of the ratio as far as possible.
    """
    values: dict[str, dict[str, list[float]]] = {}
    if num not in results or den not in results:
        return {}
    for r_num, r_den in zip(results[num], results[den], strict=True):
        for lv_num, lv_den in zip(r_num, r_den, strict=True):
            per = values.setdefault(f"{lv_num['level']:g}", {})
            for key, stat, label, _ in RATIO_METRICS:
                a = metric(lv_num["summary"], key, stat)
                b = metric(lv_den["summary"], key, stat)
                if a is not None and b:
                    per.setdefault(label, []).append(a / b)
    return {lvl: {lab: spread(v) for lab, v in per.items()} for lvl, per in values.items()}


def absolute(results: dict[str, list[list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per target, level and metric: the spread of the absolute value over rounds."""
    out: dict[str, Any] = {}
    for target, rounds in results.items():
        per_level: dict[str, dict[str, list[float]]] = {}
        for levels in rounds:
            for lv in levels:
                for key, stat, label, _ in RATIO_METRICS:
                    v = metric(lv["summary"], key, stat)
                    if v is not None:
                        per_level.setdefault(f"{lv['level']:g}", {}).setdefault(label, []).append(v)
        out[target] = {
            lvl: {lab: spread(v) for lab, v in d.items()} for lvl, d in per_level.items()
        }
    return out


# (key in a level's "server_cpu", label, digits)
CPU_FIELDS = (
    ("front_end_us_per_token", "front-end CPU µs/token", 1),
    ("engine_us_per_token", "engine CPU µs/token", 1),
    ("front_end_cores", "front-end cores", 2),
    ("engine_cores", "engine cores", 2),
)


def server_cpu(results: dict[str, list[list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per server target and level: the spread over rounds of its CPU per output token and
    busy cores, front end and engine apart, and the processes each side had."""
    out: dict[str, Any] = {}
    for target, rounds in results.items():
        per_level: dict[str, dict[str, Any]] = {}
        for levels in rounds:
            for lv in levels:
                cpu = lv.get("server_cpu")
                if not cpu:
                    continue
                per = per_level.setdefault(f"{lv['level']:g}", {})
                for key, _, _ in CPU_FIELDS:
                    if cpu.get(key) is not None:
                        per.setdefault(key, []).append(cpu[key])
                per["processes"] = cpu.get("processes")
                per["span"] = cpu.get("span")
        if per_level:
            out[target] = {
                lvl: {k: (spread(v) if k not in ("processes", "span") else v) for k, v in d.items()}
                for lvl, d in per_level.items()
            }
    return out


def cell(s: dict[str, float] | None, digits: int = 2) -> str:
    if not s:
        return "-"
    # The median, not the mean: on shared cores one disturbed round must not move the figure.
    d = digits
    if s["n"] == 1:
        return f"{s['median']:.{d}f}"
    return f"{s['median']:.{d}f} ({s['min']:.{d}f}-{s['max']:.{d}f})"


def cpu_markdown(table: dict[str, Any]) -> list[str]:
    """The server CPU section of compare.md (empty without readings)."""
    if not table:
        return []
    lines = [
        "## Server CPU per output token",
        "",
        "CPU time (user + system) of each server's processes over the level's requests, per "
        "output token the level produced, and as busy cores (CPU s / wall s). Front end: every "
        "process of the server's tree but the engine (vLLM's `EngineCore` and the workers "
        "below it). Median (min-max) over rounds.",
        "",
        "| target | level | " + " | ".join(lab for _, lab, _ in CPU_FIELDS) + " | processes |",
        "|---" * (len(CPU_FIELDS) + 3) + "|",
    ]
    for target, per_level in table.items():
        for level, per in per_level.items():
            procs = per.get("processes") or {}
            lines.append(
                f"| {target} | {level} | "
                + " | ".join(cell(per.get(key), digits) for key, _, digits in CPU_FIELDS)
                + f" | {procs.get('front_end', '?')} front end, {procs.get('engine', '?')} engine"
                + " |"
            )
    return [*lines, ""]


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [f"# Comparison ({meta['rounds']} rounds, {meta['mode']})", ""]
    if meta.get("client"):
        lines += [f"Load client: {meta['client']}.", ""]
    for target, why in (meta.get("skipped") or {}).items():
        lines += [f"Skipped {target}: {why}.", ""]
    labels = [m[2] for m in RATIO_METRICS]
    for title, key in (
        ("ours / vLLM server", "ours_vs_vllm"),
        ("ours / raw engine (floor)", "ours_vs_engine"),
        ("vLLM server / raw engine (floor)", "vllm_vs_engine"),
    ):
        table = report["ratios"].get(key) or {}
        if not table:
            continue
        lines += [
            f"## {title}",
            "",
            "Ratio per round, median (min-max) over rounds. Latency and CPU: below 1 is "
            "better; tok/s: above 1 is better.",
            "",
            "| level | " + " | ".join(labels) + " |",
            "|---" * (len(labels) + 1) + "|",
        ]
        for level, per in table.items():
            lines.append(f"| {level} | " + " | ".join(cell(per.get(lab)) for lab in labels) + " |")
        lines.append("")
    lines += cpu_markdown(report.get("server_cpu") or {})
    lines += [
        "## Absolute values",
        "",
        "Median (min-max) over rounds; latencies in ms.",
        "",
        "| target | level | " + " | ".join(labels) + " |",
        "|---" * (len(labels) + 2) + "|",
    ]
    for target, per_level in report["absolute"].items():
        for level, per in per_level.items():
            lines.append(
                f"| {target} | {level} | " + " | ".join(cell(per.get(lab)) for lab in labels) + " |"
            )
    if report.get("idle_peer_cpu"):
        lines += [
            "",
            "Idle server's CPU use while the other was loaded (share of one core): "
            + ", ".join(f"{k} {v:.1%}" for k, v in report["idle_peer_cpu"].items()),
        ]
    return "\n".join(lines) + "\n"


def plot_compare(report: dict[str, Any], path: Path) -> None:
    """TTFT p50/p99, ITL p99 and output tok/s vs level per target; bars span the rounds."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    panels = (
        ("TTFT p50", "TTFT p50 (ms)"),
        ("TTFT p99", "TTFT p99 (ms)"),
        ("ITL p99", "ITL p99 (ms)"),
        ("output tok/s", "output tokens/s"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 3.4), dpi=80)
    for ax, (label, ylabel) in zip(axes, panels, strict=True):
        for target, per_level in report["absolute"].items():
            levels = sorted(per_level, key=float)
            pts = [(float(lv), per_level[lv][label]) for lv in levels if label in per_level[lv]]
            if not pts:
                continue
            xs = [x for x, _ in pts]
            med = [s["median"] for _, s in pts]
            err = [
                [m - s["min"] for m, (_, s) in zip(med, pts, strict=True)],
                [s["max"] - m for m, (_, s) in zip(med, pts, strict=True)],
            ]
            ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=target)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
        if label != "output tok/s":
            ax.set_yscale("log")
        ax.set_xlabel(report["meta"]["mode"])
        ax.set_title(ylabel, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"median over {report['meta']['rounds']} rounds; bars: min-max", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
