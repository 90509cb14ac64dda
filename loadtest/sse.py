"""Parse an OpenAI chat-completions SSE stream into token events, usage and errors.

Parsing runs after the stream has ended, over ``(timestamp, raw line)`` pairs recorded while it
arrived, so that JSON decoding never delays the reading of the next chunk.

Which chunks count as tokens: a chunk whose ``choices[0].delta`` has a ``content`` key. Two
exceptions are skipped because they carry no generated token: a role-only announcement
(``{"role": "assistant", "content": ""}``, which some servers send before the engine has
produced anything) and a chunk with no ``content`` at all (e.g. OpenAI's ``delta: {}`` finish
chunk). Empty-string content otherwise stays a token: vLLM emits ``""`` for a token whose bytes
do not yet form a whole UTF-8 character, and that token did take a decode step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from loadtest.records import RequestRecord, TokenEvent, build_record

RawLine = tuple[float, bytes]


@dataclass
class ParsedStream:
    events: list[TokenEvent] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    error: str | None = None
    done: bool = False  # saw "data: [DONE]"


def _handle_payload(t: float, payload: bytes, out: ParsedStream) -> None:
    if payload == b"[DONE]":
        out.done = True
        return
    try:
        obj = json.loads(payload)
    except ValueError:
        out.error = out.error or f"bad SSE JSON: {payload[:120]!r}"
        return
    if not isinstance(obj, dict):
        return
    if obj.get("error"):
        err = obj["error"]
        msg = err.get("message", err) if isinstance(err, dict) else err
        out.error = out.error or f"stream error: {msg}"
        return
    if obj.get("usage"):
        out.usage = obj["usage"]
    choices = obj.get("choices")
    if not choices:
        return
    delta = choices[0].get("delta") or {}
    content = delta.get("content")
    if content is None:
        return
    if content == "" and "role" in delta:
        return
    out.events.append((t, content))


def parse_sse(lines: list[RawLine]) -> ParsedStream:
    """Parse raw SSE lines (with their arrival times) into a ``ParsedStream``.

    Handles ``data:`` with or without the space, comments (``:``), other fields (``event:``,
    ``id:``), CRLF endings and events spread over several ``data:`` lines (joined with newlines,
    stamped with the arrival time of their first line).
    """
    out = ParsedStream()
    pending: list[bytes] = []
    pending_t = 0.0
    for t, raw in lines:
        line = raw.rstrip(b"\r\n")
        if not line:
            if pending:
                _handle_payload(pending_t, b"\n".join(pending), out)
                pending = []
            continue
        if line.startswith(b":"):
            continue
        name, _, value = line.partition(b":")
        if name != b"data":
            continue
        if value.startswith(b" "):
            value = value[1:]
        if not pending:
            pending_t = t
        pending.append(value)
    if pending:
        _handle_payload(pending_t, b"\n".join(pending), out)
    return out


def record_from_sse(index: int, start: float, end: float, lines: list[RawLine]) -> RequestRecord:
    parsed = parse_sse(lines)
    usage = parsed.usage or {}
    error = parsed.error
    if error is None and not parsed.done and parsed.events:
        # A stream cut before [DONE] is a failure even when some tokens arrived.
        error = "stream ended without [DONE]"
    return build_record(
        index,
        start,
        end,
        parsed.events,
        output_tokens=usage.get("completion_tokens"),
        prompt_tokens=usage.get("prompt_tokens"),
        error=error,
    )
