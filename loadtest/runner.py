"""Drive a send function at a fixed concurrency or a Poisson arrival rate, bounded in count/time.

The runner knows nothing about HTTP: ``send`` is any coroutine that turns a ``ChatRequest`` into
a ``RequestRecord`` (the aiohttp client, or the in-process engine), so every client is loaded in
exactly the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loadtest.records import RequestRecord
from loadtest.workload import ChatRequest

SendFn = Callable[[ChatRequest], Awaitable[RequestRecord]]

# Above this share of one core, or this much event-loop lag, the client's own timestamps are
# late and the latencies it reports include its own queueing, not just the server's.
CPU_WARN_FRACTION = 0.9
LAG_WARN_MS = 20.0
_LAG_TICK_S = 0.01


class ClientMonitor:
    """Measures the load generator itself: process CPU time per wall time, and event-loop lag.

    Lag is how late a 10 ms sleep wakes up; a busy loop wakes late, and so does every chunk
    timestamp taken on it.
    """

    def __init__(self) -> None:
        self._lags: list[float] = []
        self._task: asyncio.Task[None] | None = None
        self._wall0 = 0.0
        self._cpu0 = 0.0

    async def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(_LAG_TICK_S)
            self._lags.append(max(0.0, loop.time() - t - _LAG_TICK_S))

    def start(self) -> None:
        self._wall0 = time.perf_counter()
        self._cpu0 = time.process_time()
        self._task = asyncio.get_running_loop().create_task(self._probe())

    async def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self._wall0
        cpu = time.process_time() - self._cpu0
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        lags = np.array(self._lags or [0.0]) * 1000.0
        return {
            # The machine's 1-minute load average at the end: above the core count, other work
            # competed with the server for CPU and the latencies are inflated by it.
            "loadavg_1m": os.getloadavg()[0],
            "cpu_fraction": cpu / wall if wall > 0 else 0.0,
            "loop_lag_p99_ms": float(np.percentile(lags, 99)),
            "loop_lag_max_ms": float(lags.max()),
        }


def client_warnings(client: dict[str, Any]) -> list[str]:
    warnings = []
    if client["cpu_fraction"] > CPU_WARN_FRACTION:
        warnings.append(
            f"load generator used {client['cpu_fraction']:.0%} of a core: it may be the "
            "bottleneck; latencies include client-side queueing"
        )
    if client["loop_lag_p99_ms"] > LAG_WARN_MS:
        # With low client CPU, lag means the machine is oversubscribed (the server and the
        # client share its cores), not that the client is too slow.
        cause = (
            "the client is busy"
            if client["cpu_fraction"] > CPU_WARN_FRACTION / 2
            else "the cores are oversubscribed (server and client share them)"
        )
        warnings.append(
            f"client event-loop lag p99 {client['loop_lag_p99_ms']:.1f} ms ({cause}): chunk "
            "timestamps are late by up to about that much"
        )
    # The load average also counts the server's own busy threads (engine core, API server,
    # client), about one per core under load; twice the cores means someone else was busy too.
    cores = os.cpu_count() or 1
    if client.get("loadavg_1m", 0.0) > 2 * cores:
        warnings.append(
            f"machine load average {client['loadavg_1m']:.1f} on {cores} cores: other processes "
            "competed for the CPU during this level; treat its latencies as inflated"
        )
    return warnings


@dataclass
class LevelRun:
    mode: str  # "concurrency" or "rate"
    level: float
    records: list[RequestRecord]
    duration_s: float
    client: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    # Readings a caller took just before and just after the level (``run_levels(probe=...)``),
    # e.g. the server's CPU time: {"before": ..., "after": ...}.
    probe: dict[str, Any] | None = None


class _Progress:
    """tqdm when available and stderr is a terminal; otherwise silent."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self._bar: Any = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # progress is a nicety, never a reason to fail
                return
            self._bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, leave=False)

    def update(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def run_level(
    send: SendFn,
    requests: Sequence[ChatRequest],
    *,
    concurrency: int | None = None,
    rate: float | None = None,
    max_concurrency: int | None = None,
    duration_s: float | None = None,
    seed: int = 0,
    progress: bool = True,
    monitor_client: bool = True,
) -> LevelRun:
    """Send ``requests`` (all of them, or until ``duration_s`` has passed) and collect records.

    With ``concurrency``, that many requests are always in flight (closed loop). With ``rate``,
    requests start at Poisson arrival times (open loop), optionally capped at
    ``max_concurrency`` in flight. Requests already started when the duration runs out are
    allowed to finish, so no reply is cut short.
    """
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency and rate")
    records: list[RequestRecord] = []
    bar = _Progress(
        len(requests), f"{'c' if concurrency else 'rate'}={concurrency or rate}", progress
    )
    monitor = ClientMonitor()
    monitor.start()
    t0 = time.perf_counter()
    deadline = t0 + duration_s if duration_s else float("inf")

    async def one(req: ChatRequest) -> None:
        records.append(await send(req))
        bar.update()

    if concurrency is not None:
        it = iter(requests)

        async def worker() -> None:
            while time.perf_counter() < deadline:
                req = next(it, None)
                if req is None:
                    return
                await one(req)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    else:
        assert rate is not None
        rng = random.Random(seed)
        sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        tasks: list[asyncio.Task[None]] = []
        next_t = t0

        async def limited(req: ChatRequest) -> None:
            assert sem is not None
            async with sem:
                await one(req)

        for req in requests:
            next_t += rng.expovariate(rate)
            delay = next_t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.perf_counter() >= deadline:
                break
            tasks.append(asyncio.create_task(limited(req) if sem else one(req)))
        await asyncio.gather(*tasks)

    duration = time.perf_counter() - t0
    bar.close()
    client = await monitor.stop()
    records.sort(key=lambda r: r.start)
    level = float(concurrency if concurrency is not None else rate)  # type: ignore[arg-type]
    run = LevelRun("concurrency" if concurrency else "rate", level, records, duration, client)
    if monitor_client:
        run.warnings = client_warnings(client)
    return run
