"""Auth and the one error model: every refusal is an OpenAI-style body with the right status.
Admin keys (--admin-api-key) keep the adapter routes from the keys given to clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from serve.engine.base import Delta
from serve.engine.fake import FakeEngine
from tests.unit.conftest import KEY, MODEL, chat_body, make_settings, open_client
from tests.unit.test_guard import http_scope
from tests.unit.test_personas import persona_app, started, write_adapter


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param is not None:
        assert err["param"] == param
    return err  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-unit"},
     {"Authorization": "Basic sk-unit"}, {"Authorization": "Bearer "}],
)  # fmt: skip
async def test_missing_or_wrong_key_is_401(
    app_factory: Callable[..., FastAPI], headers: dict[str, str]
) -> None:
    async with open_client(app_factory(), key=None) as c:
        r = await c.post("/v1/chat/completions", json=chat_body(), headers=headers)
        err = assert_error(r, 401)
        assert err["type"] == "authentication_error"
        assert_error(await c.get("/v1/models", headers=headers), 401)


async def test_any_configured_key_works_and_probes_stay_open(
    app_factory: Callable[..., FastAPI],
) -> None:
    app = app_factory(api_key=["k1", "k2"])
    async with open_client(app, key="k2") as c:
        assert (await c.post("/v1/chat/completions", json=chat_body())).status_code == 200
    async with open_client(app, key=None) as c:
        for path in ("/health", "/ready", "/metrics"):
            assert (await c.get(path)).status_code == 200, path


async def test_no_key_configured_runs_open(app_factory: Callable[..., FastAPI]) -> None:
    async with open_client(app_factory(api_key=[]), key=None) as c:
        assert (await c.post("/v1/chat/completions", json=chat_body())).status_code == 200


async def test_malformed_json(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    assert assert_error(r, 400)["code"] == "invalid_json"


async def test_invalid_utf8(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        content=b'{"model": "\xff\xfe"}',
        headers={"content-type": "application/json"},
    )
    assert assert_error(r, 400)["code"] == "invalid_json"


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"42", b"null"])
async def test_non_object_body(client: httpx.AsyncClient, body: bytes) -> None:
    r = await client.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert_error(r, 400)


async def test_wrong_content_type_is_415(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions", content=b"{}", headers={"content-type": "text/plain"}
    )
    assert_error(r, 415)


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 3.5}, "temperature"),
        ({"stream": "yes"}, "stream"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "ro bot", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            None,
        ),
        ({"n": 0}, "n"),
        ({"stop": ["a"] * 17}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"model": 5}, "model"),
        ({"top_p": 0}, "top_p"),
    ],
)
async def test_bad_fields_name_the_field(
    client: httpx.AsyncClient, overrides: dict[str, Any], param: str | None
) -> None:
    err = assert_error(await client.post("/v1/chat/completions", json=chat_body(**overrides)), 400)
    if param is not None:
        assert err["param"] == param, err
        assert f"`{param}`" in err["message"], err


async def test_missing_required_field(client: httpx.AsyncClient) -> None:
    body = chat_body()
    del body["messages"]
    err = assert_error(await client.post("/v1/chat/completions", json=body), 400, "messages")
    assert err["code"] == "missing_required_parameter"


async def test_unknown_model_is_404(client: httpx.AsyncClient) -> None:
    err = assert_error(
        await client.post("/v1/chat/completions", json=chat_body(model="gpt-x")), 404
    )
    assert err["code"] == "model_not_found" and err["param"] == "model"


async def test_context_window_exceeded_is_400(client: httpx.AsyncClient) -> None:
    err = assert_error(
        await client.post("/v1/chat/completions", json=chat_body(max_tokens=300)), 400, "max_tokens"
    )
    assert err["code"] == "context_length_exceeded"
    long = [{"role": "user", "content": "word " * 300}]
    err = assert_error(
        await client.post("/v1/chat/completions", json=chat_body(messages=long)), 400, "messages"
    )
    assert err["code"] == "context_length_exceeded"


async def test_body_over_limit_is_413(app_factory: Callable[..., FastAPI]) -> None:
    async with open_client(app_factory(max_body_bytes=2048)) as c:
        big = chat_body(messages=[{"role": "user", "content": "x" * 5000}])
        assert_error(await c.post("/v1/chat/completions", json=big), 413)
        assert (await c.post("/v1/chat/completions", json=chat_body())).status_code == 200


async def test_unknown_route_and_method(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v1/nothing"), 404)
    assert_error(await client.get("/v1/chat/completions"), 405)


async def test_dead_engine_is_503_and_health_fails(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.kill()
    err = assert_error(await client.post("/v1/chat/completions", json=chat_body(stream=True)), 503)
    assert err["code"] == "engine_dead"
    assert (await client.get("/health")).status_code == 503
    assert (await client.get("/ready")).status_code == 503


async def test_internal_errors_do_not_leak(
    client: httpx.AsyncClient, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(messages: Any) -> list[int]:
        raise RuntimeError("secret path /srv/models/weights.bin")

    monkeypatch.setattr(engine, "render_chat", broken)
    r = await client.post("/v1/chat/completions", json=chat_body())
    err = assert_error(r, 500)
    assert "secret" not in r.text and "/srv" not in r.text
    assert err["type"] == "server_error"


async def test_a_stream_that_breaks_says_nothing_but_the_log_says_why(
    client: httpx.AsyncClient,
    engine: FakeEngine,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug mid-stream: the client gets a generic error frame, the operator the cause."""
    real = engine.generate

    async def breaks_after_one(*args: Any, **kwargs: Any) -> AsyncGenerator[Delta, None]:
        async for delta in real(*args, **kwargs):
            yield delta
            raise RuntimeError("secret path /srv/models/weights.bin")

    monkeypatch.setattr(engine, "generate", breaks_after_one)
    r = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert r.status_code == 200
    assert '"code":"internal_error"' in r.text and r.text.endswith("data: [DONE]\n\n")
    assert "secret" not in r.text
    logged = [rec for rec in caplog.records if rec.exc_info and rec.levelname == "ERROR"]
    assert any("secret path" in str(rec.exc_info[1]) for rec in logged if rec.exc_info)


async def test_models_lists_served_names(app_factory: Callable[..., FastAPI]) -> None:
    app = app_factory(engine_args={"served_model_name": [MODEL, "alias"]})
    async with open_client(app) as c:
        for path in ("/v1/models", "/models"):
            data = (await c.get(path)).json()["data"]
            assert [m["id"] for m in data] == [MODEL, "alias"]
        assert (
            await c.post("/v1/chat/completions", json=chat_body(model="alias"))
        ).status_code == 200


ADMIN = "sk-admin"


@pytest.fixture
def adapter_root(tmp_path: Path) -> Path:
    root = tmp_path / "adapters"
    write_adapter(root / "tutor")
    write_adapter(root / "guide")
    return root


async def test_admin_keys_alone_load_and_unload_adapters(adapter_root: Path) -> None:
    """With --admin-api-key, the key given to an avatar platform cannot unload or repoint a
    persona; the admin key can, and opens nothing else."""
    engine = FakeEngine(max_model_len=256, adapter_rank=8)
    app = await started(persona_app(engine, adapter_root, admin_api_key=[ADMIN]))
    load = {"lora_name": "guide", "lora_path": "guide"}
    async with open_client(app) as chat_key:
        for path, body in (("/v1/load_lora_adapter", load),
                           ("/v1/unload_lora_adapter", {"lora_name": "tutor"})):  # fmt: skip
            err = assert_error(await chat_key.post(path, json=body), 401)
            assert err["code"] == "insufficient_permissions", err
        assert (await chat_key.post("/v1/chat/completions", json=chat_body())).status_code == 200
    async with open_client(app, key=None) as anon, open_client(app, key="wrong") as wrong:
        assert_error(await anon.post("/v1/load_lora_adapter", json=load), 401)
        assert_error(await wrong.post("/v1/load_lora_adapter", json=load), 401)
    async with open_client(app, key=ADMIN) as admin:
        assert (await admin.post("/v1/load_lora_adapter", json=load)).status_code == 200
        r = await admin.post("/v1/unload_lora_adapter", json={"lora_name": "tutor"})
        assert r.status_code == 200
        assert_error(await admin.post("/v1/chat/completions", json=chat_body()), 401)
    assert [card["id"] for card in app.state.personas.cards()] == [MODEL, "guide"]


async def test_an_admin_key_is_enough_for_runtime_updates(adapter_root: Path) -> None:
    engine = FakeEngine(max_model_len=256, adapter_rank=8)
    app = await started(persona_app(engine, adapter_root, api_key=[], admin_api_key=[ADMIN]))
    load = {"lora_name": "guide", "lora_path": "guide"}
    async with open_client(app, key=None) as anon:
        assert_error(await anon.post("/v1/load_lora_adapter", json=load), 401)
        assert (await anon.post("/v1/chat/completions", json=chat_body())).status_code == 200
    async with open_client(app, key=ADMIN) as admin:
        assert (await admin.post("/v1/load_lora_adapter", json=load)).status_code == 200


def test_an_admin_key_must_not_be_an_api_key(adapter_root: Path) -> None:
    with pytest.raises(ValueError, match="must not also be an --api-key"):
        make_settings(api_key=["shared"], admin_api_key=["shared"])


async def test_adapter_routes_check_the_key_before_the_body(adapter_root: Path) -> None:
    engine = FakeEngine(max_model_len=256, adapter_rank=8)
    app = await started(persona_app(engine, adapter_root, admin_api_key=[ADMIN]))
    reads = 0

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        await asyncio.Event().wait()  # a body that never finishes arriving
        raise AssertionError("unreachable")

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = http_scope("/v1/load_lora_adapter", key=KEY, extra=[(b"content-length", b"4000000")])
    await asyncio.wait_for(app(scope, receive, send), 10)
    assert sent[0]["status"] == 401 and reads == 0
