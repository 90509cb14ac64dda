"""The README documents every setting and every metric the server exports."""

from __future__ import annotations

from pathlib import Path

from serve.settings import ENV_PREFIX, Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_in_the_readme() -> None:
    for name in Settings.model_fields:
        if name == "engine_args":
            continue
        assert f"`--{name.replace('_', '-')}`" in README, name
        assert f"`{ENV_PREFIX}{name.upper()}`" in README, name


def test_every_metric_is_in_the_readme() -> None:
    from serve.telemetry import Metrics

    families = {f.name for f in Metrics().registry.collect() if f.name.startswith("avatar_")}
    assert families
    for family in families:
        documented = f"`{family}`" in README or f"`{family}_total`" in README
        assert documented, family


def test_the_load_tools_default_to_the_demo_models_name() -> None:
    import loadtest
    from serve.demo_model import DEMO_MODEL_NAME

    assert loadtest.DEMO_MODEL_NAME == DEMO_MODEL_NAME
