"""Streaming OpenAI chat-completions client on aiohttp."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp

from loadtest.payload import auth_headers, chat_payload
from loadtest.records import RequestRecord
from loadtest.sse import RawLine, record_from_sse
from loadtest.workload import ChatRequest


class ChatClient:
    """Sends streaming chat completions and turns each response into a ``RequestRecord``."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        ignore_eos: bool = False,
        timeout_s: float = 600.0,
        stall_timeout_s: float = 60.0,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.ignore_eos = ignore_eos
        self.extra_body = extra_body
        self.headers = auth_headers(api_key)
        # sock_read: a stream that stops sending (dead server) fails after this, not after the
        # whole-request timeout, which must be long enough for the longest reply under load.
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_read=stall_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ChatClient:
        # No connection cap: the runner decides concurrency, the pool must never queue.
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(self, req: ChatRequest) -> RequestRecord:
        assert self._session is not None, "use 'async with ChatClient(...)'"
        body = json.dumps(
            chat_payload(self.model, req, ignore_eos=self.ignore_eos, extra=self.extra_body)
        ).encode()
        lines: list[RawLine] = []
        append = lines.append
        clock = time.perf_counter
        start = clock()
        try:
            async with self._session.post(self.url, data=body, headers=self.headers) as resp:
                if resp.status != 200:
                    text = (await resp.text())[:200]
                    return RequestRecord(req.index, start, error=f"HTTP {resp.status}: {text}")
                # Hot loop: a clock read and an append per line, nothing else.
                async for line in resp.content:
                    append((clock(), line))
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return RequestRecord(req.index, start, error=f"{type(exc).__name__}: {exc}")
        return record_from_sse(req.index, start, clock(), lines)


async def list_models(base_url: str, api_key: str | None = None) -> list[str]:
    """Model ids served at ``base_url`` (``GET /models``)."""
    url = base_url.rstrip("/") + "/models"
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(url, headers=auth_headers(api_key)) as resp,
    ):
        resp.raise_for_status()
        data = await resp.json()
    return [m["id"] for m in data.get("data", [])]


async def resolve_model(base_url: str, model: str | None, api_key: str | None = None) -> str:
    """``model``, or when none is given the first model served at ``base_url``."""
    if model:
        return model
    models = await list_models(base_url, api_key)
    if not models:
        raise SystemExit(f"no models listed at {base_url}/models; pass --model")
    return models[0]
