"""The voice benchmark's traffic, planned before it runs: sessions, their turns, their arrivals.

Everything here is a pure function of the seed (and of the options), so two runs, two targets or
two rounds replay exactly the same sessions at exactly the same moments.

- A **persona** has a system prompt of realistic length: the persona's own prompt from
  ``loadtest.conversations`` followed by a seeded "knowledge" text, up to a length in characters
  drawn once per persona (``--persona-chars``). Every session of a persona shares it, as avatars
  of one product do, so the prefix cache can serve it across sessions; a short per-session
  header (the user's name, the time) ends the system message.
- A **session** is a list of turns. Turn k's user text is a line of the persona's script; before
  it the user speaks for ``think_s``; then zero to two speculative transcripts (word prefixes of
  the final one, as a speech-to-text preflight gives them) are sent and cancelled after their
  delays, then the confirmed request; a share of replies is cut by the user after
  ``barge_in_s`` seconds of speech; a share of turns force a tool call.
- **Arrivals** are open loop: session starts at a fixed rate or as a Poisson process, at
  ``rate = offered sessions / mean nominal session length``, so that Little's law gives the
  offered number of sessions in progress. So that the load is there from the first second,
  the run starts with ``offered`` sessions already under way (each picked with a probability
  proportional to its length and joined at a uniformly drawn turn, with the earlier exchanges
  from the script as history): the population a steady stream of arrivals would have.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, field, replace
from typing import Any

from loadtest.conversations import PERSONAS
from loadtest.workload import IntRange

Message = dict[str, Any]


@dataclass(frozen=True)
class FloatRange:
    """An inclusive range of floats, parsed from ``"1.5:4"`` or ``"2"``."""

    lo: float
    hi: float

    @classmethod
    def parse(cls, text: str) -> FloatRange:
        lo_s, _, hi_s = text.partition(":")
        lo = float(lo_s)
        hi = float(hi_s) if hi_s else lo
        if lo < 0 or hi < lo:
            raise ValueError(f"bad range {text!r}: expected LO:HI with 0 <= LO <= HI")
        return cls(lo, hi)

    def sample(self, rng: random.Random) -> float:
        return rng.uniform(self.lo, self.hi)

    @property
    def mean(self) -> float:
        return (self.lo + self.hi) / 2

    def __str__(self) -> str:
        return f"{self.lo:g}" if self.lo == self.hi else f"{self.lo:g}:{self.hi:g}"


@dataclass(frozen=True)
class VoiceWorkload:
    """The traffic model's options (the CLI's workload flags)."""

    seed: int = 0
    turns: IntRange = field(default_factory=lambda: IntRange(4, 10))
    think_s: FloatRange = FloatRange(1.5, 4.0)
    reply_tokens: IntRange = field(default_factory=lambda: IntRange(24, 64))
    persona_chars: IntRange = field(default_factory=lambda: IntRange(1000, 4000))
    max_context_chars: int = 6500
    speculative_weights: tuple[float, ...] = (0.3, 0.5, 0.2)  # P(0), P(1), P(2) per turn
    cancel_s: FloatRange = FloatRange(0.1, 0.8)
    barge_in: float = 0.2
    barge_in_s: FloatRange = FloatRange(0.5, 4.0)
    tool_share: float = 0.1
    tool_tokens: int = 40


@dataclass(frozen=True)
class ToolPlan:
    name: str
    result: str  # the tool message's content, appended after the call


@dataclass(frozen=True)
class TurnPlan:
    user_text: str
    think_s: float  # the user speaks (or thinks) this long before the first request of the turn
    partials: tuple[tuple[str, float], ...]  # speculative transcripts, cancelled after (s)
    max_tokens: int
    barge_in_s: float | None  # seconds of speech heard before the user cuts in; None: never
    tool: ToolPlan | None = None


@dataclass(frozen=True)
class SessionPlan:
    index: int
    persona: str
    system: str
    turns: tuple[TurnPlan, ...]
    history: tuple[Message, ...] = field(default=(), hash=False)  # a session already under way


@dataclass(frozen=True)
class Arrival:
    at_s: float  # seconds after the level starts
    plan: SessionPlan
    under_way: bool  # one of the sessions in progress when the level starts


# Tools every request of a session carries (when --tool-share > 0). Arguments are enums, so a
# forced call's JSON is short and always valid, whatever the model.
TOOLS: tuple[dict[str, Any], ...] = tuple(
    {
        "type": "function",
        "function": {
            "name": name,
            "description": desc,
            "parameters": {
                "type": "object",
                "properties": {k: {"type": "string", "enum": list(v)} for k, v in props.items()},
                "required": list(props),
            },
        },
    }
    for name, desc, props in (
        (
            "check_schedule",
            "Look up opening hours or free appointment slots.",
            {"day": ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday")},
        ),
        (
            "get_weather",
            "Current weather for a city.",
            {"city": ("lisbon", "paris", "tokyo", "boston"), "unit": ("celsius", "fahrenheit")},
        ),
        (
            "lookup_item",
            "Find an item, exhibit or product and where it is.",
            {"item": ("ticket", "map", "coffee", "shield", "router", "book")},
        ),
    )
)
TOOL_NAMES = tuple(t["function"]["name"] for t in TOOLS)

_NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Femi", "Gus", "Hana", "Ivo", "Jade", "Kim", "Lea")
_SUBJECTS = (
    "The front desk",
    "Our team",
    "The east wing",
    "The weekend schedule",
    "The membership plan",
    "The quiet room",
    "The main hall",
    "The support line",
    "The garden entrance",
    "The loyalty card",
)
_VERBS = ("opens", "closes", "changes", "moves", "includes", "excludes", "starts", "ends")
_OBJECTS = (
    "at nine in the morning",
    "after the holidays",
    "for visitors with children",
    "on the second floor",
    "during public events",
    "for a small fee",
    "without a booking",
    "every other week",
)
_RULES = (
    "Never promise what you cannot check.",
    "Ask one question at a time.",
    "Keep every answer short enough to say in one breath.",
    "If the user sounds upset, acknowledge it before anything else.",
    "Do not read out lists; summarize them.",
    "Use the user's name now and then, not in every reply.",
)
_FILLERS = ("", "", "", "Um, ", "Okay, so ", "Hey, ", "Right. ")


def _rng(seed: int, *parts: object) -> random.Random:
    return random.Random(f"voice:{seed}:" + ":".join(str(p) for p in parts))


@functools.lru_cache(maxsize=256)
def persona_prompt(seed: int, persona: str, chars: IntRange) -> str:
    """The persona's system prompt, ``chars`` long (drawn once per persona and seed)."""
    rng = _rng(seed, "persona", persona)
    target = chars.sample(rng)
    parts = [PERSONAS[persona][0], "\n\nWhat you know:"]
    size = sum(len(p) for p in parts)
    k = 0
    while size < target:
        if k % 7 == 6:
            line = " " + rng.choice(_RULES)
        else:
            line = f" {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
        parts.append(line)
        size += len(line)
        k += 1
    return "".join(parts)


def _partials(rng: random.Random, text: str, n: int) -> list[str]:
    """``n`` preflight transcripts of ``text``, each different from the one before and from
    ``text``: growing word prefixes, then the whole sentence as a preflight gives it (lower
    case, unpunctuated)."""
    words = text.split()
    variants = [text.lower().rstrip(".!?"), text.lower().rstrip(".!?") + " uh"]
    out: list[str] = []
    for i in range(n):
        frac = 0.4 + 0.5 * (i + rng.random()) / max(1, n)
        k = max(1, min(len(words) - 1, math.ceil(len(words) * frac)))
        partial = " ".join(words[:k])
        for alt in variants:
            if partial not in (text, *out[-1:]):
                break
            partial = alt
        out.append(partial)
    return out


def _turn(rng: random.Random, persona: str, k: int, wl: VoiceWorkload) -> TurnPlan:
    script = PERSONAS[persona][1]
    line = script[k % len(script)][0]
    filler = rng.choice(_FILLERS)
    user = filler + (line[0].lower() + line[1:] if filler else line)
    n_spec = rng.choices(range(len(wl.speculative_weights)), wl.speculative_weights)[0]
    texts = _partials(rng, user, n_spec)
    partials = tuple((t, wl.cancel_s.sample(rng)) for t in texts)
    tool = None
    if rng.random() < wl.tool_share:
        name = rng.choice(TOOL_NAMES)
        detail = " ".join(rng.choice(_OBJECTS) for _ in range(rng.randint(2, 6)))
        result = f'{{"status": "ok", "tool": "{name}", "detail": "{detail}"}}'
        tool = ToolPlan(name, result)
    barge = wl.barge_in_s.sample(rng) if rng.random() < wl.barge_in else None
    return TurnPlan(
        user_text=user,
        think_s=wl.think_s.sample(rng),
        partials=partials,
        max_tokens=wl.reply_tokens.sample(rng),
        barge_in_s=barge,
        tool=tool,
    )


def session_plan(index: int, wl: VoiceWorkload) -> SessionPlan:
    """Session ``index`` of the seeded population: the same for every level, target and run."""
    rng = _rng(wl.seed, "session", index)
    persona = rng.choice(sorted(PERSONAS))
    header = (
        f"\n\nThe person you are talking to is {rng.choice(_NAMES)}. "
        f"The conversation started at {rng.randint(7, 21)}:{rng.randint(0, 59):02d}."
    )
    system = persona_prompt(wl.seed, persona, wl.persona_chars) + header
    offset = rng.randrange(len(PERSONAS[persona][1]))
    n = wl.turns.sample(rng)
    turns = tuple(_turn(rng, persona, offset + k, wl) for k in range(n))
    return SessionPlan(index, persona, system, turns)


def joined_at(plan: SessionPlan, start: int) -> SessionPlan:
    """The session from turn ``start`` on, the earlier exchanges from the script as history."""
    script = PERSONAS[plan.persona][1]
    history: list[Message] = []
    for turn in plan.turns[:start]:
        reply = next(
            (a for u, a in script if turn.user_text.lower().endswith(u.lower())), script[0][1]
        )
        history += [
            {"role": "user", "content": turn.user_text},
            {"role": "assistant", "content": reply},
        ]
    return replace(plan, turns=plan.turns[start:], history=tuple(history))


def nominal_turn_s(turn: TurnPlan, speech_s_per_token: float) -> float:
    """How long a turn lasts on an idle server: the user's speech, the speculative requests'
    lives, and the reply spoken (or cut)."""
    speech = turn.max_tokens * speech_s_per_token
    if turn.barge_in_s is not None:
        speech = min(speech, turn.barge_in_s)
    return turn.think_s + sum(d for _, d in turn.partials) + speech


def nominal_session_s(plan: SessionPlan, speech_s_per_token: float) -> float:
    return sum(nominal_turn_s(t, speech_s_per_token) for t in plan.turns)


def mean_session_s(wl: VoiceWorkload, speech_s_per_token: float, sample: int = 400) -> float:
    """The mean nominal session length over the first ``sample`` sessions of the population."""
    total = sum(nominal_session_s(session_plan(i, wl), speech_s_per_token) for i in range(sample))
    return total / sample


def schedule(
    offered: int,
    wl: VoiceWorkload,
    duration_s: float,
    *,
    speech_s_per_token: float,
    arrival: str = "poisson",
) -> list[Arrival]:
    """The sessions of one level: ``offered`` under way at t=0, then new ones at
    ``offered / mean session length`` per second until ``duration_s``; sorted by time.

    ``speech_s_per_token``: seconds of speech one reply token makes (characters per token over
    the speech rate), which sets how long a session lasts and so the arrival rate.
    """
    if offered < 1:
        raise ValueError(f"offered sessions must be at least 1, got {offered}")
    if arrival not in ("poisson", "fixed"):
        raise ValueError(f"arrival must be poisson or fixed, not {arrival!r}")
    mean_s = mean_session_s(wl, speech_s_per_token)
    rate = offered / mean_s
    rng = _rng(wl.seed, "arrivals", offered, arrival)
    out: list[Arrival] = []
    index = 0
    # Sessions under way: picked in proportion to their length (a long session is more likely
    # to be in progress at a given moment), joined at a uniformly drawn turn, and their first
    # turn spread over one mean turn length.
    mean_turn_s = mean_s / max(1.0, (wl.turns.lo + wl.turns.hi) / 2)
    while len(out) < offered:
        plan = session_plan(index, wl)
        index += 1
        if rng.random() * wl.turns.hi > len(plan.turns):
            continue
        start = rng.randrange(len(plan.turns))
        out.append(Arrival(rng.uniform(0, mean_turn_s), joined_at(plan, start), True))
    t = 0.0
    while True:
        t += rng.expovariate(rate) if arrival == "poisson" else 1.0 / rate
        if t >= duration_s:
            break
        out.append(Arrival(t, session_plan(index, wl), False))
        index += 1
    out.sort(key=lambda a: (a.at_s, a.plan.index))
    return out


def fit_history(
    system: str, history: list[Message], max_chars: int, extra_chars: int = 0
) -> list[Message]:
    """The history with its oldest exchanges dropped until system, history and ``extra_chars``
    (the next user message, the tools' JSON) fit in ``max_chars`` characters; the most recent
    exchange always stays."""

    def size(msgs: list[Message]) -> int:
        return sum(
            len(str(m.get("content") or "")) + len(str(m.get("tool_calls") or "")) for m in msgs
        )

    out = list(history)
    budget = max_chars - len(system) - extra_chars
    while out and size(out) > budget:
        # Drop the oldest user message and everything up to the next one (its reply, tools).
        nxt = next((i for i, m in enumerate(out[1:], 1) if m["role"] == "user"), len(out))
        if nxt >= len(out):
            break
        out = out[nxt:]
    return out
