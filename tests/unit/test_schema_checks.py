"""Tool schemas are checked once, off the event loop: agents resend the same tools every turn,
and a check costs milliseconds that would stall every stream. The memory of checks is bounded;
a prompt made long by tools or tool-call arguments is rendered off the loop too."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import pytest

import serve.schemas
from serve.engine.base import ChatTurn
from serve.engine.fake import FakeEngine
from serve.schemas import SchemaChecks
from tests.unit.agents import TIME, WEATHER
from tests.unit.conftest import chat_body


@pytest.fixture
def checked(monkeypatch: pytest.MonkeyPatch) -> list[tuple[dict[str, Any], threading.Thread]]:
    """Each schema jsonschema really checks, and the thread it is checked on."""
    calls: list[tuple[dict[str, Any], threading.Thread]] = []
    check = serve.schemas._check

    def spy(schema: dict[str, Any]) -> str | None:
        calls.append((schema, threading.current_thread()))
        return check(schema)

    monkeypatch.setattr(serve.schemas, "_check", spy)
    return calls


def answer(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}


def reordered(tool: dict[str, Any]) -> dict[str, Any]:
    """The same tool with its schema's keys in another order, as another client may send it."""
    params = tool["function"]["parameters"]
    swapped = dict(reversed(list(params.items())))
    return {**tool, "function": {**tool["function"], "parameters": swapped}}


async def test_an_agents_tools_are_checked_once_off_the_event_loop(
    client: httpx.AsyncClient, checked: list[tuple[dict[str, Any], threading.Thread]]
) -> None:
    loop_thread = threading.current_thread()
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    body = chat_body(tools=[WEATHER, TIME], tool_choice="none", response_format=answer(schema))
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert len(checked) == 3
    assert all(thread is not loop_thread for _, thread in checked), "checked on the event loop"
    # Every later turn resends them (in any key order): no check at all.
    for tools in ([WEATHER, TIME], [reordered(WEATHER), TIME], [TIME, WEATHER]):
        r = await client.post("/v1/chat/completions", json={**body, "tools": tools})
        assert r.status_code == 200, r.text
    assert len(checked) == 3


async def test_an_invalid_schema_is_refused_every_time_and_checked_once(
    client: httpx.AsyncClient, checked: list[tuple[dict[str, Any], threading.Thread]]
) -> None:
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}
    for position in (0, 1, 1):
        tools = [WEATHER, bad] if position else [bad, WEATHER]
        r = await client.post("/v1/chat/completions", json=chat_body(tools=tools))
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == f"tools.{position}.function.parameters"
        assert error["message"].startswith("Invalid JSON Schema: 5 is not valid")
    assert [schema for schema, _ in checked] == [{"type": 5}, WEATHER["function"]["parameters"]]


def test_the_memory_of_checks_is_bounded_and_keeps_the_recent_ones(
    checked: list[tuple[dict[str, Any], threading.Thread]],
) -> None:
    checks = SchemaChecks(max_entries=8)
    schemas = [{"type": "object", "description": "x" * 10_000 + str(i)} for i in range(100)]
    recent = {"type": "object"}
    for schema in schemas:
        assert checks.check(schema) is None
        assert checks.check(recent) is None  # used all along: never evicted
    assert len(checks) == 8
    assert len(checked) == 101
    # An evicted schema is checked again, with the same answer.
    assert checks.check(schemas[0]) is None and len(checked) == 102
    assert checks.check({"type": "nope"}) is not None
    assert len(checks) == 8


async def test_tools_and_call_arguments_count_toward_rendering_off_the_loop(
    client: httpx.AsyncClient, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop_thread = threading.current_thread()
    threads: list[threading.Thread] = []
    render = engine.render_chat

    def spy(messages: Any, turn: ChatTurn | None = None) -> str:
        threads.append(threading.current_thread())
        return render(messages, turn)

    monkeypatch.setattr(engine, "render_chat", spy)

    async def rendered_on_the_loop(**fields: Any) -> bool:
        r = await client.post("/v1/chat/completions", json=chat_body(**fields))
        assert r.status_code == 200, r.text
        return threads[-1] is loop_thread

    # A short conversation: first with a schema never seen (checked and rendered in a worker
    # thread), then with it known (rendered at once, no thread hop).
    assert not await rendered_on_the_loop(tools=[WEATHER], tool_choice="none")
    assert await rendered_on_the_loop(tools=[WEATHER], tool_choice="none")
    # 20 kB of arguments in the history: the template writes them all.
    arguments = json.dumps({"text": "x" * 20_000})
    function = {"name": "get_weather", "arguments": arguments}
    call = {"id": "c", "type": "function", "function": function}
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c", "content": "ok"},
    ]
    assert not await rendered_on_the_loop(messages=history, tools=[WEATHER], tool_choice="none")
    # 20 kB of tool descriptions, schemas already checked (a second turn).
    wordy = {**WEATHER, "function": {**WEATHER["function"], "description": "y" * 20_000}}
    assert not await rendered_on_the_loop(tools=[wordy], tool_choice="none")
    assert not await rendered_on_the_loop(tools=[wordy], tool_choice="none")
