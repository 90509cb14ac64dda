"""Every malformed tool, tool choice, message or response format is a 400 naming the field;
fields that would change the answer unimplemented are refused; fields that change nothing are
accepted; and none of it disturbs a stream in flight."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from serve.engine.fake import FakeEngine
from tests.hostile_inputs import nested_list
from tests.unit.agents import TIME, WEATHER
from tests.unit.conftest import chat_body, open_client

TOOLS_ON = {"enable_auto_tool_choice": True, "tool_call_parser": "hermes"}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture
async def client(app_factory: Callable[..., FastAPI]) -> AsyncIterator[httpx.AsyncClient]:
    async with open_client(app_factory(**TOOLS_ON)) as c:
        yield c


def with_tools(**fields: Any) -> dict[str, Any]:
    return chat_body(**{"tools": [WEATHER, TIME], **fields})


def bad_name(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


def params(schema: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "f", "parameters": schema}}


def deep(levels: int) -> dict[str, Any]:
    """An object schema whose JSON nests exactly ``levels`` deep."""
    return {"type": "object", "default": nested_list(levels - 1)}


def answer(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}


def call(id: str = "call_1", name: str = "get_weather") -> dict[str, Any]:
    return {"id": id, "type": "function", "function": {"name": name, "arguments": "{}"}}


USER = {"role": "user", "content": "hi"}
ASKED = {"role": "assistant", "content": None, "tool_calls": [call()]}

BAD = [
    # tools
    ({"tools": "x"}, "tools"),
    ({"tools": [{"type": "function", "function": {}}]}, "tools.0.function.name"),
    ({"tools": [bad_name("has space")]}, "tools.0.function.name"),
    ({"tools": [bad_name("x" * 65)]}, "tools.0.function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"tools": [{"type": "function"}]}, "tools.0.function"),
    ({"tools": [params("x")]}, "tools.0.function.parameters"),
    ({"tools": [params({"type": "array"})]}, "tools.0.function.parameters"),
    ({"tools": [params({"type": 5})]}, "tools.0.function.parameters"),
    ({"tools": [WEATHER, WEATHER]}, "tools.1.function.name"),
    # past the nesting bound (64 levels, vLLM's own for schemas)
    ({"tools": [WEATHER, params(deep(65))]}, "tools.1.function.parameters"),
    ({"tools": [WEATHER] * 129}, "tools"),
    # tool_choice
    (with_tools(tool_choice="sometimes"), "tool_choice"),
    (with_tools(tool_choice=5), "tool_choice"),
    (with_tools(tool_choice={"type": "function"}), "tool_choice.function"),
    (with_tools(tool_choice={"type": "function", "function": {}}), "tool_choice.function.name"),
    (with_tools(tool_choice=bad_name("nope")), "tool_choice.function.name"),
    (with_tools(tool_choice={"type": "tool", "function": {"name": "f"}}), "tool_choice.type"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": NAMED}, "tool_choice.function.name"),
    (with_tools(parallel_tool_calls="yes"), "parallel_tool_calls"),
    # response_format
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
        "response_format.json_schema.name",
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": 1}}},
        "response_format.json_schema.schema",
    ),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "a", "schema": {"type": "nope"}},
            }
        },
        "response_format.json_schema.schema",
    ),
    ({"response_format": answer(deep(65))}, "response_format.json_schema.schema"),
    # messages
    ({"messages": [USER, {"role": "assistant", "content": None}]}, "messages.1.content"),
    ({"messages": [USER, {"role": "assistant"}]}, "messages.1.content"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
    ({"messages": [USER, ASKED, {"role": "tool", "content": "x"}]}, "messages.2.tool_call_id"),
    (
        {"messages": [USER, ASKED, {"role": "tool", "tool_call_id": "other", "content": "x"}]},
        "messages.2.tool_call_id",
    ),
    ({"messages": [USER, {"role": "tool", "tool_call_id": "call_1", "content": "x"}]}, None),
    ({"messages": [USER, ASKED, {"role": "tool", "tool_call_id": "call_1"}]}, None),
    ({"messages": [{**USER, "tool_calls": [call()]}]}, "messages.0.tool_calls"),
    ({"messages": [{**USER, "tool_call_id": "call_1"}]}, "messages.0.tool_call_id"),
    (
        {"messages": [USER, {**ASKED, "tool_calls": [{"id": "c", "type": "function"}]}]},
        "messages.1.tool_calls.0.function",
    ),
    (
        {"messages": [USER, {**ASKED, "tool_calls": [{**call(), "type": "code"}]}]},
        "messages.1.tool_calls.0.type",
    ),
    ({"messages": [{"role": "a role", "content": "x", "name": "f"}]}, "messages.0.role"),
    ({"messages": [{**USER, "name": 5}]}, "messages.0.name"),
    # template kwargs
    ({"chat_template_kwargs": "x"}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs.tools"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs.messages"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"include_reasoning": "no"}, "include_reasoning"),
    # fields that would change the answer and are not implemented
    ({"logprobs": "yes"}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities.1"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"chat_template": "{{ messages }}"}, "chat_template"),
    ({"verbosity": "low"}, "verbosity"),
    ({"guided_json": {"type": "object"}}, "guided_json"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"add_generation_prompt": False}, "add_generation_prompt"),
    ({"skip_special_tokens": False}, "skip_special_tokens"),
    ({"echo": True}, "echo"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 200}}, "logit_bias.5"),
]


@pytest.mark.parametrize(("fields", "param"), BAD, ids=[json.dumps(b[0])[:70] for b in BAD])
async def test_bad_shapes_are_400_naming_the_field(
    client: httpx.AsyncClient, fields: dict[str, Any], param: str | None
) -> None:
    r = await client.post("/v1/chat/completions", json=chat_body(**fields))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is None:  # pydantic's union branches: only the field's own path matters
        param = "messages"
    assert error["param"] == param or error["param"].startswith(param + "."), error


async def test_auto_without_a_parser_is_refused(app_factory: Callable[..., FastAPI]) -> None:
    async with open_client(app_factory()) as c:
        r = await c.post("/v1/chat/completions", json=with_tools())
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
        assert "--enable-auto-tool-choice" in r.json()["error"]["message"]
        # A forced call needs no parser: it is guided by the schema.
        for choice in ("required", NAMED, "none"):
            r = await c.post("/v1/chat/completions", json=with_tools(tool_choice=choice))
            assert r.status_code == 200, (choice, r.text)


ACCEPTED = [
    {"metadata": {"session": "a"}, "store": False, "service_tier": "auto"},
    {
        "prompt_cache_key": "k",
        "safety_identifier": "s",
        "user": "u",
        "prompt_cache_retention": "24h",
    },
    {"logprobs": False, "top_logprobs": 0, "logit_bias": {}, "functions": None},
    {"stream_options": {"include_usage": True, "include_obfuscation": False}, "stream": True},
    {"modalities": ["text"], "parallel_tool_calls": True, "response_format": {"type": "text"}},
    {"reasoning_effort": "low", "include_reasoning": False, "chat_template_kwargs": {"x": 1}},
    {"tools": [WEATHER], "tool_choice": "auto", "cache_salt": "s", "priority": 0},
    # at the nesting bound
    {"tools": [params(deep(64))], "response_format": answer(deep(64))},
]


@pytest.mark.parametrize("fields", ACCEPTED)
async def test_fields_that_change_nothing_are_accepted(
    client: httpx.AsyncClient, fields: dict[str, Any]
) -> None:
    r = await client.post("/v1/chat/completions", json=chat_body(**fields))
    assert r.status_code == 200, r.text


async def test_implemented_fields_reach_the_engine(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = with_tools(
        tool_choice=NAMED,
        parallel_tool_calls=False,
        logit_bias={"7": -100, "8": 2.5},
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    options, turn = engine.seen[-1][2], engine.turns[-1]
    assert options.logit_bias == ((7, -100.0), (8, 2.5))
    assert options.structured is not None and options.structured.json_schema == schema
    assert turn is not None
    assert (turn.tool_choice, turn.tool_name, turn.parallel_tool_calls) == (
        "function",
        "get_weather",
        False,
    )
    assert turn.tools[0] == WEATHER
    body = chat_body(response_format={"type": "json_object"})
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    options = engine.seen[-1][2]
    assert options.structured is not None and options.structured.json_schema is None
    assert engine.turns[-1] is not None and engine.turns[-1].tools == ()


async def test_text_completions_refuse_what_they_cannot_do(client: httpx.AsyncClient) -> None:
    body = {"model": chat_body()["model"], "prompt": "hi", "max_tokens": 3}
    for field, value in (("logprobs", -1), ("best_of", 3), ("guided_regex", "a+")):
        r = await client.post("/v1/completions", json={**body, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


async def test_bad_requests_do_not_disturb_a_stream(
    app_factory: Callable[..., FastAPI], engine: FakeEngine
) -> None:
    engine.token_delay = 0.002
    async with open_client(app_factory(**TOOLS_ON)) as c:

        async def stream() -> str:
            r = await c.post(
                "/v1/chat/completions", json=chat_body(stream=True, max_tokens=40, ignore_eos=True)
            )
            return r.text

        async def hostile() -> list[int]:
            codes = []
            for fields, _ in BAD:
                r = await c.post("/v1/chat/completions", json=chat_body(**fields))
                codes.append(r.status_code)
            return codes

        text, codes = await asyncio.gather(stream(), hostile())
    assert set(codes) == {400}
    frames = [f for f in text.split("\n\n") if f]
    assert frames[-1] == "data: [DONE]" and len(frames) == 41
    assert json.loads(frames[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
