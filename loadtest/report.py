"""Outputs of a benchmark run: terminal table, JSON, CSV and PNG plots."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.runner import LevelRun
from loadtest.stats import Slo, summarize

METRICS = ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms", "ttfs_ms")
STATS = ("mean", "p50", "p90", "p99")


def level_results(runs: Sequence[LevelRun], slo: Slo) -> list[dict[str, Any]]:
    out = []
    for run in runs:
        lv: dict[str, Any] = {
            "mode": run.mode,
            "level": run.level,
            "summary": summarize(run.records, run.duration_s, slo),
            "client": run.client,
            "warnings": run.warnings,
        }
        if run.probe is not None:
            lv["probe"] = run.probe
        out.append(lv)
    return out


def _fmt(v: float | int | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _scaled(v: float | None, k: float) -> float | None:
    return None if v is None else k * v


def format_table(levels: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table, one row per load level."""
    cols = [
        ("level", 6),
        ("ok", 5),
        ("err", 4),
        ("req/s", 7),
        ("tok/s", 8),
        ("TTFT p50", 9),
        ("p90", 8),
        ("p99", 8),
        ("ITL p50", 8),
        ("p90", 7),
        ("p99", 7),
        ("TPOT p50", 9),
        ("E2E p50", 8),
        ("p99", 8),
        ("TTFS p50", 9),
        ("good%", 6),
        ("cpu%", 5),
    ]
    lines = [" ".join(name.rjust(w) for name, w in cols)]
    for lv in levels:
        s = lv["summary"]
        t, i, e = s["ttft_ms"], s["itl_ms"], s["e2e_ms"]
        values = [
            f"{lv['level']:g}",
            str(s["completed"]),
            str(s["errors"]),
            _fmt(s["request_throughput"], 2),
            _fmt(s["output_token_throughput"]),
            _fmt(t["p50"]),
            _fmt(t["p90"]),
            _fmt(t["p99"]),
            _fmt(i["p50"]),
            _fmt(i["p90"]),
            _fmt(i["p99"]),
            _fmt(s["tpot_ms"]["p50"]),
            _fmt(e["p50"], 0),
            _fmt(e["p99"], 0),
            _fmt(s["ttfs_ms"]["p50"]),
            # Either may be unknown when another client (vLLM's) made the level.
            _fmt(_scaled(s["goodput"], 100), 0),
            _fmt(_scaled(lv["client"].get("cpu_fraction"), 100), 0),
        ]
        lines.append(" ".join(v.rjust(w) for v, (_, w) in zip(values, cols, strict=True)))
    lines.append(
        "(latencies in ms; tok/s = output tokens/s; good% = share meeting the SLOs; "
        "cpu% = load generator CPU, one core = 100)"
    )
    return "\n".join(lines)


def summary_row(lv: dict[str, Any]) -> dict[str, Any]:
    s = lv["summary"]
    row: dict[str, Any] = {"mode": lv["mode"], "level": lv["level"]}
    for key in (
        "requests",
        "completed",
        "errors",
        "duration_s",
        "request_throughput",
        "output_token_throughput",
        "total_output_tokens",
        "goodput",
        "goodput_rps",
    ):
        row[key] = s[key]
    for metric in METRICS:
        for stat in STATS:
            row[f"{metric[:-3]}_{stat}_ms"] = s[metric][stat]
    row["client_cpu_fraction"] = lv["client"]["cpu_fraction"]
    row["client_loop_lag_p99_ms"] = lv["client"]["loop_lag_p99_ms"]
    return row


def write_outputs(
    out_dir: Path,
    meta: dict[str, Any],
    levels: Sequence[dict[str, Any]],
    runs: Sequence[LevelRun],
    *,
    plots: bool = True,
) -> dict[str, Path]:
    """Write results.json, summary.csv, requests.csv and the plots; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "results.json",
        "summary_csv": out_dir / "summary.csv",
        "requests_csv": out_dir / "requests.csv",
    }
    paths["json"].write_text(json.dumps({"meta": meta, "levels": list(levels)}, indent=2))
    rows = [summary_row(lv) for lv in levels]
    with paths["summary_csv"].open("w", newline="") as f:
        summary = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["mode"])
        summary.writeheader()
        summary.writerows(rows)
    with paths["requests_csv"].open("w", newline="") as f:
        writer: csv.DictWriter[str] | None = None
        for run in runs:
            for rec in run.records:
                row = {"mode": run.mode, "level": run.level} | rec.to_row()
                if writer is None:
                    writer = csv.DictWriter(f, fieldnames=list(row))
                    writer.writeheader()
                writer.writerow(row)
    if plots and levels:
        paths |= write_plots(out_dir, meta.get("label", ""), levels, runs)
    return paths


def write_plots(
    out_dir: Path, label: str, levels: Sequence[dict[str, Any]], runs: Sequence[LevelRun]
) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers or in CI
    import matplotlib.pyplot as plt
    import numpy as np

    paths: dict[str, Path] = {}
    mode = levels[0]["mode"]
    xlabel = "concurrency" if mode == "concurrency" else "request rate (req/s)"
    title = f" ({label})" if label else ""

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=90)
    for run in runs:
        ttft = np.sort([r.ttft * 1000 for r in run.records if r.ok and r.ttft is not None])
        if ttft.size:
            ax.step(
                ttft,
                np.arange(1, ttft.size + 1) / ttft.size,
                where="post",
                label=f"{xlabel.split()[0]} {run.level:g}",
            )
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (ms, log)")
    ax.set_ylabel("share of requests")
    ax.set_title(f"TTFT distribution{title}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths["ttft_png"] = out_dir / "ttft_cdf.png"
    fig.savefig(paths["ttft_png"])
    plt.close(fig)

    xs = [lv["level"] for lv in levels]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=90)
    for metric, name in (("ttft_ms", "TTFT"), ("itl_ms", "ITL")):
        for stat, style in (("p50", "-o"), ("p99", "--s")):
            ys = [lv["summary"][metric][stat] for lv in levels]
            ax1.plot(
                xs, [float("nan") if y is None else y for y in ys], style, label=f"{name} {stat}"
            )
    ax1.set_xlabel(xlabel)
    ax1.set_ylabel("latency (ms)")
    ax1.set_yscale("log")
    ax1.set_title(f"Latency vs load{title}")
    ax1.grid(True, alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.plot(
        xs, [lv["summary"]["output_token_throughput"] for lv in levels], "-o", label="output tok/s"
    )
    ax2.set_xlabel(xlabel)
    ax2.set_ylabel("output tokens/s")
    ax2.set_title(f"Throughput vs load{title}")
    ax2.grid(True, alpha=0.3)
    ax2b = ax2.twinx()
    ax2b.plot(
        xs,
        [100 * lv["summary"]["goodput"] for lv in levels],
        ":^",
        color="tab:green",
        label="goodput %",
    )
    ax2b.set_ylabel("goodput (%)")
    ax2b.set_ylim(0, 105)
    handles = ax2.get_legend_handles_labels()[0] + ax2b.get_legend_handles_labels()[0]
    ax2.legend(handles, [str(h.get_label()) for h in handles], fontsize=8, loc="lower right")
    if len(xs) > 1 and mode == "concurrency" and min(xs) > 0:
        for ax in (ax1, ax2):
            # Log scale spaces 1, 16, 64 evenly; label the levels themselves, not powers of 2.
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.minorticks_off()
    fig.tight_layout()
    paths["load_png"] = out_dir / "latency_throughput.png"
    fig.savefig(paths["load_png"])
    plt.close(fig)
    return paths


def emit(
    meta: dict[str, Any],
    levels: Sequence[dict[str, Any]],
    runs: Sequence[LevelRun],
    out: Path | None,
    plots: bool,
) -> int:
    """Print the table, write the files when asked, and return the CLI's exit status
    (1 when some level completed no request)."""
    print(format_table(levels))
    if out:
        paths = write_outputs(out, meta, levels, runs, plots=plots)
        print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 1 if any(lv["summary"]["completed"] == 0 for lv in levels) else 0
