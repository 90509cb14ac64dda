"""Every hostile input of ``tests/hostile_inputs.py`` gets its 4xx, on the fake engine."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from serve.engine.fake import FakeEngine
from tests.hostile_inputs import CASES, body_for, raw_cases
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
