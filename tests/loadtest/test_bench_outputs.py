"""The bench's output files: from synthetic runs (fast), and a short real run (e2e)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest import DEMO_MODEL_NAME
from loadtest.records import build_record
from loadtest.report import format_table, level_results, write_outputs
from loadtest.runner import LevelRun
from loadtest.stats import Slo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_outputs(out: Path, levels: list[float], n_requests: int) -> dict:  # type: ignore[type-arg]
    data = json.loads((out / "results.json").read_text())
    assert [lv["level"] for lv in data["levels"]] == levels
    with (out / "summary.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(levels)
    with (out / "requests.csv").open() as f:
        assert len(list(csv.DictReader(f))) == n_requests
    for name in ("ttft_cdf.png", "latency_throughput.png"):
        png = (out / name).read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 5_000, name
    return data


def test_outputs_from_synthetic_runs(tmp_path: Path) -> None:
    runs = []
    for level in (1.0, 4.0):
        recs = [
            build_record(i, 0.0, 0.5, [(0.1 * level, "Hi."), (0.2 * level, "x")], output_tokens=2)
            for i in range(5)
        ]
        runs.append(
            LevelRun("concurrency", level, recs, 1.0, {"cpu_fraction": 0.1, "loop_lag_p99_ms": 0.5})
        )
    levels = level_results(runs, Slo(ttft_ms=200))
    table = format_table(levels)
    assert "TTFT p50" in table and len(table.splitlines()) == 4
    write_outputs(tmp_path, {"label": "synthetic"}, levels, runs)
    data = _check_outputs(tmp_path, [1.0, 4.0], 10)
    assert data["levels"][0]["summary"]["goodput"] == 1.0
    assert data["levels"][1]["summary"]["goodput"] == 0.0  # TTFT 400 ms > 200 ms


@pytest.mark.e2e
def test_short_bench_run(server_url: str, server_api_key: str | None, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    cmd = [
        sys.executable,
        "-m",
        "loadtest.bench",
        "--base-url",
        f"{server_url}/v1",
        "--model",
        DEMO_MODEL_NAME,
        "--concurrency",
        "1,4",
        "--num-requests",
        "6",
        "--max-tokens",
        "8:24",
        "--ignore-eos",
        "--warmup",
        "1",
        "--no-progress",
        "--out",
        str(out),
        *(["--api-key", server_api_key] if server_api_key else []),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TTFT p50" in proc.stdout
    data = _check_outputs(out, [1.0, 4.0], 12)
    for lv in data["levels"]:
        s = lv["summary"]
        assert (s["completed"], s["errors"]) == (6, 0), s["error_samples"]
        assert s["tokens_from_usage"]
        # ignore_eos: every reply is exactly its max_tokens, 8..24 tokens each
        assert 6 * 8 <= s["total_output_tokens"] <= 6 * 24
        assert 0 < s["ttft_ms"]["p50"] <= s["ttft_ms"]["p99"] < s["e2e_ms"]["p99"]
        assert s["itl_ms"]["count"] >= 6 * 7 and s["itl_ms"]["p50"] > 0
        assert s["output_token_throughput"] > 0 and s["request_throughput"] > 0
