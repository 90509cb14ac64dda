"""Summary statistics of a run: latency distributions, throughput and goodput."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from loadtest.records import RequestRecord

PERCENTILES = (50, 90, 99)


def distribution(values_s: Iterable[float | None]) -> Mapping[str, float | int | None]:
    """Mean, p50/p90/p99, min and max in milliseconds of the non-None values (seconds in)."""
    arr = np.fromiter((v for v in values_s if v is not None), dtype=float) * 1000.0
    if arr.size == 0:
        return {"count": 0, "mean": None, "min": None, "max": None} | {
            f"p{p}": None for p in PERCENTILES
        }
    pct = np.percentile(arr, PERCENTILES)
    out: dict[str, float | int | None] = {"count": int(arr.size), "mean": float(arr.mean())}
    out |= {f"p{p}": float(v) for p, v in zip(PERCENTILES, pct, strict=True)}
    out |= {"min": float(arr.min()), "max": float(arr.max())}
    return out


@dataclass(frozen=True)
class Slo:
    """Latency targets for goodput; ``None`` means that target is not checked.

    A request meets the ITL target when its own 99th-percentile gap is within it: an avatar's
    speech stutters on the long gaps, which a per-request mean would hide.
    """

    ttft_ms: float | None = None
    itl_ms: float | None = None

    def met_by(self, rec: RequestRecord) -> bool:
        if not rec.ok or rec.ttft is None:
            return False
        if self.ttft_ms is not None and rec.ttft * 1000.0 > self.ttft_ms:
            return False
        itl_p99_ms = float(np.percentile(rec.itl, 99)) * 1000.0 if rec.itl else 0.0
        return self.itl_ms is None or itl_p99_ms <= self.itl_ms


def summarize(records: Sequence[RequestRecord], duration_s: float, slo: Slo) -> dict[str, Any]:
    """Aggregate one level's records. ITL pools every gap of every successful request."""
    ok = [r for r in records if r.ok]
    errors = [r.error for r in records if not r.ok]
    out_tokens = sum(r.output_tokens or 0 for r in ok)
    good = sum(1 for r in records if slo.met_by(r))
    dur = max(duration_s, 1e-9)
    return {
        "requests": len(records),
        "completed": len(ok),
        "errors": len(errors),
        "error_samples": sorted(set(e for e in errors if e))[:5],
        "duration_s": duration_s,
        "request_throughput": len(ok) / dur,
        "output_token_throughput": out_tokens / dur,
        "total_output_tokens": out_tokens,
        "total_prompt_tokens": sum(r.prompt_tokens or 0 for r in ok),
        "tokens_from_usage": all(r.tokens_from_usage for r in ok) if ok else False,
        "goodput": good / len(records) if records else 0.0,
        "goodput_rps": good / dur,
        "slo": {"ttft_ms": slo.ttft_ms, "itl_ms": slo.itl_ms},
        "ttft_ms": distribution(r.ttft for r in ok),
        "itl_ms": distribution(g for r in ok for g in r.itl),
        "tpot_ms": distribution(r.tpot for r in ok),
        "e2e_ms": distribution(r.e2e for r in ok),
        "ttfs_ms": distribution(r.ttfs for r in ok),
    }
