"""Shared by the agent tests: the demo model's tokenizer, tools, and SSE reading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}

# The history an agent resends: a call (content null) and its result.
TOOL_HISTORY = [
    {"role": "system", "content": "You are a guide."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 C."},
]


def demo_tokenizer(folder: Path) -> Any:
    """The demo model's tokenizer (the markers of tool calls and thinking are one token each)."""
    from transformers import AutoTokenizer

    from serve.demo_model import train_tokenizer

    train_tokenizer(folder)
    return AutoTokenizer.from_pretrained(str(folder))


def sse_chunks(r: httpx.Response) -> list[dict[str, Any]]:
    """The JSON chunks of an SSE body (the final [DONE] checked and dropped)."""
    assert r.status_code == 200, r.text
    frames = [f for f in r.text.split("\n\n") if f]
    assert frames[-1] == "data: [DONE]"
    return [json.loads(f.removeprefix("data: ")) for f in frames[:-1]]


def deltas(chunks: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str | None]]:
    """(delta, finish_reason) of each choice chunk, tool-call ids replaced by ``ID<index>`` after
    checking that each call keeps one id."""
    out = []
    ids: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = json.loads(json.dumps(choice["delta"]))
            for call in delta.get("tool_calls", []):
                if "id" in call:
                    assert call["id"].startswith("chatcmpl-tool-"), call
                    assert ids.setdefault(call["index"], call["id"]) == call["id"]
                    call["id"] = f"ID{call['index']}"
            out.append((delta, choice["finish_reason"]))
    return out
