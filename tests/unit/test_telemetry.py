"""Gauges a soak reads to prove nothing leaks (``serve/telemetry.py``)."""

from __future__ import annotations

import asyncio

import httpx

from tests.support import metric_value
from tests.unit.conftest import chat_body


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
