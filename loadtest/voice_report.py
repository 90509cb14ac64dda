"""The voice benchmark's verdicts: the SLO, a level's summary, capacity at SLO, tables, plot."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.voice_client import SPECULATIVE, StreamResult
from loadtest.voice_metrics import cancel_waste, server_cache_share
from loadtest.voice_session import OK, REFUSED, TurnRecord

# Voice-agent budgets on a GPU: LLM time to first token inside a 500-800 ms voice-to-voice
# budget, and the first sentence ready for the TTS.
GPU_TTFT_MS, GPU_TTFS_MS = 300.0, 700.0
# The GPU those budgets are scaled from: one H200, Llama-3.1-8B shape, our server at
# concurrency 1 on the bench workload (BENCHMARKS.md, "GPU results"): TTFT p50 21.1 ms,
# TPOT p50 4.9 ms.
REF_TTFT_MS, REF_TPOT_MS = 21.1, 4.9
PCTS = (50, 95, 99)


@dataclass(frozen=True)
class VoiceSlo:
    """What a confirmed turn must meet; ``share`` of turns must meet it at capacity."""

    ttft_ms: float = GPU_TTFT_MS
    ttfs_ms: float = GPU_TTFS_MS
    no_underrun: bool = True
    share: float = 0.95
    source: str = "gpu"

    def met_by(self, t: TurnRecord) -> bool:
        if t.outcome != OK or t.ttft_s is None or t.ttfs_s is None:
            return False
        if t.ttft_s * 1000.0 > self.ttft_ms or t.ttfs_s * 1000.0 > self.ttfs_ms:
            return False
        return not (self.no_underrun and t.underruns)


def scaled_slo(
    ttft0_ms: float,
    tpot0_ms: float,
    *,
    ref_ttft_ms: float = REF_TTFT_MS,
    ref_tpot_ms: float = REF_TPOT_MS,
) -> tuple[float, float]:
    """The GPU budgets carried over to an engine whose unloaded TTFT is ``ttft0_ms`` and
    time per output token ``tpot0_ms`` (both measured at the start of the run, one request at
    a time, on the bench workload, as the reference was measured):

        TTFT SLO            = 300 ms x ttft0 / ref_ttft
        first-sentence SLO  = TTFT SLO + (700 - 300) ms x tpot0 / ref_tpot

    The TTFT budget keeps its ratio to the unloaded TTFT (about 14x on the reference), and the
    time from first token to first sentence keeps its ratio to the decode step (about 82
    steps), so "capacity at SLO" means the same on both: how much load an engine takes before
    its latency is that many times its own floor. Not clamped: a faster engine gets a tighter
    SLO.
    """
    ttft = GPU_TTFT_MS * ttft0_ms / ref_ttft_ms
    return ttft, ttft + (GPU_TTFS_MS - GPU_TTFT_MS) * tpot0_ms / ref_tpot_ms


def dist_ms(values_s: Sequence[float | None]) -> dict[str, float | int | None]:
    arr = np.array([v for v in values_s if v is not None], dtype=float) * 1000.0
    out: dict[str, float | int | None] = {"count": 0, "mean": None}
    if arr.size == 0:
        return out | {f"p{p}": None for p in PCTS}
    out = {"count": int(arr.size), "mean": float(arr.mean())}
    out |= {f"p{p}": float(v) for p, v in zip(PCTS, np.percentile(arr, PCTS), strict=True)}
    return out


def _share(num: int, den: int) -> float | None:
    return num / den if den else None


def _cache(turns: Sequence[TurnRecord], pick: Any = None) -> float | None:
    sel = [t for t in turns if t.cached_tokens is not None and t.prompt_tokens]
    if pick is not None:
        sel = [t for t in sel if pick(t)]
    prompt = sum(t.prompt_tokens or 0 for t in sel)
    return sum(t.cached_tokens or 0 for t in sel) / prompt if prompt else None


def mean_active(spans: Sequence[tuple[float, float]], t0: float, t1: float) -> float:
    """Sessions in progress, averaged over [t0, t1] (each span is a session's start and end)."""
    if t1 <= t0:
        return 0.0
    covered = sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in spans)
    return covered / (t1 - t0)


def summarize_level(
    turns: Sequence[TurnRecord],
    requests: Sequence[StreamResult],
    *,
    offered: int,
    duration_s: float,
    slo: VoiceSlo,
    before: dict[str, float] | None = None,
    after: dict[str, float] | None = None,
    active_sessions: float | None = None,
    sessions_started: int | None = None,
) -> dict[str, Any]:
    """One level's figures; confirmed turns are those whose confirmed request was sent."""
    ok = [t for t in turns if t.outcome == OK]
    refused = [t for t in turns if t.outcome == REFUSED]
    met = sum(slo.met_by(t) for t in turns)
    spoken = [t for t in ok if t.ttfs_s is not None]
    spec = [r for r in requests if r.kind == SPECULATIVE]
    return {
        "offered_sessions": offered,
        "active_sessions": active_sessions,
        "sessions_started": sessions_started,
        "duration_s": duration_s,
        "turns": len(turns),
        "ok": len(ok),
        "refused": len(refused),
        "errors": len(turns) - len(ok) - len(refused),
        "error_samples": sorted({t.error or "" for t in turns if t.outcome not in (OK, REFUSED)})[
            :5
        ],
        "met_slo": met,
        "met_share": _share(met, len(turns)),
        "goodput_tps": met / duration_s if duration_s > 0 else 0.0,
        "ttft_ms": dist_ms([t.ttft_s for t in ok]),
        "ttfs_ms": dist_ms([t.ttfs_s for t in ok]),
        "underrun_rate": _share(sum(t.underruns > 0 for t in spoken), len(spoken)),
        "stall_ms": dist_ms([t.stall_s for t in spoken if t.underruns]),
        "refusal_ms": dist_ms([t.refusal_s for t in refused]),
        "refusal_codes": sorted({str(t.error_code) for t in refused}),
        "speculative_sent": len(spec),
        "speculative_refused": sum(r.refused for r in spec),
        "tool_turns": sum(t.tool for t in turns),
        "tool_args_invalid": sum(t.tool_args_invalid for t in turns),
        "barge_ins": sum(t.barge_in for t in ok),
        "barge_ins_mid_stream": sum(t.stream_cut for t in ok),
        "cache_share": _cache(ok),
        "cache_share_after_cut": _cache(ok, lambda t: t.after_cut),
        "cache_share_after_whole": _cache(ok, lambda t: not t.after_cut and t.turn > 0),
        "server_cache_share": server_cache_share(before, after),
        "cancel": cancel_waste(before, after, requests),
        "requests": len(requests),
    }


def capacity(points: Sequence[tuple[float, float | None]], share: float) -> dict[str, Any]:
    """Capacity at SLO from (offered sessions, share of turns meeting the SLO) points.

    ``capacity``: the highest level such that it and every level below it meet ``share`` (a
    lucky pass above a failing level does not count); None when the lowest level fails.
    ``interpolated``: where the share crosses ``share`` between the last passing level and the
    next, linearly; ``at_least``: every level passed (the capacity is above the sweep).
    """
    pts = sorted(points)
    cap: float | None = None
    nxt: tuple[float, float | None] | None = None
    for level, s in pts:
        if s is not None and s >= share:
            cap = level
            continue
        nxt = (level, s)
        break
    interp = cap
    if cap is not None and nxt is not None:
        s_cap = next(s for lv, s in pts if lv == cap)
        assert s_cap is not None
        s_next = nxt[1] or 0.0
        frac = (s_cap - share) / (s_cap - s_next) if s_cap > s_next else 0.0
        interp = cap + frac * (nxt[0] - cap)
    return {"capacity": cap, "interpolated": interp, "at_least": nxt is None and cap is not None}


def _med(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _get(summary: dict[str, Any], path: str) -> float | None:
    cur: Any = summary
    for key in path.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(key)
    return None if cur is None else float(cur)


# (summary path, column label, digits)
COLUMNS = (
    ("active_sessions", "active", 1),
    ("turns", "turns", 0),
    ("met_share", "met%", 100),
    ("goodput_tps", "goodput/s", 2),
    ("ttft_ms.p50", "TTFT p50", 0),
    ("ttft_ms.p95", "p95", 0),
    ("ttft_ms.p99", "p99", 0),
    ("ttfs_ms.p50", "1st sent. p50", 0),
    ("ttfs_ms.p95", "p95", 0),
    ("ttfs_ms.p99", "p99", 0),
    ("underrun_rate", "underrun%", 100),
    ("refused", "refused", 0),
    ("refusal_ms.p50", "refusal p50 ms", 1),
    ("refusal_ms.p99", "p99", 1),
    ("errors", "errors", 0),
    ("cache_share", "cached%", 100),
    ("cancel.wasted_per_cancel", "wasted/cancel", 1),
)


def _fmt(v: float | None, digits: int) -> str:
    if v is None:
        return "-"
    if digits == 100:
        return f"{100 * v:.0f}"
    return f"{v:.{digits}f}"


def combine(results: dict[str, list[list[dict[str, Any]]]], slo: VoiceSlo) -> dict[str, Any]:
    """Per target: per level the median over rounds of each column, and capacity at SLO
    (per round, and from the median share)."""
    out: dict[str, Any] = {}
    for target, rounds in results.items():
        per_level: dict[str, dict[str, Any]] = {}
        for rnd in rounds:
            for lv in rnd:
                per_level.setdefault(f"{lv['offered_sessions']:g}", {}).setdefault(
                    "runs", []
                ).append(lv)
        levels: dict[str, Any] = {}
        for key, item in sorted(per_level.items(), key=lambda kv: float(kv[0])):
            runs = item["runs"]
            levels[key] = {path: _med([_get(r, path) for r in runs]) for path, _, _ in COLUMNS}
            levels[key]["goodput_tps_min"] = min(r["goodput_tps"] for r in runs)
            levels[key]["goodput_tps_max"] = max(r["goodput_tps"] for r in runs)
        per_round = [
            capacity([(lv["offered_sessions"], lv["met_share"]) for lv in rnd], slo.share)
            for rnd in rounds
        ]
        out[target] = {
            "levels": levels,
            "capacity_per_round": per_round,
            "capacity": capacity(
                [(float(k), v["met_share"]) for k, v in levels.items()], slo.share
            ),
        }
    return out


def markdown(report: dict[str, Any]) -> str:
    meta, combined = report["meta"], report["combined"]
    slo = meta["slo"]
    lines = [
        f"# Voice traffic: {', '.join(combined)}",
        "",
        f"SLO ({slo['source']}): TTFT <= {slo['ttft_ms']:.0f} ms, first sentence <= "
        f"{slo['ttfs_ms']:.0f} ms"
        + (", no underrun" if slo["no_underrun"] else "")
        + f"; capacity = most offered sessions with >= {100 * slo['share']:.0f}% of confirmed "
        f"turns meeting it. Median over {meta['rounds']} round(s).",
        "",
    ]
    if meta.get("calibration"):
        cal = meta["calibration"]
        lines += [
            f"Unloaded engine: TTFT p50 {cal['ttft_ms']:.1f} ms, TPOT p50 {cal['tpot_ms']:.2f} ms, "
            f"{cal['chars_per_token']:.2f} characters per token.",
            "",
        ]
    for target, c in combined.items():
        cap = c["capacity"]
        text = "below the lowest level" if cap["capacity"] is None else f"{cap['capacity']:g}"
        if cap["at_least"]:
            text = f"at least {cap['capacity']:g} (every level passed)"
        elif cap["capacity"] is not None:
            text += f" (interpolated {cap['interpolated']:.1f})"
        lines.append(f"**{target}**: capacity at SLO {text} sessions.")
    lines += ["", "| target | offered | " + " | ".join(label for _, label, _ in COLUMNS) + " |"]
    lines.append("|---|---|" + "---|" * len(COLUMNS))
    for target, c in combined.items():
        for key, lv in c["levels"].items():
            cells = [_fmt(lv[path], digits) for path, _, digits in COLUMNS]
            lines.append(f"| {target} | {key} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "(ms; met% = confirmed turns meeting the SLO; goodput = such turns per second; "
        "wasted/cancel = engine tokens generated after the client closed a stream, per "
        "cancelled request: see BENCHMARKS.md for the method and its limits)",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Goodput, share meeting the SLO and TTFT p95 against offered sessions, per target."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    slo = report["meta"]["slo"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=80)
    for target, c in report["combined"].items():
        keys = list(c["levels"])
        xs = [float(k) for k in keys]
        lv = [c["levels"][k] for k in keys]
        good = [v["goodput_tps"] or 0.0 for v in lv]
        err = [
            [g - v["goodput_tps_min"] for g, v in zip(good, lv, strict=True)],
            [v["goodput_tps_max"] - g for g, v in zip(good, lv, strict=True)],
        ]
        axes[0].errorbar(xs, good, yerr=err, marker="o", capsize=3, label=target)
        axes[1].plot(xs, [100 * (v["met_share"] or 0.0) for v in lv], marker="o", label=target)
        p95 = [math.nan if v["ttft_ms.p95"] is None else v["ttft_ms.p95"] for v in lv]
        axes[2].plot(xs, p95, marker="o", label=target)
    axes[1].axhline(100 * slo["share"], color="grey", ls="--", lw=1)
    axes[2].axhline(slo["ttft_ms"], color="grey", ls="--", lw=1)
    titles = ("goodput (turns/s meeting the SLO)", "% of turns meeting the SLO", "TTFT p95 (ms)")
    levels = sorted({float(k) for c in report["combined"].values() for k in c["levels"]})
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [f"{x:g}" for x in levels])
        ax.minorticks_off()
        ax.set_xlabel("offered sessions")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylim(bottom=0)
    axes[1].set_ylim(0, 102)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"voice traffic; SLO TTFT {slo['ttft_ms']:.0f} ms, first sentence {slo['ttfs_ms']:.0f} ms"
        f"; median over {report['meta']['rounds']} round(s), bars min-max",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def slo_dict(slo: VoiceSlo) -> dict[str, Any]:
    return asdict(slo)
