"""One streaming chat request as a voice agent sends it, read live so that it can be cut.

A request can be cut by the client in two ways, both by closing the connection as LiveKit and
Pipecat do (the server sees the client leave):
- ``cut_after_s``: a speculative request, cancelled that long after it was sent;
- ``barge_in_s``: the user cuts in that long after speech started (``voice_speech``): the
  stream is closed then if it is still open.

The SSE stream is parsed line by line as it arrives (both servers put each event on one
``data:`` line): content pieces with their arrival times, tool-call pieces, the final usage.
Every request, finished or cut, is kept in ``VoiceClient.log`` for the run's accounting.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from loadtest.payload import auth_headers
from loadtest.voice_speech import Speakable, SpeechConfig, TextEvent

REFUSAL_STATUSES = frozenset({429, 503})
SPECULATIVE, CONFIRMED, FOLLOWUP = "speculative", "confirmed", "followup"


@dataclass
class StreamResult:
    """What one request came to. Times are ``time.perf_counter()`` values."""

    kind: str
    sent: float
    max_tokens: int | None = None
    forced_call: bool = False  # the request forced a tool call
    status: int | None = None
    headers_at: float | None = None
    end: float = 0.0
    first_token: float | None = None  # first chunk carrying generated output of any kind
    events: list[TextEvent] = field(default_factory=list)  # content pieces
    token_chunks: int = 0  # chunks carrying generated output (content, tool call, reasoning)
    tool_calls: dict[int, dict[str, str]] = field(default_factory=dict)
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    done: bool = False  # saw [DONE]
    cancelled: bool = False  # the client closed the stream before its end
    speakable_at: float | None = None  # when the first speakable chunk was complete
    error: str | None = None
    error_code: str | None = None  # a refusal's or error's ``code``
    retry_after: str | None = None

    @property
    def refused(self) -> bool:
        return self.status in REFUSAL_STATUSES

    @property
    def text(self) -> str:
        return "".join(s for _, s in self.events)

    @property
    def completion_tokens(self) -> int | None:
        value = (self.usage or {}).get("completion_tokens")
        return None if value is None else int(value)

    @property
    def ok(self) -> bool:
        """A whole answer: 200, ended with [DONE], no error."""
        return self.status == 200 and self.done and self.error is None


def _piece(obj: dict[str, Any], res: StreamResult, t: float) -> str | None:
    """Take one decoded SSE event into ``res``; return its content text, if any."""
    if obj.get("error"):
        err = obj["error"]
        res.error = (
            res.error
            or f"stream error: {err.get('message', err) if isinstance(err, dict) else err}"
        )
        if isinstance(err, dict):
            res.error_code = err.get("code")
        return None
    if obj.get("usage"):
        res.usage = obj["usage"]
    choices = obj.get("choices")
    if not choices:
        return None
    if choices[0].get("finish_reason"):
        res.finish_reason = choices[0]["finish_reason"]
    delta = choices[0].get("delta") or {}
    content = delta.get("content")
    generated = False
    for call in delta.get("tool_calls") or ():
        slot = res.tool_calls.setdefault(
            int(call.get("index", 0)), {"id": "", "name": "", "arguments": ""}
        )
        if call.get("id"):
            slot["id"] = call["id"]
        fn = call.get("function") or {}
        if fn.get("name"):
            slot["name"] = fn["name"]
        slot["arguments"] += fn.get("arguments") or ""
        generated = True
    if delta.get("reasoning_content") or delta.get("reasoning"):
        generated = True
    if content is not None and not (content == "" and "role" in delta):
        generated = True
    if generated:
        res.token_chunks += 1
        if res.first_token is None:
            res.first_token = t
    return content or None


class VoiceClient:
    """Sends a session's requests; ``async with VoiceClient(...)`` holds the connection pool."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        ignore_eos: bool = True,
        speech: SpeechConfig | None = None,
        timeout_s: float = 600.0,
        stall_timeout_s: float = 60.0,
        priority: tuple[int, int] | None = None,
        slo_ttft_ms: float | None = None,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.ignore_eos = ignore_eos
        self.speech = speech or SpeechConfig()
        self.priority = priority  # (confirmed and follow-up, speculative): vLLM's body field
        self.headers = auth_headers(api_key)
        if slo_ttft_ms is not None:
            self.headers["x-slo-ttft-ms"] = f"{slo_ttft_ms:.0f}"
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_read=stall_timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self.log: list[StreamResult] = []

    async def __aenter__(self) -> VoiceClient:
        # No connection cap: the sessions decide concurrency; the pool must never queue.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=self._timeout
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def body(
        self,
        kind: str,
        messages: list[dict[str, Any]],
        max_tokens: int,
        tools: list[dict[str, Any]] | None,
        tool_choice: Any,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        forced = tool_choice not in (None, "none", "auto")
        if self.ignore_eos and not forced:
            # Not on a forced call: its grammar ends the JSON with EOS, which must stop it.
            body["ignore_eos"] = True
        if tools:
            body["tools"] = tools
            body["tool_choice"] = tool_choice or "none"
        if self.priority is not None:
            body["priority"] = self.priority[1] if kind == SPECULATIVE else self.priority[0]
        return body

    async def stream(
        self,
        kind: str,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: Any = None,
        cut_after_s: float | None = None,
        barge_in_s: float | None = None,
    ) -> StreamResult:
        assert self._session is not None, "use 'async with VoiceClient(...)'"
        data = json.dumps(self.body(kind, messages, max_tokens, tools, tool_choice)).encode()
        clock = time.perf_counter
        loop = asyncio.get_running_loop()
        forced = tool_choice not in (None, "none", "auto")
        res = StreamResult(kind, clock(), max_tokens, forced)
        self.log.append(res)
        speakable = Speakable(self.speech)
        resp: aiohttp.ClientResponse | None = None
        cm = asyncio.timeout_at(None if cut_after_s is None else loop.time() + cut_after_s)
        try:
            async with cm, self._session.post(self.url, data=data, headers=self.headers) as resp:
                res.status = resp.status
                res.headers_at = clock()
                if resp.status != 200:
                    self._refusal(res, resp, await resp.read())
                    return res
                async for raw in resp.content:
                    t = clock()
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        res.done = True
                        continue
                    try:
                        obj = json.loads(payload)
                    except ValueError:
                        res.error = res.error or f"bad SSE JSON: {payload[:120]!r}"
                        continue
                    if not isinstance(obj, dict) or (piece := _piece(obj, res, t)) is None:
                        continue
                    res.events.append((t, piece))
                    if res.speakable_at is None and speakable.feed(piece):
                        res.speakable_at = t
                        if barge_in_s is not None:
                            cm.reschedule(loop.time() + barge_in_s)
        except TimeoutError:
            if cm.expired():
                res.cancelled = True
                if resp is not None:
                    resp.close()
            else:
                res.error = "TimeoutError: no data in time"
        except asyncio.CancelledError:
            res.cancelled, res.error = True, "cancelled: the level's drain time ran out"
            raise
        except (aiohttp.ClientError, OSError) as exc:
            res.error = f"{type(exc).__name__}: {exc}"
        finally:
            res.end = clock()
        if res.status == 200 and not res.done and not res.cancelled and res.error is None:
            res.error = "stream ended without [DONE]"
        return res

    @staticmethod
    def _refusal(res: StreamResult, resp: aiohttp.ClientResponse, data: bytes) -> None:
        res.retry_after = resp.headers.get("Retry-After")
        try:
            err = json.loads(data).get("error") or {}
            res.error_code = err.get("code") if isinstance(err, dict) else None
            message = err.get("message") if isinstance(err, dict) else err
        except (ValueError, AttributeError):
            message = data[:200].decode(errors="replace")
        res.error = f"HTTP {resp.status}: {str(message)[:200]}"
