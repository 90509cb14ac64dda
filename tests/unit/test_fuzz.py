"""Property-based fuzzing of both generation routes: whatever a client sends, the answer is never
a 500, and every refusal is an OpenAI-style error body.

Deterministic in the test command: the ``ci`` Hypothesis profile derandomizes (the same examples
on every run, no example database), so a fuzz test cannot fail one run and pass the next. The
long randomized run is ``scripts/fuzz.sh``: the ``long`` profile, a count from
``AVATAR_FUZZ_EXAMPLES``, and, with ``AVATAR_FUZZ_BASE_URL``, a real server instead of the
in-process app on the fake engine.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve.app import create_app
from serve.engine.fake import FakeEngine
from tests.hostile_inputs import nested_list
from tests.unit.conftest import KEY, make_settings

PROFILE = os.environ.get("AVATAR_FUZZ_PROFILE", "ci")
EXAMPLES = int(os.environ.get("AVATAR_FUZZ_EXAMPLES", "400"))
BASE_URL = os.environ.get("AVATAR_FUZZ_BASE_URL")  # a running server; unset: in process
MODEL = os.environ.get("AVATAR_FUZZ_MODEL", "avatar-test")
API_KEY = os.environ.get("AVATAR_FUZZ_API_KEY", KEY)
ALLOWED = {200, 400, 401, 404, 413, 415, 429}
CONTENT_TYPES = ["application/json", "text/plain", "", "application/x-www-form-urlencoded"]

_common = {"deadline": None, "suppress_health_check": list(HealthCheck), "print_blob": True}
settings.register_profile("ci", derandomize=True, database=None, **_common)
settings.register_profile("long", derandomize=False, **_common)

json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
roles = st.sampled_from(["system", "user", "assistant", "developer", "tool", "robot", "", 3])
contents = (
    st.text(max_size=60)
    | st.lists(
        st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=10)}
        ),
        max_size=3,
    )
    | json_values
)
messages = (
    st.lists(st.fixed_dictionaries({"role": roles, "content": contents}), max_size=4) | json_values
)
sampling = {
    "model": st.sampled_from([MODEL, "other"]) | json_values,
    "stream": st.booleans() | json_values,
    "max_tokens": st.integers(-5, 10_000) | json_values,
    "max_completion_tokens": st.integers(-5, 300) | st.none(),
    "temperature": st.floats(-1, 3) | json_values,
    "top_p": st.floats(-1, 2),
    "top_k": st.integers(-3, 100),
    "min_p": st.floats(-1, 2),
    "seed": st.integers(-(2**70), 2**70),
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=20) | json_values,
    "n": st.integers(-1, 3),
    "presence_penalty": st.floats(-3, 3),
    "frequency_penalty": st.floats(-3, 3),
    "repetition_penalty": st.floats(-1, 12),
    "min_tokens": st.integers(-2, 50),
    "ignore_eos": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
    "logit_bias": json_values,
}


def bodies(extra: dict[str, Any]) -> st.SearchStrategy[Any]:
    fields = {**sampling, **extra}
    return (
        st.fixed_dictionaries({}, optional=fields).map(dict)
        | json_values
        | st.dictionaries(st.text(max_size=10), json_values, max_size=5)
    )


# Token ids: inside and outside the fake's 1000-word vocabulary and the demo model's, negative,
# and past int64 (2**63 once reached the engine and got a 500).
token_ids = st.lists(st.integers(-5, 2000) | st.integers(-(2**65), 2**65), max_size=8)
header_values = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
    max_size=150,
).map(lambda text: text.strip().encode("latin-1"))  # HTTP trims a value's outer spaces


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    if BASE_URL:
        with httpx.Client(base_url=BASE_URL, timeout=120) as remote:
            yield remote
        return
    engine = FakeEngine(max_model_len=512)
    app = create_app(make_settings(max_body_bytes=64 * 1024), engine)
    yield TestClient(app)


def check(response: Any) -> None:
    assert response.status_code in ALLOWED, (response.status_code, response.text)
    if response.status_code != 200:
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n")


def fuzz(strategy: st.SearchStrategy[Any], send: Callable[[Any], Any], examples: int) -> int:
    """Run ``send`` on ``examples`` draws of ``strategy``; return how many requests were sent.

    Counting inside the test itself keeps each test independent of the others and their order.
    """
    sent = 0

    @settings(settings.get_profile(PROFILE), max_examples=examples)
    @given(strategy)
    def run(case: Any) -> None:
        nonlocal sent
        sent += 1
        check(send(case))

    run()
    print(f"\nfuzz: {sent} requests, none answered 500")
    return sent


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}


def test_chat_never_500(client: Any) -> None:
    def send(body: Any) -> Any:
        return client.post("/v1/chat/completions", content=json.dumps(body), headers=_auth())

    assert fuzz(bodies({"messages": messages}), send, EXAMPLES) >= EXAMPLES // 2


def test_completions_never_500(client: Any) -> None:
    prompts = st.text(max_size=40) | token_ids | json_values

    def send(body: Any) -> Any:
        return client.post("/v1/completions", content=json.dumps(body), headers=_auth())

    strategy = bodies({"prompt": prompts, "echo": st.booleans()})
    assert fuzz(strategy, send, EXAMPLES) >= EXAMPLES // 2


def test_raw_bytes_and_headers_never_500(client: Any) -> None:
    raw_requests = st.tuples(
        st.binary(max_size=200),
        st.sampled_from(
            ["application/json", "text/plain", "", "application/x-www-form-urlencoded"]
        ),
        st.sampled_from([f"Bearer {API_KEY}", "Bearer nope", API_KEY, "", "Basic abc"]),
        header_values,
    )

    def send(case: tuple[bytes, str, str, bytes]) -> Any:
        raw, content_type, auth, request_id = case
        headers = {"content-type": content_type, "authorization": auth}
        return client.post(
            "/chat/completions", content=raw, headers={**headers, "x-request-id": request_id}
        )

    assert fuzz(raw_requests, send, EXAMPLES // 2) >= EXAMPLES // 4


# Client JSON that code below the door walks recursively (schemas, template kwargs, tool-call
# arguments), at depths on both sides of the bound, and logit_bias keys made of any digits.
def _deep_schema(kind: str, depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        if kind == "properties":
            schema = {"type": "object", "properties": {"a": schema}}
        elif kind == "items":
            schema = {"type": "array", "items": schema}
        elif kind == "anyOf":
            schema = {"anyOf": [schema, {"type": "null"}]}
        else:
            schema = {"not": schema}
    return schema


depths = st.integers(0, 150)
schemas = (
    st.builds(_deep_schema, st.sampled_from(["properties", "items", "anyOf", "not"]), depths)
    | st.builds(lambda depth: {"type": "object", "default": nested_list(depth)}, depths)
    | st.fixed_dictionaries({"type": st.just("object"), "$schema": json_values})
    | st.builds(
        lambda p: {"properties": {"a": {"pattern": p}}},
        st.text(alphabet="(){}[]a9,*?", max_size=40),
    )
    | st.builds(
        lambda n: {"properties": {"a": {"pattern": "(" * n + ")" * n}}}, st.integers(0, 800)
    )
)


def _tools(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"type": "function", "function": {"name": f"f{i}", "parameters": schema}}
        for i, schema in enumerate(found)
    ]


def _history(arguments: str) -> list[dict[str, Any]]:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
    return [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c", "content": "ok"},
    ]


digit_keys = st.text(st.characters(categories=("Nd", "No")) | st.sampled_from("0123456789"),
                     min_size=1, max_size=8)  # fmt: skip
nested_fields = {
    "tools": st.lists(schemas, max_size=3).map(_tools),
    "tool_choice": st.sampled_from(["none", "required"]),
    "response_format": schemas.map(
        lambda s: {"type": "json_schema", "json_schema": {"name": "a", "schema": s}}
    ),
    "chat_template_kwargs": st.dictionaries(
        st.text(max_size=4), depths.map(nested_list), max_size=2
    ),
    "logit_bias": st.dictionaries(digit_keys, st.floats(-100, 100), max_size=4),
    "messages": st.builds(
        lambda n, tail: _history("[" * n + tail), st.integers(0, 3000), st.text(max_size=8)
    ),
}


def test_nested_json_and_token_keys_never_500(client: Any) -> None:
    def send(fields: dict[str, Any]) -> Any:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        return client.post(
            "/v1/chat/completions", content=json.dumps({**body, **fields}), headers=_auth()
        )

    strategy = st.fixed_dictionaries({}, optional=nested_fields)
    assert fuzz(strategy, send, EXAMPLES // 4) >= EXAMPLES // 8
