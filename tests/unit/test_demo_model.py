"""The demo model builds offline into the documented shape, with a chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serve import demo_model


def test_demo_model_builds_offline(tmp_path: Path) -> None:
    out = demo_model.build(tmp_path / "demo")
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (
        128, 2, 4,
    )  # fmt: skip
    assert config["hidden_size"] // config["num_attention_heads"] == 32, (
        "a head dim vLLM's CPU kernels take"
    )
    assert demo_model.is_built(out)
    assert demo_model.ensure_built(out) == out, "a built model is reused, not rebuilt"

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hello there!"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|start|>assistant\n") and "Hello there!" in text
    assert tok.decode(tok.encode("Good morning!", add_special_tokens=False)) == "Good morning!"
    assert len(tok) <= config["vocab_size"]


def test_a_changed_template_makes_the_cache_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--ensure` rebuilds when the template (or corpus, or marker tokens) changed, with no
    version bump to remember."""
    (tmp_path / "DEMO_MODEL_VERSION").write_text(demo_model.fingerprint())
    assert demo_model.is_built(tmp_path)
    monkeypatch.setattr(demo_model, "CHAT_TEMPLATE", demo_model.CHAT_TEMPLATE + " ")
    assert not demo_model.is_built(tmp_path)
    (tmp_path / "DEMO_MODEL_VERSION").write_text("1")  # a build of the first version
    monkeypatch.undo()
    assert not demo_model.is_built(tmp_path)
