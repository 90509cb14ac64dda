"""The request guard, driven at the ASGI level so the client can leave (or stop reading, or
never send its body) at an exact moment."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from fastapi import FastAPI

from serve.engine.fake import FakeEngine
from tests.support import metric_value
from tests.unit.conftest import KEY, chat_body, open_client


class Client:
    """A scripted ASGI client: sends one request, reads until told, then disconnects."""

    def __init__(self, body: dict[str, Any], leave_after_frames: int | None = None) -> None:
        self.body = json.dumps(body).encode()
        self.leave_after = leave_after_frames
        self.messages: list[dict[str, Any]] = []
        self.frames = 0
        self._gone = asyncio.Event()
        self._sent_body = False

    async def receive(self) -> dict[str, Any]:
        if not self._sent_body:
            self._sent_body = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            self.frames += message["body"].count(b"\n\n")
            if self.leave_after is not None and self.frames >= self.leave_after:
                self._gone.set()

    def leave(self) -> None:
        self._gone.set()

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def body_bytes(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])

    async def run(self, app: FastAPI, path: str = "/v1/chat/completions") -> None:
        await app(http_scope(path), self.receive, self.send)


class StalledReader(Client):
    """Reads ``frames`` frames (all but the response's end, with None), then stops reading:
    once the socket buffers fill, the server's ``send`` waits for room that never comes
    (uvicorn's does once its transport pauses)."""

    def __init__(self, body: dict[str, Any], frames: int | None) -> None:
        super().__init__(body)
        self.reads = frames

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and (
            not message.get("more_body") if self.reads is None else self.frames >= self.reads
        ):
            await asyncio.Event().wait()
        await super().send(message)


class SlowReader(Client):
    """Reads every frame, each a little late: slow, but the writes make progress."""

    def __init__(self, body: dict[str, Any], delay: float) -> None:
        super().__init__(body)
        self.delay = delay

    async def send(self, message: dict[str, Any]) -> None:
        await asyncio.sleep(self.delay)
        await super().send(message)


def http_scope(
    path: str, key: str = KEY, extra: list[tuple[bytes, bytes]] | None = None
) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
        "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"),
                    (b"authorization", f"Bearer {key}".encode()), *(extra or [])],
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000), "state": {},
    }  # fmt: skip


async def test_leaving_mid_stream_aborts_the_engine_request(
    app_factory: Callable[..., FastAPI], engine: FakeEngine
) -> None:
    engine.token_delay = 0.01
    app = app_factory()
    client = Client(chat_body(stream=True, max_tokens=200, ignore_eos=True), leave_after_frames=3)
    await asyncio.wait_for(client.run(app), 5)
    assert engine.num_unfinished_requests() == 0
    assert len(engine.aborted) == 1
    text = _metrics(app)
    assert metric_value(text, "avatar_client_disconnects_total", endpoint="chat") == 1
    assert metric_value(text, "avatar_requests_total", status="499", finish_reason="abort") == 1
    assert b"[DONE]" not in client.body_bytes


async def test_leaving_before_the_first_token_aborts(
    app_factory: Callable[..., FastAPI], engine: FakeEngine
) -> None:
    engine.first_token_gate = asyncio.Event()  # the engine never yields
    app = app_factory()
    client = Client(chat_body(stream=True))
    task = asyncio.create_task(client.run(app))
    await _until(lambda: engine.num_unfinished_requests() == 1)
    client.leave()
    await asyncio.wait_for(task, 5)
    assert engine.num_unfinished_requests() == 0 and len(engine.aborted) == 1
    assert app.state.admission.running == 0, "the slot is released"


async def test_leaving_a_non_streaming_request_aborts(
    app_factory: Callable[..., FastAPI], engine: FakeEngine
) -> None:
    engine.token_delay = 0.01
    app = app_factory()
    client = Client(chat_body(stream=False, max_tokens=240, ignore_eos=True))
    task = asyncio.create_task(client.run(app))
    await _until(lambda: engine.num_unfinished_requests() == 1)
    await asyncio.sleep(0.05)
    client.leave()
    await asyncio.wait_for(task, 5)
    assert engine.num_unfinished_requests() == 0 and len(engine.aborted) == 1
    assert client.messages == [], "nothing is written to a client that has gone"


async def test_request_past_max_duration_is_cut(
    app_factory: Callable[..., FastAPI], engine: FakeEngine
) -> None:
    engine.token_delay = 0.01
    app = app_factory(max_request_duration=0.2, queue_timeout=0.1)
    client = Client(chat_body(stream=True, max_tokens=240, ignore_eos=True))
    await asyncio.wait_for(client.run(app), 5)
    assert engine.num_unfinished_requests() == 0 and len(engine.aborted) == 1
    body = client.body_bytes
    assert b'"code":"request_timeout"' in body and body.endswith(b"data: [DONE]\n\n")
    assert app.state.admission.running == 0


async def test_stalled_before_first_token_gets_503(
    app_factory: Callable[..., FastAPI], engine: FakeEngine
) -> None:
    engine.first_token_gate = asyncio.Event()
    app = app_factory(max_request_duration=0.2, queue_timeout=0.1)
    client = Client(chat_body(stream=True))
    await asyncio.wait_for(client.run(app), 5)
    assert client.status == 503
    assert json.loads(client.body_bytes)["error"]["code"] == "request_timeout"
    assert engine.num_unfinished_requests() == 0


async def test_engine_dying_mid_stream_ends_with_an_error_frame(
    app_factory: Callable[..., FastAPI], engine: FakeEngine
) -> None:
    engine.token_delay = 0.01
    app = app_factory()
    client = Client(chat_body(stream=True, max_tokens=240, ignore_eos=True))
    task = asyncio.create_task(client.run(app))
    await _until(lambda: client.frames >= 2)
    engine.kill()
    await asyncio.wait_for(task, 5)
    body = client.body_bytes
    assert b'"code":"engine_dead"' in body
    assert body.endswith(b"data: [DONE]\n\n")


async def test_metrics_cover_finished_and_aborted_requests(
    app_factory: Callable[..., FastAPI], engine: FakeEngine
) -> None:
    app = app_factory()
    labels = {"endpoint": "chat", "model": "avatar-test"}
    async with open_client(app) as c:
        await c.post("/v1/chat/completions", json=chat_body(stream=True, max_tokens=3))
    engine.token_delay = 0.01
    await Client(chat_body(stream=True, max_tokens=100, ignore_eos=True), leave_after_frames=2).run(
        app
    )
    text = _metrics(app)
    done = {"finish_reason": "length", **labels}
    aborted = {"finish_reason": "abort", **labels}
    # Exact counts: the app owns its registry, so nothing from other tests is in it.
    assert metric_value(text, "avatar_time_to_first_token_seconds_count", **done) == 1
    assert metric_value(text, "avatar_e2e_request_latency_seconds_count", **done) == 1
    assert metric_value(text, "avatar_e2e_request_latency_seconds_count", **aborted) == 1
    # The model label rides on TTFT and request latency only (bounded series): the rest by
    # endpoint and finish reason.
    done_any_model = {"endpoint": "chat", "finish_reason": "length"}
    # 3 tokens: 2 gaps; the aborted stream wrote 2 frames (role+first token, second): 1 gap.
    assert metric_value(text, "avatar_inter_token_latency_seconds_count", **done_any_model) == 2
    assert metric_value(text, "avatar_request_generation_tokens_sum", **done_any_model) == 3
    assert metric_value(text, "avatar_time_to_first_sentence_seconds_count", **done_any_model) == 1


def _metrics(app: FastAPI) -> str:
    from prometheus_client import generate_latest

    return generate_latest(app.state.metrics.registry).decode()


async def _until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def test_a_client_that_stops_reading_frees_its_slot(
    app_factory: Callable[..., FastAPI], engine: FakeEngine
) -> None:
    """Its writes make no progress for --write-timeout: the request ends long before
    --max-request-duration, the engine request is aborted and the slot serves the next client."""
    engine.token_delay = 0.002
    app = app_factory(max_running_requests=1, write_timeout=0.3)
    stalled = StalledReader(chat_body(stream=True, max_tokens=200, ignore_eos=True), frames=3)
    await asyncio.wait_for(stalled.run(app), 30)
    assert app.state.admission.running == 0, "the slot is free"
    assert engine.num_unfinished_requests() == 0 and len(engine.aborted) == 1
    text = _metrics(app)
    assert metric_value(text, "avatar_client_disconnects_total", endpoint="chat") == 1
    assert metric_value(text, "avatar_requests_total", status="499", finish_reason="abort") == 1
    async with open_client(app) as c:
        r = await c.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 200, "the next client gets the slot"


async def test_a_client_that_stops_reading_just_before_the_end_frees_its_slot(
    app_factory: Callable[..., FastAPI], engine: FakeEngine
) -> None:
    """The whole answer written but the response's end: the engine has finished, the slot must
    not wait for the client either."""
    app = app_factory(write_timeout=0.3)
    stalled = StalledReader(chat_body(stream=True, max_tokens=4), frames=None)
    await asyncio.wait_for(stalled.run(app), 30)
    assert stalled.body_bytes.endswith(b"data: [DONE]\n\n"), "every frame was written"
    assert app.state.admission.running == 0, "the slot is free"
    labels = {"status": "499", "finish_reason": "abort"}
    assert metric_value(_metrics(app), "avatar_requests_total", **labels) == 1


async def test_a_client_that_reads_slowly_is_not_cut(
    app_factory: Callable[..., FastAPI], engine: FakeEngine
) -> None:
    """The timeout is on progress, not on the whole answer: slower in all than the write
    timeout, every write still moves, and the answer arrives whole."""
    # Each write takes 0.05 s, 40 times less than the timeout (room for a loaded machine).
    app = app_factory(write_timeout=2)
    slow = SlowReader(chat_body(stream=True, max_tokens=48, ignore_eos=True), delay=0.05)
    await asyncio.wait_for(slow.run(app), 30)
    assert slow.status == 200
    assert slow.body_bytes.endswith(b"data: [DONE]\n\n")
    assert engine.aborted == []


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/completions"])
async def test_the_key_is_checked_before_the_body_is_read(
    app_factory: Callable[..., FastAPI], path: str
) -> None:
    """A client with a wrong key gets its 401 without the server reading (and holding) a byte
    of the body it announced."""
    app = app_factory()
    reads = 0

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        await asyncio.Event().wait()  # a 4 MiB body trickling in, slowly
        raise AssertionError("unreachable")

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = http_scope(path, key="wrong", extra=[(b"content-length", b"4194304")])
    await asyncio.wait_for(app(scope, receive, send), 10)
    assert sent[0]["status"] == 401 and reads == 0
    assert json.loads(sent[1]["body"])["error"]["type"] == "authentication_error"
    assert metric_value(_metrics(app), "avatar_requests_rejected_total", reason="auth") == 1
