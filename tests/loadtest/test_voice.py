"""The voice-traffic benchmark (``python -m loadtest.voice``): its seeded schedule, the listener,
the session state machine against a scripted fake OpenAI server, the verdicts on synthetic
results, and one short run against the real server on the demo model (e2e)."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from loadtest import DEMO_MODEL_NAME
from loadtest.voice_client import CONFIRMED, FOLLOWUP, SPECULATIVE, StreamResult, VoiceClient
from loadtest.voice_metrics import cancel_waste, parse_metrics, received_tokens
from loadtest.voice_plan import (
    FloatRange,
    SessionPlan,
    ToolPlan,
    TurnPlan,
    VoiceWorkload,
    mean_session_s,
    schedule,
    session_plan,
)
from loadtest.voice_report import VoiceSlo, capacity, scaled_slo, summarize_level
from loadtest.voice_session import ERROR, OK, REFUSED, SessionOptions, TurnRecord, run_session
from loadtest.voice_speech import Speakable, SpeechConfig, simulate
from loadtest.workload import IntRange

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WORD = "ab "  # every fake token: 3 characters


# --- the schedule -------------------------------------------------------------------------


def test_schedule_is_seeded_and_reproducible() -> None:
    wl = VoiceWorkload(seed=3)
    a = schedule(8, wl, 60.0, speech_s_per_token=0.25)
    assert a == schedule(8, wl, 60.0, speech_s_per_token=0.25)
    assert a != schedule(8, replace(wl, seed=4), 60.0, speech_s_per_token=0.25)
    assert sum(x.under_way for x in a) == 8  # the offered sessions are there from the start
    assert all(0 <= x.at_s < 60.0 for x in a)
    assert [x.at_s for x in a] == sorted(x.at_s for x in a)
    # A session is the same whatever the level it appears in.
    new = [x for x in a if not x.under_way]
    assert new and all(x.plan == session_plan(x.plan.index, wl) for x in new)
    # Sessions under way carry their earlier exchanges as history, user and assistant in turn.
    for x in a:
        if x.plan.history:
            roles = [m["role"] for m in x.plan.history]
            assert roles == ["user", "assistant"] * (len(roles) // 2)


def test_session_plans_follow_the_workload() -> None:
    wl = VoiceWorkload(seed=1, tool_share=0.5, barge_in=0.5)
    plans = [session_plan(i, wl) for i in range(60)]
    turns = [t for p in plans for t in p.turns]
    assert all(wl.turns.lo <= len(p.turns) <= wl.turns.hi for p in plans)
    assert all(len(t.partials) <= 2 for t in turns)
    assert {len(t.partials) for t in turns} == {0, 1, 2}
    for t in turns:
        texts = [p for p, _ in t.partials]
        assert t.user_text not in texts  # a speculative transcript is never the final one
        assert all(a != b for a, b in itertools.pairwise(texts))
        assert all(wl.cancel_s.lo <= d <= wl.cancel_s.hi for _, d in t.partials)
    assert 0.3 < sum(t.tool is not None for t in turns) / len(turns) < 0.7
    assert 0.3 < sum(t.barge_in_s is not None for t in turns) / len(turns) < 0.7
    # One persona prompt per persona, shared by its sessions up to the per-session header.
    by_persona: dict[str, set[str]] = {}
    for p in plans:
        by_persona.setdefault(p.persona, set()).add(p.system.split("\n\nThe person")[0])
    assert all(len(v) == 1 for v in by_persona.values())
    assert all(wl.persona_chars.lo <= len(next(iter(v))) for v in by_persona.values())


@pytest.mark.parametrize("arrival", ["poisson", "fixed"])
def test_arrival_rate_gives_the_offered_sessions(arrival: str) -> None:
    wl = VoiceWorkload(seed=2)
    spt = 0.2
    duration = 20_000.0
    a = schedule(10, wl, duration, speech_s_per_token=spt, arrival=arrival)
    new = [x.at_s for x in a if not x.under_way]
    expected = 10 / mean_session_s(wl, spt) * duration  # Little's law: 10 in progress
    assert abs(len(new) - expected) < 4 * math.sqrt(expected) + 1
    if arrival == "fixed":
        gaps = {round(b - a, 6) for a, b in itertools.pairwise(new)}
        assert len(gaps) <= 2  # one interval (rounding aside)


# --- the listener -------------------------------------------------------------------------


def test_speech_starts_at_a_long_enough_sentence_or_enough_text() -> None:
    cfg = SpeechConfig(cps=15, min_sentence_chars=10, max_first_chars=30)
    det = Speakable(cfg)
    assert not det.feed("Hi. ")  # a sentence end before 10 characters does not count
    assert not det.feed("Fine thank")
    assert det.feed(" you. And")
    det = Speakable(cfg)
    assert not det.feed("x" * 29)
    assert det.feed("y")  # 30 characters and no sentence: a clause long enough to speak


def test_underruns_on_a_scripted_slow_stream() -> None:
    # 30 characters at t=1, then 15 more at t=4: speaking at 15/s runs dry at t=3.
    events = [(1.0, "a" * 30), (4.0, "b" * 15)]
    sp = simulate(events, 1.0, cps=15.0)
    assert (sp.underruns, sp.cut) == (1, False)
    assert sp.stall_s == pytest.approx(1.0)
    assert sp.end == pytest.approx(5.0)
    assert sp.heard_chars == sp.total_chars == 45
    # Fast enough: no underrun.
    fast = [(1.0 + 0.1 * i, "abc") for i in range(30)]
    assert simulate(fast, 1.0, cps=15.0).underruns == 0
    # The user cuts in at t=2: 15 characters heard; the silence before a cut counts too.
    cut = simulate(events, 1.0, cps=15.0, cut_at=2.0)
    assert (cut.heard_chars, cut.cut, cut.underruns, cut.end) == (15, True, 0, 2.0)
    cut = simulate(events, 1.0, cps=15.0, cut_at=3.5)
    assert (cut.heard_chars, cut.underruns) == (30, 1)


# --- a scripted fake OpenAI server --------------------------------------------------------


class FakeServer:
    """Streams ``WORD`` per token every ``token_s`` (a sentence end every 12 tokens), a forced
    tool call as three argument pieces, or refuses with 429. Keeps every body it got, which
    requests the client left mid-stream, and a vLLM-style token counter on /metrics."""

    def __init__(self, token_s: float = 0.005, refuse: bool = False) -> None:
        self.token_s = token_s
        self.refuse = refuse
        self.bodies: list[dict[str, Any]] = []
        self.left: set[int] = set()
        self.generated = 0
        self.url = ""

    def _chunk(self, delta: dict[str, Any]) -> bytes:
        obj = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        index = len(self.bodies)
        self.bodies.append(body)
        if self.refuse:
            err = {"error": {"message": "busy", "type": "rate_limit", "code": "queue_full"}}
            return web.json_response(err, status=429, headers={"Retry-After": "1"})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        choice = body.get("tool_choice")
        asked = str(body["messages"][-1].get("content"))
        try:
            if isinstance(choice, dict) or (choice == "auto" and "weather" in asked):
                name = choice["function"]["name"] if isinstance(choice, dict) else "get_weather"
                pieces = [{"id": "call_1", "type": "function", "function": {"name": name}}]
                pieces += [{"function": {"arguments": a}} for a in ('{"day": ', '"friday"', "}")]
                tokens = len(pieces)
                for piece in pieces:
                    self.generated += 1
                    await resp.write(self._chunk({"tool_calls": [{"index": 0, **piece}]}))
                    await asyncio.sleep(self.token_s)
            else:
                tokens = body["max_tokens"]
                for i in range(tokens):
                    self.generated += 1
                    await asyncio.sleep(self.token_s)
                    text = "ab." if i % 12 == 11 else WORD
                    await resp.write(self._chunk({"content": text}))
            prompt = len(json.dumps(body["messages"])) // 4
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": tokens,
                "prompt_tokens_details": {"cached_tokens": prompt // 2},
            }
            await resp.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode())
            await resp.write(b"\n\ndata: [DONE]\n\n")
        except ConnectionResetError:
            self.left.add(index)  # the client closed the stream
        except asyncio.CancelledError:
            self.left.add(index)
            raise
        return resp

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": DEMO_MODEL_NAME}]})

    async def metrics(self, request: web.Request) -> web.Response:
        text = (
            "# TYPE vllm:generation_tokens counter\n"
            f'vllm:generation_tokens_total{{engine="0"}} {self.generated}\n'
            "# TYPE vllm:num_requests_running gauge\n"
            'vllm:num_requests_running{engine="0"} 0\n'
        )
        return web.Response(text=text)


@pytest.fixture
async def fake() -> AsyncIterator[FakeServer]:
    server = FakeServer()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", server.chat)
    app.router.add_get("/v1/models", server.models)
    app.router.add_get("/metrics", server.metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    await web.TCPSite(runner, "127.0.0.1", port).start()
    server.url = f"http://127.0.0.1:{port}"
    yield server
    await runner.cleanup()


def _turn(**kw: Any) -> TurnPlan:
    base: dict[str, Any] = dict(
        user_text="Where is the museum?",
        think_s=0.01,
        partials=(),
        max_tokens=20,
        barge_in_s=None,
    )
    return TurnPlan(**(base | kw))


async def _play(fake: FakeServer, plan: SessionPlan, cps: float = 100.0) -> list[TurnRecord]:
    turns: list[TurnRecord] = []
    opts = SessionOptions(tools=True, max_context_chars=100_000, cps=cps)
    speech = SpeechConfig(cps=cps, min_sentence_chars=5, max_first_chars=30)
    async with VoiceClient(fake.url + "/v1", DEMO_MODEL_NAME, speech=speech) as client:
        t0 = time.perf_counter()
        await run_session(plan, client, opts, t0=t0, stop_at=t0 + 60, turns_out=turns)
    await asyncio.sleep(0.05)  # let the server notice the connections the client closed
    return turns


async def test_session_speculative_barge_in_and_tool_turn(fake: FakeServer) -> None:
    fake.token_s = 0.01
    plan = SessionPlan(
        index=7,
        persona="museum_guide",
        system="You are Theo.",
        turns=(
            # Two speculative requests, then a confirmed reply the user cuts 0.15 s into speech
            # while it still streams (200 tokens at 10 ms each).
            _turn(
                partials=(("Where is", 0.05), ("where is the museum", 0.05)),
                max_tokens=200,
                barge_in_s=0.15,
            ),
            _turn(user_text="And the cafe?", tool=ToolPlan("check_schedule", '{"open": true}')),
            _turn(user_text="Thanks."),
        ),
    )
    turns = await _play(fake, plan)
    kinds = [(b["messages"][-1]["role"], b["messages"][-1].get("content")) for b in fake.bodies]
    assert kinds[:3] == [
        ("user", "Where is"),
        ("user", "where is the museum"),
        ("user", "Where is the museum?"),
    ]
    assert len(fake.bodies) == 6  # 2 speculative, confirmed; tool call, follow-up; confirmed
    # Both speculative requests and the cut reply were closed by the client mid-stream.
    assert {0, 1, 2} <= fake.left
    assert all(b["tools"] and b["stream_options"]["include_usage"] for b in fake.bodies)
    assert [t.outcome for t in turns] == [OK, OK, OK]
    first, tool, last = turns
    assert (first.speculative, first.barge_in, first.stream_cut) == (2, True, True)
    assert 0 < first.heard_chars < first.reply_chars
    # The next turn's history holds the reply as far as it was heard.
    heard = fake.bodies[3]["messages"][-2]
    assert heard["role"] == "assistant" and len(heard["content"]) == first.heard_chars
    streamed = "".join("ab." if i % 12 == 11 else WORD for i in range(200))
    assert streamed.startswith(heard["content"]) and 0 < len(heard["content"]) < len(streamed)
    assert tool.after_cut and tool.tool and tool.ttft_s is not None and tool.ttfs_s is not None
    # The forced call, then the follow-up with the call and the tool's result appended.
    assert fake.bodies[3]["tool_choice"] == {
        "type": "function",
        "function": {"name": "check_schedule"},
    }
    assert "ignore_eos" not in fake.bodies[3]  # a forced call must stop at its grammar's end
    follow = fake.bodies[4]["messages"]
    assert follow[-2]["role"] == "assistant" and follow[-2]["tool_calls"][0]["id"] == "call_1"
    assert json.loads(follow[-2]["tool_calls"][0]["function"]["arguments"]) == {"day": "friday"}
    assert follow[-1] == {"role": "tool", "tool_call_id": "call_1", "content": '{"open": true}'}
    assert fake.bodies[4]["tool_choice"] == "none" and fake.bodies[4]["ignore_eos"] is True
    # The last turn's history: the whole tool exchange and the spoken reply.
    assert [m["role"] for m in fake.bodies[5]["messages"]] == [
        "system", "user", "assistant", "user", "assistant", "tool", "assistant", "user",
    ]  # fmt: skip
    assert not last.after_cut and not last.barge_in and last.heard_chars == last.reply_chars
    assert first.cached_tokens is None  # a reply cut mid-stream has no usage
    assert last.cached_tokens is not None and last.prompt_tokens


async def test_a_call_the_model_chose_is_answered_too(fake: FakeServer) -> None:
    plan = SessionPlan(
        0,
        "travel_buddy",
        "You are Kai.",
        (_turn(user_text="What is the weather?"), _turn(user_text="Nice.")),
    )
    turns: list[TurnRecord] = []
    opts = SessionOptions(tools=True, cps=1000.0, tool_choice="auto")
    async with VoiceClient(fake.url + "/v1", DEMO_MODEL_NAME) as client:
        t0 = time.perf_counter()
        await run_session(plan, client, opts, t0=t0, stop_at=t0 + 60, turns_out=turns)
    assert [t.outcome for t in turns] == [OK, OK] and turns[0].tool and not turns[1].tool
    assert [b["tool_choice"] for b in fake.bodies] == ["auto", "none", "auto"]
    assert fake.bodies[1]["messages"][-1]["content"] == '{"status": "ok"}'


async def test_underrun_counted_on_a_slow_stream(fake: FakeServer) -> None:
    # 3 characters every 0.1 s is 30 characters a second: a 100-a-second voice runs dry.
    fake.token_s = 0.1
    plan = SessionPlan(0, "game_npc", "You are Brom.", (_turn(max_tokens=16),))
    (turn,) = await _play(fake, plan, cps=100.0)
    assert turn.outcome == OK and turn.underruns >= 1 and turn.stall_s > 0
    fake.token_s = 0.002  # 1500 characters a second: never dry
    (turn,) = await _play(fake, plan, cps=100.0)
    assert turn.underruns == 0


async def test_a_refused_session_leaves_at_once(fake: FakeServer) -> None:
    fake.refuse = True
    plan = SessionPlan(0, "game_npc", "You are Brom.", (_turn(partials=(("Where", 0.05),)),) * 3)
    turns = await _play(fake, plan)
    assert [t.outcome for t in turns] == [REFUSED]
    assert turns[0].refusal_s is not None and turns[0].refusal_s < 1.0
    assert turns[0].speculative_refused == 1 and turns[0].error_code == "queue_full"
    assert len(fake.bodies) == 2  # the speculative one and the confirmed one, nothing after


async def test_cli_against_the_fake_server(fake: FakeServer, tmp_path: Path) -> None:
    argv = [
        "--base-url", fake.url + "/v1", "--sessions", "2,4", "--duration", "2", "--drain", "5",
        "--rounds", "1", "--turns", "2:3", "--think-s", "0.2:0.4", "--reply-tokens", "10:20",
        "--calibration-requests", "3", "--cps", "200", "--tool-share", "0.3",
        "--barge-in", "0.5", "--barge-in-s", "0.02:0.05", "--out", str(tmp_path),
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest.voice", *argv, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-3000:]
    report = json.loads((tmp_path / "voice.json").read_text())
    assert report["meta"]["slo"]["source"].startswith("scaled")  # loopback, no GPU
    levels = report["results"]["target"][0]
    assert [lv["offered_sessions"] for lv in levels] == [2, 4]
    for lv in levels:
        assert lv["turns"] > 0 and lv["errors"] == 0, lv["error_samples"]
        assert lv["cancel"]["engine_tokens"] is not None
        assert lv["cache_share"] == pytest.approx(0.5, abs=0.05)
    assert (tmp_path / "voice.png").read_bytes().startswith(PNG_MAGIC)
    assert "capacity at SLO" in (tmp_path / "voice.md").read_text()
    assert (tmp_path / "round1" / "target" / "turns-2.csv").exists()


def test_request_bodies_and_passthrough() -> None:
    plain = VoiceClient("http://x/v1", "m")
    body = plain.body(CONFIRMED, [], 20, None, None)
    assert body["ignore_eos"] is True and body["stream_options"] == {"include_usage": True}
    assert "priority" not in body and "tools" not in body
    assert "x-slo-ttft-ms" not in plain.headers
    tools = [{"type": "function", "function": {"name": "f"}}]
    forced = {"type": "function", "function": {"name": "f"}}
    body = plain.body(SPECULATIVE, [], 20, tools, forced)
    assert body["tool_choice"] == forced and "ignore_eos" not in body
    assert plain.body(CONFIRMED, [], 20, tools, None)["tool_choice"] == "none"
    tagged = VoiceClient("http://x/v1", "m", priority=(0, 5), slo_ttft_ms=300.4)
    assert tagged.headers["x-slo-ttft-ms"] == "300"
    assert tagged.body(CONFIRMED, [], 20, None, None)["priority"] == 0
    assert tagged.body(FOLLOWUP, [], 20, None, None)["priority"] == 0
    assert tagged.body(SPECULATIVE, [], 20, None, None)["priority"] == 5


# --- verdicts on synthetic results ---------------------------------------------------------


def test_capacity_at_slo() -> None:
    pts = [(4.0, 1.0), (8.0, 0.97), (16.0, 0.85), (32.0, 0.99)]
    cap = capacity(pts, 0.95)
    assert cap["capacity"] == 8.0 and not cap["at_least"]  # 32 passing after a failure: luck
    assert cap["interpolated"] == pytest.approx(8 + (0.97 - 0.95) / (0.97 - 0.85) * 8)
    assert capacity([(4.0, 0.9), (8.0, 0.99)], 0.95)["capacity"] is None
    full = capacity([(4.0, 1.0), (8.0, 0.96)], 0.95)
    assert full == {"capacity": 8.0, "interpolated": 8.0, "at_least": True}
    assert capacity([(4.0, None)], 0.95)["capacity"] is None  # a level with no turns fails


def test_scaled_slo_keeps_the_gpu_ratios() -> None:
    assert scaled_slo(21.1, 4.9) == pytest.approx((300.0, 700.0))
    ttft, ttfs = scaled_slo(42.2, 9.8)
    assert (ttft, ttfs) == pytest.approx((600.0, 1400.0))
    assert scaled_slo(10.55, 2.45) == pytest.approx((150.0, 350.0))  # faster: tighter


def _rec(**kw: Any) -> TurnRecord:
    base: dict[str, Any] = dict(session=0, turn=1, persona="p", tool=False)
    return TurnRecord(**(base | kw))


def test_turn_verdicts_and_level_summary() -> None:
    slo = VoiceSlo(ttft_ms=300, ttfs_ms=700)
    good = _rec(ttft_s=0.1, ttfs_s=0.5, prompt_tokens=100, cached_tokens=80)
    turns = [
        good,
        _rec(ttft_s=0.4, ttfs_s=0.5),  # TTFT over
        _rec(ttft_s=0.1, ttfs_s=0.8),  # first sentence over
        _rec(ttft_s=0.1, ttfs_s=0.5, underruns=1, stall_s=0.2),  # ran dry
        _rec(outcome=REFUSED, refusal_s=0.004, error_code="queue_full"),
        _rec(outcome=ERROR, error="HTTP 500"),
        _rec(ttft_s=0.1, ttfs_s=0.5, after_cut=True, prompt_tokens=100, cached_tokens=60),
    ]
    assert [slo.met_by(t) for t in turns] == [True, False, False, False, False, False, True]
    assert VoiceSlo(300, 700, no_underrun=False).met_by(turns[3])
    s = summarize_level(turns, [], offered=4, duration_s=10.0, slo=slo)
    assert (s["turns"], s["ok"], s["refused"], s["errors"], s["met_slo"]) == (7, 5, 1, 1, 2)
    assert s["goodput_tps"] == pytest.approx(0.2)
    assert s["met_share"] == pytest.approx(2 / 7)
    assert s["underrun_rate"] == pytest.approx(1 / 5)
    assert s["refusal_ms"]["p50"] == pytest.approx(4.0)
    assert s["cache_share"] == pytest.approx(0.7)
    assert s["cache_share_after_cut"] == pytest.approx(0.6)
    assert s["cache_share_after_whole"] == pytest.approx(0.8)


def _req(kind: str, chunks: int, *, usage: int | None = None, cut: bool = False) -> StreamResult:
    r = StreamResult(kind, 0.0, status=200, done=not cut, cancelled=cut, token_chunks=chunks)
    r.first_token = 0.1 if chunks else None
    if usage is not None:
        r.usage = {"completion_tokens": usage}
    return r


def test_cancel_waste_from_the_token_counter() -> None:
    reqs = [
        _req(CONFIRMED, 40, usage=50),  # 1.25 tokens a chunk on finished text requests
        _req(FOLLOWUP, 8, usage=10),
        _req(SPECULATIVE, 8, cut=True),  # received about 10 tokens
        _req(SPECULATIVE, 0, cut=True),  # cancelled before its first token
        _req(CONFIRMED, 16, cut=True),  # barge-in: about 20
    ]
    before = {"generation_tokens": 1000.0}
    after = {"generation_tokens": 1000.0 + 60 + 10 + 20 + 6}
    w = cancel_waste(before, after, reqs)
    assert w["cancelled"] == 3 and w["cancelled_before_first_token"] == 1
    assert (w["cancelled_speculative"], w["cancelled_by_barge_in"]) == (2, 1)
    assert w["received_before_cancel"] == pytest.approx(30.0)
    assert w["engine_tokens_on_cancelled"] == pytest.approx(36.0)
    assert w["wasted_after_cancel"] == pytest.approx(6.0)
    assert w["wasted_per_cancel"] == pytest.approx(2.0)
    assert cancel_waste(None, after, reqs)["wasted_per_cancel"] is None  # no /metrics
    # A cut stream never received more than its max_tokens; all of them when it saw "length".
    near_end = _req(SPECULATIVE, 10, cut=True)
    near_end.max_tokens = 10
    assert received_tokens(near_end, 1.25) == 10.0
    near_end.token_chunks, near_end.finish_reason = 7, "length"
    assert received_tokens(near_end, 1.25) == 10.0


def test_metrics_parsing_sums_labels() -> None:
    text = (
        "# TYPE vllm:generation_tokens counter\n"
        'vllm:generation_tokens_total{engine="0",model_name="a"} 10.0\n'
        'vllm:generation_tokens_total{engine="1",model_name="a"} 5.0\n'
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="a"} 2.0\n'
    )
    assert parse_metrics(text) == {"generation_tokens": 15.0, "running": 2.0}


def test_ranges_parse() -> None:
    assert FloatRange.parse("1.5:4") == FloatRange(1.5, 4.0)
    assert FloatRange.parse("2") == FloatRange(2.0, 2.0)
    with pytest.raises(ValueError):
        FloatRange.parse("3:1")
    assert IntRange.parse("24:64") == IntRange(24, 64)


# --- one short run against the real server (e2e) -----------------------------------------


@pytest.mark.e2e
def test_short_voice_run(server_url: str, server_api_key: str | None, tmp_path: Path) -> None:
    # Short personas and history: vLLM's server here (LOADTEST_SERVER=vllm) has 2048 tokens,
    # and no tool parser, without which it refuses forced calls.
    tools = "0" if os.environ.get("LOADTEST_SERVER") == "vllm" else "0.3"
    cmd = [
        sys.executable, "-m", "loadtest.voice", "--base-url", f"{server_url}/v1",
        "--sessions", "3", "--duration", "10", "--drain", "10", "--rounds", "1",
        "--turns", "2:3", "--think-s", "0.3:0.8", "--reply-tokens", "16:32",
        "--persona-chars", "600:1200", "--max-context-chars", "2400", "--tool-share", tools,
        "--barge-in", "0.5", "--barge-in-s", "0.2:0.6", "--cps", "60",
        "--calibration-requests", "4", "--no-plot", "--out", str(tmp_path),
        *(["--api-key", server_api_key] if server_api_key else []),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "voice.json").read_text())
    (lv,) = report["results"]["target"][0]
    assert lv["turns"] >= 3 and lv["errors"] == 0, (lv["error_samples"], proc.stderr[-2000:])
    assert lv["ttft_ms"]["p50"] > 0 and lv["ttfs_ms"]["p50"] >= lv["ttft_ms"]["p50"]
    assert lv["cache_share"] is not None and lv["cache_share"] > 0
    assert lv["server_cache_share"] is not None
    w = lv["cancel"]
    assert w["engine_tokens"] is not None and w["engine_tokens"] >= w["finished_tokens"] > 0
    cal = report["meta"]["calibration"]
    assert cal["ttft_ms"] > 0 and cal["tpot_ms"] > 0 and 1 < cal["chars_per_token"] < 10
