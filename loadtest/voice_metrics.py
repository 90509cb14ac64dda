"""What the engine did during a level, read from the server's ``/metrics`` before and after it.

Both servers export vLLM's own ``vllm:*`` families (ours exports vLLM's registry beside its
own), so the same counters are read from both.

**Tokens generated for cancelled requests after the cancel.** vLLM counts every token its
output processor takes from the engine in ``vllm:generation_tokens_total``. Over a level:

    engine tokens on cancelled requests = Δ generation_tokens
        - Σ usage.completion_tokens of the requests that ran to their end
        - Σ token chunks received of requests that failed without usage
    wasted after the cancel = that - Σ tokens the client had received before it closed

Limits (BENCHMARKS.md, "Voice traffic", states them too):
- The counter is engine-wide: nothing else may use the server during the level (the run's
  calibration and warm-up happen before the first reading), and the reading after waits until
  the engine has no request running or waiting and the counter has stopped moving.
- vLLM's output processor drops the outputs of a request from the moment the front end aborts
  it (``OutputProcessor.process_outputs``: "Ignore output for already-aborted request"), so
  the figure is the tokens the front end took from the engine after the client left, until
  it aborted the request: the part a front end controls. The step or two the engine core may
  run after the abort are not in it.
- A cut stream has no usage, so the tokens it received are estimated: its chunks times the
  tokens per chunk of the level's finished requests of the same shape (text or tool call),
  whose usage gives both, never more than the request's ``max_tokens`` (exactly that when its
  ``length`` finish reason came before the cut). A chunk is not always one token: a token
  ending inside a UTF-8 character is sent with the next one (about 1.14 tokens a chunk on the
  demo model), and a tool call's chunks can carry several. The estimate is unbiased over many
  cancels, not exact for one.
- It is a total over the level, so a mean per cancel, not a distribution.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from loadtest.voice_client import SPECULATIVE, StreamResult

# reading key <- sample name (labels summed over)
SAMPLES = {
    "generation_tokens": "vllm:generation_tokens_total",
    "prompt_tokens": "vllm:prompt_tokens_total",
    "prefix_cache_hits": "vllm:prefix_cache_hits_total",
    "prefix_cache_queries": "vllm:prefix_cache_queries_total",
    "running": "vllm:num_requests_running",
    "waiting": "vllm:num_requests_waiting",
}


def parse_metrics(text: str) -> dict[str, float]:
    """The ``SAMPLES`` found in Prometheus exposition text, each summed over its labels."""
    wanted = {name: key for key, name in SAMPLES.items()}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = wanted.get(sample.name)
            if key is not None:
                out[key] = out.get(key, 0.0) + float(sample.value)
    return out


async def read_metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float] | None:
    """One reading of ``url`` (a server's /metrics); None when it cannot be read."""
    try:
        async with session.get(url) as resp:
            if resp.status != 200:
                return None
            return parse_metrics(await resp.text())
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
        return None


async def settled_reading(
    session: aiohttp.ClientSession, url: str, timeout_s: float = 30.0, poll_s: float = 0.5
) -> tuple[dict[str, float] | None, float]:
    """A reading once the engine is idle: nothing running or waiting and the token counter
    unchanged since the previous poll (or the last reading when ``timeout_s`` passes first).
    Returns the reading and how long the wait took."""
    start = time.monotonic()
    prev: dict[str, float] | None = None
    while True:
        now = await read_metrics(session, url)
        if now is None:
            return None, time.monotonic() - start
        idle = now.get("running", 0.0) + now.get("waiting", 0.0) == 0
        if (
            idle
            and prev is not None
            and prev.get("generation_tokens") == now.get("generation_tokens")
        ):
            return now, time.monotonic() - start
        if time.monotonic() - start >= timeout_s:
            return now, time.monotonic() - start
        prev = now
        await asyncio.sleep(poll_s)


def delta(
    before: dict[str, float] | None, after: dict[str, float] | None, key: str
) -> float | None:
    if before is None or after is None or key not in after:
        return None
    return after[key] - before.get(key, 0.0)


def tokens_per_chunk(finished: Sequence[StreamResult], tool_calls: bool) -> float:
    """Output tokens per token chunk over finished requests that forced a tool call (or did
    not); 1.0 when there are none."""
    sel = [r for r in finished if r.forced_call == tool_calls and r.token_chunks]
    chunks = sum(r.token_chunks for r in sel)
    return sum(r.completion_tokens or 0 for r in sel) / chunks if chunks else 1.0


def received_tokens(r: StreamResult, per_chunk: float) -> float:
    """The tokens a cut stream had received: its chunks times ``per_chunk``, at most its
    ``max_tokens``, all of them when its finish reason (``length``) came before the cut."""
    if r.max_tokens is None:
        return r.token_chunks * per_chunk
    if r.finish_reason == "length":
        return float(r.max_tokens)
    return min(float(r.max_tokens), r.token_chunks * per_chunk)


def cancel_waste(
    before: dict[str, float] | None,
    after: dict[str, float] | None,
    requests: Sequence[StreamResult],
) -> dict[str, Any]:
    """Engine tokens on cancelled requests, and after their cancel (method: module docstring)."""
    cancelled = [r for r in requests if r.cancelled]
    finished = [r for r in requests if not r.cancelled and r.completion_tokens is not None]
    unknown = [r for r in requests if not r.cancelled and r.completion_tokens is None]
    ratio = {shape: tokens_per_chunk(finished, shape) for shape in (False, True)}
    received = sum(received_tokens(r, ratio[r.forced_call]) for r in cancelled)
    out: dict[str, Any] = {
        "cancelled": len(cancelled),
        "cancelled_speculative": sum(r.kind == SPECULATIVE for r in cancelled),
        "cancelled_by_barge_in": sum(r.kind != SPECULATIVE for r in cancelled),
        "cancelled_before_first_token": sum(r.first_token is None for r in cancelled),
        # Their chunks can carry many tokens each (a whole call at once): the estimate of what
        # they received is the roughest part of the figure.
        "cancelled_forced_calls": sum(r.forced_call for r in cancelled),
        "received_chunks_before_cancel": sum(r.token_chunks for r in cancelled),
        "tokens_per_chunk": {"text": ratio[False], "tool_call": ratio[True]},
        "received_before_cancel": received,
        "finished_tokens": sum(r.completion_tokens or 0 for r in finished),
        "unknown_requests": sum(r.token_chunks > 0 for r in unknown),
        "engine_tokens": None,
        "engine_tokens_on_cancelled": None,
        "wasted_after_cancel": None,
        "wasted_per_cancel": None,
    }
    gen = delta(before, after, "generation_tokens")
    if gen is None:
        return out
    on_cancelled = gen - out["finished_tokens"] - sum(r.token_chunks for r in unknown)
    wasted = on_cancelled - out["received_before_cancel"]
    out |= {
        "engine_tokens": gen,
        "engine_tokens_on_cancelled": on_cancelled,
        "wasted_after_cancel": wasted,
        "wasted_per_cancel": wasted / len(cancelled) if cancelled else None,
    }
    return out


def server_cache_share(
    before: dict[str, float] | None, after: dict[str, float] | None
) -> float | None:
    """Prefix-cache hits over queries (tokens) during the level, every request counted."""
    hits = delta(before, after, "prefix_cache_hits")
    queries = delta(before, after, "prefix_cache_queries")
    return hits / queries if hits is not None and queries else None
