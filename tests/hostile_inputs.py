"""Inputs that once got a 500 (or could), shared by the unit tests (fake engine) and the e2e
tests (the real vLLM engine): each must get a 4xx with the OpenAI error shape and ``param``.

The first five were found by the fuzz test and by hand (issue: a 500 for ``"prompt": []``,
out-of-vocabulary and negative token ids, ``min_tokens`` above ``max_tokens``). Those after
``stream-min-tokens`` came from issue 20: client JSON nested deep enough to make a recursive check
raise ``RecursionError`` (or, as a ``$ref`` chain, overflow xgrammar's C++ stack), schemas
jsonschema itself trips over, and ``logit_bias`` keys that ``str.isdigit`` takes and ``int``
refuses or misreads.
"""

from __future__ import annotations

from typing import Any

MODEL_PLACEHOLDER = "{model}"


def _completion(prompt: Any, **fields: Any) -> dict[str, Any]:
    return {"model": MODEL_PLACEHOLDER, "prompt": prompt, "max_tokens": 3, **fields}


def _chat(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL_PLACEHOLDER,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
    }
    return {**body, **fields}


# (case id, path, body, expected status, expected param)
CASES: list[tuple[str, str, dict[str, Any], int, str | None]] = [
    ("empty-token-list", "/v1/completions", _completion([]), 400, "prompt"),
    ("token-id-past-vocab", "/v1/completions", _completion([999_999_999]), 400, "prompt"),
    ("negative-token-id", "/v1/completions", _completion([5, -1]), 400, "prompt"),
    ("token-id-2**63", "/v1/completions", _completion([2**63]), 400, "prompt"),
    ("min-tokens-above-max", "/v1/chat/completions", _chat(min_tokens=10), 400, "min_tokens"),
    ("token-id-2**70", "/v1/completions", _completion([2**70]), 400, "prompt"),
    ("float-token-id", "/v1/completions", _completion([1.5]), 400, "prompt"),
    ("empty-string-prompt", "/v1/completions", _completion(""), 400, "prompt"),
    ("seed-2**70", "/v1/chat/completions", _chat(seed=2**70), 400, "seed"),
    ("seed--2**70", "/v1/chat/completions", _chat(seed=-(2**70)), 400, "seed"),
    ("max-tokens-2**70", "/v1/chat/completions", _chat(max_tokens=2**70), 400, "max_tokens"),
    ("temperature-1e308", "/v1/chat/completions", _chat(temperature=1e308), 400, "temperature"),
    (
        "stream-min-tokens",
        "/v1/chat/completions",
        _chat(stream=True, min_tokens=9),
        400,
        "min_tokens",
    ),
]


def nested_schema(levels: int) -> dict[str, Any]:
    """An object schema with an object property ``levels`` deep: ``2 * levels + 1`` JSON levels."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def nested_list(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def _tools(schema: Any, count: int = 1) -> dict[str, Any]:
    fns = [{"name": f"f{i}", "parameters": schema} for i in range(count)]
    # tool_choice none: the server under test may run without a tool-call parser.
    return {"tools": [{"type": "function", "function": fn} for fn in fns], "tool_choice": "none"}


def _response_schema(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def _history(arguments: str) -> list[dict[str, Any]]:
    """A conversation whose earlier assistant turn called a tool with ``arguments``."""
    call = {"id": "c1", "type": "function", "function": {"name": "f0", "arguments": arguments}}
    return [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
    ]


def _pattern(regex: str) -> dict[str, Any]:
    return {"type": "object", "properties": {"a": {"type": "string", "pattern": regex}}}


def _ref_chain(length: int) -> dict[str, Any]:
    defs: dict[str, Any] = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(length)}
    defs[f"d{length}"] = {"type": "string"}
    return {"type": "object", "properties": {"a": {"$ref": "#/$defs/d0"}}, "$defs": defs}


_PARAMS = "tools.0.function.parameters"
_SCHEMA = "response_format.json_schema.schema"
_ARGUMENTS = "messages.1.tool_calls.0.function.arguments"
CASES += [
    ("schema-100-deep-in-tools", "/v1/chat/completions", _chat(**_tools(nested_schema(100))),
     400, _PARAMS),
    ("schema-100-deep-in-response-format", "/v1/chat/completions",
     _chat(response_format=_response_schema(nested_schema(100))), 400, _SCHEMA),
    ("schema-65-levels-past-the-bound", "/v1/chat/completions",
     _chat(**_tools(nested_schema(32))), 400, _PARAMS),
    ("schema-$schema-a-list", "/v1/chat/completions",
     _chat(**_tools({"$schema": [], "type": "object"})), 400, _PARAMS),
    ("schema-$schema-a-number", "/v1/chat/completions",
     _chat(response_format=_response_schema({"$schema": 5})), 400, _SCHEMA),
    ("schema-pattern-groups-600-deep", "/v1/chat/completions",
     _chat(**_tools(_pattern("(" * 600 + ")" * 600))), 400, _PARAMS),
    ("schema-pattern-repeat-overflow", "/v1/chat/completions",
     _chat(**_tools(_pattern("a{99999999999999999999}"))), 400, _PARAMS),
    ("schema-20000-ref-chain", "/v1/chat/completions",
     _chat(response_format=_response_schema(_ref_chain(20_000))), 400, _SCHEMA),
    ("129-tools", "/v1/chat/completions", _chat(**_tools({"type": "object"}, count=129)),
     400, "tools"),
    ("template-kwarg-100-deep", "/v1/chat/completions",
     _chat(chat_template_kwargs={"x": nested_list(100)}), 400, "chat_template_kwargs.x"),
    ("call-arguments-5000-deep", "/v1/chat/completions",
     _chat(messages=_history("[" * 5000 + "]" * 5000), **_tools({"type": "object"})),
     400, _ARGUMENTS),
    ("logit-bias-superscript-two", "/v1/chat/completions", _chat(logit_bias={"\u00b2": 1}),
     400, "logit_bias"),
    ("logit-bias-arabic-indic-three", "/v1/chat/completions", _chat(logit_bias={"\u0663": 1}),
     400, "logit_bias"),
    ("logit-bias-fullwidth-one", "/v1/chat/completions", _chat(logit_bias={"\uff11": 1}),
     400, "logit_bias"),
    ("logit-bias-5000-digits", "/v1/chat/completions", _chat(logit_bias={"1" * 5000: 1}),
     400, "logit_bias"),
    ("max-tokens-1e30", "/v1/chat/completions", _chat(max_tokens=10**30), 400, "max_tokens"),
]  # fmt: skip


def body_for(body: dict[str, Any], model: str) -> dict[str, Any]:
    return {k: (model if v == MODEL_PLACEHOLDER else v) for k, v in body.items()}


def raw_cases() -> list[tuple[str, str, bytes, int]]:
    """Bodies JSON cannot express as Python values: NaN and infinities (not valid JSON)."""
    template = '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "temperature": %s}'
    return [
        (f"temperature-{lit}", "/v1/chat/completions", (template % ("{model}", lit)).encode(), 400)
        for lit in ("NaN", "Infinity", "-Infinity", "1e999")
    ]
