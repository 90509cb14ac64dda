"""The hostile inputs of ``tests/hostile_inputs.py`` against the real vLLM engine: each gets its
4xx with the OpenAI error shape, and the server goes on serving (the engine holds nothing)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.hostile_inputs import CASES, body_for, raw_cases
from tests.support import MODEL, ServerProcess, metric_value


@pytest.mark.e2e
async def test_every_hostile_input_is_refused_and_nothing_is_left_in_the_engine(
    server: ServerProcess, auth_headers: dict[str, str]
) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, headers=auth_headers) as client:
        wrong: list[str] = []
        for name, path, body, status, param in CASES:
            r = await client.post(path, json=body_for(body, MODEL), timeout=60)
            err: dict[str, Any] = r.json().get("error", {}) if r.status_code != 200 else {}
            if r.status_code != status or err.get("param") != param or not err.get("message"):
                wrong.append(f"{name}: {r.status_code} {r.text[:200]}")
        for name, path, raw, status in raw_cases():
            r = await client.post(
                path,
                content=raw.replace(b"{model}", MODEL.encode()),
                headers={"content-type": "application/json"},
                timeout=60,
            )
            if r.status_code != status or "error" not in r.json():
                wrong.append(f"{name}: {r.status_code} {r.text[:200]}")
        assert wrong == []
        ok = await client.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": True},
            timeout=60,
        )
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
        metrics = (await client.get("/metrics")).text
    assert metric_value(metrics, "avatar_engine_unfinished_requests") == 0
    assert metric_value(metrics, "avatar_requests_total", status="500") == 0
