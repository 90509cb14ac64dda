"""The serving core against the real vLLM CPU engine, through real HTTP, as clients use it."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from tests.support import (
    ENDLESS_TOKENS,
    MODEL,
    TEST_API_KEY,
    TEST_CONTEXT,
    ServerProcess,
    metric_value,
    wait_until,
)

MESSAGES = [
    {"role": "system", "content": "You are a friendly museum guide."},
    {"role": "user", "content": "Hello! When does the museum open?"},
]


def sdk(server: ServerProcess, suffix: str = "/v1") -> AsyncOpenAI:
    return AsyncOpenAI(base_url=server.base_url + suffix, api_key=TEST_API_KEY, max_retries=0)


async def test_sdk_streaming_with_usage(server: ServerProcess) -> None:
    stream = await sdk(server).chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=True,
        max_tokens=24,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = [chunk async for chunk in stream]
    content = [c for c in chunks if c.choices]
    assert len({c.id for c in chunks}) == 1, "every chunk of one response shares its id"
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks)
    assert content[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in content[1:])
    assert content[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    assert usage.completion_tokens == 24
    assert usage.prompt_tokens > 10
    assert usage.total_tokens == usage.prompt_tokens + 24


async def test_sdk_non_streaming(server: ServerProcess) -> None:
    resp = await sdk(server).chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_completion_tokens=12,
        extra_body={"ignore_eos": True},  # type: ignore[arg-type]
    )
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 12


async def test_base_url_without_v1(server: ServerProcess) -> None:
    """Avatar platforms are configured with and without /v1: both must answer."""
    stream = await sdk(server, suffix="").chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        max_tokens=4,  # type: ignore[arg-type]
    )
    assert [c async for c in stream]


async def test_seed_makes_sampling_reproducible(server: ServerProcess) -> None:
    async def once() -> str:
        r = await sdk(server).chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=16,
            temperature=1.0,
            seed=1234,  # type: ignore[arg-type]
            extra_body={"ignore_eos": True},
        )
        return r.choices[0].message.content or ""

    assert await once() == await once()


async def test_raw_frames(server: ServerProcess, auth_headers: dict[str, str]) -> None:
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "stream": True,
        "max_tokens": 8,
        "ignore_eos": True,
    }
    async with (
        httpx.AsyncClient(timeout=60) as client,
        client.stream(
            "POST", f"{server.base_url}/chat/completions", json=body, headers=auth_headers
        ) as resp,
    ):
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["cache-control"] == "no-cache"
        assert resp.headers["x-accel-buffering"] == "no"
        assert "content-encoding" not in resp.headers
        raw = b"".join([chunk async for chunk in resp.aiter_raw()])
    frames = raw.split(b"\n\n")
    assert frames[-1] == b"", "the stream ends with a blank line"
    assert frames[-2] == b"data: [DONE]"
    payloads = [json.loads(f.removeprefix(b"data: ")) for f in frames[:-2]]
    assert all(f.startswith(b"data: {") for f in frames[:-2])
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for p in payloads if p["choices"][0]["delta"].get("content")) >= 1


async def test_text_completions(server: ServerProcess) -> None:
    client = sdk(server)
    resp = await client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6)
    assert resp.object == "text_completion" and resp.usage is not None
    assert resp.usage.completion_tokens <= 6
    stream = await client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=6, stream=True
    )
    pieces = [c async for c in stream]
    assert pieces and pieces[-1].choices[0].finish_reason in ("length", "stop")


async def test_models_and_auth(server: ServerProcess) -> None:
    models = await sdk(server).models.list()
    assert [m.id for m in models.data] == [MODEL]
    bad = AsyncOpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert httpx.get(f"{server.base_url}/metrics").status_code == 200


async def test_context_window_and_unknown_model(server: ServerProcess) -> None:
    client = sdk(server)
    with pytest.raises(openai.BadRequestError) as too_long:
        await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=TEST_CONTEXT - 2
        )  # type: ignore[arg-type]
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]


async def test_concurrent_streams_overlap(server: ServerProcess) -> None:
    """Eight streams interleave in the engine (continuous batching), not one after another."""
    client = sdk(server)

    async def one(i: int) -> tuple[float, float]:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Tell me story number {i}."}],
            stream=True,
            max_tokens=512,
            extra_body={"ignore_eos": True},
        )
        first = last = 0.0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                last = time.perf_counter()
                first = first or last
        return first, last

    spans = await asyncio.gather(*(one(i) for i in range(8)))
    latest_first = max(first for first, _ in spans)
    earliest_last = min(last for _, last in spans)
    assert latest_first < earliest_last, f"streams ran one after another: {spans}"


async def test_disconnect_mid_stream_aborts_engine_request(
    server: ServerProcess, auth_headers: dict[str, str]
) -> None:
    before = server.metrics()
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "stream": True,
        "max_tokens": ENDLESS_TOKENS,
        "ignore_eos": True,
    }
    headers = {**auth_headers, "X-Request-Id": "leaves-early"}
    async with (
        httpx.AsyncClient(timeout=60) as client,
        client.stream(
            "POST", f"{server.base_url}/v1/chat/completions", json=body, headers=headers
        ) as resp,
    ):
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                break
    # Leaving the block closed the connection mid-stream.

    wait_until(
        lambda: metric_value(server.metrics(), "avatar_engine_unfinished_requests") == 0,
        timeout=10,
        what="engine request aborted",
    )
    after = server.metrics()
    for name, labels in [
        ("avatar_client_disconnects_total", {}),
        ("avatar_requests_total", {"status": "499", "finish_reason": "abort"}),
    ]:
        assert metric_value(after, name, **labels) == metric_value(before, name, **labels) + 1
    entry = wait_until(lambda: _access_entry(server, "leaves-early"), 10, what="access log")
    assert entry["finish_reason"] == "abort" and entry["status"] == 499
    assert entry["output_tokens"] < ENDLESS_TOKENS, "generation stopped when the client left"


def _access_entry(server: ServerProcess, request_id: str) -> dict[str, object] | None:
    for line in server.log().splitlines():
        if "serve.access" in line and f'"request_id":"{request_id}"' in line:
            return json.loads(line.split("serve.access: ", 1)[1])  # type: ignore[no-any-return]
    return None


async def test_metrics_export_ours_and_vllms(server: ServerProcess) -> None:
    await sdk(server).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)  # type: ignore[arg-type]
    text = server.metrics()
    names = (
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds_bucket",
        "avatar_kv_cache_usage_ratio",
    )
    for name in names:
        assert any(line.startswith(name) for line in text.splitlines()), name
    assert metric_value(text, "avatar_time_to_first_token_seconds_count", endpoint="chat") >= 1
    assert metric_value(text, "avatar_engine_alive") == 1


async def test_ttft_breakdown_reads_the_engines_own_stamps(server: ServerProcess) -> None:
    """On vLLM the breakdown splits the engine's share: hand-off, scheduler queue, prefill."""
    request_id = "ttft-breakdown-e2e"
    client = sdk(server)
    stream = await client.chat.completions.create(  # type: ignore[call-overload]
        model=MODEL,
        messages=MESSAGES,
        max_tokens=4,
        stream=True,
        extra_headers={"X-Request-Id": request_id},
    )
    async for _ in stream:
        pass
    entry = wait_until(lambda: _access_entry(server, request_id), 10, what="access-log line")
    stages = entry["ttft_stages_ms"]
    assert isinstance(stages, dict)
    assert list(stages) == [
        "receive", "parse", "render", "tokenize", "validate", "admit",
        "submit", "engine_queue", "prefill", "output", "write",
    ]  # fmt: skip
    assert abs(sum(stages.values()) - float(entry["ttft_ms"])) < 0.05  # type: ignore[arg-type]
    text = server.metrics()
    assert (
        metric_value(text, "avatar_ttft_stage_seconds_count", endpoint="chat", stage="prefill") >= 1
    )
