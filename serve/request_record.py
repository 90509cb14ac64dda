"""One request's timeline, kept by the service on the stack of that request (never shared), and
what it adds to the metrics at its end: latencies, the time to first token split into stages,
tokens, the finish reason, the SLO verdict."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from serve.telemetry import Metrics, observe_all

# The first sentence ends at the first of these in the spoken text (what TTS can start on).
SENTENCE_ENDS = frozenset(".!?\n")


@dataclass(slots=True)
class RequestRecord:
    """One request's timeline, kept by the service on the stack of that request (never shared)."""

    endpoint: str
    model: str  # the served name the request asked for (base or persona), for the log
    arrival: float
    model_label: str = ""  # the metrics' bounded label of ``model`` (see Personas.label)
    # Stamps on the way to the first token (perf_counter), in order; see ``ttft_stages``.
    body_read: float | None = None
    parsed: float | None = None
    rendered: float | None = None  # chat template applied (chat only)
    tokenized: float | None = None
    queued: float | None = None  # validated and asking for an engine slot
    admitted: float | None = None
    # The engine's own stamps of its first output (queued, scheduled, first token), when known.
    engine_times: tuple[float, float, float] | None = None
    first_delta: float | None = None  # the engine's first output reached the request
    first_token: float | None = None
    first_sentence: float | None = None
    last_token: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str | None = None
    status: int = 200
    prompt_text: str | None = None  # kept only when the operator opts in (--log-prompts)
    gaps: list[float] = field(default_factory=list)
    # Thoughts (--reasoning-parser): streamed apart, never spoken, so outside the TTFT clock.
    first_reasoning: float | None = None
    last_reasoning: float | None = None
    reasoning_tokens: int | None = None  # the engine's count, set at the end
    ttft_budget: float | None = None  # seconds: the request's TTFT budget, if it had one

    def on_reasoning(self, num_tokens: int, now: float) -> None:
        """Per reasoning frame (parsed answers only): its time, and its tokens as output."""
        if self.first_reasoning is None:
            self.first_reasoning = now
        self.last_reasoning = now
        self.output_tokens += num_tokens

    @property
    def reasoning_seconds(self) -> float | None:
        if self.first_reasoning is None or self.last_reasoning is None:
            return None
        return self.last_reasoning - self.first_reasoning

    def on_text(self, text: str, num_tokens: int, now: float) -> None:
        """Per streamed frame: keep it to a few assignments (runs for every token)."""
        if self.first_token is None:
            self.first_token = now
        else:
            self.gaps.append(now - self.last_token)  # type: ignore[operator]
        self.last_token = now
        self.output_tokens += num_tokens
        if self.first_sentence is None and not SENTENCE_ENDS.isdisjoint(text):
            self.first_sentence = now

    def ttft_stages(self) -> list[tuple[str, float]]:
        """The time to first token, split into consecutive stages (seconds each).

        Stages whose stamps are missing (a text completion has no template; an engine that
        reports no timestamps) merge into the next one, so the stages always add up to the TTFT.
        """
        if self.first_token is None:
            return []
        stamps = self._front_stamps()
        times = self.engine_times
        # The engine's stamps count only when they fall inside our own window (same clock).
        if (
            times is not None
            and self.admitted is not None
            and self.first_delta is not None
            and self.admitted <= times[0] <= times[1] <= times[2] <= self.first_delta
        ):
            stamps += [("submit", times[0]), ("engine_queue", times[1]), ("prefill", times[2])]
            stamps.append(("output", self.first_delta))
        else:
            stamps.append(("engine", self.first_delta))
        stamps.append(("write", self.first_token))
        return self._split(stamps)

    def stages_until(self, end: float) -> list[tuple[str, float]]:
        """A request that ended without a first token (a refusal, an error): the stages it went
        through, then the rest until ``end`` as ``answer``, so they add up to its duration. A
        refusal at the door has no render stage; one decided in the queue has them all."""
        return self._split([*self._front_stamps(), ("answer", end)])

    def _front_stamps(self) -> list[tuple[str, float | None]]:
        return [
            ("receive", self.body_read),
            ("parse", self.parsed),
            ("render", self.rendered),
            ("tokenize", self.tokenized),
            ("validate", self.queued),
            ("admit", self.admitted),
        ]

    def _split(self, stamps: list[tuple[str, float | None]]) -> list[tuple[str, float]]:
        stages: list[tuple[str, float]] = []
        start = self.arrival
        for name, stamp in stamps:
            if stamp is None:
                continue
            stages.append((name, stamp - start))
            start = stamp
        return stages

    def finish(self, metrics: Metrics, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        reason = self.finish_reason or "error"
        labels = (self.endpoint, self.model_label, reason)
        by_finish = (self.endpoint, reason)
        if self.first_token is not None:
            metrics.ttft.labels(*labels).observe(self.first_token - self.arrival)
            for stage, seconds in self.ttft_stages():
                metrics.ttft_stage.labels(self.endpoint, stage).observe(seconds)
        if self.first_sentence is not None:
            metrics.ttfs.labels(*by_finish).observe(self.first_sentence - self.arrival)
        if self.reasoning_seconds is not None:
            metrics.reasoning.labels(*by_finish).observe(self.reasoning_seconds)
            metrics.reasoning_tokens.labels(*by_finish).observe(self.reasoning_tokens or 0)
        if self.gaps:
            observe_all(metrics.itl.labels(*by_finish), self.gaps)
        metrics.e2e.labels(*labels).observe(now - self.arrival)
        if self.queued is not None:
            # A request refused after waiting (queue timeout, client gone) waited too.
            waited = (self.admitted or now) - self.queued
            metrics.queue_wait.labels(self.endpoint, self.model_label).observe(waited)
        if self.admitted is not None:
            metrics.prompt_tokens_hist.labels(*by_finish).observe(self.prompt_tokens)
            metrics.output_tokens_hist.labels(*by_finish).observe(self.output_tokens)
            metrics.prompt_tokens.inc(self.prompt_tokens)
            metrics.generation_tokens.inc(self.output_tokens)
        metrics.requests.labels(self.endpoint, str(self.status), reason).inc()
        if self.ttft_budget is not None and self.admitted is not None:
            self._judge_slo(metrics, now, reason)

    def _judge_slo(self, metrics: Metrics, now: float, reason: str) -> None:
        """Met or missed, for a request that reached the engine. One that ended without a first
        token (tools only, or it failed or was cut) counts as missed only if its budget ran out
        first: ended within it, it neither met nor missed anything."""
        assert self.ttft_budget is not None
        if self.first_token is not None:
            met = self.first_token - self.arrival <= self.ttft_budget
            metrics.slo_ttft.labels("met" if met else "missed").inc()
        elif reason in ("abort", "error") and now - self.arrival > self.ttft_budget:
            metrics.slo_ttft.labels("missed").inc()
