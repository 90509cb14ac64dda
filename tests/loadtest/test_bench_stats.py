"""Fast unit tests of the bench's SSE parsing, per-request records, statistics and goodput."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from loadtest.compare import markdown, ratios
from loadtest.records import RequestRecord, build_record
from loadtest.runner import LevelRun, client_warnings, run_level
from loadtest.sse import parse_sse, record_from_sse
from loadtest.stats import Slo, distribution, summarize
from loadtest.workload import ChatRequest, IntRange, build_workload


def _chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
    obj = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(obj).encode() + b"\n"


def _stream(*parts: tuple[float, bytes]) -> list[tuple[float, bytes]]:
    """Interleave the blank lines that end each SSE event."""
    out: list[tuple[float, bytes]] = []
    for t, line in parts:
        out += [(t, line), (t, b"\n")]
    return out


USAGE = b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 4}}\n'


def test_parse_vllm_style_stream() -> None:
    lines = _stream(
        (1.00, _chunk({"role": "assistant", "content": ""})),  # role announcement: no token
        (1.10, _chunk({"content": "Hi"})),
        (1.12, _chunk({"content": ""})),  # a token with incomplete UTF-8: still a token
        (1.15, _chunk({"content": " there."})),
        (1.20, _chunk({"content": " Bye"}, finish="length")),
        (1.21, USAGE),
        (1.22, b"data: [DONE]\n"),
    )
    parsed = parse_sse(lines)
    assert [t for t, _ in parsed.events] == [1.10, 1.12, 1.15, 1.20]
    assert parsed.usage == {"prompt_tokens": 7, "completion_tokens": 4}
    assert parsed.done and parsed.error is None

    rec = record_from_sse(0, start=1.0, end=1.25, lines=lines)
    assert rec.ok
    assert rec.ttft == pytest.approx(0.10)
    assert rec.itl == pytest.approx([0.02, 0.03, 0.05])
    assert rec.ttfs == pytest.approx(0.15)  # " there." holds the first sentence end
    assert rec.e2e == pytest.approx(0.25)
    assert rec.output_tokens == 4 and rec.tokens_from_usage
    assert rec.tpot == pytest.approx((0.25 - 0.10) / 3)


def test_parse_sse_edge_cases() -> None:
    lines = [
        (0.0, b": keep-alive comment\r\n"),
        (0.1, b"event: message\r\n"),
        (0.1, b'data:{"choices": [{"delta": {"role": "assistant", "content": "A"}}]}\r\n'),
        (0.2, b"\r\n"),
        (0.3, b'data: {"choices": [{"delta": {}, "finish_reason": "stop"}]}\n'),  # no token
        (0.3, b"\n"),
        (0.4, b'data: {"choices": [{"delta": {"content":\n'),  # one event over two data lines
        (0.5, b'data:  "B"}}]}\n'),
        (0.5, b"\n"),
        (0.6, b"data: [DONE]"),  # last event without a trailing blank line
    ]
    parsed = parse_sse(lines)
    assert parsed.events == [(0.1, "A"), (0.4, "B")]  # role chunk with content is a token
    assert parsed.done and parsed.usage is None


def test_stream_errors_are_failures() -> None:
    err = _stream((1.1, _chunk({"content": "x"})), (1.2, b'data: {"error": {"message": "boom"}}\n'))
    assert record_from_sse(0, 1.0, 1.3, err).error == "stream error: boom"
    cut = _stream((1.1, _chunk({"content": "x"})))
    assert record_from_sse(0, 1.0, 1.3, cut).error == "stream ended without [DONE]"
    empty = _stream((1.1, b"data: [DONE]\n"))
    assert record_from_sse(0, 1.0, 1.3, empty).error == "no tokens in stream"
    bad = _stream((1.1, b"data: {not json\n"))
    assert (record_from_sse(0, 1.0, 1.3, bad).error or "").startswith("bad SSE JSON")


def test_record_without_usage_counts_chunks() -> None:
    rec = build_record(3, 0.0, 1.0, [(0.2, "a"), (0.3, "b"), (0.5, "c!")])
    assert rec.output_tokens == 3 and not rec.tokens_from_usage
    assert rec.ttfs == pytest.approx(0.5)
    assert rec.to_row()["itl_max"] == pytest.approx(0.2)


def test_distribution_percentiles() -> None:
    d = distribution([i / 1000 for i in range(1, 101)] + [None])  # 1..100 ms
    assert d["count"] == 100
    assert d["mean"] == pytest.approx(50.5)
    assert d["p50"] == pytest.approx(50.5)
    assert d["p90"] == pytest.approx(90.1)
    assert d["p99"] == pytest.approx(99.01)
    assert (d["min"], d["max"]) == (pytest.approx(1.0), pytest.approx(100.0))
    assert distribution([])["p50"] is None


def _rec(index: int, ttft: float, gaps: list[float], tokens: int) -> RequestRecord:
    events = [(ttft, "x")]
    for g in gaps:
        events.append((events[-1][0] + g, "x"))
    return build_record(index, 0.0, events[-1][0], events, output_tokens=tokens)


def test_goodput_and_summary() -> None:
    fast = _rec(0, 0.1, [0.01] * 9, 10)
    slow_start = _rec(1, 2.0, [0.01] * 9, 10)
    stutter = _rec(2, 0.1, [0.01] * 8 + [0.5], 10)  # one 500 ms gap: its p99 gap is ~0.46 s
    failed = RequestRecord(3, 0.0, error="HTTP 500: oops")
    slo = Slo(ttft_ms=1000, itl_ms=100)
    assert [slo.met_by(r) for r in (fast, slow_start, stutter, failed)] == [
        True,
        False,
        False,
        False,
    ]
    assert Slo().met_by(slow_start) and not Slo().met_by(failed)

    s = summarize([fast, slow_start, stutter, failed], duration_s=2.0, slo=slo)
    assert (s["requests"], s["completed"], s["errors"]) == (4, 3, 1)
    assert s["goodput"] == pytest.approx(0.25)
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_token_throughput"] == pytest.approx(15.0)
    assert s["itl_ms"]["count"] == 27
    assert s["error_samples"] == ["HTTP 500: oops"]


def test_workload_is_seeded_and_shaped() -> None:
    a = build_workload(50, seed=7, turns=IntRange(2, 3), max_tokens=IntRange(20, 200))
    b = build_workload(50, seed=7, turns=IntRange(2, 3), max_tokens=IntRange(20, 200))
    assert [r.messages for r in a] == [r.messages for r in b]
    assert [r.max_tokens for r in a] == [r.max_tokens for r in b]
    assert a != build_workload(50, seed=8, turns=IntRange(2, 3))
    for r in a:
        roles = [m["role"] for m in r.messages]
        assert roles[0] == "system" and roles[-1] == "user"
        assert roles.count("user") in (2, 3)
        assert 20 <= r.max_tokens <= 200
    assert IntRange.parse("64") == IntRange(64, 64)
    with pytest.raises(ValueError):
        IntRange.parse("9:3")


def _fake_send(delay: float, in_flight: list[int]):  # type: ignore[no-untyped-def]
    async def send(req: ChatRequest) -> RequestRecord:
        in_flight[0] += 1
        in_flight[1] = max(in_flight[1], in_flight[0])
        start = time.perf_counter()
        await asyncio.sleep(delay)
        in_flight[0] -= 1
        now = time.perf_counter()
        return build_record(req.index, start, now, [(now, "ok.")], output_tokens=1)

    return send


def test_runner_concurrency_and_rate() -> None:
    reqs = build_workload(12, seed=0)
    in_flight = [0, 0]
    run = asyncio.run(run_level(_fake_send(0.02, in_flight), reqs, concurrency=4, progress=False))
    assert len(run.records) == 12 and in_flight[1] == 4
    assert sorted(r.index for r in run.records) == list(range(12))

    in_flight = [0, 0]
    run = asyncio.run(
        run_level(_fake_send(0.05, in_flight), reqs, rate=400.0, max_concurrency=2, progress=False)
    )
    assert len(run.records) == 12 and in_flight[1] <= 2

    run = asyncio.run(
        run_level(
            _fake_send(0.05, [0, 0]),
            build_workload(1000),
            concurrency=2,
            duration_s=0.3,
            progress=False,
        )
    )
    assert 4 <= len(run.records) < 40  # stopped by the duration, in-flight ones finished
    assert run.client["cpu_fraction"] >= 0


def test_client_warnings() -> None:
    assert client_warnings({"cpu_fraction": 0.2, "loop_lag_p99_ms": 1.0}) == []
    busy = client_warnings({"cpu_fraction": 0.97, "loop_lag_p99_ms": 50.0})
    assert len(busy) == 2 and "97%" in busy[0]


def _level(level: float, ttft_p50: float, tok_s: float) -> dict[str, object]:
    recs = [_rec(0, ttft_p50 / 1000, [0.01, 0.01], 3)]
    s = summarize(recs, 1.0, Slo())
    s["output_token_throughput"] = tok_s
    return {"mode": "concurrency", "level": level, "summary": s}


def test_compare_ratios_pair_rounds() -> None:
    results = {
        "ours": [[_level(1, 10, 100)], [_level(1, 30, 100)]],
        "vllm": [[_level(1, 20, 50)], [_level(1, 30, 200)]],
    }
    r = ratios(results, "ours", "vllm")  # type: ignore[arg-type]
    assert r["1"]["TTFT p50"]["min"] == pytest.approx(0.5)
    assert r["1"]["TTFT p50"]["max"] == pytest.approx(1.0)
    assert r["1"]["output tok/s"]["mean"] == pytest.approx((2.0 + 0.5) / 2)
    md = markdown(
        {
            "meta": {"rounds": 2, "mode": "concurrency"},
            "ratios": {"ours_vs_vllm": r},
            "absolute": {},
            "idle_peer_cpu": {},
        }
    )
    assert "| 1 | 0.75 (0.50-1.00) |" in md


def test_level_run_dataclass_defaults() -> None:
    run = LevelRun("concurrency", 1.0, [], 0.0, {"cpu_fraction": 0.0})
    assert run.warnings == []
