"""A request the engine fails (vLLM's finish reason "error": a grammar that failed, a KV load
that failed, an input its core could not process) must never look like a finished answer: the
avatar would go silent and nothing would retry.

The vLLM adapter is driven with vLLM's own output objects from a stand-in ``AsyncLLM``; the
HTTP layer with the fake engine failing the same way."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from serve.engine.base import Delta, EngineBusyError, EngineRequestError, SamplingOptions
from serve.engine.fake import FakeEngine
from tests.support import metric_value
from tests.unit.conftest import chat_body, open_client


class _OneRequestLLM:
    """What ``VllmEngine.generate`` uses of ``AsyncLLM``: one request's DELTA outputs."""

    errored = False

    def __init__(self, steps: list[tuple[str, str | None]]) -> None:
        self.steps = steps

    async def generate(self, prompt: Any, params: Any, request_id: str, **_: Any) -> Any:
        from vllm.outputs import CompletionOutput, RequestOutput

        for i, (text, reason) in enumerate(self.steps):
            completion = CompletionOutput(
                index=0,
                text=text,
                token_ids=[7] if text else [],
                cumulative_logprob=None,
                logprobs=None,
                finish_reason=reason,
            )
            yield RequestOutput(
                request_id=request_id,
                prompt=None,
                prompt_token_ids=prompt["prompt_token_ids"],
                prompt_logprobs=None,
                outputs=[completion],
                finished=reason is not None,
                num_cached_tokens=0 if i == 0 else None,
            )


def _vllm_engine(steps: list[tuple[str, str | None]]) -> Any:
    from serve.engine.vllm_engine import VllmEngine

    engine = object.__new__(VllmEngine)  # no model: only the request loop is exercised
    engine._llm = _OneRequestLLM(steps)
    return engine


async def _drain(stream: AsyncGenerator[Delta, None]) -> list[Delta]:
    return [delta async for delta in stream]


@pytest.mark.parametrize("steps", [[("", "error")], [("Hel", None), ("lo", None), ("", "error")]])
async def test_the_vllm_adapter_raises_on_a_failed_request(
    steps: list[tuple[str, str | None]],
) -> None:
    engine = _vllm_engine(steps)
    stream = engine.generate([1, 2, 3], SamplingOptions(max_tokens=8), "req-1")
    seen: list[Delta] = []
    with pytest.raises(EngineRequestError):
        async for delta in stream:
            seen.append(delta)
    assert [d.text for d in seen] == [text for text, _ in steps[:-1]]
    assert all(d.finish_reason is None for d in seen)


async def test_the_vllm_adapter_still_finishes_normal_answers() -> None:
    engine = _vllm_engine([("Hi", None), (".", "stop")])
    deltas = await _drain(engine.generate([1], SamplingOptions(max_tokens=8), "req-2"))
    assert [(d.text, d.finish_reason) for d in deltas] == [("Hi", None), (".", "stop")]


async def _metrics(c: httpx.AsyncClient) -> str:
    return (await c.get("/metrics")).text


async def test_a_stream_the_engine_fails_ends_with_an_error_frame(
    engine: FakeEngine, app_factory: Callable[..., FastAPI]
) -> None:
    engine.fail_after = 3
    async with open_client(app_factory()) as c:
        r = await c.post("/v1/chat/completions", json=chat_body(stream=True, max_tokens=8))
        metrics = await _metrics(c)
    assert r.status_code == 200  # the stream had begun
    frames = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    error = json.loads(frames[-2])["error"]
    assert (error["type"], error["code"]) == ("server_error", "engine_error")
    chunks = [json.loads(f) for f in frames[:-2]]
    assert len(chunks) == 3 and all(ch["choices"][0]["finish_reason"] is None for ch in chunks)
    assert metric_value(metrics, "avatar_requests_total", finish_reason="error") == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_the_engine_fails_at_once_is_a_500(
    engine: FakeEngine, app_factory: Callable[..., FastAPI], stream: bool
) -> None:
    """Before anything was sent, the client gets a real status it can retry on."""
    engine.fail_after = 0
    async with open_client(app_factory()) as c:
        r = await c.post("/v1/chat/completions", json=chat_body(stream=stream))
        metrics = await _metrics(c)
    assert r.status_code == 500, r.text
    assert r.json()["error"]["code"] == "engine_error"
    assert metric_value(metrics, "avatar_requests_total", status="500", finish_reason="error") == 1


async def test_a_collected_answer_the_engine_fails_midway_is_a_500(
    engine: FakeEngine, app_factory: Callable[..., FastAPI]
) -> None:
    engine.fail_after = 2
    async with open_client(app_factory()) as c:
        r = await c.post("/v1/completions", json={"model": chat_body()["model"], "prompt": "hi"})
        engine.fail_after = None
        again = await c.post(
            "/v1/completions", json={"model": chat_body()["model"], "prompt": "hi"}
        )
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
    assert again.status_code == 200  # one failed request, and the server serves on


class _FullQueueLLM(_OneRequestLLM):
    """vLLM's own valve at capacity (``--max-num-queued-reqs``): the request is refused as it
    is added, before any output."""

    async def generate(self, prompt: Any, params: Any, request_id: str, **_: Any) -> Any:
        from vllm.exceptions import QueueOverflowError

        raise QueueOverflowError()
        yield  # an async generator, as AsyncLLM.generate is


async def test_the_vllm_adapter_reports_vllms_full_queue_as_busy() -> None:
    engine = _vllm_engine([])
    engine._llm = _FullQueueLLM([])
    with pytest.raises(EngineBusyError):
        await _drain(engine.generate([1, 2, 3], SamplingOptions(max_tokens=8), "req-1"))


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_the_engines_own_valve_refuses_is_a_429_to_retry_elsewhere(
    engine: FakeEngine, app_factory: Callable[..., FastAPI], stream: bool
) -> None:
    """Not a 500 that says nothing: the operator bounded the engine, and a voice platform
    sends a 429'd turn to another replica."""
    engine.busy = True
    async with open_client(app_factory()) as c:
        r = await c.post("/v1/chat/completions", json=chat_body(stream=stream))
        engine.busy = False
        again = await c.post("/v1/chat/completions", json=chat_body(stream=stream))
        metrics = await _metrics(c)
    assert r.status_code == 429, r.text
    assert r.headers["retry-after"] == "1"
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "server_overloaded")
    assert again.status_code == 200
    assert metric_value(metrics, "avatar_requests_total", status="429") == 1
    assert metric_value(metrics, "avatar_requests_rejected_total", reason="overload") == 1
