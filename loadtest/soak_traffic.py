"""The soak's traffic: one request of a given kind, and what came of it (an ``Outcome``).

Kinds:
- ``chat_stream``, ``chat``, ``completion_stream``, ``completion``: ordinary requests from the
  seeded avatar workload; 200 or, past the server's queue, 429.
- ``cut_before_first_token``, ``cut_mid_stream``, ``cut_non_stream``: the client closes the
  connection before the first token, after a few chunks of a stream, or while a non-streaming
  answer is being made. A cut request has no status; one that finished before its cut is judged
  like an ordinary request.
- ``burst``: short streaming chats sent all at once, many more than the server admits or queues.
- ``hostile_<case>`` (``soak_hostile``): must get that case's 4xx with OpenAI's error body.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from loadtest.payload import auth_headers, chat_payload
from loadtest.soak_hostile import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    HostileCase,
    has_error_shape,
    headers_for,
    hostile_cases,
)
from loadtest.sse import parse_sse
from loadtest.workload import ChatRequest

NORMAL_EXPECTED = frozenset({200, 429})
DONE_LINE = b"data: [DONE]"
# Relative weights of the kinds a worker picks; the hostile share is spread over the cases.
KIND_WEIGHTS = {
    "chat_stream": 30,
    "chat": 12,
    "completion_stream": 8,
    "completion": 6,
    "cut_before_first_token": 5,
    "cut_mid_stream": 6,
    "cut_non_stream": 5,
}
HOSTILE_WEIGHT = 28
BURST_KIND = "burst"
STREAM_KINDS = frozenset(
    {"chat_stream", "completion_stream", "cut_before_first_token", "cut_mid_stream", BURST_KIND}
)
HOSTILE_PREFIX = "hostile_"
_EXCERPT = 300


@dataclass(slots=True)
class Outcome:
    """What one request came to. ``status`` is None when the client cut it or no answer came."""

    kind: str
    t: float  # seconds since the soak started, when the request was sent
    expected: frozenset[int]
    status: int | None = None
    cut: bool = False  # the client closed the connection on purpose
    stream: bool = False
    done: bool | None = None  # a stream's last event was `data: [DONE]`
    bad_body: str | None = None  # an error body not of OpenAI's shape, or an in-stream error
    error: str | None = None  # the client's own failure: timeout, reset connection
    request: str = ""  # the request, kept only for outcomes that are reported
    response: str = ""

    @property
    def status_key(self) -> str:
        """The column of the statuses-by-kind table this outcome counts in."""
        if self.cut:
            return "cut"
        if self.status is None:
            return f"error:{(self.error or 'unknown').split(':')[0]}"
        return f"{self.status}+bad_body" if self.bad_body else str(self.status)

    @property
    def unexpected(self) -> bool:
        if self.cut:
            return False
        return self.status not in self.expected or self.bad_body is not None

    @property
    def missing_done(self) -> bool:
        """A stream that its client did not cut, answered 200, and did not end with [DONE]."""
        return self.stream and not self.cut and self.status == 200 and not self.done


def ends_with_done(lines: Sequence[bytes]) -> bool:
    """True when the last non-blank line of an SSE body is ``data: [DONE]``."""
    for raw in reversed(lines):
        line = raw.strip()
        if line:
            return line in (DONE_LINE, b"data:[DONE]")
    return False


class SoakClient:
    """Sends one request of any kind; ``async with SoakClient(...)`` holds its connections.

    Requests share a keep-alive pool, as one busy client would; a burst's requests each get a
    connection of their own, closed after the answer, as many distinct clients would.
    """

    def __init__(
        self,
        root_url: str,
        model: str,
        workload: Sequence[ChatRequest],
        *,
        api_key: str | None,
        ignore_eos: bool,
        t0: float,
        timeout_s: float = 120.0,
        stall_timeout_s: float = 60.0,
    ) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_read=stall_timeout_s)
        self._sessions: dict[bool, aiohttp.ClientSession] = {}
        self.root = root_url
        self.model = model
        self.api_key = api_key
        self.ignore_eos = ignore_eos
        self.t0 = t0
        self.hostile = {HOSTILE_PREFIX + c.name: c for c in hostile_cases(model, api_key)}
        self.workload = list(workload)
        self.kinds = [*KIND_WEIGHTS, *self.hostile]
        share = HOSTILE_WEIGHT / max(1, len(self.hostile))
        self.weights = [*KIND_WEIGHTS.values(), *(share for _ in self.hostile)]

    async def __aenter__(self) -> SoakClient:
        for burst in (False, True):
            # No connection cap: the workers and the bursts decide concurrency.
            connector = aiohttp.TCPConnector(limit=0, force_close=burst)
            self._sessions[burst] = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for session in self._sessions.values():
            await session.close()

    def pick(self, rng: random.Random) -> str:
        return rng.choices(self.kinds, self.weights)[0]

    async def send(self, kind: str, rng: random.Random) -> Outcome:
        """Send one request of ``kind``; random choices (cut points, variants) come from ``rng``."""
        if kind in self.hostile:
            return await self._hostile(kind, self.hostile[kind], rng)
        req = rng.choice(self.workload)  # from the worker's own rng: its sequence is seeded
        stream = kind in STREAM_KINDS
        max_tokens = 4 if kind == BURST_KIND else req.max_tokens
        if kind == "cut_mid_stream":
            max_tokens = max(max_tokens, 16)
        body = chat_payload(
            self.model, req, ignore_eos=self.ignore_eos, extra={"max_tokens": max_tokens}
        )
        path = CHAT_PATH
        if kind.startswith("completion"):
            path = COMPLETIONS_PATH
            del body["messages"]
            body["prompt"] = req.messages[-1]["content"]
        if not stream:
            body["stream"] = False
            del body["stream_options"]
        cut_s = cut_events = None
        if kind == "cut_before_first_token":
            cut_s, cut_events = rng.uniform(0.005, 0.1), 0  # else close on the headers
        elif kind == "cut_mid_stream":
            cut_events = rng.randint(1, max_tokens // 2)
        elif kind == "cut_non_stream":
            cut_s = rng.uniform(0.02, 1.0)
        out = Outcome(kind, self._now(), NORMAL_EXPECTED, stream=stream)
        await self._exchange(
            out, path, json.dumps(body).encode(), auth_headers(self.api_key), cut_s, cut_events
        )
        return out

    async def burst(self, size: int, rng: random.Random) -> list[Outcome]:
        """``size`` short streaming chats sent at the same moment."""
        return list(await asyncio.gather(*(self.send(BURST_KIND, rng) for _ in range(size))))

    async def _hostile(self, kind: str, case: HostileCase, rng: random.Random) -> Outcome:
        v = case.pick(rng)
        out = Outcome(kind, self._now(), frozenset({case.expected}))
        headers = headers_for(v.header_mode, self.api_key, v.content_type)
        await self._exchange(out, v.path, v.body, headers)
        if out.unexpected:
            out.request += f" [{v.header_mode} auth, Content-Type: {v.content_type}]"
        return out

    def _now(self) -> float:
        return time.monotonic() - self.t0

    async def _exchange(
        self,
        out: Outcome,
        path: str,
        body: bytes,
        headers: dict[str, str],
        cut_after_s: float | None = None,
        cut_after_events: int | None = None,
    ) -> None:
        """POST and fill ``out``; cut the connection after ``cut_after_s`` seconds or after
        ``cut_after_events`` SSE data lines (0: as soon as a 200's headers arrive)."""
        lines: list[bytes] = []
        try:
            async with asyncio.timeout(cut_after_s) as deadline:
                session = self._sessions[out.kind == BURST_KIND]
                async with session.post(self.root + path, data=body, headers=headers) as resp:
                    out.status = resp.status
                    if resp.status != 200 or not out.stream:
                        self._check_body(out, await resp.read())
                    else:
                        await self._read_stream(out, resp, lines, cut_after_events)
        except TimeoutError:
            if deadline.expired():
                out.cut, out.status = True, None
            else:
                out.status, out.error = None, "TimeoutError: no answer in time"
        except (aiohttp.ClientError, OSError) as exc:
            out.status, out.error = None, f"{type(exc).__name__}: {exc}"
        if out.unexpected or out.missing_done:
            out.request = f"POST {path} {body[:_EXCERPT]!r}"
            if lines and not out.response:
                out.response = repr(b"".join(lines)[-_EXCERPT:])

    @staticmethod
    def _check_body(out: Outcome, data: bytes) -> None:
        if out.status == 200:
            try:
                ok = bool(json.loads(data).get("choices"))
            except (ValueError, AttributeError):
                ok = False
            if not ok:
                out.bad_body = "200 answer without choices"
        elif not has_error_shape(data):
            out.bad_body = "error body not of OpenAI's shape"
        if out.bad_body or out.status not in out.expected:
            out.response = repr(data[:_EXCERPT])

    @staticmethod
    async def _read_stream(
        out: Outcome,
        resp: aiohttp.ClientResponse,
        lines: list[bytes],
        cut_after_events: int | None,
    ) -> None:
        if cut_after_events == 0:
            out.cut, out.status = True, None
            resp.close()
            return
        events = 0
        async for line in resp.content:
            lines.append(line)
            if cut_after_events is not None and line.startswith(b"data:"):
                events += 1
                if events >= cut_after_events and line.strip() != DONE_LINE:
                    out.cut, out.status = True, None
                    resp.close()  # closes the connection: the server sees the client leave
                    return
        out.done = ends_with_done(lines)
        parsed = parse_sse([(0.0, line) for line in lines])
        if parsed.error:
            out.bad_body = parsed.error[:_EXCERPT]
