"""The demo model builds offline into the documented shape, with a chat template."""

from __future__ import annotations

import json
from pathlib import Path

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
