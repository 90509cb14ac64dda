"""Tool calls, structured output and the agent's history on the real engine and the demo model,
through the official OpenAI SDK and LiveKit Agents' own OpenAI client. The run's shared server
has the tool flags (``--enable-auto-tool-choice --tool-call-parser hermes``); the other servers
are in tests/e2e/conftest.py.

The demo model's weights are random: what it writes is gibberish, but guided decoding must make
every forced call's arguments valid JSON that matches the tool's schema. The schemas use enums
and maxLength, so a random model finishes a call in a few dozen tokens.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import httpx
import jsonschema
import pytest
from openai import AsyncOpenAI
from pydantic import Field

from tests.support import (
    ENDLESS_TOKENS,
    MODEL,
    TEST_API_KEY,
    ServerProcess,
    metric_value,
    wait_until,
)
from tests.unit.agents import TOOL_HISTORY

MOOD = {
    "type": "object",
    "properties": {
        "mood": {"type": "string", "enum": ["happy", "sad", "calm"]},
        "note": {"type": "string", "maxLength": 12},
    },
    "required": ["mood", "note"],
    "additionalProperties": False,
}
WAVE = {
    "type": "object",
    "properties": {"hand": {"type": "string", "enum": ["left", "right"]}},
    "required": ["hand"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "set_mood", "parameters": MOOD}},
    {"type": "function", "function": {"name": "wave", "parameters": WAVE}},
]
SCHEMAS = {"set_mood": MOOD, "wave": WAVE}
NAMED = {"type": "function", "function": {"name": "set_mood"}}
USER = [{"role": "user", "content": "Hello! How are you today?"}]


def sdk(server: ServerProcess) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=server.base_url + "/v1", api_key=TEST_API_KEY, max_retries=0)


def assert_valid_call(name: str, arguments: str) -> None:
    assert name in SCHEMAS, name
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])  # strict JSON: no raw controls


@pytest.mark.parametrize("choice", ["required", NAMED], ids=["required", "named"])
async def test_forced_calls_match_the_schema(server: ServerProcess, choice: Any) -> None:
    for seed in range(6):
        resp = await sdk(server).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Hello number {seed}!"}],  # type: ignore[list-item]
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice=choice,
            parallel_tool_calls=False,
            max_completion_tokens=400,
            seed=seed,
        )
        choice_ = resp.choices[0]
        assert choice_.finish_reason == ("stop" if choice is NAMED else "tool_calls")
        calls = choice_.message.tool_calls or []
        assert len(calls) == 1 and choice_.message.content is None
        call = calls[0]
        assert call.type == "function" and call.id
        if choice is NAMED:
            assert call.function.name == "set_mood"
        assert_valid_call(call.function.name, call.function.arguments)


async def test_forced_calls_without_a_parser_are_json_guided(small_server: ServerProcess) -> None:
    """A server with no tool parser (its limits do not come into it: one request at a time):
    forced calls take vLLM's generic JSON route."""
    assert not {"--tool-call-parser", "--reasoning-parser"} & set(small_server.proc.args)
    for choice in ("required", NAMED):
        for seed in range(3):
            resp = await sdk(small_server).chat.completions.create(
                model=MODEL,
                messages=USER,  # type: ignore[arg-type]
                tools=TOOLS,  # type: ignore[arg-type]
                tool_choice=choice,  # type: ignore[arg-type]
                parallel_tool_calls=False,
                max_completion_tokens=400,
                seed=seed,
            )
            [call] = resp.choices[0].message.tool_calls or []
            assert_valid_call(call.function.name, call.function.arguments)


async def test_sdk_accumulates_streamed_calls(server: ServerProcess) -> None:
    """The SDK's own stream helper rebuilds the call from the fragments we stream."""
    async with sdk(server).chat.completions.stream(
        model=MODEL,
        messages=USER,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="required",
        parallel_tool_calls=False,
        max_completion_tokens=400,
        seed=3,
    ) as stream:
        fragments = []
        async for event in stream:
            if event.type == "tool_calls.function.arguments.delta":
                fragments.append(event.arguments_delta)
        final = await stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert len(fragments) > 1, "the arguments arrive in fragments"
    assert call.function.arguments == "".join(fragments)
    assert_valid_call(call.function.name, call.function.arguments)


async def test_raw_stream_of_a_forced_call(server: ServerProcess) -> None:
    body = {
        "model": MODEL,
        "messages": USER,
        "tools": TOOLS,
        "tool_choice": NAMED,
        "stream": True,
        "max_tokens": 400,
        "seed": 1,
    }
    headers = {"Authorization": f"Bearer {TEST_API_KEY}"}
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body, headers=headers)
    frames = [f.removeprefix("data: ") for f in r.text.split("\n\n") if f]
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f)["choices"][0] for f in frames[:-1]]
    opening = chunks[0]["delta"]
    assert opening["role"] == "assistant" and opening["content"] is None
    [head] = opening["tool_calls"]
    assert head["index"] == 0 and head["id"].startswith("chatcmpl-tool-")
    assert head["type"] == "function" and head["function"] == {"name": "set_mood", "arguments": ""}
    middle = [c["delta"]["tool_calls"] for c in chunks[1:-1]]
    assert all(len(m) == 1 and set(m[0]) == {"index", "function"} for m in middle)
    assert chunks[-1] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    arguments = "".join(m[0]["function"]["arguments"] for m in middle)
    assert_valid_call("set_mood", arguments)


async def test_json_schema_output_validates(server: ServerProcess) -> None:
    for seed in range(4):
        resp = await sdk(server).chat.completions.create(
            model=MODEL,
            messages=USER,  # type: ignore[arg-type]
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "mood", "schema": MOOD, "strict": True},
            },
            max_completion_tokens=400,
            seed=seed,
        )
        assert resp.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(resp.choices[0].message.content or ""), MOOD)
    resp = await sdk(server).chat.completions.create(
        model=MODEL,
        messages=USER,  # type: ignore[arg-type]
        response_format={"type": "json_object"},
        max_completion_tokens=8,
    )
    assert (resp.choices[0].message.content or "").lstrip().startswith("{")


async def test_tool_history_and_the_prefix_cache(server: ServerProcess) -> None:
    """An agent resends the conversation, tool turns included, each turn: it is accepted, and
    the second time the prefix cache serves most of it."""
    cached = []
    for _ in range(2):
        resp = await sdk(server).chat.completions.create(
            model=MODEL,
            messages=TOOL_HISTORY,  # type: ignore[arg-type]
            tools=[*TOOLS, {"type": "function", "function": {"name": "get_weather"}}],  # type: ignore[list-item]
            max_completion_tokens=8,
            extra_body={"ignore_eos": True},
        )
        assert resp.choices[0].finish_reason in ("length", "tool_calls", "stop")
        usage = resp.usage
        assert usage is not None and usage.prompt_tokens_details is not None
        cached.append(usage.prompt_tokens_details.cached_tokens or 0)
        prompt_tokens = usage.prompt_tokens
    assert cached[1] >= prompt_tokens // 2, (cached, prompt_tokens)


async def test_auto_streams_text_with_tools(server: ServerProcess) -> None:
    stream = await sdk(server).chat.completions.create(
        model=MODEL,
        messages=USER,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        stream=True,
        max_completion_tokens=16,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] in ("length", "stop", "tool_calls") and not any(finish[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 16


async def test_livekit_agents_client(server: ServerProcess) -> None:
    """LiveKit Agents' own OpenAI plugin, as a voice agent drives us: a spoken reply, then a
    forced tool call, then a reply after the tool's result."""
    from livekit.agents import llm
    from livekit.plugins import openai as lk_openai

    @llm.function_tool
    async def set_mood(
        mood: Literal["happy", "sad", "calm"],
        note: Annotated[str, Field(max_length=12)],
    ) -> str:
        """Set the avatar's mood."""
        return "ok"

    model = lk_openai.LLM(
        model=MODEL,
        base_url=server.base_url + "/v1",
        api_key=TEST_API_KEY,
        max_completion_tokens=300,
        parallel_tool_calls=False,  # one call, then the end: a random model would go on
    )
    # The demo model's weights are random: its end of sequence can come first (a full run saw it
    # once, a one-token reply to the tool's result). A spoken reply asks for a few tokens, sent
    # the way LiveKit sends any extra field.
    spoken = {"extra_body": {"min_tokens": 4}}
    ctx = llm.ChatContext.empty()
    ctx.add_message(role="system", content="You are a friendly avatar.")
    ctx.add_message(role="user", content="Hello!")

    async def run(**kwargs: Any) -> tuple[str, list[llm.FunctionToolCall], Any]:
        text, calls, usage = "", [], None
        async with model.chat(chat_ctx=ctx, **kwargs) as stream:
            async for chunk in stream:
                if chunk.delta is not None:
                    text += chunk.delta.content or ""
                    calls += chunk.delta.tool_calls or []
                if chunk.usage is not None:
                    usage = chunk.usage
        return text, calls, usage

    text, calls, usage = await run(tools=[set_mood], tool_choice="none", extra_kwargs=spoken)
    assert text and not calls and usage is not None and usage.completion_tokens > 0

    text, calls, _ = await run(tools=[set_mood], tool_choice="required")
    assert len(calls) >= 1
    arguments = json.loads(calls[0].arguments)
    assert calls[0].name == "set_mood" and arguments["mood"] in ("happy", "sad", "calm")
    assert isinstance(arguments["note"], str)

    # The agent runs the tool and sends the call and its result back, in LiveKit's own shape.
    ctx.insert(
        llm.FunctionCall(call_id=calls[0].call_id, name=calls[0].name, arguments=calls[0].arguments)
    )
    ctx.insert(
        llm.FunctionCallOutput(
            call_id=calls[0].call_id, name=calls[0].name, output="ok", is_error=False
        )
    )
    text, calls, usage = await run(tools=[set_mood], tool_choice="none", extra_kwargs=spoken)
    assert text and not calls
    assert usage is not None and usage.prompt_cached_tokens > 0


async def test_thoughts_are_never_spoken(reasoning_server: ServerProcess) -> None:
    """DeepSeek-R1 style: the answer thinks until </think>. With </think> banned (logit_bias)
    every token is a thought, so nothing may reach `content`, nor the TTFT clock; with thinking
    switched off in the template the same model speaks."""
    client = AsyncOpenAI(base_url=reasoning_server.base_url + "/v1", api_key="-", max_retries=0)
    from transformers import AutoTokenizer

    from tests.support import DEMO_MODEL_DIR

    end_think = AutoTokenizer.from_pretrained(str(DEMO_MODEL_DIR)).convert_tokens_to_ids("</think>")

    def ttft_count() -> float:
        text = reasoning_server.metrics()
        return metric_value(text, "avatar_time_to_first_token_seconds_count")

    before = ttft_count()
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=USER,  # type: ignore[arg-type]
        stream=True,
        max_completion_tokens=12,
        logit_bias={str(end_think): -100},
        extra_body={"ignore_eos": True},
    )
    deltas = [c.choices[0].delta for c in [c async for c in stream] if c.choices]
    thoughts = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert thoughts and not any(d.content for d in deltas)
    assert ttft_count() == before, "thoughts do not start the time to first token"

    resp = await client.chat.completions.create(
        model=MODEL,
        messages=USER,  # type: ignore[arg-type]
        max_completion_tokens=12,
        extra_body={"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}},
    )
    message = resp.choices[0].message
    assert message.content and not getattr(message, "reasoning_content", None)
    assert ttft_count() == before + 1


async def test_vllms_own_request_bound_refuses_a_turn_with_a_429_and_serves_on(
    reasoning_server: ServerProcess,
) -> None:
    """An operator who ran `vllm serve --max-num-queued-reqs N` keeps the flag: past the bound a
    turn is refused with a 429 a voice platform retries on another replica (not a 500 that
    says nothing), the turn in flight runs on, and the next turn after it is served."""
    url = reasoning_server.base_url + "/v1/chat/completions"
    long_turn = {"model": MODEL, "messages": USER, "stream": True,
                 "max_tokens": ENDLESS_TOKENS, "ignore_eos": True}  # fmt: skip
    short_turn = {"model": MODEL, "messages": USER, "max_tokens": 4}
    async with (
        httpx.AsyncClient(timeout=60) as client,
        client.stream("POST", url, json=long_turn) as held,
    ):
        assert held.status_code == 200
        lines = held.aiter_lines()
        while not (await anext(lines)).startswith("data: {"):
            pass  # the bound's one request is in the engine
        # A streamed turn, as a voice platform sends it: refused before its stream begins.
        refused = await client.post(url, json={**short_turn, "stream": True})
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert (error["type"], error["code"]) == ("rate_limit_error", "server_overloaded")
        frame = ""
        while not frame:  # frames are separated by blank lines
            frame = await anext(lines)
        assert frame.startswith("data: {"), "the turn in flight runs on"
    # Closing the held stream aborts it; the engine counts it out a moment later.
    served = wait_until(
        lambda: httpx.post(url, json=short_turn, timeout=60).status_code == 200, 30,
        what="a turn served after the held one ended",
    )  # fmt: skip
    assert served
    text = reasoning_server.metrics()
    assert metric_value(text, "avatar_requests_rejected_total", reason="overload") >= 1
