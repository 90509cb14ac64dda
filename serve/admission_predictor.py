"""Predicting a request's time to first token from the work ahead of it, learned online.

A voice agent that waits five seconds for a first token is worse off than one refused in five
milliseconds: the platform can send it to another replica. So a request that carries a TTFT
budget (``x-slo-ttft-ms``, or the server's default) is refused at once when the predicted wait
exceeds what is left of its budget, and refused while it waits once it can no longer make it.

The model, in the two parts a request's first token waits for:

- **a seat**: none while fewer requests run than the engine seats (the smaller of our
  ``--max-running-requests`` and the engine's ``--max-num-seqs``). Otherwise it waits for as many
  releases as there are requests ahead of it; seats free up at ``capacity / hold`` a second,
  ``hold`` being the mean time a request holds one. We never know when a running answer will
  end, so its remaining time is taken to be the mean (memoryless), which is what makes one
  learned figure enough.
- **the engine**: one decode step (the step its prefill joins) plus the prompt tokens admitted
  ahead of it and not yet prefilled, less the share the prefix cache serves, at the measured
  seconds per prefill token.

The request's own prefill is left out. How much of its prompt the prefix cache holds is not
known before the engine has it, and in voice traffic it is nearly all of it (the persona and
the history, sent a moment ago by the speculative request or the last turn). Counted at the
average cached share, a 2,600-token voice turn was predicted 360 ms on a server that answered
it in 40 ms, and every turn of a nearly idle server was refused; and a refused request teaches
the predictor nothing, so it never recovered. Only what stands ahead of a request refuses it at
once; its own prefill is what its budget must cover, and a request whose budget runs out while
it waits is still refused, not started.

Every figure is an exponentially weighted mean over finished requests (every request, with a
budget or not: they all hold seats), so the model follows the load as it changes. The engine
part is fitted on exactly what it predicts, admission to the first output, so it holds the
engine's own queueing and works without the engine's timestamps (``--disable-log-stats``).
Learning costs a few float operations per request, at its end; nothing per token.

Until ``MIN_SAMPLES`` requests have finished there is no prediction: nothing is refused at once
on a guess, and only the budget running out refuses a request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The weight of a new observation: about the last ten requests count, so a change of load shows
# within a few requests, and one odd request moves the estimate by a fifth.
ALPHA = 0.2
MIN_SAMPLES = 3


class Ewma:
    """An exponentially weighted mean; None until the first sample."""

    __slots__ = ("alpha", "value")

    def __init__(self, alpha: float = ALPHA) -> None:
        self.alpha = alpha
        self.value: float | None = None

    def add(self, sample: float) -> None:
        if self.value is None:
            self.value = sample
        else:
            self.value += self.alpha * (sample - self.value)

    def get(self, default: float = 0.0) -> float:
        return default if self.value is None else self.value


@dataclass(slots=True)
class Demand:
    """One request as admission sees it: its prompt, priority and TTFT deadline.

    ``deadline`` is on ``time.perf_counter``'s clock (None: no budget, the plain path); the
    other fields are admission's notes, for learning when the request ends.
    """

    prompt_tokens: int = 0
    priority: int = 0
    deadline: float | None = None
    budget: float | None = None  # the whole budget in seconds, for messages
    admitted: float | None = None
    expected: float = 0.0  # prompt tokens it was expected to compute, as the backlog counts it
    backlog_ahead: float = 0.0  # tokens to compute admitted ahead of it, not yet prefilled
    first_output: float | None = None
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Prediction:
    seat: float  # seconds until an engine seat is free
    engine: float  # seconds from the seat to the first output

    @property
    def total(self) -> float:
        return self.seat + self.engine


class WaitPredictor:
    """The wait a new request faces; learned from the requests that finish.

    ``capacity``: requests the engine runs at once, as this front end sees it.
    """

    def __init__(self, capacity: int, min_samples: int = MIN_SAMPLES) -> None:
        self.capacity = max(1, capacity)
        self.min_samples = min_samples
        self.samples = 0
        self.hold = Ewma()  # seconds a request holds its seat
        self.step = Ewma()  # seconds per decode step (gap between tokens)
        self.prefill = Ewma()  # seconds per prompt token computed, the engine's queue included
        self.cached_share = Ewma()  # share of prompt tokens the prefix cache served
        # Seconds from a request's parse to its ask for a seat: rendering and tokenizing, the
        # renderer thread's queue, the event loop's. The door keeps this much of a budget back.
        self.preparation = Ewma()
        # Prompt tokens to compute (less the expected cached share) of the requests admitted
        # whose first output has not come yet.
        self.backlog = 0.0

    @property
    def ready(self) -> bool:
        return self.samples >= self.min_samples

    def predict(self, running: int, ahead: int) -> Prediction | None:
        """The wait before a new request's own prefill, with ``running`` requests admitted and
        ``ahead`` waiting that would be admitted before it; None until ready."""
        if not self.ready:
            return None
        releases = running + ahead + 1 - self.capacity
        seat = releases * self.hold.get() / self.capacity if releases > 0 else 0.0
        engine = self.step.get() + self.backlog * self.prefill.get()
        return Prediction(seat, engine)

    # -- the life of a request -------------------------------------------------------------

    def on_prepared(self, seconds: float) -> None:
        self.preparation.add(seconds)

    def on_admit(self, demand: Demand, now: float) -> None:
        demand.admitted = now
        demand.backlog_ahead = self.backlog
        demand.expected = demand.prompt_tokens * (1.0 - self.cached_share.get())
        self.backlog += demand.expected

    def on_first_output(self, demand: Demand, now: float, cached_tokens: int | None) -> None:
        if demand.admitted is None or demand.first_output is not None:
            return
        demand.first_output = now
        demand.cached_tokens = cached_tokens or 0
        self._settle(demand)

    def _settle(self, demand: Demand) -> None:
        # Never below zero: float sums of what came and went need not cancel exactly.
        self.backlog = max(0.0, self.backlog - demand.expected)

    def on_release(
        self,
        demand: Demand,
        now: float,
        decode_seconds: float | None = None,
        decode_steps: int = 0,
    ) -> None:
        """The request gave its seat back; learn from it. ``decode_seconds`` over
        ``decode_steps`` gaps: the time between its first and last token."""
        if demand.admitted is None:
            return
        if demand.first_output is None:
            self._settle(demand)  # ended before its first output
            return  # a request that never produced is no measure of anything but failure
        self.hold.add(now - demand.admitted)
        if decode_steps > 0 and decode_seconds is not None:
            self.step.add(decode_seconds / decode_steps)
        prompt = demand.prompt_tokens
        if prompt > 0:
            cached = min(demand.cached_tokens, prompt)
            self.cached_share.add(cached / prompt)
            computed = demand.backlog_ahead + prompt - cached
            engine = demand.first_output - demand.admitted
            # What the step does not explain is put on the prompt tokens it computed.
            self.prefill.add(max(0.0, engine - self.step.get()) / max(1, computed))
        self.samples += 1


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, at least one (it is an integer header, and zero
    would invite a client to hammer a server that just said it is behind)."""
    if not math.isfinite(seconds):
        return "1"
    return str(max(1, min(60, math.ceil(seconds))))
