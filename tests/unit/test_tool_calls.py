"""Tool calls and reasoning on the wire: the fake engine replies with scripted Hermes-format text,
vLLM's own parsers read it (as on the real engine), and the frames must be OpenAI's, exactly."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import generate_latest

from serve.app import create_app
from serve.engine.fake import FakeEngine
from tests.unit.agents import TIME, TOOL_HISTORY, WEATHER, deltas, demo_tokenizer, sse_chunks
from tests.unit.conftest import chat_body, make_settings, open_client

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TOOLS_ON = {"enable_auto_tool_choice": True, "tool_call_parser": "hermes"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return demo_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def engine(tokenizer: Any) -> FakeEngine:
    return FakeEngine(max_model_len=4096, tokenizer=tokenizer)


@pytest.fixture
def app(engine: FakeEngine) -> FastAPI:
    return create_app(make_settings(**TOOLS_ON), engine)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with open_client(app) as c:
        yield c


def tool_body(**overrides: Any) -> dict[str, Any]:
    return chat_body(**{"tools": [WEATHER, TIME], "max_tokens": 500, "stream": True, **overrides})


def header(index: int, name: str) -> dict[str, Any]:
    call = {"index": index, "id": f"ID{index}", "type": "function"}
    return {"tool_calls": [{**call, "function": {"name": name, "arguments": ""}}]}


def args(index: int, text: str) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, "function": {"arguments": text}}]}


async def test_text_then_one_call(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.script = [
        "Sure",
        ". ",
        "<tool_call>",
        '\n{"name": "get_weather", ',
        '"arguments": {"city": ',
        '"Paris"}}\n',
        "</tool_call>",
    ]
    r = await client.post("/v1/chat/completions", json=tool_body())
    assert deltas(sse_chunks(r)) == [
        ({"role": "assistant", "content": "Sure"}, None),
        ({"content": ". "}, None),
        (header(0, "get_weather"), None),
        (args(0, '{"city":'), None),
        (args(0, ' "Paris"}'), None),
        ({}, "tool_calls"),
    ]
    turn = engine.turns[-1]
    assert turn is not None and turn.tool_choice == "auto" and len(turn.tools) == 2


async def test_a_call_first_opens_with_the_role(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.script = [CALL]
    chunks = sse_chunks(await client.post("/v1/chat/completions", json=tool_body()))
    first = chunks[0]["choices"][0]["delta"]
    assert first["role"] == "assistant" and first["content"] is None
    assert first["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}


async def test_two_parallel_calls(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.script = [CALL, '\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>']
    r = await client.post("/v1/chat/completions", json=tool_body())
    assert deltas(sse_chunks(r))[1:] == [
        (args(0, '{"city": "Paris"}'), None),
        (header(1, "get_time"), None),
        (args(1, "{}"), None),
        ({}, "tool_calls"),
    ]


async def test_parallel_tool_calls_false_keeps_the_first(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.script = [CALL, '\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>']
    body = tool_body(parallel_tool_calls=False)
    got = deltas(sse_chunks(await client.post("/v1/chat/completions", json=body)))
    assert {call["index"] for d, _ in got for call in d.get("tool_calls", [])} == {0}
    assert got[-1] == ({}, "tool_calls")


async def test_a_call_split_across_many_deltas(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.script = list(CALL)  # one character per engine step
    got = deltas(sse_chunks(await client.post("/v1/chat/completions", json=tool_body())))
    assert got[0][0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    fragments = [d["tool_calls"][0]["function"]["arguments"] for d, _ in got[1:-1]]
    assert len(fragments) > 5 and all(fragments)
    assert json.loads("".join(fragments)) == {"city": "Paris"}
    assert all(list(d["tool_calls"][0]) == ["index", "function"] for d, _ in got[1:-1])
    assert got[-1] == ({}, "tool_calls")


async def test_malformed_call_is_dropped_not_spoken(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    """Markup the parser cannot read never reaches the avatar's voice, and the stream ends."""
    engine.script = ["Hello. ", "<tool_call>", "not json at all", "</tool_call>"]
    got = deltas(sse_chunks(await client.post("/v1/chat/completions", json=tool_body())))
    assert got == [({"role": "assistant", "content": "Hello. "}, None), ({}, "stop")]


async def test_non_streaming_calls(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.script = ["Let me check.", CALL]
    r = await client.post("/v1/chat/completions", json=tool_body(stream=False))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "Let me check."
    [call] = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("chatcmpl-tool-")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}

    engine.script = [CALL]
    message = (await client.post("/v1/chat/completions", json=tool_body(stream=False))).json()
    assert message["choices"][0]["message"]["content"] is None, "OpenAI: null beside calls"


async def test_tool_choice_none_streams_plain_text(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.script = ["Hi", " there."]
    body = tool_body(tool_choice="none")
    got = deltas(sse_chunks(await client.post("/v1/chat/completions", json=body)))
    assert got == [
        ({"role": "assistant", "content": "Hi"}, None),
        ({"content": " there."}, "stop"),
    ], "the plain path, frames unchanged"
    assert engine.turns[-1] is not None and engine.turns[-1].tool_choice == "none"


async def test_only_spoken_content_starts_the_ttft_clock(
    app: FastAPI, client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    def count(name: str) -> float:
        text = generate_latest(app.state.metrics.registry).decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "_count")
        )

    engine.script = [CALL]
    sse_chunks(await client.post("/v1/chat/completions", json=tool_body()))
    assert count("avatar_time_to_first_token_seconds") == 0, "a tool call is not spoken"
    engine.script = ["Sure.", CALL]
    sse_chunks(await client.post("/v1/chat/completions", json=tool_body()))
    assert count("avatar_time_to_first_token_seconds") == 1


async def test_forced_calls_guide_and_finish(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.script = [CALL]
    named = {"type": "function", "function": {"name": "get_weather"}}
    got = deltas(
        sse_chunks(await client.post("/v1/chat/completions", json=tool_body(tool_choice=named)))
    )
    assert got[-1] == ({}, "stop"), "a named choice finishes with stop, as OpenAI's"
    assert engine.turns[-1] is not None and engine.turns[-1].tool_name == "get_weather"
    got = deltas(
        sse_chunks(
            await client.post("/v1/chat/completions", json=tool_body(tool_choice="required"))
        )
    )
    assert got[0][0] == header(0, "get_weather") | {"role": "assistant", "content": None}
    assert got[-1] == ({}, "tool_calls")


# -- reasoning -----------------------------------------------------------------------------


@pytest.fixture
def thinking(tokenizer: Any) -> Callable[..., tuple[FastAPI, FakeEngine]]:
    def build(**settings: Any) -> tuple[FastAPI, FakeEngine]:
        engine = FakeEngine(max_model_len=4096, tokenizer=tokenizer, reasoning_parser="deepseek_r1")
        return create_app(make_settings(**settings), engine), engine

    return build


THOUGHTS = ["<think>", "Let me", " think", "</think>", "Hello."]


async def test_thoughts_are_never_content(thinking: Callable[..., Any]) -> None:
    app, engine = thinking()
    engine.script = THOUGHTS
    async with open_client(app) as c:
        body = chat_body(stream=True, stream_options={"include_usage": True}, max_tokens=50)
        chunks = sse_chunks(await c.post("/v1/chat/completions", json=body))
        # Thoughts in vLLM 0.32's `reasoning` and again in the older `reasoning_content`.
        assert deltas(chunks) == [
            ({"role": "assistant", "reasoning": "Let me", "reasoning_content": "Let me"}, None),
            ({"reasoning": " think", "reasoning_content": " think"}, None),
            ({"content": "Hello."}, None),
            ({}, "stop"),
        ]
        usage = chunks[-1]["usage"]
        assert usage["completion_tokens_details"] == {"reasoning_tokens": 3}
        assert usage["prompt_tokens_details"] == {"cached_tokens": 0}

        r = await c.post("/v1/chat/completions", json=chat_body(max_tokens=50))
        message = r.json()["choices"][0]["message"]
        assert (message["content"], message["reasoning"]) == ("Hello.", "Let me think")
        assert message["reasoning_content"] == "Let me think"

        body = chat_body(stream=True, max_tokens=50, include_reasoning=False)
        got = deltas(sse_chunks(await c.post("/v1/chat/completions", json=body)))
        assert got == [({"role": "assistant", "content": "Hello."}, None), ({}, "stop")]


async def test_thoughts_then_a_call(thinking: Callable[..., Any]) -> None:
    app, engine = thinking(**TOOLS_ON)
    engine.script = [*THOUGHTS[:4], CALL]
    async with open_client(app) as c:
        got = deltas(sse_chunks(await c.post("/v1/chat/completions", json=tool_body())))
    assert [list(d) for d, _ in got] == [
        ["role", "reasoning", "reasoning_content"],
        ["reasoning", "reasoning_content"],
        ["tool_calls"],
        ["tool_calls"],
        [],
    ]
    assert got[-1][1] == "tool_calls"


async def test_thinking_switch_reaches_the_template(thinking: Callable[..., Any]) -> None:
    app, engine = thinking()
    engine.script = ["Hi."]
    async with open_client(app) as c:
        body = chat_body(chat_template_kwargs={"enable_thinking": False})
        assert (await c.post("/v1/chat/completions", json=body)).status_code == 200
        assert engine.turns[-1].template_kwargs == {"enable_thinking": False}
        body = chat_body(reasoning_effort="none")
        assert (await c.post("/v1/chat/completions", json=body)).status_code == 200
        assert engine.turns[-1].template_kwargs == {"enable_thinking": False}


# -- the history an agent resends -----------------------------------------------------------


async def test_tool_history_is_accepted(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.script = ["It is sunny."]
    r = await client.post(
        "/v1/chat/completions", json=tool_body(messages=TOOL_HISTORY, stream=False)
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "It is sunny."
    rendered = engine.rendered[-1]
    assert rendered[2]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert rendered[2]["content"] is None
    assert rendered[3] == {"role": "tool", "content": "Sunny, 24 C.", "tool_call_id": "call_1"}


async def test_thinking_time_is_measured_apart(thinking: Callable[..., Any]) -> None:
    app, engine = thinking()
    engine.script = THOUGHTS
    async with open_client(app) as c:
        body = chat_body(stream=True, max_tokens=50)
        sse_chunks(await c.post("/v1/chat/completions", json=body))
    text = generate_latest(app.state.metrics.registry).decode()
    count = [line for line in text.splitlines() if line.startswith("avatar_reasoning_tokens_sum")]
    assert count and float(count[0].rsplit(" ", 1)[1]) == 3
    assert "avatar_reasoning_seconds_count" in text
