"""Server-sent events: chunk templates and the response that writes them.

Per token the work is one ``orjson.dumps`` of the new text and one ``bytes.join`` into a template
built once per request; no model objects, no validation. Each frame goes to the socket the
moment it exists: no buffering, no compression.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from serve.engine.base import ToolCallDelta
from serve.errors import APIError, error_json

DONE_FRAME = b"data: [DONE]\n\n"
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    # Proxies (nginx, ingress controllers) must not buffer or cache the stream.
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_dumps = orjson.dumps


def usage_dict(
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int | None = None,
    reasoning_tokens: int | None = None,
) -> dict[str, Any]:
    """OpenAI's usage object; the details only where the engine reports them."""
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        # Prompt tokens the prefix cache served: agents resend the conversation every turn.
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    if reasoning_tokens is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return usage


class ChunkFormat:
    """Frame templates of one response (chat or text completion), built once per request."""

    def __init__(self, *, chat: bool, response_id: str, created: int, model: str) -> None:
        self.chat = chat
        self.response_id = response_id
        self.created = created
        self.model = model
        obj = b"chat.completion.chunk" if chat else b"text_completion"
        head = b"".join(
            (
                b'data: {"id":', _dumps(response_id), b',"object":"', obj,
                b'","created":', str(created).encode(), b',"model":', _dumps(model),
            )
        )  # fmt: skip
        if chat:
            choice = head + b',"choices":[{"index":0,"delta":{'
            self._first = choice + b'"role":"assistant","content":'
            self._next = choice + b'"content":'
            self._close = b'},"logprobs":null,"finish_reason":'
            # Parsed answers only (tools, reasoning): frames of thoughts, tool calls, the end.
            self._choice = choice
            self._role = b'"role":"assistant",'
        else:
            choice = head + b',"choices":[{"index":0,"text":'
            self._first = self._next = choice
            self._close = b',"logprobs":null,"finish_reason":'
        self._open_tail = self._close + b"null}]}\n\n"
        self._usage_head = head + b',"choices":[],"usage":'
        self._head = head

    def frame(self, text: str, first: bool, finish_reason: str | None = None) -> bytes:
        """One content frame; the finish reason rides on the last one."""
        start = self._first if first else self._next
        if finish_reason is None:
            return b"".join((start, _dumps(text), self._open_tail))
        return b"".join((start, _dumps(text), self._close, _dumps(finish_reason), b"}]}\n\n"))

    def reasoning_frame(self, text: str, first: bool) -> bytes:
        """Thoughts, never ``content``, never spoken: in ``reasoning`` (the field of the vLLM we
        pin) and again in ``reasoning_content`` (the older vLLM's and DeepSeek's, which clients
        written against them read)."""
        role = self._role if first else b""
        thoughts = _dumps(text)
        return b"".join(
            (
                self._choice, role, b'"reasoning":', thoughts, b',"reasoning_content":', thoughts,
                self._open_tail,
            )
        )  # fmt: skip

    def tool_call_frame(self, call: ToolCallDelta, first: bool) -> bytes:
        """One tool-call fragment in OpenAI's shape: a call opens with its index, id, type and
        name (arguments ""), then its arguments arrive in fragments of their own."""
        entry: dict[str, Any] = {"index": call.index}
        if call.id is not None or call.name is not None:
            entry["id"] = call.id
            entry["type"] = "function"
            entry["function"] = {"name": call.name, "arguments": call.arguments}
        else:
            entry["function"] = {"arguments": call.arguments}
        role = self._role + b'"content":null,' if first else b""
        return b"".join(
            (self._choice, role, b'"tool_calls":[', _dumps(entry), b"]", self._open_tail)
        )

    def finish_frame(self, finish_reason: str) -> bytes:
        """The last frame of a parsed answer: an empty delta with the finish reason."""
        return b"".join((self._choice, self._close, _dumps(finish_reason), b"}]}\n\n"))

    def usage_frame(
        self,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int | None = None,
        reasoning_tokens: int | None = None,
    ) -> bytes:
        usage = usage_dict(prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens)
        return b"".join((self._usage_head, _dumps(usage), b"}\n\n"))

    def completion_body(
        self,
        text: str,
        finish_reason: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int | None = None,
    ) -> bytes:
        """The whole non-streaming response."""
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            choice: dict[str, Any] = {"index": 0, "message": message}
        else:
            choice = {"index": 0, "text": text}
        choice["logprobs"] = None
        choice["finish_reason"] = finish_reason
        return self._body(choice, usage_dict(prompt_tokens, completion_tokens, cached_tokens))

    def chat_body(
        self,
        text: str,
        reasoning: str | None,
        tool_calls: list[dict[str, Any]],
        finish_reason: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int | None,
        reasoning_tokens: int | None,
    ) -> bytes:
        """The whole non-streaming response of a parsed answer: content is null when the answer
        is only tool calls, as OpenAI writes it."""
        message: dict[str, Any] = {
            "role": "assistant",
            "content": text if text or not tool_calls else None,
        }
        if reasoning is not None:
            # Both names, as in the frames: vLLM's current one and the older one.
            message["reasoning"] = message["reasoning_content"] = reasoning or None
        if tool_calls:
            message["tool_calls"] = tool_calls
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        usage = usage_dict(prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens)
        return self._body(choice, usage)

    def choice_frame(self, choice: dict[str, Any], usage: dict[str, Any] | None = None) -> bytes:
        """A frame of one choice of a detailed answer (``serve.choices``), built whole: such
        answers carry more than text per token, so the template's saving would be small."""
        tail = b"]}\n\n" if usage is None else b'],"usage":' + _dumps(usage) + b"}\n\n"
        return b"".join((self._head, b',"choices":[', _dumps(choice), tail))

    def choices_body(
        self,
        choices: list[dict[str, Any]],
        usage: dict[str, Any],
        extra: dict[str, Any] | None = None,
    ) -> bytes:
        """The whole non-streaming response of a detailed answer; ``extra``: top-level fields
        (vLLM's ``prompt_logprobs`` on chat)."""
        return self._body(choices, usage, extra)

    def _body(
        self,
        choice: dict[str, Any] | list[dict[str, Any]],
        usage: dict[str, Any],
        extra: dict[str, Any] | None = None,
    ) -> bytes:
        body = {
            "id": self.response_id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choice if isinstance(choice, list) else [choice],
            "usage": usage,
        }
        if extra:
            body.update(extra)
        return _dumps(body)


def error_frame(error: APIError) -> bytes:
    """An error inside a stream that has already begun: the OpenAI SDK raises it as APIError."""
    return b"".join((b"data: ", error_json(error), b"\n\n"))


class SSEResponse(Response):
    """An ASGI response that writes each frame as it comes, then always runs ``on_close``.

    ``on_close`` runs even if the body never started (the client left between the handler and
    the first write), which is where a generator's own ``finally`` would not run.
    """

    def __init__(
        self, frames: AsyncGenerator[bytes, None], on_close: Callable[[], Awaitable[None]]
    ) -> None:
        # A Response subclass so the framework passes it through untouched; the headers are
        # fixed, so the base class's header machinery is skipped.
        self.frames = frames
        self.on_close = on_close
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Start and end pass through every layer (they record status and completion); the
        # frames in between go straight to the server's send, set aside by the request guard.
        send_frame = scope.get("state", {}).get("server_send", send)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            async for frame in self.frames:
                await send_frame({"type": "http.response.body", "body": frame, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            # The server reports a write to a closed connection this way: the client left.
            scope.setdefault("state", {})["client_gone"] = True
        finally:
            await self.frames.aclose()
            await self.on_close()
