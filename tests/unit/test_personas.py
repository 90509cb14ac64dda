"""Personas (LoRA adapters) through the HTTP layer, on the fake engine: selection by `model`,
/v1/models, runtime load and unload behind the key and inside the adapter root, bounded labels."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from serve.app import create_app
from serve.engine.fake import FakeEngine
from tests.unit.conftest import MODEL, chat_body, make_settings, open_client


def write_adapter(folder: Path, rank: int = 8) -> Path:
    """What the fake engine reads of an adapter: its config (the real engine reads weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank}))
    return folder


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "adapters"
    write_adapter(root / "tutor")
    write_adapter(root / "guide")
    return root


@pytest.fixture
def lora_engine() -> FakeEngine:
    return FakeEngine(max_model_len=256, adapter_rank=8, token_delay=0.001)


def persona_app(engine: FakeEngine, root: Path, **overrides: Any) -> FastAPI:
    fields: dict[str, Any] = {
        "engine_args": {"served_model_name": [MODEL], "enable_lora": True},
        "lora_modules": [f"tutor={root / 'tutor'}"],
        "lora_adapter_root": root,
        "allow_runtime_lora_updating": True,
    }
    fields.update(overrides)
    return create_app(make_settings(**fields), engine)


async def started(app: FastAPI) -> FastAPI:
    await app.state.personas.start()  # the lifespan's job; the ASGI test transport skips it
    return app


async def test_models_lists_personas_with_their_parent(lora_engine: FakeEngine, root: Path) -> None:
    app = await started(persona_app(lora_engine, root))
    async with open_client(app) as c:
        data = (await c.get("/v1/models")).json()["data"]
    assert [(m["id"], m["parent"]) for m in data] == [(MODEL, None), ("tutor", MODEL)]


async def test_a_persona_answers_and_the_engine_gets_its_adapter(
    lora_engine: FakeEngine, root: Path
) -> None:
    app = await started(persona_app(lora_engine, root))
    async with open_client(app) as c:
        plain = await c.post("/v1/chat/completions", json=chat_body())
        persona = await c.post("/v1/chat/completions", json=chat_body(model="tutor"))
        streamed = await c.post("/v1/chat/completions", json=chat_body(model="tutor", stream=True))
    assert plain.json()["model"] == MODEL and persona.json()["model"] == "tutor"
    frames = [line for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert frames and all(json.loads(f[6:])["model"] == "tutor" for f in frames)
    assert streamed.text.rstrip().endswith("data: [DONE]")
    used = [a.name if a else None for a in lora_engine.adapters]
    assert used == [None, "tutor", "tutor"]


async def test_an_unknown_persona_is_404(lora_engine: FakeEngine, root: Path) -> None:
    app = await started(persona_app(lora_engine, root))
    async with open_client(app) as c:
        r = await c.post("/v1/chat/completions", json=chat_body(model="guide"))
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    assert lora_engine.adapters == []


async def test_runtime_updates_are_off_unless_enabled(lora_engine: FakeEngine, root: Path) -> None:
    app = await started(persona_app(lora_engine, root, allow_runtime_lora_updating=False))
    async with open_client(app) as c:
        r = await c.post("/v1/load_lora_adapter", json={"lora_name": "g", "lora_path": "guide"})
        assert (
            r.status_code == 404 and "--allow-runtime-lora-updating" in r.json()["error"]["message"]
        )
        r = await c.post("/v1/unload_lora_adapter", json={"lora_name": "tutor"})
        assert r.status_code == 404
        # The static persona is untouched.
        assert (
            await c.post("/v1/chat/completions", json=chat_body(model="tutor"))
        ).status_code == 200


async def test_load_and_unload_need_the_key(lora_engine: FakeEngine, root: Path) -> None:
    app = await started(persona_app(lora_engine, root))
    body = {"lora_name": "guide", "lora_path": "guide"}
    async with open_client(app, key=None) as anon, open_client(app, key="wrong") as bad:
        assert (await anon.post("/v1/load_lora_adapter", json=body)).status_code == 401
        assert (await bad.post("/v1/load_lora_adapter", json=body)).status_code == 401
        r = await anon.post("/v1/unload_lora_adapter", json={"lora_name": "tutor"})
        assert r.status_code == 401
    async with open_client(app) as c:
        ids = [m["id"] for m in (await c.get("/v1/models")).json()["data"]]
    assert ids == [MODEL, "tutor"]


async def test_load_use_unload_at_runtime(lora_engine: FakeEngine, root: Path) -> None:
    app = await started(persona_app(lora_engine, root))
    async with open_client(app) as c:
        r = await c.post("/v1/load_lora_adapter", json={"lora_name": "guide", "lora_path": "guide"})
        assert r.status_code == 200, r.text
        assert r.text == "Success: LoRA adapter 'guide' added successfully."
        assert r.headers["content-type"].startswith("text/plain")  # as vLLM answers
        assert (
            await c.post("/v1/chat/completions", json=chat_body(model="guide"))
        ).status_code == 200
        ids = [m["id"] for m in (await c.get("/v1/models")).json()["data"]]
        assert ids == [MODEL, "tutor", "guide"]

        again = await c.post(
            "/v1/load_lora_adapter", json={"lora_name": "guide", "lora_path": "guide"}
        )
        assert again.status_code == 400 and again.json()["error"]["code"] == "adapter_exists"
        inplace = await c.post(
            "/v1/load_lora_adapter",
            json={"lora_name": "guide", "lora_path": str(root / "guide"), "load_inplace": True},
        )
        assert inplace.status_code == 200

        r = await c.post("/v1/unload_lora_adapter", json={"lora_name": "guide"})
        assert r.status_code == 200 and "removed" in r.text
        gone = await c.post("/v1/chat/completions", json=chat_body(model="guide"))
        assert gone.status_code == 404
        r = await c.post("/v1/unload_lora_adapter", json={"lora_name": "guide"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"
    # Each load is a new engine id: a request in flight keeps the weights it started with.
    loaded = [(a.name, a.id) for a in lora_engine.loaded]
    assert loaded == [("tutor", 1), ("guide", 2), ("guide", 3)]
    assert [a.name for a in lora_engine.adapters if a] == ["guide"]


@pytest.mark.parametrize("path", ["/etc", "../outside", "tutor/../../outside"])
async def test_a_path_outside_the_root_is_refused(
    lora_engine: FakeEngine, root: Path, path: str
) -> None:
    write_adapter(root.parent / "outside")
    app = await started(persona_app(lora_engine, root))
    async with open_client(app) as c:
        r = await c.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": path})
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": r.json()["error"]["message"],
        "type": "invalid_request_error",
        "param": "lora_path",
        "code": "path_outside_root",
    }
    assert [a.name for a in lora_engine.loaded] == ["tutor"]  # the engine never saw it


async def test_a_symlink_out_of_the_root_is_refused(lora_engine: FakeEngine, root: Path) -> None:
    outside = write_adapter(root.parent / "elsewhere")
    (root / "link").symlink_to(outside, target_is_directory=True)
    app = await started(persona_app(lora_engine, root))
    async with open_client(app) as c:
        r = await c.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": "link"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "path_outside_root"


async def test_bad_adapters_are_refused_and_the_server_serves_on(
    lora_engine: FakeEngine, root: Path
) -> None:
    (root / "corrupt").mkdir()
    (root / "corrupt" / "adapter_config.json").write_text("{not json")
    write_adapter(root / "wide", rank=64)
    app = await started(persona_app(lora_engine, root))
    async with open_client(app) as c:
        cases = {"missing": "nowhere", "corrupt": "corrupt", "wide": "wide"}
        for name, path in cases.items():
            r = await c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
            assert r.status_code == 400, (name, r.text)
            assert r.json()["error"]["param"] == "lora_path"
        r = await c.post("/v1/load_lora_adapter", json={"lora_name": "wide", "lora_path": "wide"})
        assert "max_lora_rank 8" in r.json()["error"]["message"]
        clash = await c.post(
            "/v1/load_lora_adapter", json={"lora_name": MODEL, "lora_path": "guide"}
        )
        assert clash.status_code == 400 and clash.json()["error"]["param"] == "lora_name"
        assert (
            await c.post("/v1/chat/completions", json=chat_body(model="tutor"))
        ).status_code == 200
        ids = [m["id"] for m in (await c.get("/v1/models")).json()["data"]]
    assert ids == [MODEL, "tutor"]


async def test_streams_run_on_through_a_load_and_an_unload(
    lora_engine: FakeEngine, root: Path
) -> None:
    """A load that takes a while, and the unload of the persona a stream is using, disturb no
    stream: each ends with [DONE] and every token it asked for."""
    app = await started(persona_app(lora_engine, root))
    lora_engine.load_gate = asyncio.Event()
    async with open_client(app) as c:

        async def stream(model: str) -> str:
            body = chat_body(model=model, stream=True, max_tokens=40, ignore_eos=True)
            return (await c.post("/v1/chat/completions", json=body)).text

        streams = [asyncio.create_task(stream(m)) for m in ("tutor", MODEL, "tutor")]
        load = asyncio.create_task(
            c.post("/v1/load_lora_adapter", json={"lora_name": "guide", "lora_path": "guide"})
        )

        async def under_way() -> None:
            while lora_engine.num_unfinished_requests() < 3:
                await asyncio.sleep(0.001)

        await asyncio.wait_for(under_way(), timeout=5)
        unload = await c.post("/v1/unload_lora_adapter", json={"lora_name": "tutor"})
        assert not load.done()  # the load is still held by the engine
        lora_engine.load_gate.set()
        texts = await asyncio.gather(*streams)
        assert (await load).status_code == 200 and unload.status_code == 200
    for text in texts:
        assert text.rstrip().endswith("data: [DONE]")
        assert '"error"' not in text
        assert text.count('"content"') == 40


async def test_the_model_label_is_bounded(lora_engine: FakeEngine, root: Path) -> None:
    app = await started(
        persona_app(
            lora_engine,
            root,
            max_model_labels=2,
            lora_modules=[f"tutor={root / 'tutor'}", f"guide={root / 'guide'}"],
        )
    )
    async with open_client(app) as c:
        for model in ("tutor", "guide", "guide"):
            assert (
                await c.post("/v1/chat/completions", json=chat_body(model=model))
            ).status_code == 200
        await c.post("/v1/chat/completions", json=chat_body(model="not-served"))
        text = (await c.get("/metrics")).text
    labels = {
        line.split('model="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("avatar_e2e_request_latency_seconds_count")
    }
    # The base took a label; a name nobody serves gets none of its own (the empty label of
    # every request refused before its model is known).
    assert labels == {"tutor", "other", ""}, labels


async def test_a_static_persona_that_cannot_load_stops_the_start(root: Path) -> None:
    engine = FakeEngine(adapter_rank=4)  # the adapters are rank 8
    app = persona_app(engine, root)
    with pytest.raises(RuntimeError, match=r"--lora-modules tutor: .*max_lora_rank 4"):
        await app.state.personas.start()


class _Unanswered(FakeEngine):
    """An engine core that leaves the first ``silent`` loads unanswered (a reply that never
    comes), then answers."""

    def __init__(self, silent: int) -> None:
        super().__init__(max_model_len=256, adapter_rank=8)
        self.silent = silent
        self.calls: list[tuple[int, str]] = []

    async def load_adapter(self, adapter: Any) -> None:
        self.calls.append((adapter.id, adapter.engine_name))
        if len(self.calls) <= self.silent:
            await asyncio.Event().wait()
        await super().load_adapter(adapter)


async def test_a_start_up_load_left_unanswered_is_sent_again(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("serve.personas.START_LOAD_TIMEOUT_S", 0.05)
    engine = _Unanswered(silent=1)
    app = await started(persona_app(engine, root))
    # The same adapter, id and engine name again: the engine takes it as one load.
    assert engine.calls == [(1, "tutor"), (1, "tutor")]
    async with open_client(app) as c:
        r = await c.post("/v1/chat/completions", json=chat_body(model="tutor"))
        assert r.status_code == 200, r.text


async def test_a_start_up_load_never_answered_fails_the_start(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("serve.personas.START_LOAD_TIMEOUT_S", 0.05)
    engine = _Unanswered(silent=99)
    app = persona_app(engine, root)
    with pytest.raises(RuntimeError, match=r"--lora-modules tutor: the engine core did not answer"):
        await app.state.personas.start()
    assert len(engine.calls) == 3


async def test_the_access_log_names_the_persona(
    lora_engine: FakeEngine, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = await started(persona_app(lora_engine, root))
    caplog.set_level("INFO", logger="serve.access")
    async with open_client(app) as c:
        await c.post("/v1/chat/completions", json=chat_body(model="tutor"))
    entries = [json.loads(r.getMessage()) for r in caplog.records if r.name == "serve.access"]
    assert entries and entries[-1]["model"] == "tutor"


def test_keys_are_required_for_runtime_updates(root: Path) -> None:
    with pytest.raises(ValueError, match="needs --api-key"):
        make_settings(
            api_key=[],
            engine_args={"enable_lora": True},
            lora_adapter_root=root,
            allow_runtime_lora_updating=True,
        )


@pytest.mark.parametrize("name", ["", "two words", "x" * 257, "tab\there"])
async def test_a_persona_name_must_be_printable_and_bounded(
    lora_engine: FakeEngine, root: Path, name: str
) -> None:
    app = await started(persona_app(lora_engine, root))
    async with open_client(app) as c:
        r = await c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "guide"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name", r.text
    assert [a.name for a in lora_engine.loaded] == ["tutor"]
