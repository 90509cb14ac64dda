"""Personas on the real engine (vLLM's CPU build, demo model): LoRA adapters written by the test,
selected by `model`, loaded and unloaded at runtime while other persona streams run."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import NotFoundError, OpenAI

from serve import demo_model
from serve.demo_personas import build_adapter
from tests.support import (
    DEMO_MODEL_DIR,
    ENDLESS_TOKENS,
    MODEL,
    TEST_API_KEY,
    ServerProcess,
    metric_value,
    running_server,
    tokens_lasting,
    wait_until,
)

AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
HELLO = [{"role": "user", "content": "Hello! Where is the museum?"}]


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = demo_model.ensure_built(DEMO_MODEL_DIR)
    root = tmp_path_factory.mktemp("adapters")
    for name, seed in {"tutor": 11, "guide": 12, "spare": 13}.items():
        build_adapter(base, root / name, seed=seed)
    build_adapter(base, root / "wide", seed=14, rank=16)  # above --max-lora-rank 8
    corrupt = root / "corrupt"
    shutil.copytree(root / "spare", corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{not a header")
    shaped = json.loads((base / "config.json").read_text())
    other_base = tmp_path_factory.mktemp("other-base")
    (other_base / "config.json").write_text(json.dumps({**shaped, "hidden_size": 256}))
    build_adapter(other_base, root / "other-base", seed=15)  # weights for a wider model
    return root


@pytest.fixture(scope="module")
def persona_server(
    tmp_path_factory: pytest.TempPathFactory, adapter_root: Path
) -> Iterator[ServerProcess]:
    log_path = tmp_path_factory.mktemp("personas") / "server.log"
    with running_server(
        log_path,
        "--api-key", TEST_API_KEY,
        "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8", "--max-cpu-loras", "4",
        "--lora-modules", f"tutor={adapter_root / 'tutor'}",
        json.dumps({"name": "guide", "path": str(adapter_root / "guide"),
                    "base_model_name": MODEL}),
        "--lora-adapter-root", str(adapter_root),
        "--allow-runtime-lora-updating",
    ) as srv:  # fmt: skip
        yield srv


def chat(srv: ServerProcess, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": HELLO, "max_tokens": 16, "temperature": 0, **extra}
    return httpx.post(f"{srv.base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=120)


def answer(srv: ServerProcess, model: str) -> str:
    r = chat(srv, model, ignore_eos=True)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def post(srv: ServerProcess, path: str, body: dict[str, Any], **kw: Any) -> httpx.Response:
    return httpx.post(f"{srv.base_url}{path}", json=body, timeout=60, **kw)


def test_models_lists_the_personas(persona_server: ServerProcess) -> None:
    r = httpx.get(f"{persona_server.base_url}/v1/models", headers=AUTH, timeout=10)
    cards = [(m["id"], m["parent"]) for m in r.json()["data"]]
    assert cards == [(MODEL, None), ("tutor", MODEL), ("guide", MODEL)]


def test_greedy_answers_differ_by_persona_and_are_stable(persona_server: ServerProcess) -> None:
    first = {m: answer(persona_server, m) for m in (MODEL, "tutor", "guide")}
    again = {m: answer(persona_server, m) for m in (MODEL, "tutor", "guide")}
    assert first == again
    assert len(set(first.values())) == 3, first


def test_a_persona_streams(persona_server: ServerProcess) -> None:
    r = chat(persona_server, "tutor", stream=True, ignore_eos=True)
    frames = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
    assert r.text.rstrip().endswith("data: [DONE]")
    assert {f["model"] for f in frames} == {"tutor"}
    streamed = "".join(f["choices"][0]["delta"].get("content") or "" for f in frames)
    assert streamed == answer(persona_server, "tutor")


def test_the_openai_sdk_picks_a_persona(persona_server: ServerProcess) -> None:
    """As voice-agent frameworks call it: streaming, usage in the last chunk."""
    client = OpenAI(base_url=f"{persona_server.base_url}/v1", api_key=TEST_API_KEY)
    chunks = list(
        client.chat.completions.create(
            model="guide",
            messages=HELLO,  # type: ignore[arg-type]
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert {c.model for c in chunks} == {"guide"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer(persona_server, "guide")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="nobody", messages=HELLO)  # type: ignore[arg-type]


def test_an_unknown_persona_is_404(persona_server: ServerProcess) -> None:
    r = chat(persona_server, "nobody")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_load_and_unload_at_runtime_behind_the_key(persona_server: ServerProcess) -> None:
    load = {"lora_name": "spare", "lora_path": "spare"}
    assert post(persona_server, "/v1/load_lora_adapter", load).status_code == 401
    assert chat(persona_server, "spare").status_code == 404
    r = post(persona_server, "/v1/load_lora_adapter", load, headers=AUTH)
    assert r.status_code == 200, r.text
    assert answer(persona_server, "spare") != answer(persona_server, MODEL)
    unload = {"lora_name": "spare"}
    assert post(persona_server, "/v1/unload_lora_adapter", unload).status_code == 401
    assert chat(persona_server, "spare").status_code == 200
    assert post(persona_server, "/v1/unload_lora_adapter", unload, headers=AUTH).status_code == 200
    assert chat(persona_server, "spare").status_code == 404


def test_a_path_outside_the_root_is_refused(
    persona_server: ServerProcess, adapter_root: Path
) -> None:
    outside = adapter_root.parent / "outside-adapter"
    if not outside.exists():
        shutil.copytree(adapter_root / "spare", outside)
    for path in (str(outside), "../outside-adapter"):
        body = {"lora_name": "evil", "lora_path": path}
        r = post(persona_server, "/v1/load_lora_adapter", body, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["code"] == "path_outside_root", r.text
    assert chat(persona_server, "evil").status_code == 404


@pytest.mark.parametrize(
    ("folder", "reason"),
    [
        ("corrupt", "header"),
        ("wide", "greater than max_lora_rank 8"),
        ("other-base", "must match"),
        ("missing", "No adapter folder"),
    ],
)
def test_a_bad_adapter_is_refused_and_the_server_serves_on(
    persona_server: ServerProcess, folder: str, reason: str
) -> None:
    reference = answer(persona_server, "tutor")
    body = {"lora_name": f"bad-{folder}", "lora_path": folder}
    r = post(persona_server, "/v1/load_lora_adapter", body, headers=AUTH)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "lora_path" and reason in error["message"], error
    assert httpx.get(f"{persona_server.base_url}/health", timeout=10).status_code == 200
    assert answer(persona_server, "tutor") == reference
    assert chat(persona_server, f"bad-{folder}").status_code == 404


def test_persona_streams_run_on_through_a_load_and_an_unload(
    persona_server: ServerProcess,
) -> None:
    """Three streams (two personas and the base) are in flight when a new persona is loaded
    and one of theirs is unloaded: every stream ends whole, with every token it asked for."""
    # Seconds long on this machine, whatever its speed: the load and the unload land mid-stream.
    tokens = tokens_lasting(persona_server.base_url, 10, AUTH)
    started: list[str] = []

    def stream(model: str) -> tuple[str, dict[str, Any]]:
        body = {
            "model": model,
            "messages": HELLO,
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        lines = []
        with httpx.stream(
            "POST", f"{persona_server.base_url}/v1/chat/completions",
            json=body, headers=AUTH, timeout=120,
        ) as r:  # fmt: skip
            for line in r.iter_lines():
                if line.startswith("data: {") and not started.count(model):
                    started.append(model)
                if line:  # frames are separated by blank lines
                    lines.append(line)
        frames = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        return lines[-1] if lines else "", frames[-1]

    models = ("tutor", "guide", MODEL)
    with ThreadPoolExecutor(len(models)) as pool:
        futures = [pool.submit(stream, m) for m in models]
        wait_until(lambda: len(started) == len(models), 60, what="three streams under way")
        load = {"lora_name": "late", "lora_path": "spare"}
        began = time.monotonic()
        loaded = post(persona_server, "/v1/load_lora_adapter", load, headers=AUTH)
        unloaded = post(
            persona_server, "/v1/unload_lora_adapter", {"lora_name": "guide"}, headers=AUTH
        )
        in_flight = sum(not f.done() for f in futures)
        took = time.monotonic() - began
        results = [f.result(timeout=120) for f in futures]
    assert loaded.status_code == 200 and unloaded.status_code == 200
    assert in_flight == len(models), f"a stream ended before the load and unload ({took:.2f} s)"
    for last, usage_frame in results:
        assert last == "data: [DONE]"
        assert usage_frame["usage"]["completion_tokens"] == tokens
    assert chat(persona_server, "guide").status_code == 404
    assert chat(persona_server, "late").status_code == 200
    # Put the module's personas back as they were, for tests that run after this one.
    back = {"lora_name": "guide", "lora_path": "guide"}
    assert post(persona_server, "/v1/load_lora_adapter", back, headers=AUTH).status_code == 200


def test_metrics_and_log_name_the_persona(persona_server: ServerProcess) -> None:
    answer(persona_server, "tutor")
    answer(persona_server, MODEL)
    text = persona_server.metrics()
    assert "vllm:lora_requests_info{" in text  # read by the inference gateway's LoRA affinity
    count = "avatar_e2e_request_latency_seconds_count"
    assert metric_value(text, count, model="tutor") >= 1
    assert metric_value(text, count, model=MODEL) >= 1
    log = persona_server.log()
    assert '"model":"tutor"' in log
    assert "personas (send one as `model`): tutor, guide" in log  # the start-up hint


LONG_PROMPT = [
    {"role": "system", "content": "You are a museum guide. " * 60},  # whole prefix-cache blocks
    {"role": "user", "content": "Hello! Where is the museum?"},
]


def long_answer(srv: ServerProcess, model: str) -> str:
    body = {"model": model, "messages": LONG_PROMPT, "max_tokens": 16, "temperature": 0}
    r = httpx.post(f"{srv.base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def test_a_reload_in_place_under_load_keeps_the_engine_and_serves_the_new_weights(
    persona_server: ServerProcess, adapter_root: Path
) -> None:
    """vLLM tells adapters apart by name. A persona reloaded in place while its old weights
    still stream must reach the engine as another adapter: with --max-loras 2 and two persona
    streams running, a request on the reloaded persona once made the engine core activate one
    of two same-named adapters and die (KeyError in its LoRA mapping). And a reload from the
    same folder with new weights must not be served KV blocks its old weights computed."""
    load = "/v1/load_lora_adapter"
    # The reference: the spare weights under a name of their own, one request at a time.
    ref = {"lora_name": "ref", "lora_path": "spare"}
    assert post(persona_server, load, ref, headers=AUTH).status_code == 200
    expected = answer(persona_server, "ref")
    expected_long = long_answer(persona_server, "ref")

    started: list[str] = []
    leave = threading.Event()  # the old tutor stream's client leaves once the test has seen enough

    def stream(model: str, tokens: int) -> str:
        body = {"model": model, "messages": HELLO, "max_tokens": tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}  # fmt: skip
        last = ""
        with httpx.stream(
            "POST", f"{persona_server.base_url}/v1/chat/completions",
            json=body, headers=AUTH, timeout=180,
        ) as r:  # fmt: skip
            for line in r.iter_lines():
                if line.startswith("data: {") and model not in started:
                    started.append(model)
                last = line or last
                if leave.is_set():
                    break
        return last

    # Both LoRA slots taken. The scheduler counts adapters by id, so the reloaded tutor waits
    # for the guide's slot, then shares a batch with the old tutor's stream, still running
    # (an endless one, cut by its client at the end): vLLM's worker then sees two adapters of
    # one name.
    with ThreadPoolExecutor(2) as pool:
        old_tutor = pool.submit(stream, "tutor", ENDLESS_TOKENS)
        try:
            guide = pool.submit(stream, "guide", 384)
            wait_until(lambda: len(started) == 2, 60, what="two persona streams under way")
            body = {"lora_name": "tutor", "lora_path": "spare", "load_inplace": True}
            reloaded = post(persona_server, load, body, headers=AUTH)
            assert reloaded.status_code == 200, reloaded.text
            during = answer(persona_server, "tutor")  # waits for a LoRA slot, then runs
            # Still streaming (an engine death would have ended it with an error frame).
            assert not old_tutor.done(), old_tutor.result()
        finally:
            leave.set()  # a failure above must not leave the endless stream running
        guide_end = guide.result(timeout=180)
        old_tutor_end = old_tutor.result(timeout=180)
    assert guide_end == "data: [DONE]"
    assert old_tutor_end.startswith("data: {") and "error" not in old_tutor_end, old_tutor_end
    assert httpx.get(f"{persona_server.base_url}/health", timeout=10).status_code == 200
    assert during == expected

    # Same folder, new weights: copy the tutor's, warm the prefix cache, then overwrite.
    mutable = adapter_root / "mutable"
    shutil.rmtree(mutable, ignore_errors=True)
    shutil.copytree(adapter_root / "guide", mutable)
    mut = {"lora_name": "mut", "lora_path": "mutable"}
    assert post(persona_server, load, mut, headers=AUTH).status_code == 200
    before = long_answer(persona_server, "mut")
    assert before != expected_long  # other weights, another answer
    shutil.rmtree(mutable)
    shutil.copytree(adapter_root / "spare", mutable)
    body = {"lora_name": "mut", "lora_path": "mutable", "load_inplace": True}
    assert post(persona_server, load, body, headers=AUTH).status_code == 200
    assert long_answer(persona_server, "mut") == expected_long

    # Put the module's personas back as they were.
    back = {"lora_name": "tutor", "lora_path": "tutor", "load_inplace": True}
    assert post(persona_server, load, back, headers=AUTH).status_code == 200
