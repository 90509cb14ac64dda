"""Admission control: bounded running and waiting, 429 at once past the queue, 503 after the
queue timeout or while draining; admitted requests are never disturbed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
from fastapi import FastAPI

from serve.engine.fake import FakeEngine
from tests.unit.conftest import chat_body, open_client


async def test_full_queue_is_429_with_retry_after(
    app_factory: Callable[..., FastAPI], engine: FakeEngine
) -> None:
    engine.first_token_gate = asyncio.Event()
    app = app_factory(max_running_requests=1, max_waiting_requests=1)
    async with open_client(app) as c:
        admitted = asyncio.create_task(c.post("/v1/chat/completions", json=chat_body()))
        queued = asyncio.create_task(c.post("/v1/chat/completions", json=chat_body()))
        await _until(lambda: app.state.admission.waiting == 1)
        refused = await c.post("/v1/chat/completions", json=chat_body())
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        engine.first_token_gate.set()
        results = await asyncio.gather(admitted, queued)
    assert [r.status_code for r in results] == [200, 200], "admitted and queued both finish"
    assert app.state.admission.in_flight == 0


async def test_queue_timeout_is_503(
    app_factory: Callable[..., FastAPI], engine: FakeEngine
) -> None:
    engine.first_token_gate = asyncio.Event()
    app = app_factory(max_running_requests=1, max_waiting_requests=4, queue_timeout=0.1)
    async with open_client(app) as c:
        admitted = asyncio.create_task(c.post("/v1/chat/completions", json=chat_body()))
        await _until(lambda: app.state.admission.running == 1)
        late = await c.post("/v1/chat/completions", json=chat_body())
        assert late.status_code == 503
        assert late.json()["error"]["code"] == "queue_timeout"
        engine.first_token_gate.set()
        assert (await admitted).status_code == 200


async def test_draining_refuses_new_work_but_finishes_old(
    app_factory: Callable[..., FastAPI], engine: FakeEngine
) -> None:
    engine.token_delay = 0.005
    app = app_factory()
    async with open_client(app) as c:
        old = asyncio.create_task(
            c.post(
                "/v1/chat/completions", json=chat_body(stream=True, max_tokens=40, ignore_eos=True)
            )
        )
        await _until(lambda: app.state.admission.running == 1)
        app.state.admission.draining = True
        assert (await c.get("/ready")).status_code == 503
        assert (await c.get("/health")).status_code == 200, "draining is not dead"
        new = await c.post("/v1/chat/completions", json=chat_body())
        assert new.status_code == 503 and new.json()["error"]["code"] == "draining"
        finished: httpx.Response = await old
    assert finished.status_code == 200 and finished.text.endswith("data: [DONE]\n\n")


async def _until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)
