"""Build LoRA persona adapters offline, in PEFT's on-disk format, for any local Llama-shaped model.

The demo serves two personas over the demo model (``--demo-personas``); the tests and the
persona benchmark build theirs the same way. Weights are random but seeded: every build of one
persona is identical, and each persona steers greedy output away from the base model's.

Format (what vLLM and PEFT read): ``adapter_config.json`` (``peft_type`` LORA, rank ``r``,
``lora_alpha``, ``target_modules``) and ``adapter_model.safetensors`` with, per layer and target,
``base_model.model.model.layers.{i}.self_attn.{target}.lora_A.weight`` of shape (r, in) and
``...lora_B.weight`` of shape (out, r).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# The two personas of the demo, and the seeds that make their weights.
DEMO_PERSONAS: dict[str, int] = {"demo-tutor": 1, "demo-guide": 2}
DEMO_RANK = 8
DEFAULT_TARGETS = ("q_proj", "v_proj")
_MARKER = "PERSONA_BUILD"
# Bump when the weights' recipe changes, so a cached adapter is rebuilt.
_VERSION = "1"


def _projection_shapes(config: dict[str, Any], target: str) -> tuple[int, int]:
    """(in, out) features of one attention projection of a Llama-shaped model."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    out = {
        "q_proj": heads * head_dim,
        "k_proj": kv_heads * head_dim,
        "v_proj": kv_heads * head_dim,
    }[target]
    return hidden, out


def build_adapter(
    base_model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    seed: int,
    rank: int = DEMO_RANK,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    scale: float = 0.5,
) -> Path:
    """Write a random LoRA adapter for the model in ``base_model_dir`` into ``out_dir``.

    ``scale`` sets the size of the weights: large enough that greedy answers change.
    """
    import torch
    from safetensors.torch import save_file

    base = Path(base_model_dir).expanduser().resolve()
    config = json.loads((base / "config.json").read_text())
    target_dir = Path(out_dir).expanduser().resolve()
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(int(config["num_hidden_layers"])):
        for target in targets:
            fan_in, fan_out = _projection_shapes(config, target)
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            a = torch.randn(rank, fan_in, generator=generator) * scale
            b = torch.randn(fan_out, rank, generator=generator) * scale
            tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16).contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16).contiguous()
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    staging = Path(tempfile.mkdtemp(prefix=".adapter-", dir=target_dir.parent))
    try:
        (staging / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        save_file(tensors, str(staging / "adapter_model.safetensors"))
        (staging / _MARKER).write_text(_stamp(seed, rank, targets))
        if target_dir.exists():
            shutil.rmtree(target_dir)
        staging.rename(target_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target_dir


def _stamp(seed: int, rank: int, targets: tuple[str, ...]) -> str:
    return f"{_VERSION}:{seed}:{rank}:{','.join(targets)}"


def ensure_demo_personas(
    base_model_dir: str | os.PathLike[str], root: str | os.PathLike[str]
) -> dict[str, Path]:
    """The demo personas under ``root`` (built when missing or stale): name → adapter folder."""
    found: dict[str, Path] = {}
    for name, seed in DEMO_PERSONAS.items():
        folder = Path(root).expanduser().resolve() / name
        marker = folder / _MARKER
        current = marker.is_file() and marker.read_text() == _stamp(
            seed, DEMO_RANK, DEFAULT_TARGETS
        )
        found[name] = folder if current else build_adapter(base_model_dir, folder, seed=seed)
    return found
