"""How many series one replica can export: each persona multiplies the families labelled by
model, so the worst case (every persona label, both endpoints, every finish reason) must stay
bounded, and the README states it."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import generate_latest

from serve.request_record import RequestRecord
from serve.telemetry import FINISH_REASONS, TTFT_STAGES, Metrics


def _worst_case(model_labels: int) -> int:
    metrics = Metrics()
    for endpoint in ("chat", "completions"):
        for m in range(model_labels):
            for reason in FINISH_REASONS:
                name = f"persona-{m}"
                record = RequestRecord(endpoint, name, 0.0, model_label=name)
                record.finish_reason = reason
                record.status = 200
                # Every optional stamp set, so every family this request can touch is touched.
                record.queued, record.admitted, record.first_delta = 0.001, 0.002, 0.003
                record.first_token, record.first_sentence = 0.004, 0.005
                record.gaps = [0.01]
                record.first_reasoning, record.last_reasoning = 0.001, 0.002
                record.reasoning_tokens = 3
                record.finish(metrics, now=0.01)
    for stage in TTFT_STAGES:
        metrics.ttft_stage.labels("chat", stage).observe(0.001)
    text = generate_latest(metrics.registry).decode()
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def test_the_series_of_64_personas_stay_bounded() -> None:
    """At the default --max-model-labels (64) the worst case once reached 124,000 series."""
    assert _worst_case(64) <= 40_000


def test_the_readme_states_the_bound() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    stated = re.search(r"at most ([\d,]+) series at the default 64", readme)
    assert stated, "README: the metrics section states the worst case"
    worst = _worst_case(64)
    assert int(stated.group(1).replace(",", "")) == worst
