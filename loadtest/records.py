"""Per-request measurements, and how they are derived from timestamped token events.

Clients (HTTP/SSE, the raw engine, Locust) only collect ``(timestamp, text)`` pairs while a reply
streams, one per chunk that carries generated tokens, and do all the arithmetic here afterwards:
keeping the per-chunk work in the hot loop to a clock read and a list append is what stops the
load generator from becoming the bottleneck it is trying to measure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# A reply "has its first sentence" once any of these appears: that is when a text-to-speech
# stage can start speaking, which matters more to an avatar than the first token.
SENTENCE_END = frozenset(".!?\n")

TokenEvent = tuple[float, str]


@dataclass
class RequestRecord:
    """What one request measured. Times are in seconds; ``None`` when not applicable."""

    index: int
    start: float  # perf_counter() when the request was sent, to order requests in time
    ttft: float | None = None
    e2e: float | None = None
    ttfs: float | None = None  # time to first sentence end
    itl: list[float] = field(default_factory=list)  # gaps between consecutive token chunks
    chunks: int = 0
    output_tokens: int | None = None
    prompt_tokens: int | None = None
    tokens_from_usage: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first, the usual decode-speed figure."""
        if self.ttft is None or self.e2e is None or not self.output_tokens:
            return None
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_row(self) -> dict[str, Any]:
        """A flat dict for CSV/JSON, without the (long) ITL list."""
        row = asdict(self)
        itl = row.pop("itl")
        row["tpot"] = self.tpot
        row["itl_mean"] = sum(itl) / len(itl) if itl else None
        row["itl_max"] = max(itl) if itl else None
        return row


def build_record(
    index: int,
    start: float,
    end: float,
    events: list[TokenEvent],
    *,
    output_tokens: int | None = None,
    prompt_tokens: int | None = None,
    error: str | None = None,
) -> RequestRecord:
    """Turn a finished stream's token events into a record.

    ``output_tokens`` should come from the server's usage report when there is one; without it
    the number of token chunks stands in (one chunk is one token on vLLM-style servers).
    """
    rec = RequestRecord(index=index, start=start, error=error, prompt_tokens=prompt_tokens)
    rec.chunks = len(events)
    if output_tokens is not None:
        rec.output_tokens = output_tokens
        rec.tokens_from_usage = True
    else:
        rec.output_tokens = len(events)
    if error is None and not events:
        rec.error = "no tokens in stream"
    if not events:
        return rec
    rec.ttft = events[0][0] - start
    rec.e2e = end - start
    prev = events[0][0]
    gaps = rec.itl
    for t, _ in events[1:]:
        gaps.append(t - prev)
        prev = t
    for t, text in events:
        if not SENTENCE_END.isdisjoint(text):
            rec.ttfs = t - start
            break
    return rec
