"""Runtime persona updates that once went wrong, on the fake engine: a reload under a name
already used must reach the engine as an adapter of its own; a client's path is text under the
root (never expanded, never a 500, never a forged log line); and the update routes keep no
state per name sent."""

from __future__ import annotations

import json
import logging
import os
import tracemalloc
from pathlib import Path

import pytest

from serve.engine.fake import FakeEngine
from tests.unit.conftest import chat_body, open_client
from tests.unit.test_personas import persona_app, started, write_adapter

_ROOT_HOME = os.path.expanduser("~root")  # what the server must never expand a path to


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "adapters"
    write_adapter(root / "tutor")
    write_adapter(root / "guide")
    return root


@pytest.fixture
def lora_engine() -> FakeEngine:
    return FakeEngine(max_model_len=256, adapter_rank=8)


async def test_every_load_of_a_name_is_a_distinct_adapter_in_the_engine(
    lora_engine: FakeEngine, root: Path
) -> None:
    """vLLM tells adapters apart by name (batches, prefix cache): a reload, in place or after an
    unload, must never reach it under the name an earlier load used."""
    write_adapter(root / "tutor-v2")
    app = await started(persona_app(lora_engine, root))
    async with open_client(app) as c:
        assert (await c.post("/v1/chat/completions", json=chat_body(model="tutor"))).is_success
        body = {"lora_name": "tutor", "lora_path": "tutor-v2", "load_inplace": True}
        assert (await c.post("/v1/load_lora_adapter", json=body)).status_code == 200
        assert (await c.post("/v1/chat/completions", json=chat_body(model="tutor"))).is_success
        unload = {"lora_name": "tutor"}
        assert (await c.post("/v1/unload_lora_adapter", json=unload)).status_code == 200
        body = {"lora_name": "tutor", "lora_path": "tutor"}  # the first folder again
        assert (await c.post("/v1/load_lora_adapter", json=body)).status_code == 200
        assert (await c.post("/v1/chat/completions", json=chat_body(model="tutor"))).is_success
    used = [a for a in lora_engine.adapters if a is not None]
    assert [a.name for a in used] == ["tutor"] * 3  # the public name stays
    assert len({a.engine_name for a in used}) == 3, used
    assert len({a.id for a in used}) == 3
    # The first load keeps the public name in the engine (vLLM's adapter metrics say it).
    assert used[0].engine_name == "tutor"


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("tut\x00or", "invalid_value"),  # the OS refuses it: was a 500
        ('guide\n{"level": "CRITICAL"}/..', "invalid_value"),  # a forged log line
        ("a" * 4000, "invalid_value"),  # a name too long for the OS: was a 500
        ("/".join(["x"] * 2000), "adapter_not_found"),
    ],
)
async def test_a_path_the_os_cannot_take_is_a_400(
    lora_engine: FakeEngine, root: Path, path: str, code: str
) -> None:
    app = await started(persona_app(lora_engine, root))
    async with open_client(app) as c:
        # Sent as JSON escapes, as a client can.
        raw = json.dumps({"lora_name": "x", "lora_path": path}).encode()
        r = await c.post(
            "/v1/load_lora_adapter", content=raw, headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "lora_path"
        assert r.json()["error"]["code"] == code
        models = [m["id"] for m in (await c.get("/v1/models")).json()["data"]]
    assert "x" not in models


async def test_a_tilde_is_never_expanded(lora_engine: FakeEngine, root: Path) -> None:
    """``~root`` would name root's home folder, and a different answer for ``~nobody-here``
    would tell which local users exist: both are plain folders under the adapter root."""
    write_adapter(root / "~root" / "tutor")  # a folder literally named so, under the root
    app = await started(persona_app(lora_engine, root))
    async with open_client(app) as c:
        answers = [
            await c.post("/v1/load_lora_adapter", json={"lora_name": f"p{i}", "lora_path": p})
            for i, p in enumerate(["~root", "~no-such-user-here", "~root/tutor"])
        ]
    assert [r.status_code for r in answers] == [400, 400, 200]
    # `~root` is the folder of that name under the root (no adapter in it), not /root; the
    # unknown user's is simply not found.
    assert [r.json()["error"]["code"] for r in answers[:2]] == [
        "invalid_input",
        "adapter_not_found",
    ]
    assert all(_ROOT_HOME not in r.text for r in answers)
    assert lora_engine.loaded[-1].path == str((root / "~root" / "tutor").resolve())


async def test_the_load_log_line_is_quoted(
    lora_engine: FakeEngine, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = await started(persona_app(lora_engine, root))
    with caplog.at_level(logging.INFO, logger="serve.personas"):
        async with open_client(app) as c:
            body = {"lora_name": "g", "lora_path": "./guide"}
            assert (await c.post("/v1/load_lora_adapter", json=body)).status_code == 200
    line = next(r.getMessage() for r in caplog.records if "loaded at runtime" in r.getMessage())
    assert line.endswith(repr(str((root / "guide").resolve())))


async def test_names_sent_to_the_update_routes_leave_nothing_behind(
    lora_engine: FakeEngine, root: Path
) -> None:
    """A key holder's stream of made-up names (failed unloads, failed loads) must not grow the
    server's memory: once, every name kept a lock for the life of the process."""
    app = await started(persona_app(lora_engine, root))
    personas = app.state.personas
    for i in range(50):  # warm up whatever is allocated once
        with pytest.raises(Exception):  # noqa: B017 - 404, any shape
            await personas.unload(f"warm-{i}")
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(3000):
            with pytest.raises(Exception):  # noqa: B017
                await personas.unload(f"nobody-{i}")
            with pytest.raises(Exception):  # noqa: B017
                await personas.load(f"nothing-{i}", "no-such-folder")
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename") if s.size_diff > 0)
    assert grown < 100_000, f"{grown} bytes kept after 6000 refused updates"
