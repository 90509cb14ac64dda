"""Admission control: a bounded number of requests in the engine and a bounded waiting queue.

Past the queue a request is refused at once rather than queued forever, one that waits longer
than the queue timeout is refused too, and so is every new request during a drain
(``serve.errors`` maps these to 429 with Retry-After, 503 and 503). When a drain starts, the
requests already waiting are refused at once as well: the drain only waits for what is running,
and a quick 503 sends a waiting client to another replica instead of starting a generation here.
What was admitted is never disturbed.

A request with a TTFT budget (``Demand.deadline``) is refused at once when the predicted wait
(``serve.admission_predictor``) exceeds what is left of it, and refused, not started, once it
has waited so long that it cannot make it (429 ``slo_unattainable`` / ``slo_expired``). A
request without one takes exactly the path it took before budgets existed.

The queue is ordered by priority (lower first, vLLM's rule) when the engine schedules by
priority (``--scheduling-policy priority``), so a confirmed turn is not admitted behind
speculative work; otherwise every request has priority 0 and it is first come, first served.
It is a heap of futures rather than ``asyncio.wait_for`` around a semaphore: on Python 3.11,
``wait_for`` swallows a cancellation that lands in the same loop turn as the slot (the request
then runs on after its client left), and it costs a task per waiting request. Here a slot is
handed from ``release`` straight to the first waiter, and a waiter that gives up just as it is
handed one passes it on.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time

from serve.admission_predictor import Demand, WaitPredictor, retry_after
from serve.errors import Refused
from serve.telemetry import Metrics

_DRAINING = "The server is shutting down; retry on another replica."
_AT_CAPACITY = "The server is at capacity; retry shortly."

# (priority, arrival order, the waiter's future): the order is unique, so futures are never
# compared, and equal priorities keep their arrival order.
_Entry = tuple[int, int, asyncio.Future[None]]


class Admission:
    def __init__(
        self,
        max_running: int,
        max_waiting: int,
        queue_timeout: float,
        metrics: Metrics,
        predictor: WaitPredictor | None = None,
    ) -> None:
        self._free = max_running
        self._waiters: list[_Entry] = []
        self._order = itertools.count()
        self._max_waiting = max_waiting
        self._queue_timeout = queue_timeout
        self._metrics = metrics
        self.predictor = predictor if predictor is not None else WaitPredictor(max_running)
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
            waiter = heapq.heappop(self._waiters)[2]
            if not waiter.done():  # a done one was cancelled: its owner accounts for it
                waiter.set_exception(Refused("draining", _DRAINING))
                self._set(waiting=-1)

    async def wait_idle(self) -> None:
        """Return once no request is running or waiting (used by the drain)."""
        await self._idle.wait()

    def refuse_now(self, demand: Demand) -> None:
        """Raise the ``Refused`` that ``acquire`` would raise at once with things as they are now
        (draining, the queue full, a budget that cannot be met), and nothing else: no slot is
        taken and no state changes. It needs no prompt tokens, so a request can be turned away
        before its prompt is rendered and tokenized; ``acquire`` decides again later."""
        if self._draining:
            raise Refused("draining", _DRAINING)
        if demand.deadline is not None:
            # Its prompt is still to be prepared: at 512 voice sessions 64 % of the refusals came
            # only after it, in 33 ms (p50) where the door's took 1 (BENCHMARKS.md, "Where a
            # late refusal's time goes"), so the door keeps the time preparing takes now back.
            self._check_budget(demand, reserve=self.predictor.preparation.get())
        if self._free <= 0 and self.waiting >= self._max_waiting:
            raise Refused("overload", _AT_CAPACITY)

    def prepared(self, seconds: float) -> None:
        """A request took ``seconds`` from its parse to its ask for a seat."""
        self.predictor.on_prepared(seconds)

    async def acquire(self, demand: Demand | None = None) -> None:
        """Take one engine slot, waiting in the bounded queue if none is free.

        Raises ``Refused``: while draining (also when a drain starts during the wait), when the
        queue is full, after the queue timeout; with a TTFT budget, when it cannot be met
        (at once) or runs out while waiting.
        """
        if self._draining:
            raise Refused("draining", _DRAINING)
        demand = demand if demand is not None else Demand()
        # The whole wait may be spent in the queue, unless a budget says less (its engine part
        # kept back: a request admitted with no time left for its prefill would still miss).
        timeout, expires = self._queue_timeout, False
        if demand.deadline is not None:
            left = self._check_budget(demand)
            if left < timeout:
                timeout, expires = left, True
        if self._free > 0:
            # A free slot: no suspension, so no event-loop hop on the common path.
            self._free -= 1
            self._set(running=+1)
            self.predictor.on_admit(demand, time.perf_counter())
            return
        if self.waiting >= self._max_waiting:
            raise Refused("overload", _AT_CAPACITY)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (demand.priority, next(self._order), waiter))
        self._set(waiting=+1)
        try:
            async with asyncio.timeout(timeout):
                await waiter  # release() hands the slot over and does the accounting
        except BaseException as exc:
            self._give_up(waiter)
            if isinstance(exc, TimeoutError) and expires:
                raise Refused(
                    "slo_expired",
                    f"The request's time-to-first-token budget ({_ms(demand.budget)}) ran out "
                    "while it waited for capacity; retry on another replica.",
                ) from None
            if isinstance(exc, TimeoutError):
                raise Refused(
                    "queue_timeout", "The request waited too long for capacity; retry shortly."
                ) from None
            raise
        self.predictor.on_admit(demand, time.perf_counter())

    def _check_budget(self, demand: Demand, reserve: float = 0.0) -> float:
        """Refuse at once a budget that cannot be met, ``reserve`` seconds of it still to be
        spent before the queue; else the seconds it may wait."""
        assert demand.deadline is not None
        left = demand.deadline - time.perf_counter() - reserve
        ahead = 0
        if self._waiters:  # those the queue would admit first (a budget's cost, not the plain one)
            ahead = sum(1 for p, _, w in self._waiters if p <= demand.priority and not w.done())
        predicted = self.predictor.predict(self.running, ahead)
        if left <= 0:
            why = "it was spent before the request reached the queue"
        elif predicted is not None and predicted.total > left:
            why = f"{_ms(left)} of it was left, and the predicted wait is {_ms(predicted.total)}"
        else:
            return left - (predicted.engine if predicted is not None else 0.0)
        raise Refused(
            "slo_unattainable",
            f"The request's time-to-first-token budget ({_ms(demand.budget)}) cannot be met "
            f"here: {why}. Retry on another replica.",
            retry_after=retry_after(predicted.total - left if predicted is not None else 1.0),
        )

    def _give_up(self, waiter: asyncio.Future[None]) -> None:
        """A waiter stopped waiting (timeout, client gone, drain): leave the queue cleanly."""
        if waiter.done() and not waiter.cancelled():
            if waiter.exception() is None:
                # Handed a slot in the same loop turn as it gave up: pass the slot on.
                self.release()
            return  # refused by the drain, which already took it off the queue
        waiter.cancel()
        for index, entry in enumerate(self._waiters):
            if entry[2] is waiter:
                self._waiters[index] = self._waiters[-1]
                self._waiters.pop()
                heapq.heapify(self._waiters)
                break
        self._set(waiting=-1)

    def started(self, demand: Demand, cached_tokens: int | None) -> None:
        """The request's first output came (its prefill is done)."""
        self.predictor.on_first_output(demand, time.perf_counter(), cached_tokens)

    def release(
        self,
        demand: Demand | None = None,
        decode_seconds: float | None = None,
        decode_steps: int = 0,
    ) -> None:
        """Give a slot back (to the first waiter, if any); learn from the request that held it."""
        if demand is not None:
            self.predictor.on_release(demand, time.perf_counter(), decode_seconds, decode_steps)
        while self._waiters:
            waiter = heapq.heappop(self._waiters)[2]
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


def _ms(seconds: float | None) -> str:
    return "none" if seconds is None else f"{seconds * 1000:.0f} ms"
