"""vLLM's parsers and templates as the adapter drives them, step by step on the demo tokenizer."""

from __future__ import annotations

import json
from typing import Any

import pytest

from serve.engine.base import ChatConfig, ChatTurn, EngineInputError, SamplingOptions
from tests.unit.agents import TIME, WEATHER, demo_tokenizer

HERMES = ChatConfig(enable_auto_tool_choice=True, tool_call_parser="hermes")
OPTIONS = SamplingOptions(max_tokens=100)


def ChatSupport(*args: Any, **kwargs: Any) -> Any:  # stands for the class
    """vLLM's import (seconds) at the first test, not at collection: ``--fast`` runs on
    several workers, and every worker collects every module."""
    from serve.engine.vllm_agents import ChatSupport as cls

    return cls(*args, **kwargs)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return demo_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_text_before_a_call_is_never_held_back(tokenizer: Any) -> None:
    parser = ChatSupport(tokenizer).start(ChatTurn(HERMES, (WEATHER,), "auto"), OPTIONS, [1])
    steps = ["Sure", ", one", " moment.", "<tool_call>", '{"name": "get_weather", "arguments": {}}']
    texts = [
        parser.feed(s, tokenizer.encode(s, add_special_tokens=False), None).text for s in steps
    ]
    assert texts == ["Sure", ", one", " moment.", "", ""], "each piece leaves in its own step"


def test_plain_requests_are_not_parsed(tokenizer: Any) -> None:
    chat = ChatSupport(tokenizer)
    assert not chat.parses(ChatTurn(HERMES))
    assert not chat.parses(ChatTurn(HERMES, (WEATHER,), "none"))
    assert chat.parses(ChatTurn(HERMES, (WEATHER,), "auto"))
    assert ChatSupport(tokenizer, reasoning_parser="deepseek_r1").parses(ChatTurn(HERMES))


def test_forced_calls_pin_the_argument_schema(tokenizer: Any) -> None:
    """vLLM leaves the arguments of a tool without `strict` free; a forced call here is always
    guided by the tool's schema, in the parser's own format or as JSON without a parser."""
    chat = ChatSupport(tokenizer)
    for turn in (
        ChatTurn(HERMES, (WEATHER, TIME), "required"),
        ChatTurn(HERMES, (WEATHER, TIME), "function", "get_weather"),
    ):
        guided = chat.start(turn, OPTIONS, [1]).structured
        assert guided is not None and guided.structural_tag is not None
        tag = guided.structural_tag
        assert json.dumps(WEATHER["function"]["parameters"]) in tag, "the schema is pinned"
        assert "<tool_call>" in tag
    named = chat.start(ChatTurn(ChatConfig(), (WEATHER,), "function", "get_weather"), OPTIONS, [1])
    assert named.structured is not None
    assert named.structured.json == WEATHER["function"]["parameters"]
    required = chat.start(ChatTurn(ChatConfig(), (WEATHER,), "required"), OPTIONS, [1])
    assert required.structured is not None and required.structured.json["minItems"] == 1


def test_auto_needs_a_tool_parser(tokenizer: Any) -> None:
    chat = ChatSupport(tokenizer, reasoning_parser="deepseek_r1")
    with pytest.raises(EngineInputError) as err:
        chat.start(ChatTurn(ChatConfig(), (WEATHER,), "auto"), OPTIONS, [1])
    assert err.value.param == "tool_choice"


def test_unknown_parsers_and_templates_fail_at_start(tokenizer: Any) -> None:
    chat = ChatSupport(tokenizer)
    with pytest.raises(ValueError):
        chat.check(ChatConfig(enable_auto_tool_choice=True, tool_call_parser="no-such-parser"))
    with pytest.raises(ValueError):
        chat.check(ChatConfig(chat_template="/no/such/template.jinja"))
    with pytest.raises((TypeError, RuntimeError, ValueError)):
        ChatSupport(tokenizer, reasoning_parser="no-such-parser")


def test_the_demo_template_renders_tools_calls_and_results(tokenizer: Any) -> None:
    chat = ChatSupport(tokenizer)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "c2",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": "x"},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "Sunny."},
        {"role": "tool", "tool_call_id": "c2", "content": "Noon."},
    ]
    text = chat.render(messages, ChatTurn(ChatConfig(), (WEATHER, TIME), "auto"))
    assert "<|start|>system\nBe brief.\n\n# Tools" in text
    assert json.dumps(WEATHER) in text and json.dumps(TIME) in text
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    )
    assert '{"name": "get_time", "arguments": {}}' in text, "unparsable arguments render as {}"
    assert (
        "<|start|>user\n<tool_response>\nSunny.\n</tool_response>\n<tool_response>\nNoon." in text
    )
    assert text.endswith("</tool_response><|end|>\n<|start|>assistant\n")
    off = ChatTurn(ChatConfig(), template_kwargs={"enable_thinking": False})
    assert chat.render(messages[:2], off).endswith("<|start|>assistant\n<think>\n\n</think>\n\n")
    plain = chat.render(messages[:2], None)
    assert plain.endswith("Weather in Paris?<|end|>\n<|start|>assistant\n") and "Tools" not in plain


def test_a_template_that_refuses_is_a_400(tokenizer: Any) -> None:
    chat = ChatSupport(tokenizer)
    config = ChatConfig(chat_template="{{ raise_exception('no system turns') }}")
    with pytest.raises(EngineInputError) as err:
        chat.render([{"role": "user", "content": "x"}], ChatTurn(config))
    assert err.value.param == "messages" and err.value.public
