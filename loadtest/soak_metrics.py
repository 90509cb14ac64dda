"""What the soak watches on the server: ``/metrics`` gauges and, optionally, a process tree.

Every few seconds one ``Sample`` is taken: the front end's own resident memory and open file
descriptors (``process_*``, exported by prometheus_client), the admission and engine gauges, the
event-loop task count when the server exports it, and with ``--pid`` the RSS and open fds of that
process and its children (the engine core runs in a child process) read with psutil.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

# Sample field <- Prometheus sample name (a counter's ``_total`` sample; labels summed).
METRIC_FIELDS = {
    "rss_bytes": "process_resident_memory_bytes",
    "open_fds": "process_open_fds",
    "running": "avatar_requests_running",
    "waiting": "avatar_requests_waiting",
    "engine_unfinished": "avatar_engine_unfinished_requests",
    "kv_cache_usage": "avatar_kv_cache_usage_ratio",
    "loop_tasks": "avatar_event_loop_tasks",  # optional: newer servers only
    "disconnects": "avatar_client_disconnects_total",
}
# Gauges that must read 0 once the load has stopped and the server has settled.
SETTLE_GAUGES = ("running", "waiting", "engine_unfinished")


@dataclass
class Sample:
    t: float  # seconds since the soak started
    phase: str  # "idle" (before the load), "load", or "settled" (after it)
    rss_bytes: float | None = None
    open_fds: float | None = None
    running: float | None = None
    waiting: float | None = None
    engine_unfinished: float | None = None
    kv_cache_usage: float | None = None
    loop_tasks: float | None = None
    disconnects: float | None = None
    tree_rss_bytes: float | None = None  # --pid: the process and its children
    tree_open_fds: float | None = None
    tree_processes: int | None = None
    scrape_error: str | None = None

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def parse_metrics(text: str) -> dict[str, float]:
    """The ``METRIC_FIELDS`` found in Prometheus exposition text; absent ones are left out."""
    wanted = {name: key for key, name in METRIC_FIELDS.items()}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = wanted.get(sample.name)
            if key is not None:
                out[key] = out.get(key, 0.0) + float(sample.value)
    return out


def process_tree(pid: int) -> tuple[float, float, int]:
    """RSS bytes, open fds and process count of ``pid`` and all its descendants."""
    import psutil  # only with --pid; ships with Locust

    root = psutil.Process(pid)
    rss = fds = 0.0
    count = 0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a child may exit between listing and reading
            rss += proc.memory_info().rss
            fds += proc.num_fds()
            count += 1
    return rss, fds, count


class Sampler:
    """Takes a ``Sample`` now (``take``) or every ``interval_s`` in the background."""

    def __init__(
        self,
        metrics_url: str,
        *,
        pid: int | None,
        t0: float,
        interval_s: float,
        on_sample: Callable[[Sample], None] | None = None,
    ) -> None:
        self.metrics_url = metrics_url
        self.pid = pid
        self.t0 = t0
        self.interval_s = interval_s
        self.on_sample = on_sample
        self.samples: list[Sample] = []
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Sampler:
        # Its own single connection, so that closing the load's connections leaves the server
        # with exactly the sockets it had before the load.
        timeout = aiohttp.ClientTimeout(total=10)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1), timeout=timeout
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        if self._session is not None:
            await self._session.close()

    async def take(self, phase: str) -> Sample:
        assert self._session is not None, "use 'async with Sampler(...)'"
        sample = Sample(t=time.monotonic() - self.t0, phase=phase)
        try:
            async with self._session.get(self.metrics_url) as resp:
                resp.raise_for_status()
                values = parse_metrics(await resp.text())
            # A labelled counter has no sample until its first increment: absent means 0.
            sample.disconnects = 0.0
            for key, value in values.items():
                setattr(sample, key, value)
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            sample.scrape_error = f"{type(exc).__name__}: {exc}"[:200]
        if self.pid is not None:
            try:
                rss, fds, count = process_tree(self.pid)
                sample.tree_rss_bytes, sample.tree_open_fds, sample.tree_processes = rss, fds, count
            except Exception as exc:  # the process is gone: the samples say so
                sample.scrape_error = sample.scrape_error or f"pid {self.pid}: {exc}"[:200]
        self.samples.append(sample)
        if self.on_sample is not None:
            self.on_sample(sample)
        return sample

    async def _loop(self, phase: str) -> None:
        next_t = time.monotonic()
        while True:
            await self.take(phase)
            next_t += self.interval_s
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))

    def start(self, phase: str = "load") -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(phase))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def settle(self, timeout_s: float, poll_s: float = 0.5) -> float:
        """Poll until the server is back where it was before the load (``settled``), or until
        ``timeout_s`` has passed. Keeps the last sample (phase "settled"); returns how long
        that took."""
        idle = next((s for s in self.samples if s.phase == "idle"), None)
        start = time.monotonic()
        deadline = start + timeout_s
        while True:
            sample = await self.take("settled")
            if settled(sample, idle) or time.monotonic() >= deadline:
                return time.monotonic() - start
            self.samples.pop()  # keep only the final settled sample
            await asyncio.sleep(poll_s)


def settled(sample: Sample, idle: Sample | None = None) -> bool:
    """The request gauges read 0 and, when known, the front end has no more open fds than it had
    before the load (the server may take a moment to close the sockets the client closed)."""
    if sample.scrape_error is not None:
        return False
    if any(getattr(sample, key) != 0 for key in SETTLE_GAUGES):
        return False
    if idle is None or idle.open_fds is None or sample.open_fds is None:
        return True
    return sample.open_fds <= idle.open_fds
