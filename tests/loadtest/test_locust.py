"""A short headless Locust run of loadtest/locustfile.py against the real CPU engine."""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest import DEMO_MODEL_NAME

REPO = Path(__file__).resolve().parents[2]


def _locust_cmd() -> list[str]:
    exe = shutil.which("locust", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "locust"]


@pytest.mark.e2e
def test_locust_reports_streaming_entries(
    server_url: str, server_api_key: str | None, tmp_path: Path
) -> None:
    # Never import locust here: importing it monkey-patches this whole process with gevent.
    assert importlib.util.find_spec("locust") is not None, "the loadtest extra installs locust"
    prefix = tmp_path / "locust"
    cmd = [
        *_locust_cmd(),
        "-f",
        str(REPO / "loadtest" / "locustfile.py"),
        "--headless",
        "-u",
        "4",
        "-r",
        "4",
        "-t",
        "15s",
        "--host",
        server_url,
        "--csv",
        str(prefix),
        "--only-summary",
        "--model",
        DEMO_MODEL_NAME,
        "--ignore-eos",
        "--max-tokens",
        "16:48",
        "--think-time-s",
        "0.2",
        "--stop-timeout",
        "30",
        *(["--api-key", server_api_key] if server_api_key else []),
    ]
    # Bounded: 15 s of load, up to 30 s to let in-flight streams finish, plus start-up.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    with (tmp_path / "locust_stats.csv").open() as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    total = rows[("", "Aggregated")]
    assert int(total["Failure Count"]) == 0, (tmp_path / "locust_failures.csv").read_text()
    post = rows[("POST", "/v1/chat/completions")]
    assert int(post["Request Count"]) > 0
    for name in ("ttft", "itl", "e2e"):
        row = rows[("SSE", name)]
        assert int(row["Request Count"]) > 0, name
        assert float(row["Average Response Time"]) > 0, name
    # A reply streams for longer than its first token takes to arrive.
    assert float(rows[("SSE", "e2e")]["Average Response Time"]) > float(
        rows[("SSE", "ttft")]["Average Response Time"]
    )
