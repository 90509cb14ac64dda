"""Deadline-aware admission and priority on the real vLLM CPU engine (demo model).

One server, with vLLM's ``--scheduling-policy priority`` and one sequence per batch
(``--max-num-seqs 1``), so a request waits for a seat behind whatever runs and the engine's own
queue is where priority decides. Nothing here assumes how fast the machine is: the long answers
are ENDLESS_TOKENS long and cut by the test; the budget comes from what the server itself took
on this machine (its access log), and the refusal is timed by the server too, against that
hold: a client's clock on a crowded 2-core machine times the machine. The priority test
compares only the order in which answers started.

Streams are read on the test's one event loop, beside its polls (a reader thread once fell a
minute behind on a crowded machine, and the server cut its endless answer as a client that had
stopped reading; the server's --write-timeout, tests/support.py, is long for the same reason).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.support import (
    ENDLESS_TOKENS,
    MODEL,
    SERVER_FIXTURES,
    ServerProcess,
    metric_value,
    running_server,
    wait_until,
)

CHAT = "/v1/chat/completions"
WARM_UP = 3  # the predictor's MIN_SAMPLES: it predicts nothing before
WARM_UP_TOKENS = 2048
PATIENCE_S = 300.0  # only a failing test waits this long


@pytest.fixture(scope="module")
def slo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log_path = tmp_path_factory.mktemp("slo") / "server.log"
    with running_server(log_path, *SERVER_FIXTURES["slo_server"]) as srv:
        yield srv


@pytest.fixture
async def client(slo_server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=slo_server.base_url, timeout=PATIENCE_S) as c:
        yield c


def body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hello there!"}], **extra}


ENDLESS = body(max_tokens=ENDLESS_TOKENS, ignore_eos=True, stream=True)


class Stream:
    """A streamed answer read as a task: when its first frame came; cancel it to cut it."""

    def __init__(self, client: httpx.AsyncClient, **kwargs: Any) -> None:
        self.first: float | None = None
        self.started = asyncio.Event()
        self.task = asyncio.create_task(self._read(client, kwargs))

    async def _read(self, client: httpx.AsyncClient, kwargs: dict[str, Any]) -> int:
        async with client.stream("POST", CHAT, **kwargs) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {") and self.first is None:
                    self.first = time.perf_counter()
                    self.started.set()
            return response.status_code

    async def cut(self) -> None:
        """Close the connection: the server aborts the engine request."""
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def until(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    """``tests.support.wait_until`` for the event loop: poll with a deadline."""
    deadline = time.monotonic() + PATIENCE_S
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {PATIENCE_S} s")
        await asyncio.sleep(0.05)


def engine_holds(client: httpx.AsyncClient, n: int) -> Callable[[], Awaitable[bool]]:
    """The engine holds exactly ``n`` requests (running or in its own queue)."""

    async def check() -> bool:
        text = (await client.get("/metrics")).text
        return metric_value(text, "avatar_engine_unfinished_requests") == n

    return check


def access(server: ServerProcess, request_id: str) -> dict[str, Any]:
    """The request's access-log entry (the server's own timing of it)."""

    def entry() -> dict[str, Any] | None:
        for line in server.log().splitlines():
            if f'"request_id":"{request_id}"' in line:
                return json.loads(line.split("serve.access: ", 1)[1])  # type: ignore[no-any-return]
        return None

    found: dict[str, Any] = wait_until(entry, PATIENCE_S, what=f"the access log of {request_id}")
    return found


async def test_a_tiny_budget_behind_a_long_answer_is_refused_at_once(
    slo_server: ServerProcess, client: httpx.AsyncClient
) -> None:
    before = (await client.get("/metrics")).text
    # The server learns from finished requests how long one holds the engine's one seat.
    for n in range(WARM_UP):
        r = await client.post(
            CHAT,
            json=body(max_tokens=WARM_UP_TOKENS, ignore_eos=True),
            headers={"x-slo-ttft-ms": "600000", "x-request-id": f"slo-warm-{n}"},  # met
        )
        assert r.status_code == 200, r.text
    # A quarter of the shortest hold the server saw: far under the wait behind a running
    # answer, on a machine of any speed (both scale with it).
    held_ms = min(access(slo_server, f"slo-warm-{n}")["duration_ms"] for n in range(WARM_UP))
    budget_ms = held_ms / 4
    long = Stream(client, json=ENDLESS)
    try:
        await asyncio.wait_for(long.started.wait(), PATIENCE_S)  # it holds the one seat
        refused = await client.post(
            CHAT,
            json=body(stream=True, max_tokens=8),
            headers={"x-slo-ttft-ms": f"{budget_ms:.0f}", "x-request-id": "slo-refused"},
        )
        assert not long.task.done(), "refused while the long answer ran"
    finally:
        await long.cut()
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "slo_unattainable", error  # predicted, not waited out
    assert error["type"] == "rate_limit_error"
    assert int(refused.headers["retry-after"]) >= 1
    # Refused without waiting for the seat: sooner than one request's hold (milliseconds on a
    # quiet machine; a crowded one has kept the server off the CPU for a second).
    took_ms = access(slo_server, "slo-refused")["duration_ms"]
    assert took_ms < held_ms, f"refused in {took_ms} ms; a seat is held {held_ms:.0f} ms"
    await until(engine_holds(client, 0), "the engine idle")
    after = (await client.get("/metrics")).text

    def grew(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert grew("avatar_requests_rejected_total", reason="slo_unattainable") == 1
    assert grew("avatar_slo_ttft_requests_total", outcome="met") == WARM_UP


async def test_a_high_priority_request_starts_before_the_low_ones_queued_ahead(
    slo_server: ServerProcess, client: httpx.AsyncClient
) -> None:
    await until(engine_holds(client, 0), "the engine idle")
    short = body(max_tokens=16, ignore_eos=True, stream=True)

    def named(name: str, **headers: str) -> dict[str, str]:
        return {"x-request-id": f"slo-{name}", **headers}

    long = Stream(client, json=ENDLESS)
    try:
        await asyncio.wait_for(long.started.wait(), PATIENCE_S)  # it holds the one seat
        low = []
        for n in (1, 2):  # vLLM's body field
            low.append(Stream(client, json={**short, "priority": 5}, headers=named(f"low-{n}")))
            await until(engine_holds(client, 1 + n), f"low {n} queued")
        high = Stream(  # vLLM's header; lower is earlier
            client, json=short, headers=named("high", **{"X-Vllm-Priority": "-5"})
        )
        await until(engine_holds(client, 4), "the high one queued")
        assert not long.task.done(), "the three queued behind the long answer"
    finally:
        await long.cut()  # the seat frees: the engine picks from its queue
    statuses = await asyncio.wait_for(asyncio.gather(*(s.task for s in (*low, high))), PATIENCE_S)
    assert statuses == [200] * 3
    # The order the server finished them in, which with one seat is the order they started in
    # (the server's log, not the client's clock: a crowded machine can hold the client until
    # all three have ended, and it then reads them in any order).
    names = ("high", "low-1", "low-2")
    for name in names:
        access(slo_server, f"slo-{name}")  # logged
    log = slo_server.log()
    order = sorted(names, key=lambda name: log.index(f'"request_id":"slo-{name}"'))
    assert order == ["high", "low-1", "low-2"], order
