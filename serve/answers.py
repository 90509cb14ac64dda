"""Writing one answer: SSE frames of a stream, or one JSON body, from the engine's deltas.

``GenerationService.respond`` picks one of four: a plain answer is streamed by ``plain_frames``
(its per-token work kept to a few assignments) or collected by ``collect_plain``; a chat answer
the engine parses (tools to call, a reasoning parser) by ``parsed_frames`` or ``collect_parsed``,
where thoughts and tool calls get frames of their own and only spoken content counts for time
to first token and first sentence. Each writes the request's ``RequestRecord`` as it goes.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from serve.engine.base import Adapter, ChatTurn, Delta, SamplingOptions, ToolCallDelta
from serve.errors import aborted, to_api_error
from serve.streaming import DONE_FRAME, ChunkFormat, error_frame
from serve.telemetry import RequestRecord


@dataclass(slots=True)
class Prepared:
    request_id: str
    prompt_ids: list[int]
    options: SamplingOptions
    stream: bool
    include_usage: bool
    format: ChunkFormat
    turn: ChatTurn | None = None  # chat only
    adapter: Adapter | None = None  # the persona answering; None for the base model
    reasoning: bool = False  # the engine has a reasoning parser (the answer carries thoughts)
    parsed: bool = False  # the engine splits the answer into text, reasoning and tool calls
    priority: int = 0  # vLLM's: lower is served earlier (with --scheduling-policy priority)


async def plain_frames(
    p: Prepared, delta: Delta, stream: AsyncGenerator[Delta, None], record: RequestRecord
) -> AsyncGenerator[bytes, None]:
    frame = p.format.frame
    on_text = record.on_text
    clock = time.perf_counter
    first = True
    cached = delta.num_cached_tokens
    try:
        while True:
            reason = delta.finish_reason
            if reason == "abort":
                raise aborted()
            if delta.text or reason is not None:
                yield frame(delta.text, first, reason)
                # After the yield the frame has been handed to the socket: that is the
                # moment the user-facing clock records.
                on_text(delta.text, delta.num_tokens, clock())
                first = False
            else:
                record.output_tokens += delta.num_tokens  # bytes of an unfinished character
            if reason is not None:
                record.finish_reason = reason
                break
            delta = await anext(stream)
    except Exception as exc:  # cancellation (a BaseException) passes through
        record.finish_reason = "error"
        yield error_frame(to_api_error(exc))
        yield DONE_FRAME
        return
    if p.include_usage:
        yield p.format.usage_frame(record.prompt_tokens, record.output_tokens, cached)
    yield DONE_FRAME


async def collect_plain(
    p: Prepared, delta: Delta, stream: AsyncGenerator[Delta, None], record: RequestRecord
) -> bytes:
    parts: list[str] = []
    clock = time.perf_counter
    cached = delta.num_cached_tokens
    while True:
        record.on_text(delta.text, delta.num_tokens, clock())
        parts.append(delta.text)
        if delta.finish_reason is not None:
            break
        delta = await anext(stream)
    if delta.finish_reason == "abort":
        raise aborted()
    record.finish_reason = delta.finish_reason
    return p.format.completion_body(
        "".join(parts), delta.finish_reason, record.prompt_tokens, record.output_tokens, cached
    )


async def parsed_frames(
    p: Prepared, delta: Delta, stream: AsyncGenerator[Delta, None], record: RequestRecord
) -> AsyncGenerator[bytes, None]:
    """Frames of a parsed answer, each kind of its own (some clients read one field per
    chunk): thoughts as ``reasoning``, spoken text as ``content``, each tool-call
    fragment alone; the finish reason in a last frame with an empty delta."""
    fmt = p.format
    clock = time.perf_counter
    first = True
    cached = delta.num_cached_tokens
    include_reasoning = p.turn is None or p.turn.include_reasoning
    try:
        while True:
            reason = delta.finish_reason
            if reason == "abort":
                raise aborted()
            if delta.reasoning:
                if include_reasoning:
                    yield fmt.reasoning_frame(delta.reasoning, first)
                    first = False
                # Thinking time is the operator's to see; it is never time to first token.
                record.on_reasoning(0 if delta.text else delta.num_tokens, clock())
            if delta.text:
                yield fmt.frame(delta.text, first)
                record.on_text(delta.text, delta.num_tokens, clock())
                first = False
            elif not delta.reasoning:
                # Tool calls are not spoken: they count as tokens only.
                record.output_tokens += delta.num_tokens
            for call in delta.tool_calls:
                yield fmt.tool_call_frame(call, first)
                first = False
            if reason is not None:
                yield fmt.frame("", True, reason) if first else fmt.finish_frame(reason)
                record.finish_reason = reason
                record.reasoning_tokens = delta.num_reasoning_tokens
                break
            delta = await anext(stream)
    except Exception as exc:  # cancellation (a BaseException) passes through
        record.finish_reason = "error"
        yield error_frame(to_api_error(exc))
        yield DONE_FRAME
        return
    if p.include_usage:
        yield fmt.usage_frame(
            record.prompt_tokens, record.output_tokens, cached, delta.num_reasoning_tokens
        )
    yield DONE_FRAME


async def collect_parsed(
    p: Prepared, delta: Delta, stream: AsyncGenerator[Delta, None], record: RequestRecord
) -> bytes:
    text: list[str] = []
    reasoning: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    clock = time.perf_counter
    cached = delta.num_cached_tokens
    while True:
        if delta.reasoning:
            record.on_reasoning(0 if delta.text else delta.num_tokens, clock())
            reasoning.append(delta.reasoning)
        if delta.text:
            record.on_text(delta.text, delta.num_tokens, clock())
            text.append(delta.text)
        elif not delta.reasoning:
            record.output_tokens += delta.num_tokens
        for call in delta.tool_calls:
            _merge_call(calls, call)
        if delta.finish_reason is not None:
            break
        delta = await anext(stream)
    if delta.finish_reason == "abort":
        raise aborted()
    record.finish_reason = delta.finish_reason
    record.reasoning_tokens = delta.num_reasoning_tokens
    include_reasoning = p.turn is None or p.turn.include_reasoning
    return p.format.chat_body(
        "".join(text),
        "".join(reasoning) if p.reasoning and include_reasoning else None,
        [calls[i] for i in sorted(calls)],
        delta.finish_reason,
        record.prompt_tokens,
        record.output_tokens,
        cached,
        delta.num_reasoning_tokens,
    )


def _merge_call(calls: dict[int, dict[str, Any]], call: ToolCallDelta) -> None:
    """Accumulate a streamed tool-call fragment into the whole call, as clients do."""
    whole = calls.setdefault(
        call.index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
    )
    if call.id is not None:
        whole["id"] = call.id
    if call.name:
        whole["function"]["name"] += call.name
    whole["function"]["arguments"] += call.arguments
