"""Soak benchmark: mixed, hostile and bursty traffic for a while, then look for what leaked.

    python -m loadtest.soak --base-url http://127.0.0.1:8000 --minutes 20 --pid SERVER_PID \\
        --api-key KEY --burst-size 64 --out results/soak

For ``--minutes`` it keeps ``--concurrency`` requests in flight: streaming and non-streaming
chat and text completions, connections the client cuts (before the first token, mid-stream,
during a non-streaming answer), hostile requests that must be refused with their own 4xx and
OpenAI's error body, and every ``--burst-every`` seconds a burst of ``--burst-size`` requests at
once, which should pass the server's queue and draw 429s. Every few seconds it samples the
server's ``/metrics`` (and, with ``--pid``, that process tree's RSS and open fds).

When the time is up it stops the load, polls until the request gauges are back to 0 (or
``--settle-timeout``), prints the summary, writes ``summary.json`` and ``samples.csv`` under
``--out``, and exits 1 if a goal failed: RSS growth after the warm-up, an unexpected status,
requests left in the engine, a gauge not back to 0, or a stream that did not end with
``data: [DONE]``. See BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.bench import add_endpoint_args, add_workload_args
from loadtest.client import resolve_model
from loadtest.soak_metrics import Sample, Sampler
from loadtest.soak_summary import Goals, exit_code, fmt, format_report, summarize, write_outputs
from loadtest.soak_traffic import Outcome, SoakClient
from loadtest.workload import IntRange, build_workload

WORKLOAD_SIZE = 2_000  # seeded workload requests; each worker draws from them with its own rng


def root_url(base_url: str) -> str:
    """The server's root (where ``/metrics`` lives), from a base URL with or without ``/v1``."""
    url = base_url.rstrip("/")
    return url.removesuffix("/v1")


def warmup_seconds(args: argparse.Namespace) -> float:
    if args.warmup_minutes is not None:
        return float(args.warmup_minutes) * 60.0
    return 0.2 * args.minutes * 60.0


def window_seconds(warmup_s: float, sample_every: float) -> float:
    """How far back each end of a growth figure looks: a few samples, or a tenth of warm-up."""
    return max(2.0 * sample_every, 0.1 * warmup_s)


class _Progress:
    """One line on stderr every ``every_s`` seconds of load, so a long run shows it is alive."""

    def __init__(self, outcomes: list[Outcome], every_s: float) -> None:
        self.outcomes = outcomes
        self.every_s = every_s
        self.last = -float("inf")

    def __call__(self, s: Sample) -> None:
        if self.every_s <= 0 or s.phase != "load" or s.t - self.last < self.every_s:
            return
        self.last = s.t
        print(
            f"[{s.t:6.0f} s] {len(self.outcomes)} requests; rss {fmt(s.rss_bytes, 'bytes')}, "
            f"fds {fmt(s.open_fds)}, running {fmt(s.running)}, waiting {fmt(s.waiting)}, "
            f"engine {fmt(s.engine_unfinished)}, tasks {fmt(s.loop_tasks)}"
            + (f"; {s.scrape_error}" if s.scrape_error else ""),
            file=sys.stderr,
            flush=True,
        )


async def run_soak(args: argparse.Namespace) -> tuple[dict[str, Any], list[Sample]]:
    """Run the soak; return its summary and the samples taken."""
    root = root_url(args.base_url)
    model = await resolve_model(root + "/v1", args.model, args.api_key)
    duration_s = args.minutes * 60.0
    warmup_s = warmup_seconds(args)
    workload = build_workload(
        WORKLOAD_SIZE, seed=args.seed, turns=args.turns, max_tokens=args.max_tokens
    )
    outcomes: list[Outcome] = []
    t0 = time.monotonic()
    sampler = Sampler(
        root + "/metrics",
        pid=args.pid,
        t0=t0,
        interval_s=args.sample_every,
        on_sample=_Progress(outcomes, args.progress_every),
    )
    async with sampler:
        await sampler.take("idle")
        client = SoakClient(
            root,
            model,
            workload,
            api_key=args.api_key,
            ignore_eos=args.ignore_eos,
            t0=t0,
            timeout_s=args.timeout,
            stall_timeout_s=args.stall_timeout,
        )
        async with client:  # its connections are closed before the server is asked to settle
            sampler.start("load")
            try:
                await drive_load(client, args, t0 + duration_s, outcomes)
            finally:
                await sampler.stop()
        settle_s = await sampler.settle(args.settle_timeout)
    meta = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "base_url": root,
        "model": model,
        "minutes": args.minutes,
        "concurrency": args.concurrency,
        "seed": args.seed,
        "turns": str(args.turns),
        "max_tokens": str(args.max_tokens),
        "burst_size": args.burst_size,
        "burst_every_s": args.burst_every,
        "sample_every_s": args.sample_every,
        "pid": args.pid,
    }
    summary = summarize(
        outcomes,
        sampler.samples,
        warmup_s=warmup_s,
        window_s=window_seconds(warmup_s, args.sample_every),
        settle_s=settle_s,
        goals=goals_from(args),
        meta=meta,
    )
    return summary, sampler.samples


async def drive_load(
    client: SoakClient, args: argparse.Namespace, deadline: float, outcomes: list[Outcome]
) -> None:
    """``--concurrency`` closed-loop workers and the bursts, until ``deadline`` (monotonic).

    A request under way at the deadline is let finish: none is cut but on purpose.
    """

    async def worker(index: int) -> None:
        rng = random.Random(f"{args.seed}-worker-{index}")
        while time.monotonic() < deadline:
            outcomes.append(await client.send(client.pick(rng), rng))

    async def bursts() -> None:
        rng = random.Random(f"{args.seed}-bursts")
        next_t = client.t0 + args.burst_every * rng.uniform(0.3, 0.7)
        while args.burst_size > 0 and next_t < deadline:
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))  # a schedule, not a wait
            outcomes.extend(await client.burst(args.burst_size, rng))
            next_t += args.burst_every * rng.uniform(0.5, 1.5)

    await asyncio.gather(*(worker(i) for i in range(args.concurrency)), bursts())


def goals_from(args: argparse.Namespace) -> Goals:
    return Goals(
        max_rss_growth_pct=args.max_rss_growth_pct,
        max_unexpected=args.max_unexpected,
        max_engine_left=args.max_engine_left,
        max_gauge_left=args.max_gauge_left,
        max_missing_done=args.max_missing_done,
    )


def _positive(kind: type[float] | type[int]) -> Any:
    def parse(text: str) -> float | int:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--base-url", default="http://127.0.0.1:8000", help="server URL, with or without /v1"
    )
    p.add_argument("--minutes", type=_positive(float), required=True, help="how long the load runs")
    p.add_argument(
        "--warmup-minutes",
        type=float,
        default=None,
        help="growth is measured from the end of this (default: the first 20%% of the run)",
    )
    add_endpoint_args(p, timeout_s=120.0)  # with --api-key, bad-auth requests are sent too
    p.add_argument(
        "--concurrency", type=_positive(int), default=8, help="requests kept in flight (default 8)"
    )
    p.add_argument("--pid", type=int, default=None, help="also sample RSS and fds of this tree")
    p.add_argument(
        "--out", type=Path, default=Path("results/soak"), help="summary.json, samples.csv"
    )
    g = p.add_argument_group("load")
    g.add_argument(
        "--burst-size",
        type=int,
        default=48,
        help="requests per burst (default 48; 0: none); for 429s it must pass the server's "
        "--max-running-requests + --max-waiting-requests, less --concurrency",
    )
    g.add_argument(
        "--burst-every", type=_positive(float), default=30.0, help="seconds between bursts (about)"
    )
    g.add_argument("--sample-every", type=_positive(float), default=5.0, help="seconds (default 5)")
    g.add_argument(
        "--settle-timeout",
        type=float,
        default=30.0,
        help="after the load, how long the gauges get to return to 0 (default 30 s)",
    )
    g.add_argument("--progress-every", type=float, default=30.0, help="stderr progress; 0: off")
    add_workload_args(p, max_tokens=IntRange(8, 64))  # short replies: more requests a minute
    goals = p.add_argument_group("goals (exit 1 when one fails)")
    d = Goals()
    goals.add_argument("--max-rss-growth-pct", type=float, default=d.max_rss_growth_pct)
    goals.add_argument("--max-unexpected", type=int, default=d.max_unexpected)
    goals.add_argument("--max-engine-left", type=int, default=d.max_engine_left)
    goals.add_argument("--max-gauge-left", type=float, default=d.max_gauge_left)
    goals.add_argument("--max-missing-done", type=int, default=d.max_missing_done)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    summary, samples = asyncio.run(run_soak(args))
    print(format_report(summary))
    write_outputs(args.out, summary, samples)
    print(f"\nwrote {args.out / 'summary.json'} and {args.out / 'samples.csv'}", file=sys.stderr)
    return exit_code(summary)


if __name__ == "__main__":
    sys.exit(main())
