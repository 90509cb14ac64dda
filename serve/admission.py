"""Admission control: a bounded number of requests in the engine and a bounded waiting queue.

Past the queue a request is refused at once rather than queued forever, one that waits longer
than the queue timeout is refused too, and so is every new request during a drain
(``serve.errors`` maps these to 429 with Retry-After, 503 and 503). When a drain starts, the
requests already waiting are refused at once as well: the drain only waits for what is running,
and a quick 503 sends a waiting client to another replica instead of starting a generation here.
What was admitted is never disturbed.

The queue is a FIFO of futures rather than ``asyncio.wait_for`` around a semaphore: on Python
3.11, ``wait_for`` swallows a cancellation that lands in the same loop turn as the slot (the
request then runs on after its client left), and it costs a task per waiting request. Here a
slot is handed from ``release`` straight to the first waiter, and a waiter that gives up just as
it is handed one passes it on.
"""

from __future__ import annotations

import asyncio
from collections import deque

from serve.errors import Refused
from serve.telemetry import Metrics

_DRAINING = "The server is shutting down; retry on another replica."


class Admission:
    def __init__(
        self, max_running: int, max_waiting: int, queue_timeout: float, metrics: Metrics
    ) -> None:
        self._free = max_running
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._max_waiting = max_waiting
        self._queue_timeout = queue_timeout
        self._metrics = metrics
        self.running = 0
        self.waiting = 0
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return self.running + self.waiting

    @property
    def draining(self) -> bool:
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        """Start (or end) a drain; starting one refuses every waiting request at once."""
        self._draining = value
        if not value:
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():  # a done one was cancelled: its owner accounts for it
                waiter.set_exception(Refused("draining", _DRAINING))
                self._set(waiting=-1)

    async def wait_idle(self) -> None:
        """Return once no request is running or waiting (used by the drain)."""
        await self._idle.wait()

    async def acquire(self) -> None:
        """Take one engine slot, waiting in the bounded queue if none is free.

        Raises ``Refused``: while draining (also when a drain starts during the wait), when the
        queue is full, after the queue timeout.
        """
        if self._draining:
            raise Refused("draining", _DRAINING)
        if self._free > 0:
            # A free slot: no suspension, so no event-loop hop on the common path.
            self._free -= 1
            self._set(running=+1)
            return
        if self.waiting >= self._max_waiting:
            raise Refused("overload", "The server is at capacity; retry shortly.")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._set(waiting=+1)
        try:
            async with asyncio.timeout(self._queue_timeout):
                await waiter  # release() hands the slot over and does the accounting
        except BaseException as exc:
            self._give_up(waiter)
            if isinstance(exc, TimeoutError):
                raise Refused(
                    "queue_timeout", "The request waited too long for capacity; retry shortly."
                ) from None
            raise

    def _give_up(self, waiter: asyncio.Future[None]) -> None:
        """A waiter stopped waiting (timeout, client gone, drain): leave the queue cleanly."""
        if waiter.done() and not waiter.cancelled():
            if waiter.exception() is None:
                # Handed a slot in the same loop turn as it gave up: pass the slot on.
                self.release()
            return  # refused by the drain, which already took it off the queue
        waiter.cancel()
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        self._set(waiting=-1)

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._set(waiting=-1)  # the slot passes on: running stays as it is
                return
        self._free += 1
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
