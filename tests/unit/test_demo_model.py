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


def test_persona_adapters_are_peft_shaped_seeded_and_cached(tmp_path: Path) -> None:
    from safetensors import safe_open

    from serve.demo_personas import DEMO_PERSONAS, build_adapter, ensure_demo_personas

    base = tmp_path / "base"
    base.mkdir()
    config = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2}  # fmt: skip
    (base / "config.json").write_text(json.dumps(config))
    one = build_adapter(base, tmp_path / "one", seed=1)
    same = build_adapter(base, tmp_path / "same", seed=1)
    other = build_adapter(base, tmp_path / "other", seed=2)
    weights = "adapter_model.safetensors"
    assert (one / weights).read_bytes() == (same / weights).read_bytes()
    assert (one / weights).read_bytes() != (other / weights).read_bytes()
    adapter_config = json.loads((one / "adapter_config.json").read_text())
    assert (adapter_config["peft_type"], adapter_config["r"]) == ("LORA", 8)
    with safe_open(str(one / weights), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    prefix = "base_model.model.model.layers.1.self_attn"
    assert shapes[f"{prefix}.q_proj.lora_A.weight"] == (8, 128)
    assert shapes[f"{prefix}.v_proj.lora_B.weight"] == (64, 8)  # 2 kv heads of 32
    assert len(shapes) == 2 * 2 * 2  # layers x targets x (A, B)

    built = ensure_demo_personas(base, tmp_path / "personas")
    assert set(built) == set(DEMO_PERSONAS)
    stamp = {name: (path / weights).stat().st_mtime_ns for name, path in built.items()}
    again = ensure_demo_personas(base, tmp_path / "personas")
    assert {n: (p / weights).stat().st_mtime_ns for n, p in again.items()} == stamp, "reused"
