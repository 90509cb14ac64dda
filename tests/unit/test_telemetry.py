"""Gauges a soak reads to prove nothing leaks (``serve/telemetry.py``)."""

from __future__ import annotations

import asyncio
import time

import httpx

from serve.app import create_app
from serve.engine.fake import FakeEngine
from tests.support import metric_value
from tests.unit.conftest import MODEL, chat_body, make_settings, open_client


async def _tasks(client: httpx.AsyncClient) -> float:
    return metric_value((await client.get("/metrics")).text, "avatar_event_loop_tasks")


async def test_event_loop_tasks_return_to_their_level_after_streams(
    client: httpx.AsyncClient,
) -> None:
    before = await _tasks(client)
    assert before >= 1  # at least the task serving the scrape itself

    async def stream() -> str:
        body = chat_body(stream=True, max_tokens=8)
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            return "".join([line async for line in r.aiter_lines()])

    texts = await asyncio.gather(*(stream() for _ in range(20)))
    assert all(t.endswith("data: [DONE]") for t in texts)
    assert await _tasks(client) == before


def _stage_sums(text: str, endpoint: str) -> dict[str, tuple[float, float]]:
    """``stage -> (count, sum)`` of the TTFT-stage histogram for one endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "avatar_ttft_stage_seconds":
            continue
        for s in family.samples:
            if s.labels.get("endpoint") != endpoint or s.name.endswith("_bucket"):
                continue
            slot = out.setdefault(s.labels["stage"], [0.0, 0.0])
            slot[0 if s.name.endswith("_count") else 1] = s.value
    return {k: (v[0], v[1]) for k, v in out.items()}


async def test_ttft_stages_cover_the_whole_ttft_in_order(client: httpx.AsyncClient) -> None:
    for _ in range(3):
        r = await client.post("/v1/chat/completions", json=chat_body(stream=True))
        assert r.status_code == 200
    text = (await client.get("/metrics")).text
    stages = _stage_sums(text, "chat")
    # The fake engine reports its own stamps, so the engine's three stages appear.
    assert list(stages) == [
        "receive", "parse", "render", "tokenize", "validate", "admit",
        "submit", "engine_queue", "prefill", "output", "write",
    ]  # fmt: skip
    assert all(count == 3 for count, _ in stages.values())
    assert all(total >= 0 for _, total in stages.values())
    ttft = metric_value(
        text,
        "avatar_time_to_first_token_seconds_sum",
        endpoint="chat",
        model=MODEL,
        finish_reason="length",
    )
    assert abs(sum(total for _, total in stages.values()) - ttft) < 1e-6


async def test_text_completion_stages_have_no_template(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "prompt": "hello there", "max_tokens": 3}
    assert (await client.post("/v1/completions", json=body)).status_code == 200
    stages = _stage_sums((await client.get("/metrics")).text, "completions")
    assert "render" not in stages and "tokenize" in stages and "write" in stages


def test_engine_stamps_outside_our_window_fold_into_one_engine_stage() -> None:
    from serve.request_record import RequestRecord

    record = RequestRecord("chat", MODEL, arrival=10.0, body_read=10.1, parsed=10.2)
    record.rendered, record.tokenized, record.queued, record.admitted = 10.3, 10.4, 10.5, 10.6
    record.first_delta, record.first_token = 11.0, 11.2
    record.engine_times = (5.0, 5.1, 5.2)  # a clock we cannot compare with ours
    stages = dict(record.ttft_stages())
    assert "submit" not in stages and abs(stages["engine"] - 0.4) < 1e-9
    assert abs(sum(stages.values()) - 1.2) < 1e-9
    record.engine_times = (10.7, 10.8, 10.9)
    stages = dict(record.ttft_stages())
    assert [round(stages[k], 6) for k in ("submit", "engine_queue", "prefill", "output")] == [
        0.1, 0.1, 0.1, 0.1,
    ]  # fmt: skip


def test_observing_all_gaps_at_once_exports_what_one_by_one_would() -> None:
    import random

    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from serve.telemetry import ITL_BUCKETS, observe_all

    rng = random.Random(7)
    gaps = [
        rng.choice((0.001, 0.0025, 3.0)) if i % 5 == 0 else rng.expovariate(40) for i in range(500)
    ]
    one, batch = CollectorRegistry(), CollectorRegistry()
    h_one = Histogram("itl", "x", ("m",), buckets=ITL_BUCKETS, registry=one).labels("a")
    h_batch = Histogram("itl", "x", ("m",), buckets=ITL_BUCKETS, registry=batch).labels("a")
    for gap in gaps:
        h_one.observe(gap)
    observe_all(h_batch, gaps)

    def samples(registry: CollectorRegistry) -> list[str]:
        lines = generate_latest(registry).decode().splitlines()
        return [line for line in lines if not line.startswith(("#", "itl_created"))]

    # Bucket boundaries included (values equal to a bound land in that bound's bucket).
    assert samples(batch) == samples(one)


async def test_a_blocked_event_loop_shows_in_the_loop_lag_histogram() -> None:
    """A refusal or a first token can wait for the loop before any handler runs: an operator
    sees that wait in avatar_event_loop_lag_seconds, not in the per-request timings."""
    app = create_app(make_settings(), FakeEngine())

    def over(text: str, bound: str) -> float:
        total = metric_value(text, "avatar_event_loop_lag_seconds_count")
        return total - metric_value(text, "avatar_event_loop_lag_seconds_bucket", le=bound)

    async with app.router.lifespan_context(app), open_client(app) as c:
        async with asyncio.timeout(10):  # the sampler runs
            while (
                metric_value((await c.get("/metrics")).text, "avatar_event_loop_lag_seconds_count")
                < 2
            ):
                await asyncio.sleep(0.05)
        assert over((await c.get("/metrics")).text, "0.25") == 0, "an idle loop is not late"
        # A handler that holds the loop with CPU work (a long render, a sync call) for 0.4 s.
        busy_until = time.perf_counter() + 0.4
        while time.perf_counter() < busy_until:
            pass
        async with asyncio.timeout(10):
            while over((await c.get("/metrics")).text, "0.25") < 1:
                await asyncio.sleep(0.05)
