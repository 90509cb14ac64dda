"""The request guard, driven at the ASGI level so the client can leave at an exact moment."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

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
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
            "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"application/json"),
                        (b"authorization", f"Bearer {KEY}".encode())],
            "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000), "state": {},
        }  # fmt: skip
        await app(scope, self.receive, self.send)


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
    # 3 tokens: 2 gaps; the aborted stream wrote 2 frames (role+first token, second): 1 gap.
    assert metric_value(text, "avatar_inter_token_latency_seconds_count", **done) == 2
    assert metric_value(text, "avatar_request_generation_tokens_sum", **done) == 3
    assert metric_value(text, "avatar_time_to_first_sentence_seconds_count", **done) == 1


def _metrics(app: FastAPI) -> str:
    from prometheus_client import generate_latest

    return generate_latest(app.state.metrics.registry).decode()


async def _until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)
