"""Streaming benchmark of an OpenAI-compatible chat endpoint.

    python -m loadtest.bench --base-url http://127.0.0.1:8000/v1 --concurrency 1,16,64 \\
        --num-requests 128 --ignore-eos --out results/run1

Every level of the sweep replays the same seeded avatar workload; see BENCHMARKS.md. With
``--personas N`` each conversation asks for a persona adapter named after its persona instead
of ``--model`` (the server must serve them; ``loadtest.personas`` sets one up).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loadtest.client import ChatClient, resolve_model
from loadtest.report import emit, level_results
from loadtest.runner import LevelRun, SendFn, run_level
from loadtest.stats import Slo
from loadtest.workload import (
    ChatRequest,
    IntRange,
    build_workload,
    persona_adapter_names,
    route_to_personas,
)


def _levels(text: str, kind: type[float] | type[int]) -> list[Any]:
    values = [kind(v) for v in text.split(",") if v.strip()]
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of positive numbers, got {text!r}"
        )
    return values


def add_endpoint_args(parser: argparse.ArgumentParser, timeout_s: float = 600.0) -> None:
    """How to talk to the server: key, model and timeouts (the bench's and the soak's)."""
    parser.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="bearer token (default $OPENAI_API_KEY)",
    )
    parser.add_argument("--model", default=None, help="model name (default: first of GET /models)")
    parser.add_argument(
        "--timeout", type=float, default=timeout_s, help=f"per-request timeout, s ({timeout_s:g})"
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=60.0,
        help="fail a request when no bytes arrive for this many seconds",
    )


DEFAULT_MAX_TOKENS = IntRange(20, 200)


def add_workload_args(
    parser: argparse.ArgumentParser, max_tokens: IntRange = DEFAULT_MAX_TOKENS
) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    g.add_argument(
        "--turns",
        type=IntRange.parse,
        default=IntRange(1, 4),
        help="user turns per conversation, N or LO:HI (default 1:4); earlier turns "
        "are history, so this sets the prompt length",
    )
    g.add_argument(
        "--max-tokens",
        type=IntRange.parse,
        default=max_tokens,
        help=f"reply length cap per request, N or LO:HI (default {max_tokens})",
    )
    g.add_argument(
        "--ignore-eos",
        action="store_true",
        help="send ignore_eos=true (vLLM extension) so replies are exactly max_tokens",
    )


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text}")
    return value


def add_persona_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--personas",
        type=_non_negative,
        default=0,
        metavar="N",
        help="send each conversation to one of N persona adapters named after its persona "
        "(game_npc, kids_storyteller, ...; past eight game_npc-2, ...), which the server must "
        "serve (--lora-modules); 0 (default): every request asks for --model",
    )


def routed(args: argparse.Namespace, requests: list[ChatRequest]) -> list[ChatRequest]:
    """The requests as ``--personas`` sends them: to persona adapters, or unchanged."""
    n = getattr(args, "personas", 0) or 0
    return route_to_personas(requests, persona_adapter_names(n)) if n else requests


def add_load_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("load")
    sweep = g.add_mutually_exclusive_group()
    sweep.add_argument(
        "--concurrency",
        type=lambda s: _levels(s, int),
        default=None,
        help="closed loop: comma-separated in-flight counts, e.g. 1,16,64 (default 1)",
    )
    sweep.add_argument(
        "--rate",
        type=lambda s: _levels(s, float),
        default=None,
        help="open loop: comma-separated Poisson request rates (req/s)",
    )
    g.add_argument(
        "--max-concurrency", type=int, default=None, help="with --rate, cap on requests in flight"
    )
    g.add_argument(
        "--num-requests",
        type=int,
        default=None,
        help="requests per level (default: max(32, 4 x concurrency), or 8 x rate)",
    )
    g.add_argument(
        "--duration",
        type=float,
        default=None,
        help="stop starting new requests after this many seconds per level",
    )
    g.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="unmeasured requests sent (2 at a time) before each sweep (default 2)",
    )
    g.add_argument(
        "--slo-ttft-ms", type=float, default=1000.0, help="goodput TTFT target in ms (default 1000)"
    )
    g.add_argument(
        "--slo-itl-ms",
        type=float,
        default=100.0,
        help="goodput target for each request's p99 inter-token gap (default 100)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def sweep(args: argparse.Namespace) -> tuple[str, list[float]]:
    if args.rate:
        return "rate", args.rate
    return "concurrency", args.concurrency or [1]


def level_size(args: argparse.Namespace, mode: str, level: float) -> int:
    if args.num_requests:
        return int(args.num_requests)
    if args.duration:
        return 1_000_000  # the duration bounds the level; the workload list is lazy enough
    return int(max(32, 4 * level) if mode == "concurrency" else max(16, 8 * level))


def workload_for(args: argparse.Namespace, n: int) -> list[ChatRequest]:
    if n >= 1_000_000:
        n = 100_000  # bounded by --duration; a long enough list without wasting memory
    return routed(
        args, build_workload(n, seed=args.seed, turns=args.turns, max_tokens=args.max_tokens)
    )


Probe = Callable[[], Any]


async def run_levels(
    send: SendFn,
    args: argparse.Namespace,
    *,
    monitor_client: bool = True,
    log: bool = True,
    probe: Probe | None = None,
) -> list[LevelRun]:
    """Warm up, then run each level of the sweep in turn with the same seeded workload.

    ``probe``, when given, is called right before and right after each level (not around the
    warm-up) and its two results are kept on the level's run: a reading of the server's CPU
    time, for instance, then covers exactly the requests the level's summary counts.
    """
    mode, levels = sweep(args)
    if args.warmup:
        warm = routed(
            args,
            build_workload(
                args.warmup, seed=args.seed + 10_000, turns=args.turns, max_tokens=IntRange(8, 16)
            ),
        )
        await run_level(
            send, warm, concurrency=min(2, args.warmup), progress=False, monitor_client=False
        )
    runs = []
    for level in levels:
        reqs = workload_for(args, level_size(args, mode, level))
        kw: dict[str, Any] = (
            {"concurrency": int(level)}
            if mode == "concurrency"
            else {"rate": float(level), "max_concurrency": args.max_concurrency}
        )
        before = probe() if probe is not None else None
        run = await run_level(
            send,
            reqs,
            duration_s=args.duration,
            seed=args.seed,
            progress=not args.no_progress,
            monitor_client=monitor_client,
            **kw,
        )
        if probe is not None:
            run.probe = {"before": before, "after": probe()}
        for w in run.warnings:
            print(f"WARNING ({mode} {level:g}): {w}", file=sys.stderr)
        if log:
            ok = sum(r.ok for r in run.records)
            print(
                f"  {mode} {level:g}: {ok}/{len(run.records)} ok in {run.duration_s:.1f} s",
                file=sys.stderr,
            )
        runs.append(run)
    return runs


def run_meta(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    mode, levels = sweep(args)
    return {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "mode": mode,
        "levels": levels,
        "num_requests": args.num_requests,
        "duration": args.duration,
        "seed": args.seed,
        "turns": str(args.turns),
        "max_tokens": str(args.max_tokens),
        "ignore_eos": args.ignore_eos,
        "personas": getattr(args, "personas", 0) or 0,
        "slo": {"ttft_ms": args.slo_ttft_ms, "itl_ms": args.slo_itl_ms},
        "host": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
    } | extra


async def bench_endpoint(
    args: argparse.Namespace,
    base_url: str,
    model: str | None,
    api_key: str | None,
    *,
    probe: Probe | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[LevelRun]]:
    """Run the whole sweep against one endpoint; used by this CLI and by ``compare``
    (``probe``: see ``run_levels``)."""
    model = await resolve_model(base_url, model, api_key)
    async with ChatClient(
        base_url,
        model,
        api_key=api_key,
        ignore_eos=args.ignore_eos,
        timeout_s=args.timeout,
        stall_timeout_s=args.stall_timeout,
    ) as client:
        runs = await run_levels(client.send, args, probe=probe)
    slo = Slo(args.slo_ttft_ms, args.slo_itl_ms)
    meta = run_meta(args, target=base_url, model=model, label=getattr(args, "label", "") or "")
    return meta, level_results(runs, slo), runs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--base-url",
        default="http://127.0.0.1:8000/v1",
        help="OpenAI-compatible base URL, ending in /v1",
    )
    add_endpoint_args(p)
    p.add_argument("--label", default="", help="name of this run, shown in plots and JSON")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for results.json, summary.csv, requests.csv and PNG plots",
    )
    p.add_argument("--no-plots", action="store_true")
    add_workload_args(p)
    add_persona_args(p)
    add_load_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    meta, levels, runs = asyncio.run(bench_endpoint(args, args.base_url, args.model, args.api_key))
    return emit(meta, levels, runs, args.out, plots=not args.no_plots)


if __name__ == "__main__":
    sys.exit(main())
