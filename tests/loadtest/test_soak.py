"""The soak benchmark: its verdicts on synthetic runs (fast), on a fake server that drops
``[DONE]`` and leaks a request (a few seconds, no engine), and a short run against the real
server on the demo model (e2e)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from loadtest.servers import free_port
from loadtest.soak import build_parser, run_soak
from loadtest.soak_hostile import has_error_shape, hostile_cases
from loadtest.soak_metrics import Sample, parse_metrics
from loadtest.soak_summary import Goals, exit_code, format_report, summarize
from loadtest.soak_traffic import NORMAL_EXPECTED, Outcome, ends_with_done
from tests.support import TEST_API_KEY, ServerProcess

MiB = 2**20


def _samples(rss: Sequence[float], *, every: float = 10.0, **gauges: float) -> list[Sample]:
    """An idle sample, one load sample per ``rss`` value, then a settled one with ``gauges``."""
    out = [Sample(t=0.0, phase="idle", rss_bytes=rss[0], open_fds=30, disconnects=0)]
    out += [
        Sample(t=every * (i + 1), phase="load", rss_bytes=v, open_fds=40) for i, v in enumerate(rss)
    ]
    final = Sample(t=every * (len(rss) + 1), phase="settled", rss_bytes=rss[-1], open_fds=30)
    final.running = final.waiting = final.engine_unfinished = 0.0
    for key, value in gauges.items():
        setattr(final, key, value)
    return [*out, final]


def _summary(outcomes: list[Outcome], samples: list[Sample], **goals: Any) -> dict[str, Any]:
    return summarize(
        outcomes,
        samples,
        warmup_s=60.0,
        window_s=20.0,
        settle_s=0.5,
        goals=Goals(**goals),
        meta={"burst_size": 8},
    )


def _goal(summary: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in summary["goals"] if r["goal"] == name)


OK = [Outcome("chat_stream", 1.0, NORMAL_EXPECTED, status=200, stream=True, done=True)]
# Memory climbs during the warm-up (caches filling), then stays flat.
FLAT_AFTER_WARMUP = [100 * MiB, 150 * MiB, 180 * MiB, 200 * MiB, 200 * MiB, 201 * MiB] + [
    201 * MiB
] * 6


def test_growth_counts_from_the_end_of_warmup_not_from_the_start() -> None:
    summary = _summary(OK, _samples(FLAT_AFTER_WARMUP))
    rss = summary["growth"]["rss_bytes"]
    # Warm-up ends at 60 s: the median of 40..60 s is 200 MiB; the last 20 s read 201 MiB.
    assert rss["warmup_end"] == 200 * MiB and rss["end"] == 201 * MiB
    assert rss["growth_pct"] == pytest.approx(0.5)
    assert summary["passed"] and exit_code(summary) == 0
    assert "SOAK PASSED" in format_report(summary)


def test_steady_growth_after_warmup_fails_and_one_spike_does_not() -> None:
    leaking = FLAT_AFTER_WARMUP[:6] + [201 * MiB + i * 4 * MiB for i in range(1, 7)]
    summary = _summary(OK, _samples(leaking))
    goal = _goal(summary, "rss_bytes growth % after warm-up")
    assert not goal["ok"] and goal["value"] == pytest.approx((221 - 200) / 2)  # 10.5 %
    assert exit_code(summary) == 1
    assert "FAIL  rss_bytes growth" in format_report(summary)
    # The threshold is an option: at 20 % the same run passes.
    assert exit_code(_summary(OK, _samples(leaking), max_rss_growth_pct=20.0)) == 0
    # A single sample taken in a spike at the very end moves the median of the window not at all.
    spike = [*FLAT_AFTER_WARMUP[:-1], 400 * MiB]
    assert exit_code(_summary(OK, _samples(spike))) == 0


def test_a_run_too_short_to_measure_growth_fails() -> None:
    summary = _summary(OK, _samples([100 * MiB, 100 * MiB], every=20.0))  # ends at the warm-up
    assert summary["growth"]["rss_bytes"] is None
    assert not _goal(summary, "rss_bytes growth % after warm-up")["ok"]


def test_unexpected_statuses_by_kind() -> None:
    hostile_400 = frozenset({400})
    outcomes = [
        *OK,
        Outcome("chat", 1.0, NORMAL_EXPECTED, status=429),
        Outcome("chat", 1.0, NORMAL_EXPECTED, status=503, request="POST /v1/chat/completions"),
        Outcome("cut_mid_stream", 1.0, NORMAL_EXPECTED, cut=True, stream=True),
        Outcome("hostile_nan", 1.0, hostile_400, status=400),
        Outcome("hostile_nan", 1.0, hostile_400, status=500, request="POST NaN"),
        Outcome("hostile_nan", 1.0, hostile_400, status=400, bad_body="not OpenAI's shape"),
        Outcome("chat", 1.0, NORMAL_EXPECTED, error="ServerDisconnectedError: gone"),
    ]
    summary = _summary(outcomes, _samples(FLAT_AFTER_WARMUP))
    assert summary["statuses_by_kind"] == {
        "chat": {"429": 1, "503": 1, "error:ServerDisconnectedError": 1},
        "chat_stream": {"200": 1},
        "cut_mid_stream": {"cut": 1},
        "hostile_nan": {"400": 1, "400+bad_body": 1, "500": 1},
    }
    got = {(g["kind"], g["status"]): g["count"] for g in summary["unexpected"]}
    assert got == {
        ("chat", "503"): 1,
        ("chat", "error:ServerDisconnectedError"): 1,
        ("hostile_nan", "400+bad_body"): 1,
        ("hostile_nan", "500"): 1,
    }
    assert _goal(summary, "unexpected statuses")["value"] == 4
    assert exit_code(summary) == 1
    report = format_report(summary)
    assert "hostile_nan -> 500 x1 (expected [400])" in report and "POST NaN" in report
    assert summary["requests"]["cut_by_client"] == 1 and summary["requests"]["hostile_4xx"] == 2


def test_every_uncut_stream_must_end_with_done() -> None:
    assert ends_with_done([b'data: {"choices": []}\n', b"\n", b"data: [DONE]\n", b"\n"])
    assert not ends_with_done([b"data: [DONE]\n", b"\n", b'data: {"choices": []}\n', b"\n"])
    assert not ends_with_done([])
    streams = [
        Outcome("chat_stream", 1.0, NORMAL_EXPECTED, status=200, stream=True, done=False),
        # Cut by the client, or refused with 429: no [DONE] is owed.
        Outcome("cut_mid_stream", 1.0, NORMAL_EXPECTED, cut=True, stream=True, done=False),
        Outcome("burst", 1.0, NORMAL_EXPECTED, status=429, stream=True),
    ]
    summary = _summary(streams, _samples(FLAT_AFTER_WARMUP))
    assert [(g["kind"], g["count"]) for g in summary["streams_without_done"]] == [
        ("chat_stream", 1)
    ]
    assert not _goal(summary, "streams without [DONE]")["ok"] and exit_code(summary) == 1


@pytest.mark.parametrize(
    ("gauges", "failed"),
    [
        ({"engine_unfinished": 2.0}, "engine requests left"),
        ({"running": 1.0}, "avatar_requests_running after load"),
        ({"waiting": 3.0}, "avatar_requests_waiting after load"),
    ],
)
def test_requests_left_after_the_load_fail(gauges: dict[str, float], failed: str) -> None:
    summary = _summary(OK, _samples(FLAT_AFTER_WARMUP, **gauges))
    assert [r["goal"] for r in summary["goals"] if not r["ok"]] == [failed]
    assert not summary["after_load"]["settled"] and exit_code(summary) == 1
    assert "NOT settled" in format_report(summary)


def test_metrics_parsing_sums_labels_and_leaves_absent_gauges_out() -> None:
    text = (
        "# TYPE process_open_fds gauge\nprocess_open_fds 41.0\n"
        "# TYPE avatar_requests_running gauge\navatar_requests_running 3.0\n"
        "# TYPE avatar_client_disconnects counter\n"
        'avatar_client_disconnects_total{endpoint="chat"} 4.0\n'
        'avatar_client_disconnects_total{endpoint="completions"} 1.0\n'
    )
    assert parse_metrics(text) == {"open_fds": 41.0, "running": 3.0, "disconnects": 5.0}


def test_auth_cases_only_against_a_server_that_wants_a_key() -> None:
    open_server = {c.name for c in hostile_cases("m", None)}
    keyed = {c.name for c in hostile_cases("m", "k")}
    assert keyed - open_server == {"bad_auth"}
    nan = next(c for c in hostile_cases("m", None) if c.name == "nan")
    assert all(b"NaN" in v.body or b"Infinity" in v.body for v in nan.variants)
    assert has_error_shape(b'{"error": {"message": "x", "type": "t", "param": null, "code": null}}')
    assert not has_error_shape(b'{"detail": "Not Found"}')


# -- a fake server that drops [DONE] and leaks a request, to check the whole loop -------------


async def _fake_generation(request: web.Request) -> web.StreamResponse:
    try:
        body = json.loads(await request.read())
    except ValueError:
        body = None
    if not isinstance(body, dict) or not body.get("stream"):
        return web.json_response({"choices": [{"text": "hi"}]})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for word in ("Hello", " there"):
        chunk = {"choices": [{"index": 0, "delta": {"content": word}}]}
        await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    await resp.write_eof()  # and no [DONE]
    return resp


async def _fake_metrics(request: web.Request) -> web.Response:
    text = (
        "process_resident_memory_bytes 1e8\nprocess_open_fds 10\navatar_requests_running 0\n"
        "avatar_requests_waiting 0\navatar_engine_unfinished_requests 1\n"
    )
    return web.Response(text=text)


@pytest.fixture
async def fake_server() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _fake_generation)
    app.router.add_post("/v1/completions", _fake_generation)
    app.router.add_get("/metrics", _fake_metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_soak_reports_missing_done_and_a_leaked_request(
    fake_server: str, tmp_path: Path
) -> None:
    args = build_parser().parse_args(
        [
            "--base-url", fake_server, "--model", "fake", "--minutes", "0.04",
            "--concurrency", "2", "--burst-size", "0", "--sample-every", "0.5",
            "--settle-timeout", "1", "--progress-every", "0", "--out", str(tmp_path),
        ]
    )  # fmt: skip
    summary, samples = await run_soak(args)
    assert samples[0].phase == "idle" and samples[-1].phase == "settled"
    missing = {g["kind"] for g in summary["streams_without_done"]}
    assert {"chat_stream", "completion_stream"} & missing
    failed = {r["goal"] for r in summary["goals"] if not r["ok"]}
    assert {"streams without [DONE]", "engine requests left"} <= failed
    assert summary["after_load"]["engine_unfinished"] == 1
    assert exit_code(summary) == 1


# -- the real server ---------------------------------------------------------------------------

API_KEY = TEST_API_KEY  # the key of ``small_server`` (tests/conftest.py)


@pytest.mark.e2e
def test_short_soak_against_the_real_server(small_server: ServerProcess, tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "loadtest.soak", "--base-url", small_server.base_url,
        "--api-key", API_KEY, "--minutes", "0.5", "--concurrency", "3",
        "--burst-size", "16", "--burst-every", "8", "--sample-every", "2",
        "--pid", str(small_server.proc.pid), "--progress-every", "0", "--out", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    log_tail = "\n".join(small_server.log().splitlines()[-40:])
    detail = f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}\n{log_tail}"
    summary = json.loads((tmp_path / "summary.json").read_text())
    req = summary["requests"]
    assert req["status_429"] > 0, detail
    assert req["hostile_4xx"] > 0 and req["cut_by_client"] > 0, detail
    assert summary["unexpected"] == [], detail
    assert summary["streams_without_done"] == [], detail
    left = summary["after_load"]
    assert (left["engine_unfinished"], left["running"], left["waiting"]) == (0, 0, 0), detail
    assert left["disconnects_idle_delta"] > 0, detail  # the cuts reached the server
    assert (tmp_path / "samples.csv").read_text().count("\n") > 10
    assert proc.returncode == 0, detail
    assert "SOAK PASSED" in proc.stdout
