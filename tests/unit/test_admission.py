"""Admission control: bounded running and waiting, 429 at once past the queue, 503 after the
queue timeout or while draining (the waiting ones refused when the drain starts); admitted
requests are never disturbed; a slot is never lost to a request that gives up as it gets one."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
from fastapi import FastAPI

from serve.admission import Admission
from serve.engine.fake import FakeEngine
from serve.telemetry import Metrics
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


async def test_a_drain_refuses_the_waiting_requests_at_once(
    app_factory: Callable[..., FastAPI], engine: FakeEngine
) -> None:
    """A request still waiting when the drain starts gets a quick 503 (another replica can take
    it) instead of starting a generation here once a slot frees."""
    engine.first_token_gate = asyncio.Event()
    app = app_factory(max_running_requests=1, max_waiting_requests=4, queue_timeout=30)
    async with open_client(app) as c:
        admitted = asyncio.create_task(c.post("/v1/chat/completions", json=chat_body()))
        await _until(lambda: app.state.admission.running == 1)
        queued = [
            asyncio.create_task(c.post("/v1/chat/completions", json=chat_body())) for _ in range(2)
        ]
        await _until(lambda: app.state.admission.waiting == 2)
        app.state.admission.draining = True  # what SIGTERM does
        refused = await asyncio.wait_for(asyncio.gather(*queued), 10)  # not the queue's 30 s
        assert [r.status_code for r in refused] == [503, 503]
        assert {r.json()["error"]["code"] for r in refused} == {"draining"}
        assert app.state.admission.waiting == 0
        engine.first_token_gate.set()
        assert (await admitted).status_code == 200, "what was admitted runs to its end"
    assert len(engine.seen) == 1, "no refused request reached the engine"
    assert app.state.admission.in_flight == 0


async def test_a_request_cancelled_as_its_slot_arrives_stops() -> None:
    """The client leaves in the very loop turn its slot is handed over: the request must stop
    (Python 3.11's wait_for swallowed that cancellation, and the request ran on for nobody,
    holding the slot), and the slot goes back."""
    admission = Admission(1, 4, 30, Metrics())
    await admission.acquire()
    stopped = asyncio.Event()

    async def request() -> None:
        await admission.acquire()
        try:
            await asyncio.Event().wait()  # the generation: runs until cancelled
        finally:
            admission.release()
            stopped.set()

    task = asyncio.create_task(request())
    await _until(lambda: admission.waiting == 1)
    admission.release()  # the slot goes to the waiting request...
    await asyncio.sleep(0)
    task.cancel()  # ...as its client leaves
    await asyncio.wait_for(stopped.wait(), 10)
    assert task.cancelled()
    assert (admission.running, admission.waiting) == (0, 0)
    await asyncio.wait_for(admission.acquire(), 10)  # the slot is free again


async def test_a_slot_handed_to_a_waiter_that_gives_up_passes_on() -> None:
    """A waiter handed the slot in the same turn as its client leaves (or its queue time runs
    out) passes the slot to the next waiter: no slot is ever lost."""
    admission = Admission(1, 4, 30, Metrics())
    await admission.acquire()
    first = asyncio.create_task(admission.acquire())
    await _until(lambda: admission.waiting == 1)
    second = asyncio.create_task(admission.acquire())
    await _until(lambda: admission.waiting == 2)
    admission.release()  # handed to the first waiter...
    first.cancel()  # ...which gives up in the same turn
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.wait_for(second, 10)  # the slot was passed on, not lost
    assert (admission.running, admission.waiting) == (1, 0)
