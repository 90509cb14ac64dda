"""Deadline-aware admission and priority on the real vLLM CPU engine (demo model).

One server, with vLLM's ``--scheduling-policy priority`` and one sequence per batch
(``--max-num-seqs 1``), so a request waits for a seat behind whatever runs and the engine's own
queue is where priority decides. Nothing here assumes how fast the machine is: the long answers
are ENDLESS_TOKENS long and cut by the test; the budget comes from what the server itself took
on this machine (its access log), and the refusal is timed by the server too: on a crowded
2-core machine a client process can be kept off the CPU for tens of seconds, so a client's
clock would time the machine, not the server. The priority test compares only the order in
which answers started.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.support import (
    ENDLESS_TOKENS,
    MODEL,
    ServerProcess,
    metric_value,
    running_server,
    wait_until,
)

# The flags of this module's server (to plan it ahead: tests/support.py SERVER_FIXTURES).
SLO_SERVER_FLAGS = ("--scheduling-policy", "priority", "--max-num-seqs", "1")
CHAT = "/v1/chat/completions"
WARM_UP = 3  # the predictor's MIN_SAMPLES: it predicts nothing before
WARM_UP_TOKENS = 1024
PATIENCE_S = 300  # only a failing test waits this long


@pytest.fixture(scope="module")
def slo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log_path = tmp_path_factory.mktemp("slo") / "server.log"
    with running_server(log_path, *SLO_SERVER_FLAGS) as srv:
        yield srv


def body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hello there!"}], **extra}


def endless() -> dict[str, Any]:
    return body(max_tokens=ENDLESS_TOKENS, ignore_eos=True, stream=True)


class Stream:
    """A streamed answer read in a thread: when its first frame came, and a way to cut it."""

    def __init__(self, pool: ThreadPoolExecutor, base_url: str, **kwargs: Any) -> None:
        self.first: float | None = None
        self.started = threading.Event()
        self.cut = threading.Event()
        self.result: Future[int] = pool.submit(self._read, base_url, kwargs)

    def _read(self, base_url: str, kwargs: dict[str, Any]) -> int:
        with (
            httpx.Client(base_url=base_url, timeout=PATIENCE_S) as client,
            client.stream("POST", CHAT, **kwargs) as response,
        ):
            for line in response.iter_lines():
                if line.startswith("data: {") and self.first is None:
                    self.first = time.perf_counter()
                    self.started.set()
                if self.cut.is_set():
                    break  # closing the connection aborts the engine request
            return response.status_code


def engine_holds(server: ServerProcess, n: int) -> bool:
    """The engine holds exactly ``n`` requests (running or in its own queue)."""
    return metric_value(server.metrics(), "avatar_engine_unfinished_requests") == n


def access(server: ServerProcess, request_id: str) -> dict[str, Any]:
    """The request's access-log entry (the server's own timing of it)."""

    def entry() -> dict[str, Any] | None:
        for line in server.log().splitlines():
            if f'"request_id":"{request_id}"' in line:
                return json.loads(line.split("serve.access: ", 1)[1])  # type: ignore[no-any-return]
        return None

    found: dict[str, Any] = wait_until(entry, PATIENCE_S, what=f"the access log of {request_id}")
    return found


def test_a_tiny_budget_behind_a_long_answer_is_refused_in_milliseconds(
    slo_server: ServerProcess,
) -> None:
    url = slo_server.base_url
    before = slo_server.metrics()
    # The server learns from finished requests how long one holds the engine's one seat.
    for n in range(WARM_UP):
        r = httpx.post(
            url + CHAT,
            json=body(max_tokens=WARM_UP_TOKENS, ignore_eos=True),
            headers={"x-slo-ttft-ms": "600000", "x-request-id": f"slo-warm-{n}"},  # met
            timeout=PATIENCE_S,
        )
        assert r.status_code == 200, r.text
    # A quarter of the shortest hold the server saw: far under the wait behind a running
    # answer, on a machine of any speed (both scale with it).
    held_ms = min(access(slo_server, f"slo-warm-{n}")["duration_ms"] for n in range(WARM_UP))
    budget_ms = held_ms / 4
    with ThreadPoolExecutor(1) as pool:
        long = Stream(pool, url, json=endless())
        try:
            assert long.started.wait(PATIENCE_S), "the long answer holds the engine's one seat"
            refused = httpx.post(
                url + CHAT,
                json=body(stream=True, max_tokens=8),
                headers={"x-slo-ttft-ms": f"{budget_ms:.0f}", "x-request-id": "slo-refused"},
                timeout=PATIENCE_S,
            )
            still_running = not long.result.done()
        finally:
            long.cut.set()
        assert long.result.result(PATIENCE_S) == 200
    assert still_running, "refused while the long answer ran"
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "slo_unattainable", error  # predicted, not waited out
    assert error["type"] == "rate_limit_error"
    assert int(refused.headers["retry-after"]) >= 1
    took_ms = access(slo_server, "slo-refused")["duration_ms"]
    assert took_ms < budget_ms, f"refused in {took_ms} ms, within its {budget_ms:.0f} ms budget"
    wait_until(lambda: engine_holds(slo_server, 0), PATIENCE_S, what="the engine idle")
    after = slo_server.metrics()

    def grew(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert grew("avatar_requests_rejected_total", reason="slo_unattainable") == 1
    assert grew("avatar_slo_ttft_requests_total", outcome="met") == WARM_UP


def test_a_high_priority_request_starts_before_the_low_ones_queued_ahead(
    slo_server: ServerProcess,
) -> None:
    url = slo_server.base_url
    wait_until(lambda: engine_holds(slo_server, 0), PATIENCE_S, what="the engine idle")
    short = body(max_tokens=16, ignore_eos=True, stream=True)
    with ThreadPoolExecutor(4) as pool:
        long = Stream(pool, url, json=endless())
        try:
            assert long.started.wait(PATIENCE_S), "the long answer holds the engine's one seat"
            low = []
            for n in (1, 2):  # vLLM's body field
                low.append(Stream(pool, url, json={**short, "priority": 5}))
                wait_until(
                    lambda n=n: engine_holds(slo_server, 1 + n), PATIENCE_S, what=f"low {n} queued"
                )
            # vLLM's header; lower is earlier.
            high = Stream(pool, url, json=short, headers={"X-Vllm-Priority": "-5"})
            wait_until(lambda: engine_holds(slo_server, 4), PATIENCE_S, what="the high one queued")
        finally:
            long.cut.set()  # the seat frees: the engine picks from its queue
        statuses = [s.result.result(PATIENCE_S) for s in (long, *low, high)]
    assert statuses == [200] * 4
    started = {"high": high.first, "low 1": low[0].first, "low 2": low[1].first}
    assert all(t is not None for t in started.values()), started
    order = sorted(started, key=lambda name: started[name] or 0.0)
    assert order == ["high", "low 1", "low 2"], order
