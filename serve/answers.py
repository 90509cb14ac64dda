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

from serve.choices import Choices
from serve.engine.base import (
    Adapter,
    ChatTurn,
    ChoiceDelta,
    Delta,
    SamplingOptions,
    ToolCallDelta,
)
from serve.errors import aborted, to_api_error
from serve.logprobs import CompletionLogprobs, chat_content, prompt_logprobs
from serve.request_record import RequestRecord
from serve.streaming import DONE_FRAME, ChunkFormat, error_frame, usage_dict


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
    ttft_budget: float | None = None  # seconds, from x-slo-ttft-ms (None: the server default)
    # Several answers, or more than text in them (serve.choices); None: the plain path.
    choices: Choices | None = None


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


# -- detailed answers (serve.choices): several choices, logprobs, echo, usage per chunk -------


class _Choice:
    """One choice of a detailed answer, as it grows."""

    __slots__ = ("chat_logprobs", "finish_reason", "index", "logprobs", "started", "text")

    def __init__(self, index: int, spec: Choices, chat: bool) -> None:
        self.index = index
        self.started = False
        self.text: list[str] = []
        self.chat_logprobs: list[dict[str, Any]] = []
        self.logprobs = (
            CompletionLogprobs(spec.logprobs) if spec.logprobs is not None and not chat else None
        )
        self.finish_reason: str | None = None

    def opening(self, spec: Choices, delta: ChoiceDelta) -> str:
        """The text before the choice's first tokens: the echoed prompt (and its logprobs)."""
        self.started = True
        if spec.echo is None:
            return ""
        prompt = spec.echo[self.index // spec.n]
        if self.logprobs is not None and delta.prompt_logprobs is not None:
            first = spec.echo_first[self.index // spec.n]
            for pos in delta.prompt_logprobs:
                self.logprobs.add(pos, first)
            self.logprobs.offset = len(prompt)
        return prompt

    def add_logprobs(self, spec: Choices, delta: ChoiceDelta) -> None:
        if spec.logprobs is None or not delta.logprobs:
            return
        if self.logprobs is not None:
            for pos in delta.logprobs:
                self.logprobs.add(pos)
        else:
            self.chat_logprobs.extend(chat_content(delta.logprobs, spec.logprobs))

    def take_logprobs(self, spec: Choices) -> dict[str, Any] | None:
        if spec.logprobs is None:
            return None
        if self.logprobs is not None:
            return self.logprobs.take()
        content, self.chat_logprobs = self.chat_logprobs, []
        return {"content": content}


@dataclass(slots=True)
class _Tally:
    """What the choices of one answer add up to, streamed or collected: each prompt's tokens
    (counted once, by the engine, per prompt), the cached ones, and the choices still open."""

    left: int
    prompt_tokens: int = 0
    cached: int | None = None

    def add(self, delta: ChoiceDelta) -> None:
        if delta.finish_reason == "abort":
            raise aborted()
        if delta.num_prompt_tokens is not None:
            self.prompt_tokens += delta.num_prompt_tokens
        if delta.num_cached_tokens is not None:
            self.cached = (self.cached or 0) + delta.num_cached_tokens

    def ended(self) -> bool:
        """One choice has finished: were all?"""
        self.left -= 1
        return not self.left


async def choice_frames(
    p: Prepared, delta: Delta, stream: AsyncGenerator[Delta, None], record: RequestRecord
) -> AsyncGenerator[bytes, None]:
    """Frames of a detailed answer: each frame one choice's new text, with its ``index``, its
    tokens' logprobs, and the usage so far with ``continuous_usage_stats``."""
    spec = p.choices
    assert spec is not None
    fmt = p.format
    chosen = [_Choice(i, spec, fmt.chat) for i in range(spec.total)]
    clock = time.perf_counter
    tally = _Tally(spec.total)
    try:
        while True:
            assert isinstance(delta, ChoiceDelta)
            reason = delta.finish_reason
            tally.add(delta)
            choice = chosen[delta.index]
            first = not choice.started
            text = choice.opening(spec, delta) + delta.text if first else delta.text
            choice.add_logprobs(spec, delta)
            usage = None
            if spec.continuous_usage:
                usage = usage_dict(tally.prompt_tokens, record.output_tokens + delta.num_tokens)
            yield fmt.choice_frame(
                _frame_choice(fmt.chat, choice, text, first, spec, reason), usage
            )
            record.on_text(delta.text, delta.num_tokens, clock())
            if reason is not None:
                record.finish_reason = reason
                if tally.ended():
                    break
            delta = await anext(stream)
    except Exception as exc:  # cancellation (a BaseException) passes through
        record.finish_reason = "error"
        yield error_frame(to_api_error(exc))
        yield DONE_FRAME
        return
    record.prompt_tokens = tally.prompt_tokens
    if p.include_usage:
        yield fmt.usage_frame(tally.prompt_tokens, record.output_tokens, tally.cached)
    yield DONE_FRAME


def _frame_choice(
    chat: bool, choice: _Choice, text: str, first: bool, spec: Choices, reason: str | None
) -> dict[str, Any]:
    out: dict[str, Any] = {"index": choice.index}
    if chat:
        out["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
    else:
        out["text"] = text
    out["logprobs"] = choice.take_logprobs(spec)
    out["finish_reason"] = reason
    return out


async def collect_choices(
    p: Prepared, delta: Delta, stream: AsyncGenerator[Delta, None], record: RequestRecord
) -> bytes:
    spec = p.choices
    assert spec is not None
    fmt = p.format
    chosen = [_Choice(i, spec, fmt.chat) for i in range(spec.total)]
    clock = time.perf_counter
    tally = _Tally(spec.total)
    prompts: list[Any] = [None] * len(spec.prompts)  # each prompt's prompt_logprobs
    while True:
        assert isinstance(delta, ChoiceDelta)
        tally.add(delta)
        if delta.prompt_logprobs is not None:
            prompts[delta.index // spec.n] = prompt_logprobs(delta.prompt_logprobs)
        choice = chosen[delta.index]
        if not choice.started:
            choice.text.append(choice.opening(spec, delta))
        choice.text.append(delta.text)
        choice.add_logprobs(spec, delta)
        record.on_text(delta.text, delta.num_tokens, clock())
        if delta.finish_reason is not None:
            choice.finish_reason = record.finish_reason = delta.finish_reason
            if tally.ended():
                break
        delta = await anext(stream)
    record.prompt_tokens = tally.prompt_tokens
    bodies: list[dict[str, Any]] = []
    for choice in chosen:
        text = "".join(choice.text)
        body: dict[str, Any] = {"index": choice.index}
        if fmt.chat:
            body["message"] = {"role": "assistant", "content": text}
        else:
            body["text"] = text
        body["logprobs"] = choice.take_logprobs(spec)
        body["finish_reason"] = choice.finish_reason
        if spec.prompt_logprobs and not fmt.chat:
            body["prompt_logprobs"] = prompts[choice.index // spec.n]
        bodies.append(body)
    extra = {"prompt_logprobs": prompts[0]} if spec.prompt_logprobs and fmt.chat else None
    usage = usage_dict(tally.prompt_tokens, record.output_tokens, tally.cached)
    return fmt.choices_body(bodies, usage, extra)
