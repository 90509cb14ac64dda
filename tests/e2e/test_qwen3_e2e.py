"""The Qwen3 demo model on the real engine (vLLM's CPU build), served as production Qwen3 is:
Hermes tool calls, the qwen3 reasoning parser, and a persona adapter, all on one server.

The weights are random, so the model neither calls tools nor thinks by itself: forced calls are
guided decoding, and thoughts are made to end by raising the odds of `</think>`; what is tested
is that the server writes and reads Qwen3's formats, never what the model says.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from serve import demo_qwen3
from serve.demo_personas import build_adapter
from tests.support import DEMO_MODEL_DIR, TEST_API_KEY, ServerProcess, running_server
from tests.unit.agents import TOOL_HISTORY, WEATHER
from tests.unit.test_demo_qwen3 import as_the_server_passes_them

# Where the server builds it given the tests' --demo-model-dir (and --demo-model qwen3).
QWEN3_DIR = demo_qwen3.qwen3_folder_beside(DEMO_MODEL_DIR)
MODEL = demo_qwen3.DEMO_QWEN3_NAME
PERSONA = "qwen3-tutor"
AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
HELLO = [{"role": "user", "content": "Hello! Where is the museum?"}]
NO_THINKING = {"enable_thinking": False}
END_THINK_ID = 151668  # "</think>" in Qwen3's vocabulary
MOOD = {
    "type": "object",
    "properties": {
        "mood": {"type": "string", "enum": ["happy", "sad", "calm"]},
        "note": {"type": "string", "maxLength": 12},
    },
    "required": ["mood", "note"],
    "additionalProperties": False,
}
SET_MOOD = {"type": "function", "function": {"name": "set_mood", "parameters": MOOD}}


@pytest.fixture(scope="module")
def qwen3_model() -> Path:
    return demo_qwen3.ensure_built(QWEN3_DIR)


@pytest.fixture(scope="module")
def qwen3_server(
    tmp_path_factory: pytest.TempPathFactory, qwen3_model: Path
) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("qwen3")
    adapter = build_adapter(qwen3_model, folder / PERSONA, seed=21)
    with running_server(
        folder / "server.log",
        "--model", str(qwen3_model), "--served-model-name", MODEL,
        "--api-key", TEST_API_KEY,
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
        "--reasoning-parser", "qwen3",
        "--enable-lora", "--max-lora-rank", "8", "--lora-modules", f"{PERSONA}={adapter}",
    ) as srv:  # fmt: skip
        yield srv


def post(srv: ServerProcess, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{srv.base_url}/v1/{path}", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    return dict(r.json())


def chat(srv: ServerProcess, **body: Any) -> dict[str, Any]:
    return post(srv, "chat/completions", {"model": MODEL, "messages": HELLO, **body})


def whitespace_banned(tokenizer: Any) -> dict[str, int]:
    """logit_bias against every whitespace-only token. JSON allows any run of whitespace between
    tokens, and Qwen3's vocabulary has 422 such tokens: a random model picks them far more often
    than the next piece of the call, and would pad the arguments for thousands of tokens. A
    trained model writes them compactly."""
    banned = {}
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if text and not text.strip(" \t\r\n"):
            banned[str(token_id)] = -100
    return banned


def test_the_server_renders_qwen3s_template(qwen3_server: ServerProcess, qwen3_model: Path) -> None:
    """The engine's prompt for a conversation with tools and a tool result is exactly what
    Qwen3's own template and tokenizer make of it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(qwen3_model))
    history = as_the_server_passes_them(TOOL_HISTORY)
    for thinking in (True, False):
        text = tokenizer.apply_chat_template(
            history, tools=[WEATHER], add_generation_prompt=True, tokenize=False,
            enable_thinking=thinking,
        )  # fmt: skip
        expected = len(tokenizer.encode(text, add_special_tokens=False))
        resp = chat(
            qwen3_server,
            messages=TOOL_HISTORY,
            tools=[WEATHER],
            max_tokens=1,
            chat_template_kwargs={"enable_thinking": thinking},
        )
        assert resp["usage"]["prompt_tokens"] == expected, (thinking, text)


def test_a_forced_call_is_read_by_the_hermes_parser(
    qwen3_server: ServerProcess, qwen3_model: Path
) -> None:
    from transformers import AutoTokenizer

    banned = whitespace_banned(AutoTokenizer.from_pretrained(str(qwen3_model)))
    named = {"type": "function", "function": {"name": "set_mood"}}
    for seed in range(3):
        resp = chat(
            qwen3_server,
            messages=[{"role": "user", "content": f"Hello number {seed}!"}],
            tools=[SET_MOOD, WEATHER],
            tool_choice=named,
            max_tokens=400,
            seed=seed,
            logit_bias=banned,
            chat_template_kwargs=NO_THINKING,  # guided decoding starts once thinking is over
        )
        choice = resp["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        assert choice["message"]["content"] is None
        [call] = choice["message"]["tool_calls"]
        assert call["type"] == "function" and call["function"]["name"] == "set_mood"
        jsonschema.validate(json.loads(call["function"]["arguments"]), MOOD)


def test_thoughts_are_split_from_speech_by_the_qwen3_parser(qwen3_server: ServerProcess) -> None:
    """Qwen3 thinks first: everything before `</think>` is a thought (`reasoning`), the rest is
    speech (`content`). The same sampled answer from /v1/completions is the raw text: the
    parser must cut it at its first `</think>`, losing and repeating nothing, streamed or not.
    A bias of +10 makes `</think>` about one sampled token in eight."""
    sampling = {"max_tokens": 24, "ignore_eos": True, "logit_bias": {str(END_THINK_ID): 10}}
    prompt = "<|im_start|>user\nHello! Where is the museum?<|im_end|>\n<|im_start|>assistant\n"
    split = 0
    for seed in range(4):
        message = chat(qwen3_server, seed=seed, **sampling)["choices"][0]["message"]
        raw = post(qwen3_server, "completions", {"model": MODEL, "prompt": prompt, "seed": seed,
                                                 **sampling})["choices"][0]["text"]  # fmt: skip
        thought, _, speech = raw.partition("</think>")
        assert (message["reasoning"] or "", message["content"] or "") == (thought, speech), raw
        split += bool(thought and speech)

        r = httpx.post(
            f"{qwen3_server.base_url}/v1/chat/completions",
            json={"model": MODEL, "messages": HELLO, "seed": seed, "stream": True, **sampling},
            headers=AUTH,
            timeout=120,
        )
        frames = [f.removeprefix("data: ") for f in r.text.split("\n\n") if f]
        assert frames[-1] == "[DONE]"
        deltas = [c["delta"] for f in frames[:-1] for c in json.loads(f)["choices"]]
        assert "".join(d.get("reasoning") or "" for d in deltas) == thought
        assert "".join(d.get("content") or "" for d in deltas) == speech
    assert split, "some answer both thought and spoke"

    message = chat(qwen3_server, seed=0, chat_template_kwargs=NO_THINKING, **sampling)
    spoken = message["choices"][0]["message"]
    assert spoken["content"] and not spoken["reasoning"], "thinking off: all of it is speech"


def test_a_persona_adapter_changes_the_answers(qwen3_server: ServerProcess) -> None:
    def greedy(model: str) -> str:
        body = {"model": model, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        resp = chat(qwen3_server, chat_template_kwargs=NO_THINKING, **body)
        return str(resp["choices"][0]["message"]["content"])

    base, persona = greedy(MODEL), greedy(PERSONA)
    assert base and persona and base != persona
    assert greedy(PERSONA) == persona and greedy(MODEL) == base, "each is stable"
    listed = httpx.get(f"{qwen3_server.base_url}/v1/models", headers=AUTH, timeout=10).json()
    assert {MODEL, PERSONA} <= {m["id"] for m in listed["data"]}
