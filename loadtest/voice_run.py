"""Run the voice traffic against one target: calibrate it, warm it, play one level's sessions.

A level plays a schedule (``voice_plan.schedule``) open loop: each session starts at its time
whatever the others are doing. The sessions under way at the start have their prompts so far
put in the prefix cache first (``warm_sessions``), as their earlier turns would have. New turns
start until ``duration_s``; the turns then in flight finish (up to ``drain_s`` more, after
which what is left is cancelled and reported). The server's ``/metrics`` are read once the
engine is idle before the level and again after it. Turns are judged against the SLO only at
the end of the run (``voice_report``), since the SLO may come from every target's calibration.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from loadtest.runner import ClientMonitor, client_warnings
from loadtest.voice_client import CONFIRMED, StreamResult, VoiceClient
from loadtest.voice_metrics import settled_reading
from loadtest.voice_plan import TOOLS, Arrival, VoiceWorkload, fit_history, persona_prompt
from loadtest.voice_report import VoiceSlo, dist_ms, mean_active, summarize_level
from loadtest.voice_session import OK, SessionOptions, TurnRecord, run_session
from loadtest.voice_speech import SpeechConfig
from loadtest.workload import IntRange, build_workload


@dataclass(frozen=True)
class Target:
    name: str
    base_url: str  # ends in /v1
    model: str
    api_key: str | None = None

    @property
    def metrics_url(self) -> str:
        root = self.base_url.rstrip("/")
        root = root.removesuffix("/v1")
        return root + "/metrics"


@dataclass(frozen=True)
class RunOptions:
    duration_s: float = 60.0
    drain_s: float = 30.0
    settle_s: float = 30.0
    speech: SpeechConfig = field(default_factory=SpeechConfig)
    session: SessionOptions = field(default_factory=SessionOptions)
    ignore_eos: bool = True
    timeout_s: float = 600.0
    stall_timeout_s: float = 60.0
    priority: tuple[int, int] | None = None  # sent as vLLM's body field when given
    slo_header: bool = False  # send x-slo-ttft-ms


@dataclass
class LevelRaw:
    """What one level measured, before the SLO judges it."""

    offered: int
    duration_s: float
    turns: list[TurnRecord]
    requests: list[StreamResult]
    before: dict[str, float] | None
    after: dict[str, float] | None
    active_sessions: float
    sessions_started: int
    client: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def summary(self, slo: VoiceSlo) -> dict[str, Any]:
        out = summarize_level(
            self.turns,
            self.requests,
            offered=self.offered,
            duration_s=self.duration_s,
            slo=slo,
            before=self.before,
            after=self.after,
            active_sessions=self.active_sessions,
            sessions_started=self.sessions_started,
        )
        return out | {"client": self.client, "warnings": self.warnings}


def client_for(target: Target, opts: RunOptions, slo_ttft_ms: float | None = None) -> VoiceClient:
    return VoiceClient(
        target.base_url,
        target.model,
        api_key=target.api_key,
        ignore_eos=opts.ignore_eos,
        speech=opts.speech,
        timeout_s=opts.timeout_s,
        stall_timeout_s=opts.stall_timeout_s,
        priority=opts.priority,
        slo_ttft_ms=slo_ttft_ms if opts.slo_header else None,
    )


async def calibrate(target: Target, opts: RunOptions, n: int = 12, seed: int = 0) -> dict[str, Any]:
    """The unloaded engine behind ``target``: one request at a time, the bench workload (1-4
    turns, 32 tokens each, ``ignore_eos``), after two unmeasured ones. TTFT p50, TPOT p50
    (first to last token over the tokens between) and characters per output token."""
    reqs = build_workload(
        n + 2, seed=seed + 20_000, turns=IntRange(1, 4), max_tokens=IntRange(32, 32)
    )
    ttft: list[float] = []
    tpot: list[float] = []
    chars = tokens = 0
    errors: list[str] = []
    async with client_for(target, RunOptions(ignore_eos=True, timeout_s=opts.timeout_s)) as client:
        for i, req in enumerate(reqs):
            r = await client.stream(CONFIRMED, list(req.messages), max_tokens=req.max_tokens)
            if not r.ok or r.first_token is None:
                errors.append(r.error or f"HTTP {r.status}")
                continue
            if i < 2:
                continue
            ttft.append(r.first_token - r.sent)
            n_tok = r.completion_tokens or r.token_chunks
            if n_tok > 1 and r.events:
                tpot.append((r.events[-1][0] - r.first_token) / (n_tok - 1))
            chars += len(r.text)
            tokens += n_tok
    if not ttft or not tpot or not tokens:
        raise RuntimeError(f"calibration of {target.name} failed: {errors[:3]}")
    return {
        "ttft_ms": 1000 * statistics.median(ttft),
        "tpot_ms": 1000 * statistics.median(tpot),
        "chars_per_token": chars / tokens,
        "requests": len(ttft),
        "errors": errors,
    }


async def warm_personas(target: Target, wl: VoiceWorkload, opts: RunOptions, tools: bool) -> None:
    """One short request per persona prompt, so that no target meets them cold in its first
    level (a deployed avatar's prompt is always in the cache)."""
    from loadtest.conversations import PERSONAS

    async with client_for(target, opts) as client:
        for persona in sorted(PERSONAS):
            system = persona_prompt(wl.seed, persona, wl.persona_chars)
            msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Hello."}]
            await client.stream(
                CONFIRMED, msgs, max_tokens=2, tools=[dict(t) for t in TOOLS] if tools else None
            )


async def warm_sessions(client: VoiceClient, arrivals: list[Arrival], opts: RunOptions) -> None:
    """Put the prompts of the sessions under way at the start into the prefix cache, as their
    earlier turns would have on a server in steady state: each one's system prompt, tools and
    history once (one token, four at a time), before the level's first reading."""
    tools = [dict(t) for t in TOOLS] if opts.session.tools else None
    sem = asyncio.Semaphore(4)

    async def one(a: Arrival) -> None:
        history = fit_history(a.plan.system, list(a.plan.history), opts.session.max_context_chars)
        msgs = [{"role": "system", "content": a.plan.system}, *history]
        async with sem:
            await client.stream(
                CONFIRMED, [*msgs, {"role": "user", "content": "..."}], max_tokens=1, tools=tools
            )

    await asyncio.gather(*(one(a) for a in arrivals if a.under_way))
    client.log.clear()  # not the level's requests


async def run_level(
    target: Target,
    offered: int,
    arrivals: list[Arrival],
    opts: RunOptions,
    *,
    slo_ttft_ms: float | None = None,
) -> LevelRaw:
    """Play ``arrivals`` against ``target``; see the module docstring."""
    clock = time.perf_counter
    turns: list[TurnRecord] = []
    spans: list[tuple[float, float]] = []
    failures: list[BaseException] = []
    timeout = aiohttp.ClientTimeout(total=15)
    async with (
        aiohttp.ClientSession(timeout=timeout) as msess,
        client_for(target, opts, slo_ttft_ms) as client,
    ):
        await warm_sessions(client, arrivals, opts)
        before, _ = await settled_reading(msess, target.metrics_url, opts.settle_s)
        monitor = ClientMonitor()
        monitor.start()
        t0 = clock()
        stop_at = t0 + opts.duration_s

        async def one(a: Arrival) -> None:
            await asyncio.sleep(max(0.0, t0 + a.at_s - clock()))
            # A session under way is in progress from the start (its user is talking).
            start = t0 if a.under_way else clock()
            try:
                await run_session(
                    a.plan, client, opts.session, t0=t0, stop_at=stop_at, turns_out=turns
                )
            finally:
                spans.append((start, clock()))

        tasks = [asyncio.create_task(one(a)) for a in arrivals]
        _, pending = await asyncio.wait(tasks, timeout=opts.duration_s + opts.drain_s)
        for task in pending:
            task.cancel()
        for res in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(res, BaseException) and not isinstance(res, asyncio.CancelledError):
                failures.append(res)
        client_stats = await monitor.stop()
        after, settle_wait = await settled_reading(msess, target.metrics_url, opts.settle_s)
    if failures:
        raise RuntimeError(
            f"{len(failures)} sessions failed; first: {failures[0]!r}"
        ) from failures[0]
    for r in client.log:
        r.events = []  # the speech was judged; keep the counts only
    warnings = client_warnings(client_stats)
    if pending:
        warnings.append(
            f"{len(pending)} sessions were still in a turn {opts.drain_s:g} s after the level "
            "ended and were cut: their turns are missing"
        )
    if before is None or after is None:
        warnings.append(f"could not read {target.metrics_url}: no engine-side figures")
    elif after.get("running", 0) + after.get("waiting", 0) > 0:
        warnings.append(f"engine not idle {settle_wait:.0f} s after the level: counters partial")
    return LevelRaw(
        offered=offered,
        duration_s=opts.duration_s,
        turns=turns,
        requests=client.log,
        before=before,
        after=after,
        active_sessions=mean_active(spans, t0, stop_at),
        sessions_started=len(spans),
        client=client_stats,
        warnings=warnings,
    )


def progress_line(target: str, raw: LevelRaw) -> str:
    ok = [t for t in raw.turns if t.outcome == OK]
    ttft = dist_ms([t.ttft_s for t in ok])
    refused = sum(t.outcome == "refused" for t in raw.turns)

    def ms(v: float | int | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    return (
        f"  {target} {raw.offered} sessions: {len(raw.turns)} turns, {len(ok)} ok, "
        f"{refused} refused, {len(raw.turns) - len(ok) - refused} errors; TTFT p50 "
        f"{ms(ttft['p50'])} p95 {ms(ttft['p95'])} ms; {raw.active_sessions:.1f} active"
    )


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
