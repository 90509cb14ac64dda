"""`--demo-model qwen3` (or AVATAR_DEMO_MODEL=qwen3) serves the Qwen3-shaped demo model on the
real Qwen3 tokenizer, built beside the default demo model; with --model it is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve.cli import finalize_engine_args, parse_settings
from serve.demo_qwen3 import DEMO_QWEN3_NAME
from tests.support import DEMO_MODEL_DIR


def test_the_default_demo_model_stays_the_llama() -> None:
    assert parse_settings([], {}).demo_model == "llama"


def test_the_flag_and_its_variable_pick_qwen3() -> None:
    assert parse_settings(["--demo-model", "qwen3"], {}).demo_model == "qwen3"
    assert parse_settings([], {"AVATAR_DEMO_MODEL": "qwen3"}).demo_model == "qwen3"


def test_an_unknown_demo_model_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--demo-model", "gpt"], {})
    assert "demo-model" in capsys.readouterr().err


def test_a_demo_model_and_a_model_are_refused_together(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--demo-model", "qwen3", "--model", "/some/model"], {})
    assert "--demo-model" in capsys.readouterr().err


def test_qwen3_is_built_beside_the_demo_model_and_served_by_its_name() -> None:
    settings = parse_settings(
        ["--demo-model", "qwen3", "--demo-model-dir", str(DEMO_MODEL_DIR)], {}
    )
    args = finalize_engine_args(settings, {})
    built = Path(args["model"])
    assert built.parent == DEMO_MODEL_DIR.parent and built != DEMO_MODEL_DIR
    assert args["served_model_name"] == [DEMO_QWEN3_NAME]
    assert (built / "tokenizer.json").stat().st_size > 10_000_000  # the real vocabulary
