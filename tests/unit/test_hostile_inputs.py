"""Every hostile input of ``tests/hostile_inputs.py`` gets its 4xx, on the fake engine."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from serve.engine.fake import FakeEngine
from tests.hostile_inputs import CASES, body_for, nested_list, raw_cases
from tests.unit.conftest import MODEL, chat_body


def _assert_error(response: httpx.Response, status: int, param: str | None) -> None:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, err


@pytest.mark.parametrize(("path", "body", "status", "param"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
async def test_hostile_body_gets_its_4xx_and_the_engine_never_sees_it(
    client: httpx.AsyncClient,
    engine: FakeEngine,
    path: str,
    body: dict[str, Any],
    status: int,
    param: str | None,
) -> None:
    _assert_error(await client.post(path, json=body_for(body, MODEL)), status, param)
    assert engine.seen == [], "refused at the door, before the engine"
    # Nothing is left behind: the next ordinary request is served.
    assert (await client.post("/v1/chat/completions", json=chat_body())).status_code == 200


@pytest.mark.parametrize(("path", "raw", "status"), [c[1:] for c in raw_cases()],
                         ids=[c[0] for c in raw_cases()])  # fmt: skip
async def test_non_finite_numbers_are_refused(
    client: httpx.AsyncClient, path: str, raw: bytes, status: int
) -> None:
    response = await client.post(
        path,
        content=raw.replace(b"{model}", MODEL.encode()),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


async def test_a_token_id_just_inside_the_vocabulary_is_served(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    last = engine.vocab_size - 1
    body = {"model": MODEL, "prompt": [0, last], "max_tokens": 2}
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    _assert_error(
        await client.post("/v1/completions", json={**body, "prompt": [0, last + 1]}), 400, "prompt"
    )


async def test_logit_bias_refusal_names_every_bad_key_and_the_vocabulary(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    # str.isdigit() takes all three; int() refuses the first and reads the others as 3 and 1.
    bad = {"\u00b2": 1, "\u0663": 1, "\uff11": 1, "abc": 1, "-1": 1, "1000": 1}
    r = await client.post("/v1/chat/completions", json=chat_body(logit_bias={**bad, "7": 1}))
    _assert_error(r, 400, "logit_bias")
    message = r.json()["error"]["message"]
    for shown in (r"'\xb2'", r"'\u0663'", r"'\uff11'", "'abc'", "'-1'", "'1000'"):
        assert shown in message, message
    assert "'7'" not in message and "1000 tokens" in message and "0 to 999" in message
    assert engine.seen == []
    # ASCII digits are token ids, leading zeros and all.
    r = await client.post("/v1/chat/completions", json=chat_body(logit_bias={"0007": 2.5}))
    assert r.status_code == 200, r.text
    assert engine.seen[-1][2].logit_bias == ((7, 2.5),)


async def test_many_bad_logit_bias_keys_make_a_bounded_message(client: httpx.AsyncClient) -> None:
    keys = {f"x{i}": 1 for i in range(5000)}
    r = await client.post("/v1/chat/completions", json=chat_body(logit_bias=keys))
    _assert_error(r, 400, "logit_bias")
    message = r.json()["error"]["message"]
    assert "'x0'" in message and "4984 more" in message and len(message) < 1000


async def test_nesting_refusals_say_the_bound(client: httpx.AsyncClient) -> None:
    deep_kwargs = chat_body(chat_template_kwargs={"x": nested_list(65)})
    r = await client.post("/v1/chat/completions", json=deep_kwargs)
    _assert_error(r, 400, "chat_template_kwargs.x")
    assert "64 levels" in r.json()["error"]["message"]
    # At the bound exactly, it is served.
    at_bound = chat_body(chat_template_kwargs={"x": nested_list(64)})
    assert (await client.post("/v1/chat/completions", json=at_bound)).status_code == 200
