"""Log-probabilities on the wire, in the shapes of vLLM's OpenAI server (itself OpenAI's).

The engine reports each position as ``TokenLogprobs`` (the token there and its candidates, in
the engine's order: the chosen token first, then by rank); these functions write them as

- chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``, the first
  ``top_logprobs`` candidates of each position (vLLM's ``_create_chat_logprobs``);
- completions: ``{"text_offset", "token_logprobs", "tokens", "top_logprobs"}``, the first
  ``logprobs + 1`` candidates of each position (vLLM's ``_create_completion_logprobs``);
- ``prompt_logprobs`` (vLLM's field): ``[null, {"<id>": {"logprob", "rank", "decoded_token"}}]``.

A log-probability of minus infinity is written as -9999.0, as vLLM and OpenAI write it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from serve.engine.base import LogprobEntry, TokenLogprobs

FLOOR = -9999.0


def _lp(value: float) -> float:
    return max(value, FLOOR)


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_content(positions: Sequence[TokenLogprobs], top: int) -> list[dict[str, Any]]:
    """Chat's ``logprobs.content`` entries of some generated tokens."""
    out: list[dict[str, Any]] = []
    for pos in positions:
        chosen = _chosen(pos)
        out.append(
            {
                "token": chosen.token,
                "logprob": _lp(chosen.logprob),
                "bytes": _bytes(chosen.token),
                "top_logprobs": [
                    {"token": e.token, "logprob": _lp(e.logprob), "bytes": _bytes(e.token)}
                    for e in pos.entries[:top]
                ],
            }
        )
    return out


class CompletionLogprobs:
    """Completions' four parallel lists, grown as tokens arrive; ``text_offset`` counts the
    characters of the choice's text before each token (the echoed prompt's included)."""

    __slots__ = ("offset", "text_offset", "token_logprobs", "tokens", "top", "top_logprobs")

    def __init__(self, top: int, offset: int = 0) -> None:
        self.top = top
        self.offset = offset
        self.text_offset: list[int] = []
        self.token_logprobs: list[float | None] = []
        self.tokens: list[str] = []
        self.top_logprobs: list[dict[str, float] | None] = []

    def add(self, pos: TokenLogprobs | None, text: str = "") -> None:
        """One position; ``None`` is the prompt's first token (no context, no logprob), whose
        ``text`` is given."""
        self.text_offset.append(self.offset)
        if pos is None:
            token = text
            self.token_logprobs.append(None)
            self.top_logprobs.append(None)
        else:
            token = _chosen(pos).token
            self.token_logprobs.append(_lp(_chosen(pos).logprob))
            self.top_logprobs.append({e.token: _lp(e.logprob) for e in pos.entries[: self.top + 1]})
        self.tokens.append(token)
        self.offset += len(token)

    def take(self) -> dict[str, Any]:
        """The lists so far, then empty ones (a stream sends each token once)."""
        out = {
            "text_offset": self.text_offset,
            "token_logprobs": self.token_logprobs,
            "tokens": self.tokens,
            "top_logprobs": self.top_logprobs,
        }
        self.text_offset, self.token_logprobs, self.tokens, self.top_logprobs = [], [], [], []
        return out


def prompt_logprobs(positions: Sequence[TokenLogprobs | None]) -> list[dict[str, Any] | None]:
    """vLLM's ``prompt_logprobs``: per prompt token, each candidate by id."""
    return [
        None
        if pos is None
        else {
            str(e.token_id): {"logprob": _lp(e.logprob), "rank": e.rank, "decoded_token": e.token}
            for e in pos.entries
        }
        for pos in positions
    ]


def _chosen(pos: TokenLogprobs) -> LogprobEntry:
    chosen = pos.chosen()
    if chosen is None:  # the engine always reports the chosen token; be safe regardless
        return LogprobEntry(pos.token_id, "", float("-inf"))
    return chosen
