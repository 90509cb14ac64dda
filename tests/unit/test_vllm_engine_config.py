"""The vLLM adapter's engine configuration (``serve.engine.vllm_engine.engine_config``).

vLLM picks its scheduler's batch sizes by hardware and by who starts the engine. The first GPU
run (H200) showed our server getting the generic fallback (2048 batched tokens) where
``vllm serve`` on the same card got 8192 tokens and 1024 sequences: our server must get what an
OpenAI API server gets. This machine has no GPU, so the test gives vLLM the H100/H200 table
vLLM itself uses for cards of 70 GiB or more, and checks which row our engine ends up with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support import DEMO_MODEL_DIR


def _hopper_batch_defaults(cls: Any, world_size: int) -> tuple[dict[Any, int], dict[Any, int]]:
    from vllm.usage.usage_lib import UsageContext

    # The values of vLLM's own get_batch_defaults for a >= 70 GiB card that is not an A100.
    return (
        {UsageContext.LLM_CLASS: 16384, UsageContext.OPENAI_API_SERVER: 8192},
        {UsageContext.LLM_CLASS: 1024, UsageContext.OPENAI_API_SERVER: 1024},
    )


@pytest.fixture(scope="module")
def demo_model() -> Path:
    from serve.demo_model import ensure_built

    return ensure_built(DEMO_MODEL_DIR)


def test_engine_gets_the_openai_servers_batch_defaults_on_a_large_gpu(
    demo_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs

    from serve.engine.vllm_engine import engine_config

    monkeypatch.setattr(AsyncEngineArgs, "get_batch_defaults", classmethod(_hopper_batch_defaults))
    args = AsyncEngineArgs(model=str(demo_model), max_model_len=2048, enforce_eager=True)
    scheduler = engine_config(args).scheduler_config
    assert scheduler.max_num_batched_tokens == 8192
    assert scheduler.max_num_seqs == 1024


def test_explicit_batch_flags_still_win(demo_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs

    from serve.engine.vllm_engine import engine_config

    monkeypatch.setattr(AsyncEngineArgs, "get_batch_defaults", classmethod(_hopper_batch_defaults))
    args = AsyncEngineArgs(
        model=str(demo_model),
        max_model_len=2048,
        enforce_eager=True,
        max_num_batched_tokens=4096,
        max_num_seqs=64,
    )
    scheduler = engine_config(args).scheduler_config
    assert (scheduler.max_num_batched_tokens, scheduler.max_num_seqs) == (4096, 64)
