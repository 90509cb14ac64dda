"""Seeded, reproducible avatar chat workload.

A request is a window of consecutive exchanges from one persona's script (``conversations.py``):
the persona's system prompt, ``turns - 1`` earlier (user, assistant) exchanges as history, then
one user turn to answer. The reply length is controlled with ``max_tokens`` drawn from a range,
so that with ``ignore_eos`` a random model still produces replies of the intended lengths.
The same seed always gives the same list of requests, whatever the client (bench, Locust or
the raw engine), which is what makes A/B comparisons fair.

``route_to_personas`` sends each request to a persona adapter (a LoRA over the base model)
named after its conversation's persona, so that a server with N adapters batches all of them
together (``loadtest.bench --personas N``, ``loadtest.personas``).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

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
    """One chat completion to send: OpenAI-style messages and the reply length cap.

    ``model`` names the served model or adapter the request asks for; None means the client's
    own model (the base model).
    """

    index: int
    persona: str
    messages: list[dict[str, str]] = field(hash=False)
    max_tokens: int
    model: str | None = None


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


def persona_adapter_names(n: int) -> list[str]:
    """The names of ``n`` persona adapters: the conversation personas in sorted order
    (``game_npc``, ``kids_storyteller``, ...); past eight, a second set (``game_npc-2``, ...)."""
    if n < 1:
        raise ValueError(f"need at least one persona adapter, got {n}")
    order = sorted(PERSONAS)
    return [
        order[k % len(order)] + (f"-{k // len(order) + 1}" if k >= len(order) else "")
        for k in range(n)
    ]


def route_to_personas(requests: Sequence[ChatRequest], names: Sequence[str]) -> list[ChatRequest]:
    """Each request sent to an adapter of its own persona, as an avatar product would.

    Name k belongs to the k-th persona (sorted, modulo eight), so with eight names every
    conversation goes to the adapter named after it; a persona with several adapters (more than
    eight names) takes them in turn; with fewer than eight, persona j shares name ``j % n``.
    A persona keeps its adapter, so the prefix cache (keyed by adapter) serves its history as
    it does for the base model. Everything else about each request is unchanged.
    """
    if not names:
        raise ValueError("no adapter names")
    order = sorted(PERSONAS)
    own: dict[str, list[str]] = {}
    for k, name in enumerate(names):
        own.setdefault(order[k % len(order)], []).append(name)
    for j, persona in enumerate(order):
        own.setdefault(persona, [names[j % len(names)]])
    turn: Counter[str] = Counter()
    out = []
    for req in requests:
        choices = own[req.persona]
        out.append(replace(req, model=choices[turn[req.persona] % len(choices)]))
        turn[req.persona] += 1
    return out
