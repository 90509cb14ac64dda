"""The request guard: one pure-ASGI middleware around every request.

For every request it stamps the arrival time (the clock TTFT is measured from), assigns the
request id (an incoming ``X-Request-Id`` is honoured, returned in a header and used as the engine
request id) and writes one structured access-log line.

For the generation routes it also
- checks the API key before it reads a byte of the body, so an unauthenticated client cannot
  make the server hold a body of up to ``--max-body-bytes``;
- reads the body itself, refusing one over the size limit with 413 before it is buffered;
- watches the connection while the request runs, and cancels the request's task the moment the
  client leaves (before the first token, mid-stream or while a non-streaming answer is built):
  the ``finally`` blocks below abort the engine request and release its slot;
- cancels the request once it outlives ``max_request_duration``, so a slow or stalled client
  cannot hold engine capacity;
- cancels the request once one write has made no progress for ``write_timeout`` (a client
  that stopped reading: the socket buffers are full and the server's ``send`` waits), which
  aborts its engine request and frees its slot long before the request's own deadline; it is
  counted as a client that left (499);
- records the request's metrics once it has ended, however it ended.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import MutableMapping
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from serve.api.auth import BearerAuth
from serve.api.errors import count_refusal, send_error
from serve.errors import APIError, internal_error, timed_out, too_large
from serve.request_record import RequestRecord
from serve.streaming import DONE_FRAME, error_frame
from serve.telemetry import Metrics

access_log = logging.getLogger("serve.access")
log = logging.getLogger(__name__)

GENERATION_PATHS = frozenset(
    {"/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions"}
)
QUIET_PATHS = frozenset({"/health", "/ready", "/metrics"})
_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# After the deadline, how long we try to tell a client that is still reading.
_FAREWELL_TIMEOUT_S = 1.0


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


class _RequestState:
    """Per-request state of the middleware: lives on this request's stack only."""

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        # Why we cancelled the task: "disconnect", "deadline" or "write_timeout".
        self.reason: str | None = None
        self.started = False
        self.status = 0
        self.done = False  # the response's end has been handed to the server
        self.finished = False  # ...and the server has taken it (the last write is done)
        self.client_gone = asyncio.Event()
        self.write_started: float | None = None  # loop time of the write in progress, if any

    def cancel(self, reason: str) -> None:
        # Until the last write is done: a client that stops reading just before the end holds
        # the request (and its slot) in that write.
        if self.reason is None and not self.finished:
            self.reason = reason
            self.task.cancel()


class _WriteWatch:
    """Ends a request whose write has been stuck for ``timeout`` seconds.

    Each write stamps its start and clears it when done (two attribute stores per frame, no
    timer); one timer per request looks at the stamp and re-arms itself for the earliest moment
    the write in progress could have been stuck too long.
    """

    def __init__(self, guard: _RequestState, timeout: float) -> None:
        self._guard = guard
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_later(timeout, self._check)

    def _check(self) -> None:
        started = self._guard.write_started
        now = self._loop.time()
        if started is not None and now - started >= self._timeout:
            log.warning(
                "a write made no progress for %.0f s (the client stopped reading): "
                "ending the request",
                now - started,
            )
            self._guard.cancel("write_timeout")
            return
        due = started + self._timeout if started is not None else now + self._timeout
        self._timer = self._loop.call_at(due, self._check)

    def stop(self) -> None:
        self._timer.cancel()


class RequestGuard:
    def __init__(
        self,
        app: Any,
        *,
        metrics: Metrics,
        auth: BearerAuth,
        max_body_bytes: int,
        max_request_duration: float,
        write_timeout: float,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.auth = auth
        self.max_body_bytes = max_body_bytes
        self.max_request_duration = max_request_duration
        self.write_timeout = write_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrival = time.perf_counter()
        incoming = _header(scope, b"x-request-id")
        if incoming is not None and _REQUEST_ID_OK.fullmatch(incoming.decode("latin-1")):
            request_id = incoming.decode("latin-1")
        else:
            request_id = uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        task = asyncio.current_task()
        assert task is not None
        guard = _RequestState(task)
        id_header = (b"x-request-id", request_id.encode())
        clock = asyncio.get_running_loop().time

        async def timed_send(message: MutableMapping[str, Any]) -> None:
            # What the write watch reads: when the write in progress started.
            guard.write_started = clock()
            await send(message)
            guard.write_started = None

        async def send_with_id(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                guard.started = True
                guard.status = message["status"]
                message["headers"] = [*message.get("headers", ()), id_header]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                guard.done = True
                await timed_send(message)
                guard.finished = True
                return
            await timed_send(message)

        path = scope["path"]
        if path not in GENERATION_PATHS or scope["method"] != "POST":
            try:
                await self._call_app(scope, receive, send_with_id, guard)
            finally:
                self._log(scope, request_id, guard, arrival, None)
            return

        record = RequestRecord(endpoint=_endpoint(path), model="", arrival=arrival)
        state["record"] = record
        # The frames between the response's start and end skip the framework (SSEResponse),
        # not the write watch.
        state["server_send"] = timed_send
        watcher: asyncio.Task[None] | None = None
        deadline = asyncio.get_running_loop().call_later(
            self.max_request_duration, guard.cancel, "deadline"
        )
        write_watch = _WriteWatch(guard, self.write_timeout)
        try:
            if not await self._authorized(scope, send_with_id):
                return
            body = await self._read_body(scope, receive, send_with_id, guard)
            if body is None:
                return
            record.body_read = time.perf_counter()
            watcher = asyncio.create_task(self._watch(receive, guard))
            await self._call_app(scope, _replay(body, guard), send_with_id, guard)
        except asyncio.CancelledError:
            if guard.reason is None:
                raise  # cancelled from outside (server shutdown): not ours to swallow
            task.uncancel()
            if guard.reason == "deadline":
                await self._farewell(send_with_id, guard)
        finally:
            deadline.cancel()
            write_watch.stop()
            if watcher is not None:
                watcher.cancel()
            self._finish(record, guard, state)
            self._log(scope, request_id, guard, arrival, record)

    async def _call_app(
        self, scope: Scope, receive: Receive, send: Send, guard: _RequestState
    ) -> None:
        """Run the app; an unexpected error becomes a 500 that says nothing of its cause."""
        try:
            await self.app(scope, receive, send)
        except Exception:
            # The framework has answered with the generic 500 body if it could; log once here.
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if not guard.started:
                await send_error(send, internal_error())

    async def _authorized(self, scope: Scope, send: Send) -> bool:
        """The key, checked before the body is read; a refusal is answered here."""
        authorization = _header(scope, b"authorization")
        try:
            self.auth.check(authorization.decode("latin-1") if authorization else None)
        except APIError as error:
            count_refusal(self.metrics, error)
            await send_error(send, error)
            return False
        return True

    async def _read_body(
        self, scope: Scope, receive: Receive, send: Send, guard: _RequestState
    ) -> bytes | None:
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._reject_too_large(send)
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                guard.reason = "disconnect"
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._reject_too_large(send)
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def _reject_too_large(self, send: Send) -> None:
        error = too_large(self.max_body_bytes)
        count_refusal(self.metrics, error)
        await send_error(send, error)

    @staticmethod
    async def _watch(receive: Receive, guard: _RequestState) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                guard.client_gone.set()
                guard.cancel("disconnect")
                return

    @staticmethod
    async def _farewell(send: Send, guard: _RequestState) -> None:
        """The request outlived its deadline: tell the client, if it still reads, and end."""
        error = timed_out()
        try:
            async with asyncio.timeout(_FAREWELL_TIMEOUT_S):
                if not guard.started:
                    await send_error(send, error)
                elif not guard.done:
                    frame = error_frame(error) + DONE_FRAME
                    await send({"type": "http.response.body", "body": frame, "more_body": False})
        except (TimeoutError, OSError):
            pass

    def _finish(self, record: RequestRecord, guard: _RequestState, state: dict[str, Any]) -> None:
        # A client that stopped reading is one that left, as far as anyone can tell.
        left = guard.reason in ("disconnect", "write_timeout") or state.get("client_gone", False)
        if left:
            record.status = 499  # the client closed the request (nginx's convention)
            record.finish_reason = "abort"
            self.metrics.disconnects.labels(record.endpoint).inc()
        else:
            record.status = guard.status or 500
            if guard.reason == "deadline":
                record.finish_reason = "abort"
                record.status = 503
        record.finish(self.metrics)

    @staticmethod
    def _log(
        scope: Scope,
        request_id: str,
        guard: _RequestState,
        arrival: float,
        record: RequestRecord | None,
    ) -> None:
        path = scope["path"]
        level = logging.DEBUG if path in QUIET_PATHS else logging.INFO
        if not access_log.isEnabledFor(level):
            return
        now = time.perf_counter()
        entry: dict[str, Any] = {
            "request_id": request_id,
            "method": scope["method"],
            "path": path,
            "status": record.status if record is not None else guard.status,
            "duration_ms": round((now - arrival) * 1000, 2),
        }
        client = scope.get("client")
        if client:
            entry["client"] = f"{client[0]}:{client[1]}"
        if record is not None:
            if record.model:
                entry["model"] = record.model
            if record.first_token is not None:
                entry["ttft_ms"] = round((record.first_token - arrival) * 1000, 2)
                entry["ttft_stages_ms"] = {
                    stage: round(seconds * 1000, 3) for stage, seconds in record.ttft_stages()
                }
            elif record.status >= 400:  # where a refusal's or an error's time went
                entry["stages_ms"] = {
                    stage: round(seconds * 1000, 3) for stage, seconds in record.stages_until(now)
                }
            entry["prompt_tokens"] = record.prompt_tokens
            entry["output_tokens"] = record.output_tokens
            if record.reasoning_seconds is not None:
                entry["reasoning_ms"] = round(record.reasoning_seconds * 1000, 2)
                entry["reasoning_tokens"] = record.reasoning_tokens
            entry["finish_reason"] = record.finish_reason
            if record.prompt_text is not None:
                entry["prompt"] = record.prompt_text
        access_log.log(level, orjson.dumps(entry).decode())


def _endpoint(path: str) -> str:
    return "chat" if path.endswith("chat/completions") else "completions"


def _replay(body: bytes, guard: _RequestState) -> Receive:
    """The app's view of ``receive``: the body we already read, then the disconnect."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await guard.client_gone.wait()
        return {"type": "http.disconnect"}

    return receive
