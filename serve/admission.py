"""Admission control: a bounded number of requests in the engine and a bounded waiting queue.

Past the queue a request is refused at once rather than queued forever, one that waits longer
than the queue timeout is refused too, and so is every new request during a drain
(``serve.errors`` maps these to 429 with Retry-After, 503 and 503). What was admitted is never
disturbed.
"""

from __future__ import annotations

import asyncio

from serve.errors import Refused
from serve.telemetry import Metrics


class Admission:
    def __init__(
        self, max_running: int, max_waiting: int, queue_timeout: float, metrics: Metrics
    ) -> None:
        self._slots = asyncio.Semaphore(max_running)
        self._max_waiting = max_waiting
        self._queue_timeout = queue_timeout
        self._metrics = metrics
        self.running = 0
        self.waiting = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return self.running + self.waiting

    async def wait_idle(self) -> None:
        """Return once no request is running or waiting (used by the drain)."""
        await self._idle.wait()

    async def acquire(self) -> None:
        """Take one engine slot, waiting in the bounded queue if none is free.

        Raises ``Refused``: while draining, when the queue is full, after the queue timeout.
        """
        if self.draining:
            raise Refused("draining", "The server is shutting down; retry on another replica.")
        if self._slots.locked():
            if self.waiting >= self._max_waiting:
                raise Refused("overload", "The server is at capacity; retry shortly.")
            self._set(waiting=+1)
            try:
                await asyncio.wait_for(self._slots.acquire(), self._queue_timeout)
            except TimeoutError:
                raise Refused(
                    "queue_timeout", "The request waited too long for capacity; retry shortly."
                ) from None
            finally:
                self._set(waiting=-1)
        else:
            # A free slot: acquire() returns without suspending, so no event-loop hop here.
            await self._slots.acquire()
        self._set(running=+1)

    def release(self) -> None:
        self._slots.release()
        self._set(running=-1)

    def _set(self, running: int = 0, waiting: int = 0) -> None:
        self.running += running
        self.waiting += waiting
        self._metrics.running.set(self.running)
        self._metrics.waiting.set(self.waiting)
        if self.in_flight == 0:
            self._idle.set()
        else:
            self._idle.clear()
