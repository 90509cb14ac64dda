"""Several front ends (``serve/multiproc.py``): the limits split exactly, readiness waits for
every process. The processes themselves run in tests/e2e/test_multiproc_e2e.py."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from fastapi import FastAPI

from serve.app import create_app
from serve.engine.fake import FakeEngine
from serve.multiproc import check_split, split_limit
from tests.unit.conftest import make_settings, open_client


@pytest.mark.parametrize(("total", "count"), [(256, 2), (7, 3), (5, 5), (513, 4), (0, 3)])
def test_shares_add_up_to_the_server_wide_limit_and_differ_by_at_most_one(
    total: int, count: int
) -> None:
    shares = [split_limit(total, count, i) for i in range(count)]
    assert sum(shares) == total
    assert max(shares) - min(shares) <= 1


def test_more_processes_than_engine_slots_is_refused_at_start_up() -> None:
    with pytest.raises(SystemExit, match="--max-running-requests"):
        check_split(make_settings(api_server_count=4, max_running_requests=3))
    check_split(make_settings(api_server_count=4, max_running_requests=4))


async def test_ready_fails_until_every_front_end_serves(engine: FakeEngine) -> None:
    peers = [True, False]
    app: FastAPI = create_app(make_settings(), engine, peers_ready=lambda: all(peers))
    async with open_client(app) as client:
        r = await client.get("/ready")
        assert r.status_code == 503 and r.json()["error"]["code"] == "starting"
        peers[1] = True
        assert (await client.get("/ready")).status_code == 200


def _front_end_work(requests: int) -> None:
    from serve.telemetry import Metrics

    metrics = Metrics(multiprocess=True)
    metrics.requests.labels("chat", "200", "stop").inc(requests)
    metrics.running.set(requests)


def _scrape(out: multiprocessing.Queue[bytes]) -> None:
    from serve.telemetry import Metrics, render_latest

    out.put(render_latest(Metrics(multiprocess=True))[0])


def test_one_scrape_sums_every_front_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.support import metric_value

    # Spawned processes choose file-backed values at import, as the launcher's front ends do.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    ctx = multiprocessing.get_context("spawn")
    for requests in (3, 4):
        proc = ctx.Process(target=_front_end_work, args=(requests,))
        proc.start()
        proc.join(60)
        assert proc.exitcode == 0
    out: multiprocessing.Queue[bytes] = ctx.Queue()
    proc = ctx.Process(target=_scrape, args=(out,))
    proc.start()
    text = out.get(timeout=60).decode()
    proc.join(60)
    labels = {"endpoint": "chat", "status": "200", "finish_reason": "stop"}
    assert metric_value(text, "avatar_requests_total", **labels) == 7
    assert metric_value(text, "avatar_requests_running") == 7
