"""HTTP-layer tests against the fake engine, in-process (no sockets, no vLLM)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from serve.app import create_app
from serve.engine.fake import FakeEngine
from serve.settings import Settings

MODEL = "avatar-test"
KEY = "sk-unit"


def make_settings(**overrides: Any) -> Settings:
    fields: dict[str, Any] = {"api_key": [KEY], "engine_args": {"served_model_name": [MODEL]}}
    fields.update(overrides)
    return Settings(**fields)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=256)


@pytest.fixture
def app_factory(engine: FakeEngine) -> Callable[..., FastAPI]:
    def build(**overrides: Any) -> FastAPI:
        return create_app(make_settings(**overrides), engine)

    return build


@pytest.fixture
async def client(app_factory: Callable[..., FastAPI]) -> AsyncIterator[httpx.AsyncClient]:
    async with open_client(app_factory()) as c:
        yield c


def open_client(app: FastAPI, key: str | None = KEY) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test", headers=headers
    )


def chat_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
    }
    body.update(overrides)
    return body
