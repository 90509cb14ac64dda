"""Prometheus metrics, measured where the user feels them: from the moment the HTTP request
arrives (vLLM's own clock starts later, at tokenization) to the last byte.

Our families live in a registry each app owns (``Metrics()``), so one app's counts are exact
and tests need no before/after deltas. vLLM registers its ``vllm:*`` metrics, and
prometheus_client its ``process_*`` ones, in the process-wide default registry; ``/metrics``
exports both registries, so existing vLLM dashboards keep working. Aborted and failed requests
land in the latency histograms too, labelled with their finish reason.

Series are bounded: the ``model`` label (at most ``--max-model-labels`` values) rides only on
the histograms a persona's operator acts on, time to first token and request latency (every
request, by persona), and on the queue wait; the rest are by endpoint and finish reason. No
``_created`` series are written. The worst case is in the README (and checked by a test).
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from typing import Protocol

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

# Voice latency is sub-second: resolve TTFT down to a few milliseconds.
TTFT_BUCKETS = (
    0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25,
    0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5,
)  # fmt: skip
E2E_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
)  # fmt: skip
QUEUE_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
# The stages before the first token are often well under a millisecond each.
STAGE_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
TOKEN_BUCKETS = (1, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 131072)


# The stages of the time to first token, in order (``RequestRecord.ttft_stages``).
TTFT_STAGES = {
    "receive": "arrival to the whole request body read",
    "parse": "the body parsed and validated into a request",
    "render": "the chat template applied (chat only)",
    "tokenize": "the prompt turned into token ids",
    "validate": "the context-window check, sampling options and frame templates",
    "admit": "waiting for an engine slot (admission)",
    "submit": "the engine's input processing and hand-off to the engine core, which takes new "
    "requests between steps (so this includes the rest of the step it is running)",
    "engine_queue": "waiting in the engine's scheduler",
    "prefill": "the engine computing the first token",
    "output": "the first token on its way back: output handler, detokenizer",
    "engine": "submit to the first output, when the engine reports no timestamps",
    "write": "the first frame formatted and handed to the socket",
}

REJECT_REASONS = (
    "overload", "auth", "validation", "draining", "queue_timeout", "too_large",
    "slo_unattainable", "slo_expired",
)  # fmt: skip
SLO_OUTCOMES = ("met", "missed")
FINISH_REASONS = ("stop", "length", "tool_calls", "abort", "error")

# A `_created` sample per label set and family would add one series to every histogram's and
# counter's label set, and nothing reads them (process-wide: vLLM's families lose them too).
disable_created_metrics()


class EngineState(Protocol):
    """The part of ``serve.engine.base.Engine`` that the gauges read."""

    @property
    def is_alive(self) -> bool: ...

    def kv_cache_usage(self) -> float | None: ...

    def num_unfinished_requests(self) -> int: ...


class Metrics:
    """The server's own metric families, in a registry of their own (a fresh one by default).

    ``multiprocess``: one of several front-end processes (``--api-server-count``). Values then
    live in prometheus_client's shared files (``PROMETHEUS_MULTIPROC_DIR``, set up by the
    launcher before any front end starts), a scrape of any process reads them all, and the
    gauges say how processes combine: counts of requests add up, the engine is alive only if
    every process sees it alive. Gauges that read engine state are refreshed by ``refresh()``
    (every second, and on each scrape) instead of being computed at scrape time, since a scrape
    only runs in one process.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, multiprocess: bool = False
    ) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.registry = registry
        self.multiprocess = multiprocess
        self._engine: EngineState | None = None
        # The model label multiplies a family's series by up to --max-model-labels: only where
        # an operator acts per persona (its TTFT, its requests' latency, its queue wait).
        labels = ("endpoint", "model", "finish_reason")
        by_finish = ("endpoint", "finish_reason")
        self.ttft = Histogram(
            "avatar_time_to_first_token_seconds",
            "From HTTP request arrival to the first content byte leaving the server.",
            labels, buckets=TTFT_BUCKETS, registry=registry,
        )  # fmt: skip
        self.ttfs = Histogram(
            "avatar_time_to_first_sentence_seconds",
            "From arrival to the first sentence end (. ! ? or newline): when TTS can speak.",
            by_finish, buckets=TTFT_BUCKETS, registry=registry,
        )  # fmt: skip
        self.itl = Histogram(
            "avatar_inter_token_latency_seconds",
            "Gap between successive streamed content frames.",
            by_finish, buckets=ITL_BUCKETS, registry=registry,
        )  # fmt: skip
        self.e2e = Histogram(
            "avatar_e2e_request_latency_seconds",
            "From arrival to the end of the response, whatever its finish reason.",
            labels, buckets=E2E_BUCKETS, registry=registry,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "avatar_queue_wait_seconds",
            "Time a request waited for admission to the engine.",
            ("endpoint", "model"), buckets=QUEUE_BUCKETS, registry=registry,
        )  # fmt: skip
        self.ttft_stage = Histogram(
            "avatar_ttft_stage_seconds",
            "Where the time to first token goes, one stage at a time (stages: "
            + ", ".join(TTFT_STAGES)
            + "); the stages of one request add up to its TTFT.",
            ("endpoint", "stage"), buckets=STAGE_BUCKETS, registry=registry,
        )  # fmt: skip
        self.reasoning = Histogram(
            "avatar_reasoning_seconds",
            "How long an answer thought before it spoke or called a tool (first to last "
            "reasoning frame); only answers that reasoned (--reasoning-parser).",
            by_finish, buckets=E2E_BUCKETS, registry=registry,
        )  # fmt: skip
        self.reasoning_tokens = Histogram(
            "avatar_reasoning_tokens",
            "Reasoning tokens per answer that reasoned (never spoken; they delay the first "
            "spoken token).",
            by_finish, buckets=TOKEN_BUCKETS, registry=registry,
        )  # fmt: skip
        self.prompt_tokens_hist = Histogram(
            "avatar_request_prompt_tokens", "Prompt tokens per request.",
            by_finish, buckets=TOKEN_BUCKETS, registry=registry,
        )  # fmt: skip
        self.output_tokens_hist = Histogram(
            "avatar_request_generation_tokens", "Generated tokens per request.",
            by_finish, buckets=TOKEN_BUCKETS, registry=registry,
        )  # fmt: skip
        self.requests = Counter(
            "avatar_requests", "Finished requests by endpoint, HTTP status and finish reason.",
            ("endpoint", "status", "finish_reason"), registry=registry,
        )  # fmt: skip
        self.rejected = Counter(
            "avatar_requests_rejected", "Requests refused before reaching the engine, by reason.",
            ("reason",), registry=registry,
        )  # fmt: skip
        self.slo_ttft = Counter(
            "avatar_slo_ttft_requests",
            "Requests with a TTFT budget (x-slo-ttft-ms or the server's default) that reached "
            "the engine, by whether the first token came within it (refusals: "
            "avatar_requests_rejected_total, reasons slo_*).",
            ("outcome",), registry=registry,
        )  # fmt: skip
        self.disconnects = Counter(
            "avatar_client_disconnects", "Requests whose client left before the response ended.",
            ("endpoint",), registry=registry,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "avatar_prompt_tokens_total", "Prompt tokens processed.", registry=registry
        )
        self.generation_tokens = Counter(
            "avatar_generation_tokens_total", "Tokens generated.", registry=registry
        )
        self.running = Gauge(
            "avatar_requests_running", "Requests admitted to the engine.", registry=registry,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.waiting = Gauge(
            "avatar_requests_waiting", "Requests waiting for admission.", registry=registry,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.kv_cache_usage = Gauge(
            "avatar_kv_cache_usage_ratio", "Fraction of the engine's KV cache in use (0..1).",
            registry=registry, multiprocess_mode="livemax",
        )  # fmt: skip
        self.engine_unfinished = Gauge(
            "avatar_engine_unfinished_requests",
            "Requests the engine holds that have not finished (0 once every client is served "
            "or gone: a request that outlives its client shows here).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.engine_alive = Gauge(
            "avatar_engine_alive", "1 while the engine is alive, 0 once it has died.",
            registry=registry, multiprocess_mode="livemin",
        )  # fmt: skip
        self.loop_lag = Histogram(
            "avatar_event_loop_lag_seconds",
            "How late the server's event loop ran a timer (one every 50 ms): how long anything "
            "that arrived then (a request, its refusal, a frame) waited for the loop before its "
            "own work began, a wait the per-request timings start too late to see.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=registry,
        )
        self.loop_tasks = Gauge(
            "avatar_event_loop_tasks",
            "asyncio tasks alive on the server's event loop(s) at scrape time (flat under "
            "steady load; growth means a leak).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        if not multiprocess:
            self.loop_tasks.set_function(_loop_tasks)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)  # export zeros, so rate() works from the first scrape
        for outcome in SLO_OUTCOMES:
            self.slo_ttft.labels(outcome)

    def bind_engine(self, engine: EngineState) -> None:
        """Read engine state at scrape time rather than on the request path."""
        self._engine = engine
        if self.multiprocess:
            self.refresh()
            return
        self.kv_cache_usage.set_function(lambda: engine.kv_cache_usage() or 0.0)
        self.engine_alive.set_function(lambda: 1.0 if engine.is_alive else 0.0)
        self.engine_unfinished.set_function(
            lambda: engine.num_unfinished_requests() if engine.is_alive else 0
        )

    def refresh(self) -> None:
        """Multiprocess mode: write this process's view of the engine into the shared gauges."""
        engine = self._engine
        if not self.multiprocess or engine is None:
            return
        alive = engine.is_alive
        self.engine_alive.set(1.0 if alive else 0.0)
        self.kv_cache_usage.set(engine.kv_cache_usage() or 0.0)
        self.engine_unfinished.set(engine.num_unfinished_requests() if alive else 0)
        self.loop_tasks.set(_loop_tasks())


def observe_all(histogram: Histogram, values: list[float]) -> None:
    """``histogram.observe(v)`` for every value, in one pass.

    A request's inter-token gaps are observed at its end: one ``observe`` each cost a lock, a
    linear scan of the buckets and two increments per token, 4.5% of the front end's CPU at
    64 streams (py-spy, BENCHMARKS.md). Counting buckets first makes it one bisect per token
    and one increment per bucket touched. It reads prometheus_client's histogram fields; if
    they are not there (another release), it falls back to plain ``observe``.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values:
            histogram.observe(value)
        return
    counts = [0] * len(bounds)
    for value in values:
        counts[bisect_left(bounds, value)] += 1  # the first bucket whose bound is >= value
    for index, count in enumerate(counts):
        if count:
            buckets[index].inc(count)
    total.inc(sum(values))


def _loop_tasks() -> float:
    # /metrics is an async route, so a scrape runs on the server's loop; NaN elsewhere.
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:
        return float("nan")


def render_latest(metrics: Metrics) -> tuple[bytes, str]:
    """One scrape: the app's families, then the process-wide ones (vLLM's, the process's).

    In multiprocess mode every family of every front end (vLLM's too) is read from the shared
    files and combined; per-process ``process_*`` families are not exported then.
    """
    if metrics.multiprocess:
        metrics.refresh()
        combined = CollectorRegistry()
        MultiProcessCollector(combined)
        return generate_latest(combined), CONTENT_TYPE_LATEST
    return generate_latest(metrics.registry) + generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def exported_metric_names(registry: CollectorRegistry = REGISTRY) -> set[str]:
    """Sample names the server exports now (``_bucket``, ``_total``, ``vllm:*`` included)."""
    names: set[str] = set()
    for family in registry.collect():
        for sample in family.samples:
            names.add(sample.name)
        if family.type == "histogram":
            names.update(f"{family.name}{s}" for s in ("_bucket", "_sum", "_count"))
        elif family.type == "counter":
            names.add(f"{family.name}_total")
    return names
