"""Property-based fuzzing of both generation routes: whatever a client sends, the answer is never
a 500, and every refusal is an OpenAI-style error body."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve.app import create_app
from serve.engine.fake import FakeEngine
from tests.unit.conftest import KEY, MODEL, make_settings

EXAMPLES = 400
ALLOWED = {200, 400, 401, 404, 413, 415, 429}

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


@pytest.fixture(scope="module")
def client() -> TestClient:
    engine = FakeEngine(max_model_len=512)
    app = create_app(make_settings(max_body_bytes=64 * 1024), engine)
    return TestClient(app, headers={"Authorization": f"Bearer {KEY}"})


tried: dict[str, int] = {"chat": 0, "completions": 0, "raw": 0}


def check(response: Any) -> None:
    assert response.status_code in ALLOWED, (response.status_code, response.text)
    if response.status_code != 200:
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n")


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies({"messages": messages}))
def test_chat_never_500(client: TestClient, body: Any) -> None:
    tried["chat"] += 1
    check(client.post("/v1/chat/completions", content=json.dumps(body)))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=bodies(
        {"prompt": st.text(max_size=40) | st.lists(st.integers(-5, 2000), max_size=8) | json_values,
         "echo": st.booleans()}
    )
)  # fmt: skip
def test_completions_never_500(client: TestClient, body: Any) -> None:
    tried["completions"] += 1
    check(client.post("/v1/completions", content=json.dumps(body)))


@settings(max_examples=EXAMPLES // 2, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    raw=st.binary(max_size=200),
    content_type=st.sampled_from(
        ["application/json", "text/plain", "", "application/x-www-form-urlencoded"]
    ),
    auth=st.sampled_from([f"Bearer {KEY}", "Bearer nope", KEY, "", "Basic abc"]),
)
def test_raw_bytes_and_headers_never_500(
    client: TestClient, raw: bytes, content_type: str, auth: str
) -> None:
    tried["raw"] += 1
    headers = {"content-type": content_type, "authorization": auth}
    check(client.post("/chat/completions", content=raw, headers=headers))


def test_report_fuzz_count() -> None:
    """Prints how many cases the fuzz tests tried (run after them in file order)."""
    total = sum(tried.values())
    print(f"\nfuzz: {tried} = {total} requests, no 500")
    assert total >= EXAMPLES * 2, tried
