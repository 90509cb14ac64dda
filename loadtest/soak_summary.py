"""Turn a soak's outcomes and samples into its summary, its goals and its exit code.

Pure functions over ``Outcome`` and ``Sample`` lists, so that each rule is tested on synthetic
data: growth after warm-up, statuses by kind, unexpected statuses, streams without ``[DONE]``,
and what the server still held once the load had stopped.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtest.soak_metrics import SETTLE_GAUGES, Sample, settled
from loadtest.soak_traffic import HOSTILE_PREFIX, Outcome

# Series whose growth after warm-up is reported; the RSS ones are also goals.
GROWTH_KEYS = ("rss_bytes", "open_fds", "loop_tasks", "tree_rss_bytes", "tree_open_fds")
RSS_KEYS = ("rss_bytes", "tree_rss_bytes")
_EXAMPLES = 3


@dataclass(frozen=True)
class Goals:
    """Thresholds of a passing soak; each is a command-line option."""

    max_rss_growth_pct: float = 5.0  # fails at or above
    max_unexpected: int = 0
    max_engine_left: int = 0
    max_gauge_left: float = 0.0
    max_missing_done: int = 0


def _values(samples: Sequence[Sample], key: str, lo: float, hi: float) -> list[float]:
    return [
        float(v)
        for s in samples
        if s.phase == "load" and lo <= s.t <= hi and (v := getattr(s, key)) is not None
    ]


def growth(
    samples: Sequence[Sample], key: str, warmup_s: float, window_s: float
) -> dict[str, Any] | None:
    """``key`` at the end of the warm-up against the end of the load.

    Each end is the median of the load samples in the ``window_s`` before it, so one sample
    taken during a spike does not decide the figure. None when the series is absent or no
    sample was taken after the warm-up.
    """
    load = [s for s in samples if s.phase == "load" and getattr(s, key) is not None]
    if not load or load[-1].t <= warmup_s:
        return None
    # No sample in the window (sampling stalled): the first one of the load stands in.
    base = _values(load, key, warmup_s - window_s, warmup_s) or [float(getattr(load[0], key))]
    end_t = load[-1].t
    end = _values(load, key, end_t - window_s, end_t)
    b, e = statistics.median(base), statistics.median(end)
    return {
        "warmup_end": b,
        "end": e,
        "delta": e - b,
        "growth_pct": 100.0 * (e - b) / b if b else None,
    }


def statuses_by_kind(outcomes: Sequence[Outcome]) -> dict[str, dict[str, int]]:
    table: dict[str, Counter[str]] = defaultdict(Counter)
    for o in outcomes:
        table[o.kind][o.status_key] += 1
    return {kind: dict(sorted(table[kind].items())) for kind in sorted(table)}


def _grouped(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[Outcome]] = defaultdict(list)
    for o in outcomes:
        groups[(o.kind, o.status_key)].append(o)
    return [
        {
            "kind": kind,
            "status": key,
            "expected": sorted(items[0].expected),
            "count": len(items),
            "examples": [
                {
                    "t_s": round(o.t, 1),
                    "request": o.request,
                    "response": o.response,
                    "error": o.error or o.bad_body,
                }
                for o in items[:_EXAMPLES]
            ],
        }
        for (kind, key), items in sorted(groups.items())
    ]


def unexpected(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    """Outcomes outside their kind's expected statuses (or with a bad body), grouped."""
    return _grouped([o for o in outcomes if o.unexpected])


def missing_done(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    """Streams their client did not cut that did not end with ``data: [DONE]``, grouped."""
    return _grouped([o for o in outcomes if o.missing_done])


def after_load(final: Sample | None, idle: Sample | None, settle_s: float) -> dict[str, Any]:
    """What the server still held once the load stopped and it was given time to settle, and
    how its task and fd counts compare with before the load."""
    if final is None:
        return {"measured": False}
    out: dict[str, Any] = {
        "measured": final.scrape_error is None,
        "settled": settled(final, idle),
        "settle_s": settle_s,
        "scrape_error": final.scrape_error,
    }
    for key in (*SETTLE_GAUGES, "kv_cache_usage", "loop_tasks", "open_fds"):
        out[key] = getattr(final, key)
    for key in ("loop_tasks", "open_fds", "tree_open_fds", "disconnects"):
        a, b = (None, None) if idle is None else (getattr(idle, key), getattr(final, key))
        out[f"{key}_idle_delta"] = None if a is None or b is None else b - a
    return out


def evaluate(summary: dict[str, Any], goals: Goals) -> list[dict[str, Any]]:
    """One row a goal: its name, the value measured, the limit, and whether it passed.

    A figure that could not be measured fails its goal: a soak that saw nothing proves nothing.
    """
    rows = []

    def at_most(name: str, value: float | None, limit: float) -> None:
        ok = value is not None and value <= limit
        rows.append({"goal": name, "value": value, "limit": f"<= {limit:g}", "ok": ok})

    for key in RSS_KEYS:
        g = summary["growth"].get(key)
        if key == "tree_rss_bytes" and g is None:
            continue  # only with --pid
        pct = None if g is None else g["growth_pct"]
        ok = pct is not None and pct < goals.max_rss_growth_pct
        limit = f"< {goals.max_rss_growth_pct:g}"
        rows.append(
            {"goal": f"{key} growth % after warm-up", "value": pct, "limit": limit, "ok": ok}
        )
    at_most("unexpected statuses", _count(summary["unexpected"]), goals.max_unexpected)
    at_most(
        "streams without [DONE]", _count(summary["streams_without_done"]), goals.max_missing_done
    )
    left = summary["after_load"] if summary["after_load"]["measured"] else {}
    at_most("engine requests left", left.get("engine_unfinished"), goals.max_engine_left)
    for key in ("running", "waiting"):
        at_most(f"avatar_requests_{key} after load", left.get(key), goals.max_gauge_left)
    return rows


def _count(groups: list[dict[str, Any]]) -> int:
    return sum(g["count"] for g in groups)


def summarize(
    outcomes: Sequence[Outcome],
    samples: Sequence[Sample],
    *,
    warmup_s: float,
    window_s: float,
    settle_s: float,
    goals: Goals,
    meta: dict[str, Any],
) -> dict[str, Any]:
    idle = next((s for s in samples if s.phase == "idle"), None)
    final = next((s for s in reversed(samples) if s.phase == "settled"), None)
    summary: dict[str, Any] = {
        "meta": meta | {"goals": asdict(goals), "warmup_s": warmup_s, "window_s": window_s},
        "requests": {
            "total": len(outcomes),
            "cut_by_client": sum(o.cut for o in outcomes),
            "status_429": sum(o.status == 429 for o in outcomes),
            "hostile_4xx": sum(
                o.kind.startswith(HOSTILE_PREFIX) and o.status in o.expected for o in outcomes
            ),
        },
        "statuses_by_kind": statuses_by_kind(outcomes),
        "unexpected": unexpected(outcomes),
        "streams_without_done": missing_done(outcomes),
        "growth": {k: growth(samples, k, warmup_s, window_s) for k in GROWTH_KEYS},
        "after_load": after_load(final, idle, settle_s),
        "scrape_errors": sum(s.scrape_error is not None for s in samples),
    }
    summary["goals"] = evaluate(summary, goals)
    summary["passed"] = all(r["ok"] for r in summary["goals"])
    return summary


def exit_code(summary: dict[str, Any]) -> int:
    return 0 if summary["passed"] else 1


def fmt(value: Any, key: str = "") -> str:
    """A figure as printed: MiB for bytes, whole numbers without decimals, n/a for None."""
    if value is None:
        return "n/a"
    if "bytes" in key:
        return f"{value / 2**20:.1f} MiB"
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        return f"{value:.2f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def format_report(summary: dict[str, Any]) -> str:
    lines = []
    req = summary["requests"]
    lines.append(
        f"requests: {req['total']} ({req['cut_by_client']} cut by the client, "
        f"{req['status_429']} x 429, {req['hostile_4xx']} hostile refused as expected); "
        f"the server counted {fmt(summary['after_load'].get('disconnects_idle_delta'))} "
        "client disconnects"
    )
    if req["status_429"] == 0 and summary["meta"].get("burst_size"):
        lines.append(
            "note: no 429 at all: the bursts did not pass the server's queue; raise --burst-size"
        )
    lines.append("\ngrowth after warm-up (median of the last window of warm-up and of the load):")
    for key, g in summary["growth"].items():
        if g is None:
            continue
        pct = "" if g["growth_pct"] is None else f" ({g['growth_pct']:+.2f}%)"
        lines.append(
            f"  {key:16} {fmt(g['warmup_end'], key):>12} -> {fmt(g['end'], key):>12}"
            f"  delta {fmt(g['delta'], key)}{pct}"
        )
    lines.append("\nstatuses by kind:")
    for kind, counts in summary["statuses_by_kind"].items():
        cells = "  ".join(f"{k}: {v}" for k, v in counts.items())
        lines.append(f"  {kind:34} {cells}")
    for title, key in (
        ("unexpected statuses", "unexpected"),
        ("streams without [DONE]", "streams_without_done"),
    ):
        groups = summary[key]
        lines.append(f"\n{title}: {_count(groups)}")
        for g in groups:
            lines.append(f"  {g['kind']} -> {g['status']} x{g['count']} (expected {g['expected']})")
            for ex in g["examples"][:1]:
                lines.append(f"    request:  {ex['request']}")
                lines.append(f"    response: {ex['response'] or ex['error']}")
    left = summary["after_load"]
    lines.append(
        f"\nafter the load ({'settled' if left.get('settled') else 'NOT settled'} after "
        f"{fmt(left.get('settle_s'))} s): "
        + ", ".join(
            f"{k} {fmt(left.get(k))}"
            for k in (
                *SETTLE_GAUGES,
                "kv_cache_usage",
                "loop_tasks_idle_delta",
                "open_fds_idle_delta",
            )
        )
    )
    lines.append("\ngoals:")
    for r in summary["goals"]:
        mark = "PASS" if r["ok"] else "FAIL"
        lines.append(f"  {mark}  {r['goal']}: {fmt(r['value'])} (limit {r['limit']})")
    lines.append("\nSOAK " + ("PASSED" if summary["passed"] else "FAILED"))
    return "\n".join(lines)


def write_outputs(out: Path, summary: dict[str, Any], samples: Sequence[Sample]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    with (out / "samples.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=Sample.columns())
        writer.writeheader()
        for s in samples:
            writer.writerow(s.to_row())
