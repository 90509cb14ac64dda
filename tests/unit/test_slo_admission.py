"""Deadline-aware admission and priority, on the fake engine: the wait predictor learns from
finished requests; a request whose TTFT budget (x-slo-ttft-ms, or the server's default) cannot
be met is refused at once with 429, Retry-After and code slo_unattainable; one whose budget runs
out while it waits is refused, not started (slo_expired); SLO outcomes and refusals are counted;
priority (the body's field, vLLM's X-Vllm-Priority header) reaches the engine and orders our
queue when the engine schedules by priority."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from loadtest.soak_hostile import headers_for, hostile_cases
from serve.admission import Admission
from serve.admission_predictor import MIN_SAMPLES, Demand, WaitPredictor, retry_after
from serve.app import create_app
from serve.engine.fake import FakeEngine
from serve.telemetry import Metrics
from tests.support import metric_value
from tests.unit.conftest import chat_body, make_settings, open_client

CHAT = "/v1/chat/completions"


def _app(engine: FakeEngine, **settings: Any) -> FastAPI:
    return create_app(make_settings(**settings), engine)


def _metrics(app: FastAPI) -> str:
    from prometheus_client import generate_latest

    return generate_latest(app.state.metrics.registry).decode()


def _teach(predictor: WaitPredictor, hold: float, step: float = 0.001) -> None:
    """Make the predictor ready with known figures (what finished requests would teach it)."""
    predictor.samples = MIN_SAMPLES
    predictor.hold.value = hold
    predictor.step.value = step
    predictor.prefill.value = 0.0
    predictor.cached_share.value = 0.0


async def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


def _assert_refusal(response: httpx.Response, code: str) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["retry-after"].isdigit()
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["type"] == "rate_limit_error"
    assert "budget" in error["message"]


# -- the predictor -------------------------------------------------------------------------


def _finish(p: WaitPredictor, prompt: int, engine_s: float, steps: int, step_s: float) -> None:
    """One request through the predictor: admitted at 0, first output at engine_s, then
    ``steps`` decode steps of ``step_s``."""
    demand = Demand(prompt_tokens=prompt)
    p.on_admit(demand, 0.0)
    p.on_first_output(demand, engine_s, cached_tokens=0)
    p.on_release(demand, engine_s + steps * step_s, steps * step_s, steps)


def test_no_prediction_until_enough_requests_have_finished() -> None:
    p = WaitPredictor(capacity=2)
    for _ in range(MIN_SAMPLES - 1):
        _finish(p, 100, 0.1, 10, 0.05)
        assert p.predict(running=2, ahead=0) is None, "no refusal on a guess"
    _finish(p, 100, 0.1, 10, 0.05)
    assert p.predict(running=2, ahead=0) is not None


def test_the_learned_wait_follows_seats_queue_and_prompt() -> None:
    p = WaitPredictor(capacity=2)
    for _ in range(MIN_SAMPLES):
        # 100 prompt tokens to the first output in 0.1 s (one 0.05 s step + 0.05 s of prefill),
        # then 10 steps of 0.05 s: the seat is held 0.6 s.
        _finish(p, 100, 0.1, 10, 0.05)
    assert p.prefill.value == pytest.approx(0.0005), "0.05 s over 100 prompt tokens"
    free = p.predict(running=1, ahead=0)
    assert free is not None
    assert free.seat == 0, "a free seat: no wait for one"
    assert free.engine == pytest.approx(0.05), "one step: its own prefill is its budget's"
    full = p.predict(running=2, ahead=0)
    assert full is not None and full.seat == pytest.approx(0.6 / 2), "one release of two seats"
    queued = p.predict(running=2, ahead=3)
    assert queued is not None and queued.seat == pytest.approx(4 * 0.6 / 2)


def test_prompts_admitted_ahead_and_not_yet_prefilled_add_to_the_wait() -> None:
    p = WaitPredictor(capacity=8)
    for _ in range(MIN_SAMPLES):
        _finish(p, 100, 0.1, 10, 0.05)
    alone = p.predict(running=0, ahead=0)
    big = Demand(prompt_tokens=4000)
    p.on_admit(big, 0.0)
    behind = p.predict(running=1, ahead=0)
    assert alone is not None and behind is not None
    assert behind.engine == pytest.approx(alone.engine + 4000 * 0.0005)
    p.on_first_output(big, 1.0, cached_tokens=0)
    after = p.predict(running=1, ahead=0)
    assert after is not None and after.engine == pytest.approx(alone.engine)
    p.on_release(big, 2.0)
    assert p.backlog == 0


def test_prompts_ahead_count_less_the_share_the_prefix_cache_serves() -> None:
    """Voice turns resend a persona and a history the cache holds: 90 % of each prompt served
    from it, so 4,000 tokens admitted ahead stand for 400 to compute."""
    p = WaitPredictor(capacity=8)
    for _ in range(30):
        demand = Demand(prompt_tokens=1000)
        p.on_admit(demand, 0.0)
        p.on_first_output(demand, 0.1, cached_tokens=900)
        p.on_release(demand, 0.5, 0.4, 8)
    alone = p.predict(running=0, ahead=0)
    p.on_admit(Demand(prompt_tokens=4000), 0.0)
    behind = p.predict(running=1, ahead=0)
    assert alone is not None and behind is not None
    assert p.cached_share.value == pytest.approx(0.9, abs=1e-3)
    assert behind.engine - alone.engine == pytest.approx(400 * p.prefill.get(), rel=0.01)


async def test_an_idle_server_admits_a_long_prompt_it_learned_was_slow_to_prefill() -> None:
    """A server that learned slow prefills (long prompts, nothing cached) still admits a budget
    shorter than that on an idle engine: how much of a prompt the cache holds is not known
    before the engine has it, and a voice turn's is nearly all cached. (Predicted at the average
    cached share, every voice turn of a nearly idle server was refused, and refused requests
    teach nothing, so it stayed so.)"""
    engine = FakeEngine()
    app = _app(engine, max_running_requests=4, max_waiting_requests=4)
    predictor = app.state.admission.predictor
    _teach(predictor, hold=1.0)
    predictor.prefill.value = 0.005  # a second for the 200-token prompt below, uncached
    long_prompt = "word " * 200  # the fake engine's window is 256 tokens
    async with open_client(app) as c:
        r = await c.post(
            CHAT,
            json=chat_body(messages=[{"role": "user", "content": long_prompt}]),
            headers={"x-slo-ttft-ms": "200"},
        )
        assert r.status_code == 200, r.text


def test_a_request_that_never_produced_leaves_no_backlog_and_teaches_nothing() -> None:
    p = WaitPredictor(capacity=1)
    demand = Demand(prompt_tokens=50)
    p.on_admit(demand, 0.0)
    p.on_release(demand, 5.0)  # failed or cut before its first output
    assert (p.backlog, p.samples, p.hold.value) == (0, 0, None)


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert retry_after(0.0) == "1"
    assert retry_after(0.2) == "1"
    assert retry_after(2.1) == "3"
    assert retry_after(1e9) == "60"
    assert retry_after(float("nan")) == "1"


# -- refusals over HTTP --------------------------------------------------------------------


async def test_a_budget_that_cannot_be_met_is_refused_at_once() -> None:
    engine = FakeEngine()
    engine.first_token_gate = asyncio.Event()
    app = _app(engine, max_running_requests=1, max_waiting_requests=4)
    _teach(app.state.admission.predictor, hold=20.0)  # a seat frees every 20 s
    async with open_client(app) as c:
        running = asyncio.create_task(c.post(CHAT, json=chat_body()))
        await _until(lambda: app.state.admission.running == 1)
        refused = await c.post(CHAT, json=chat_body(), headers={"x-slo-ttft-ms": "1000"})
        # Refused at once on the prediction (not by waiting out its budget: that is
        # slo_expired), and never queued.
        _assert_refusal(refused, "slo_unattainable")
        assert int(refused.headers["retry-after"]) >= 19, "about when it could be met"
        assert app.state.admission.waiting == 0
        engine.first_token_gate.set()
        assert (await running).status_code == 200
    assert len(engine.seen) == 1, "the refused request never reached the engine"
    text = _metrics(app)
    assert metric_value(text, "avatar_requests_rejected_total", reason="slo_unattainable") == 1
    assert metric_value(text, "avatar_requests_rejected_total", reason="overload") == 0


async def test_the_predictor_learns_from_finished_requests() -> None:
    """No figure set by hand: three requests of at least 0.2 s each teach the server that a seat
    is held that long, so a 50 ms budget behind a running request is refused at once."""
    engine = FakeEngine(token_delay=0.01)
    app = _app(engine, max_running_requests=1, max_waiting_requests=4)
    async with open_client(app) as c:
        for _ in range(MIN_SAMPLES):
            r = await c.post(CHAT, json=chat_body(max_tokens=20, ignore_eos=True))
            assert r.status_code == 200
        engine.first_token_gate = asyncio.Event()
        running = asyncio.create_task(c.post(CHAT, json=chat_body()))
        await _until(lambda: app.state.admission.running == 1)
        refused = await c.post(CHAT, json=chat_body(), headers={"x-slo-ttft-ms": "50"})
        _assert_refusal(refused, "slo_unattainable")
        engine.first_token_gate.set()
        assert (await running).status_code == 200
        # Alone on the server, the same budget is admitted: the wait was what stood ahead.
        engine.token_delay = 0.0
        alone = await c.post(CHAT, json=chat_body(), headers={"x-slo-ttft-ms": "5000"})
        assert alone.status_code == 200


async def test_a_budget_that_runs_out_in_the_queue_is_refused_not_started() -> None:
    engine = FakeEngine()
    engine.first_token_gate = asyncio.Event()
    # Cold predictor: nothing refused at once, so the request queues and its budget runs out.
    app = _app(engine, max_running_requests=1, max_waiting_requests=4, queue_timeout=30)
    async with open_client(app) as c:
        running = asyncio.create_task(c.post(CHAT, json=chat_body()))
        await _until(lambda: app.state.admission.running == 1)
        # Refused when its budget ran out (slo_expired), not at the queue's 30 s timeout
        # (queue_timeout, a 503).
        expired = await c.post(CHAT, json=chat_body(), headers={"x-slo-ttft-ms": "100"})
        _assert_refusal(expired, "slo_expired")
        assert app.state.admission.waiting == 0
        engine.first_token_gate.set()
        assert (await running).status_code == 200
    assert len(engine.seen) == 1, "the expired request was never started"
    text = _metrics(app)
    assert metric_value(text, "avatar_requests_rejected_total", reason="slo_expired") == 1


async def test_the_server_default_budget_applies_without_the_header() -> None:
    engine = FakeEngine()
    engine.first_token_gate = asyncio.Event()
    app = _app(engine, max_running_requests=1, default_slo_ttft_ms=500)
    _teach(app.state.admission.predictor, hold=20.0)
    async with open_client(app) as c:
        running = asyncio.create_task(c.post(CHAT, json=chat_body()))
        await _until(lambda: app.state.admission.running == 1)
        _assert_refusal(await c.post(CHAT, json=chat_body()), "slo_unattainable")
        # The header replaces the default: a budget of a minute is attainable.
        waits = asyncio.create_task(
            c.post(CHAT, json=chat_body(), headers={"x-slo-ttft-ms": "60000"})
        )
        await _until(lambda: app.state.admission.waiting == 1)
        engine.first_token_gate.set()
        assert (await running).status_code == 200
        assert (await waits).status_code == 200


async def test_slo_met_and_missed_are_counted() -> None:
    engine = FakeEngine()
    app = _app(engine)
    async with open_client(app) as c:
        met = await c.post(CHAT, json=chat_body(), headers={"x-slo-ttft-ms": "60000"})
        assert met.status_code == 200
        # Each token takes at least 50 ms: a 20 ms budget is admitted (nothing is known yet)
        # and missed.
        engine.token_delay = 0.05
        missed = await c.post(CHAT, json=chat_body(), headers={"x-slo-ttft-ms": "20"})
        assert missed.status_code == 200
        plain = await c.post(CHAT, json=chat_body())  # no budget: neither
        assert plain.status_code == 200
    text = _metrics(app)
    assert metric_value(text, "avatar_slo_ttft_requests_total", outcome="met") == 1
    assert metric_value(text, "avatar_slo_ttft_requests_total", outcome="missed") == 1


@pytest.mark.parametrize("value", ["", "abc", "0", "-5", "nan", "inf", "3600001", "1e400"])
async def test_a_malformed_budget_header_is_a_400_naming_it(value: str) -> None:
    async with open_client(_app(FakeEngine())) as c:
        r = await c.post(CHAT, json=chat_body(), headers={"x-slo-ttft-ms": value})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "x-slo-ttft-ms"
    assert r.json()["error"]["code"] == "invalid_value"


@pytest.mark.parametrize("value", ["", "high", "1.5", "99999999999999999999", "0x10"])
async def test_a_malformed_priority_header_is_a_400_naming_it(value: str) -> None:
    async with open_client(_app(FakeEngine(priority_scheduling=True))) as c:
        r = await c.post(CHAT, json=chat_body(), headers={"x-vllm-priority": value})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "x-vllm-priority"


async def test_a_priority_of_the_wrong_type_is_a_400() -> None:
    async with open_client(_app(FakeEngine())) as c:
        r = await c.post(CHAT, json=chat_body(priority="1"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority"


# -- priority ------------------------------------------------------------------------------


async def test_priority_reaches_the_engine_header_over_body() -> None:
    engine = FakeEngine(priority_scheduling=True)
    async with open_client(_app(engine)) as c:
        assert (await c.post(CHAT, json=chat_body(priority=7))).status_code == 200
        r = await c.post(CHAT, json=chat_body(priority=7), headers={"X-Vllm-Priority": "-3"})
        assert r.status_code == 200
        r = await c.post("/v1/completions", json={"model": chat_body()["model"], "prompt": "hi"})
        assert r.status_code == 200
    assert engine.priorities == [7, -3, 0]


async def test_without_priority_scheduling_priority_is_accepted_and_ignored_as_vllm_does() -> None:
    """vLLM 0.32's server passes any priority to its engine, whose FCFS scheduler ignores it
    (no error): so do we, and our queue stays first come, first served."""
    order = await _admission_order(FakeEngine(priority_scheduling=False))
    assert order == ["low-1", "low-2", "high"]


async def test_with_priority_scheduling_a_high_priority_request_is_admitted_first() -> None:
    order = await _admission_order(FakeEngine(priority_scheduling=True))
    assert order == ["high", "low-1", "low-2"]


async def _admission_order(engine: FakeEngine) -> list[str]:
    """One request running; two of priority 5 then one of -5 queue behind it (one seat): the
    order in which the queued ones reach the engine."""
    engine.first_token_gate = asyncio.Event()
    app = _app(engine, max_running_requests=1, max_waiting_requests=8)
    async with open_client(app) as c:

        def send(name: str, priority: int) -> asyncio.Task[httpx.Response]:
            body = chat_body(priority=priority)
            return asyncio.create_task(c.post(CHAT, json=body, headers={"x-request-id": name}))

        tasks = [send("running", 0)]
        await _until(lambda: app.state.admission.running == 1)
        for n, (name, priority) in enumerate([("low-1", 5), ("low-2", 5), ("high", -5)]):
            tasks.append(send(name, priority))
            await _until(lambda n=n: app.state.admission.waiting == n + 1)  # type: ignore[misc]
        engine.first_token_gate.set()
        assert [r.status_code for r in await asyncio.gather(*tasks)] == [200] * 4
    return [request_id for request_id, _, _ in engine.seen][1:]


async def test_a_waiting_request_of_higher_priority_counts_fewer_ahead() -> None:
    """The budget check counts only the waiters the queue would admit first."""
    admission = Admission(1, 8, 30, Metrics())
    _teach(admission.predictor, hold=1.0)
    await admission.acquire()
    waiters = [asyncio.create_task(admission.acquire(Demand(priority=5))) for _ in range(3)]
    await _until(lambda: admission.waiting == 3)
    now = time.perf_counter()
    # Behind three: 4 releases of 1 s; first in line: 1 release. A 2 s budget tells them apart.
    with pytest.raises(Exception, match="cannot be met"):
        await admission.acquire(Demand(priority=5, deadline=now + 2, budget=2))
    urgent = asyncio.create_task(admission.acquire(Demand(priority=-1, deadline=now + 2, budget=2)))
    await _until(lambda: admission.waiting == 4)
    admission.release()
    await asyncio.wait_for(urgent, 5)
    assert not any(w.done() for w in waiters), "the urgent one went first"
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert (admission.running, admission.waiting) == (1, 0)


# -- flags ---------------------------------------------------------------------------------


def test_the_flags_pass_through_the_cli() -> None:
    """vLLM's --scheduling-policy reaches the engine unchanged (our CLI adds vLLM's own engine
    flags); the default budget is ours, a flag or its variable."""
    from serve.cli import parse_settings

    settings = parse_settings(["--scheduling-policy", "priority", "--default-slo-ttft-ms", "700"])
    assert settings.engine_args["scheduling_policy"] == "priority"
    assert settings.default_slo_ttft_ms == 700
    from_env = parse_settings([], {"AVATAR_DEFAULT_SLO_TTFT_MS": "250"})
    assert from_env.default_slo_ttft_ms == 250
    assert parse_settings([], {}).default_slo_ttft_ms is None, "off by default"


@pytest.mark.parametrize("why", ["overload", "slo_unattainable"])
async def test_a_request_refused_at_the_door_costs_no_prompt_work(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, why: str
) -> None:
    """At overload every refused turn's template and tokenizer would be event-loop time taken
    from the streams being served: a request admission refuses whatever its prompt is turned
    away before its prompt is rendered or tokenized."""
    engine = FakeEngine()
    engine.first_token_gate = asyncio.Event()
    app = _app(engine, max_running_requests=1, max_waiting_requests=0)
    _teach(app.state.admission.predictor, hold=20.0)
    prepared: list[str] = []
    for name in ("render_chat", "encode"):
        real = getattr(engine, name)
        monkeypatch.setattr(
            engine,
            name,
            lambda *a, _real=real, _name=name, **k: prepared.append(_name) or _real(*a, **k),
        )
    headers = {"x-slo-ttft-ms": "1000"} if why == "slo_unattainable" else {}
    caplog.set_level("INFO", logger="serve.access")
    async with open_client(app) as c:
        running = asyncio.create_task(c.post(CHAT, json=chat_body()))
        await _until(lambda: app.state.admission.running == 1)
        work = len(prepared)
        assert work > 0, "the admitted request's prompt was prepared"
        for path, body in (
            (CHAT, chat_body()),
            ("/v1/completions", {"model": chat_body()["model"], "prompt": "Hi there"}),
        ):
            refused = await c.post(path, json=body, headers=headers)
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == (
                "server_overloaded" if why == "overload" else why
            )
        assert len(prepared) == work, "no template or tokenizer ran for the refused requests"
        engine.first_token_gate.set()
        assert (await running).status_code == 200
    assert len(engine.seen) == 1
    text = _metrics(app)
    assert metric_value(text, "avatar_requests_rejected_total", reason=why) == 2
    # The access log says where each refusal's time went: parsed, then answered, nothing between.
    entries = [json.loads(r.getMessage()) for r in caplog.records if r.name == "serve.access"]
    refusals = [e for e in entries if e["status"] == 429]
    assert len(refusals) == 2 and all("ttft_stages_ms" not in e for e in refusals)
    for entry in refusals:
        assert list(entry["stages_ms"]) == ["receive", "parse", "answer"], entry
        assert sum(entry["stages_ms"].values()) == pytest.approx(entry["duration_ms"], abs=0.05)
    assert all("stages_ms" not in e for e in entries if e["status"] == 200)


async def test_every_soak_hostile_request_gets_its_own_4xx_at_capacity_too() -> None:
    """A retry on another replica cannot mend a wrong request (an empty prompt, a token id out
    of the vocabulary, a bad parameter): at capacity each of the soak's hostile requests still
    gets its own 4xx, not a 429 that sends the client to retry it elsewhere."""
    engine = FakeEngine()
    engine.first_token_gate = asyncio.Event()
    app = _app(engine, max_running_requests=1, max_waiting_requests=0)
    model = chat_body()["model"]
    wrong = []
    async with open_client(app) as c:
        running = asyncio.create_task(c.post(CHAT, json=chat_body()))
        await _until(lambda: app.state.admission.running == 1)
        for case in hostile_cases(model, api_key=None):
            for v in case.variants:
                got = await c.post(
                    v.path, content=v.body, headers=headers_for(v.header_mode, None, v.content_type)
                )
                if got.status_code != case.expected:
                    wrong.append((case.name, v.body, got.status_code))
        busy = await c.post("/v1/completions", json={"model": model, "prompt": [1, 2]})
        assert busy.status_code == 429, "a valid request is still refused at capacity"
        engine.first_token_gate.set()
        assert (await running).status_code == 200
    assert not wrong, wrong


async def test_the_door_keeps_back_the_time_a_prompt_takes_to_prepare(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A budget that the wait ahead leaves room for, but not once the prompt is rendered and
    tokenized as long as prompts take now, is refused at the door, before any of that work,
    not after it: at overload such late refusals took 33 ms where the door's took 1."""
    engine = FakeEngine()
    engine.first_token_gate = asyncio.Event()
    app = _app(engine, max_running_requests=1, max_waiting_requests=4)
    predictor = app.state.admission.predictor
    _teach(predictor, hold=0.5)  # one seat, held 0.5 s: a second request waits about that
    rendered: list[object] = []
    real = engine.render_chat
    monkeypatch.setattr(engine, "render_chat", lambda *a, **k: rendered.append(a) or real(*a, **k))
    budget = {"x-slo-ttft-ms": "1000"}
    async with open_client(app) as c:
        running = asyncio.create_task(c.post(CHAT, json=chat_body()))
        await _until(lambda: app.state.admission.running == 1)
        assert predictor.preparation.get() > 0, "learned from the request that went in"
        predictor.preparation.value = 0.6  # 0.5 s of wait + 0.6 s of preparing > 1 s
        refused = await c.post(CHAT, json=chat_body(), headers=budget)
        _assert_refusal(refused, "slo_unattainable")
        assert len(rendered) == 1, "only the running request's prompt was rendered"
        predictor.preparation.value = 0.1  # now it fits: past the door, rendered, and queued
        waiting = asyncio.create_task(c.post(CHAT, json=chat_body(), headers=budget))
        await _until(lambda: app.state.admission.waiting == 1)
        assert len(rendered) == 2
        engine.first_token_gate.set()
        assert (await running).status_code == 200
        assert (await waiting).status_code == 200
