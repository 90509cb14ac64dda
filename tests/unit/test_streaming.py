"""Exact SSE framing of chat and text completion streams."""

from __future__ import annotations

import json

import httpx

from serve.engine.fake import FakeEngine
from tests.unit.conftest import MODEL, chat_body


def parse_frames(raw: str) -> list[str]:
    assert raw.endswith("\n\n"), "every frame ends with a blank line"
    frames = raw.split("\n\n")[:-1]
    assert all(f.startswith("data: ") for f in frames), frames
    return [f.removeprefix("data: ") for f in frames]


async def test_chat_stream_frames(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json=chat_body(stream=True, max_tokens=4, stream_options={"include_usage": True}),
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert r.headers["cache-control"] == "no-cache"
    assert r.headers["x-accel-buffering"] == "no"
    frames = parse_frames(r.text)
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    content, usage = chunks[:-1], chunks[-1]
    assert [c["choices"][0]["delta"].get("content") for c in content] == [
        "Hello", " there", ".", " How",
    ]  # fmt: skip
    assert content[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in content[1:])
    assert [c["choices"][0]["finish_reason"] for c in content] == [None, None, None, "length"]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    for c in content:
        assert c["object"] == "chat.completion.chunk"
        assert c["model"] == MODEL
        assert isinstance(c["created"], int)
        assert c["choices"][0]["index"] == 0
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


async def test_no_usage_frame_unless_asked(client: httpx.AsyncClient) -> None:
    r = await client.post("/chat/completions", json=chat_body(stream=True, max_tokens=2))
    frames = parse_frames(r.text)
    assert frames[-1] == "[DONE]"
    assert all("usage" not in json.loads(f) for f in frames[:-1])


async def test_stop_string_ends_with_stop(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    r = await client.post(
        "/v1/chat/completions", json=chat_body(stream=True, max_tokens=20, stop=["How"])
    )
    chunks = [json.loads(f) for f in parse_frames(r.text)[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "Hello there. "
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert engine.seen[-1][2].stop == ("How",)


async def test_text_completion_stream(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "a b", "max_tokens": 2, "stream": True}
    )
    frames = parse_frames(r.text)
    chunks = [json.loads(f) for f in frames[:-1]]
    assert [c["choices"][0]["text"] for c in chunks] == ["Hello", " there"]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_non_streaming_chat(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat_body(max_tokens=3))
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello there."}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


async def test_content_parts_and_developer_role(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "you"}],
        },
    ]
    r = await client.post("/v1/chat/completions", json=chat_body(messages=messages))
    assert r.status_code == 200
    assert engine.rendered[-1] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi you"},
    ]


async def test_sampling_fields_reach_the_engine(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json=chat_body(
            temperature=0.7, top_p=0.9, seed=7, presence_penalty=0.5, frequency_penalty=-0.5,
            top_k=40, min_p=0.05, repetition_penalty=1.1, min_tokens=2, ignore_eos=True,
            max_completion_tokens=4, logit_bias={"1": 2}, user="someone", unknown_field=[1],
        ),
    )  # fmt: skip
    assert r.status_code == 200, r.text
    opts = engine.seen[-1][2]
    assert (opts.temperature, opts.top_p, opts.seed, opts.top_k, opts.min_p) == (
        0.7,
        0.9,
        7,
        40,
        0.05,
    )
    assert (opts.presence_penalty, opts.frequency_penalty) == (0.5, -0.5)
    assert (opts.repetition_penalty, opts.min_tokens, opts.ignore_eos) == (1.1, 2, True)
    assert opts.max_tokens == 4, "max_completion_tokens wins over max_tokens"


async def test_default_max_tokens_fills_the_context(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    body = chat_body()
    del body["max_tokens"]
    await client.post("/v1/chat/completions", json=body)
    prompt_len = len(engine.seen[-1][1])
    assert engine.seen[-1][2].max_tokens == engine.max_model_len - prompt_len


async def test_request_id_is_honoured(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    r = await client.post(
        "/v1/chat/completions", json=chat_body(), headers={"X-Request-Id": "call-42"}
    )
    assert r.headers["x-request-id"] == "call-42"
    assert engine.seen[-1][0] == "call-42"
    r = await client.post(
        "/v1/chat/completions", json=chat_body(), headers={"X-Request-Id": "bad id\x01"}
    )
    assert r.headers["x-request-id"] != "bad id\x01" and len(r.headers["x-request-id"]) == 32
    # A trailing newline would forge a line in a log that quotes the id (a "$" regex allowed it).
    r = await client.post(
        "/v1/chat/completions", json=chat_body(), headers={"X-Request-Id": "call-42\n"}
    )
    assert r.headers["x-request-id"] != "call-42\n" and len(r.headers["x-request-id"]) == 32
    assert engine.seen[-1][0] == r.headers["x-request-id"]
