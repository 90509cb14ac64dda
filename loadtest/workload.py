"""Seeded, reproducible avatar chat workload.

A request is a window of consecutive exchanges from one persona's script (``conversations.py``):
the persona's system prompt, ``turns - 1`` earlier (user, assistant) exchanges as history, then
one user turn to answer. The reply length is controlled with ``max_tokens`` drawn from a range,
so that with ``ignore_eos`` a random model still produces replies of the intended lengths.
The same seed always gives the same list of requests, whatever the client (bench, Locust or
the raw engine), which is what makes A/B comparisons fair.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from loadtest.conversations import PERSONAS


@dataclass(frozen=True)
class IntRange:
    """An inclusive integer range, parsed from ``"20:200"`` or ``"64"``."""

    lo: int
    hi: int

    @classmethod
    def parse(cls, text: str) -> IntRange:
        lo_s, _, hi_s = text.partition(":")
        lo = int(lo_s)
        hi = int(hi_s) if hi_s else lo
        if lo < 1 or hi < lo:
            raise ValueError(f"bad range {text!r}: expected LO:HI with 1 <= LO <= HI")
        return cls(lo, hi)

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.lo, self.hi)

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}:{self.hi}"


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion to send: OpenAI-style messages and the reply length cap."""

    index: int
    persona: str
    messages: list[dict[str, str]] = field(hash=False)
    max_tokens: int


def build_workload(
    num_requests: int,
    seed: int = 0,
    turns: IntRange = IntRange(1, 4),
    max_tokens: IntRange = IntRange(20, 200),
) -> list[ChatRequest]:
    """Return ``num_requests`` requests; identical for identical arguments."""
    rng = random.Random(seed)
    names = sorted(PERSONAS)
    out: list[ChatRequest] = []
    for index in range(num_requests):
        persona = rng.choice(names)
        system, script = PERSONAS[persona]
        n_turns = min(turns.sample(rng), len(script))
        start = rng.randint(0, len(script) - n_turns)
        window = script[start : start + n_turns]
        messages = [{"role": "system", "content": system}]
        for user, assistant in window[:-1]:
            messages.append({"role": "user", "content": user})
            messages.append({"role": "assistant", "content": assistant})
        messages.append({"role": "user", "content": window[-1][0]})
        out.append(ChatRequest(index, persona, messages, max_tokens.sample(rng)))
    return out
