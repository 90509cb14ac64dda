"""Persona adapters against the base model on one server: what serving N LoRAs in a batch costs.

    python -m loadtest.personas --personas 8 --concurrency 8 --rounds 2 --out results/personas

Builds N random rank-R LoRA adapters for the base model (``serve.demo_personas.build_adapter``,
distinct seeds, in a child process: this package imports nothing of the server), starts our
server once with ``--enable-lora --max-loras N --max-cpu-loras N --max-lora-rank R
--lora-modules name=path ...``, and at each load level runs the same seeded workload in two
modes: ``base`` (every request asks for the base model) and ``personas`` (each conversation
asks for the adapter named after its persona, ``loadtest.workload.route_to_personas``), so the
engine batches the N adapters together. The modes alternate in ABBA order over the rounds on
the one server, so drift of a shared machine favours neither; ratios personas/base are taken
within each round, then spread over rounds, as ``loadtest.compare`` does.

Each level is checked on the server's /metrics: where its requests went (our histograms'
``model`` label) and the most adapters that ran in one engine step (vLLM's
``vllm:lora_requests_info``). ``--budget-s`` bounds the whole run: a round that would not fit
is not started. Writes personas.json and personas.md after every round (a run cut short
still leaves its results), plus per-round, per-mode bench outputs, under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from loadtest.bench import add_load_args, add_workload_args, bench_endpoint, level_size, sweep
from loadtest.client import ChatClient, list_models
from loadtest.compare import DEMO_MODEL_DIR, build_demo_model
from loadtest.cpu import ProcessTree, attach_cpu, cpu_from_probe, probe_cpu
from loadtest.personas_report import (
    MODES,
    adapters_together,
    build_report,
    check_level,
    markdown,
    served_requests,
    summary_lines,
)
from loadtest.report import format_table, write_outputs
from loadtest.runner import run_level
from loadtest.servers import ServerProcess, add_server_args, engine_flags, free_port, ours_command
from loadtest.workload import IntRange, build_workload, persona_adapter_names

# vLLM's allowed --max-lora-rank values: the engine's slots are sized to the cap, not the rank.
LORA_RANK_CAPS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Run as ``python -c`` so that building adapters (torch) happens in the server's world.
_BUILD = """\
import json, sys
from serve.demo_personas import build_adapter
spec = json.loads(sys.argv[1])
for name, folder in spec["folders"].items():
    build_adapter(spec["base"], folder, seed=spec["seeds"][name], rank=spec["rank"],
                  targets=tuple(spec["targets"]))
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.personas",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"base model: a local Llama-shaped folder (default: the demo model, {DEMO_MODEL_DIR})",
    )
    p.add_argument("--personas", type=int, default=8, metavar="N", help="adapters (default 8)")
    p.add_argument("--lora-rank", type=int, default=8, help="rank of each adapter (default 8)")
    p.add_argument(
        "--lora-targets",
        default="q_proj,v_proj",
        help="projections each adapter changes (default q_proj,v_proj, PEFT's for Llama)",
    )
    p.add_argument("--adapter-seed", type=int, default=1000, help="adapter k gets seed+k")
    p.add_argument(
        "--adapter-dir",
        type=Path,
        default=None,
        help="where to build the adapters (default: a temporary folder, removed afterwards)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="seconds for the whole run; a round that would not fit is not started",
    )
    add_server_args(p)
    p.add_argument("--out", type=Path, default=Path("results/personas"))
    add_workload_args(p, max_tokens=IntRange(16, 64))
    add_load_args(p)
    # Small enough for two shared cores: 8 streams, so 32 requests per level and mode (bench's
    # default, max(32, 4 x concurrency)); short replies.
    p.set_defaults(ignore_eos=True, concurrency=[8])
    return p


def lora_rank_cap(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds ``rank``."""
    for cap in LORA_RANK_CAPS:
        if cap >= rank:
            return cap
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest, {LORA_RANK_CAPS[-1]}")


def server_flags(adapters: dict[str, Path], rank: int) -> list[str]:
    """Our server's flags for serving every adapter at once, from start-up."""
    n = str(len(adapters))
    return [
        "--enable-lora",
        "--max-loras",  # GPU slots: all N in one batch, none waits for a slot
        n,
        "--max-cpu-loras",  # all N stay loaded: no adapter is read from disk mid-run
        n,
        "--max-lora-rank",
        str(lora_rank_cap(rank)),
        "--lora-modules",
        *(f"{name}={path}" for name, path in adapters.items()),
    ]


def build_adapters(
    model: str, root: Path, names: Sequence[str], *, rank: int, targets: Sequence[str], seed: int
) -> tuple[dict[str, Path], dict[str, int]]:
    """Adapter folders and seeds by name, built by the server's own builder."""
    folders = {name: root / name for name in names}
    seeds = {name: seed + k for k, name in enumerate(names)}
    spec = {
        "base": model,
        "folders": {n: str(f) for n, f in folders.items()},
        "seeds": seeds,
        "rank": rank,
        "targets": list(targets),
    }
    done = subprocess.run(
        [sys.executable, "-c", _BUILD, json.dumps(spec)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"building the adapters failed:\n{done.stderr[-2000:]}")
    return folders, seeds


def scrape(base_url: str) -> str:
    """One /metrics scrape ("" when it fails: the checks then say so, the run goes on)."""
    try:
        with urllib.request.urlopen(base_url + "/metrics", timeout=10) as resp:
            return str(resp.read().decode(errors="replace"))
    except OSError:
        return ""


def level_probe(base_url: str, tree: ProcessTree | None) -> Callable[[], dict[str, Any]]:
    """A ``run_levels`` probe: wall time, a /metrics scrape and the server's CPU by role."""
    cpu = probe_cpu(tree) if tree is not None else None

    def read() -> dict[str, Any]:
        out: dict[str, Any] = {"wall": time.time(), "metrics": scrape(base_url)}
        return out | (cpu() if cpu is not None else {})

    return read


def finish_level(
    lv: dict[str, Any], mode: str, base: str, names: Sequence[str], tree: ProcessTree | None
) -> None:
    """Turn a level's probe readings into its checks and CPU; drop the raw scrapes."""
    before, after = lv["probe"]["before"], lv["probe"]["after"]
    lv["served"] = served_requests(before.pop("metrics"), after["metrics"])
    lv["adapters_together"] = adapters_together(after.pop("metrics"), before["wall"])
    lv["warnings"] += check_level(lv, mode, base, names)
    if tree is not None:
        attach_cpu(lv, cpu_from_probe(lv, tree))


async def warm_adapters(args: argparse.Namespace, base_url: str, names: Sequence[str]) -> None:
    """Every adapter a few times at each level's concurrency, unmeasured: the first batch that
    holds an adapter moves it into the engine's slots (on a GPU, it may also compile the LoRA
    kernels for that batch size), a cost no measured level should carry."""
    mode, levels = sweep(args)
    async with ChatClient(
        base_url, args.served_model_name, ignore_eos=True, timeout_s=args.timeout
    ) as client:
        for level in levels:
            c = int(level) if mode == "concurrency" else len(names)
            warm = build_workload(max(2 * len(names), c), seed=args.seed + 20_000,
                                  turns=args.turns, max_tokens=IntRange(8, 16))  # fmt: skip
            warm = [replace(r, model=names[i % len(names)]) for i, r in enumerate(warm)]
            await run_level(client.send, warm, concurrency=c, progress=False, monitor_client=False)


Pass = Callable[[str, int], Awaitable[list[dict[str, Any]]]]


async def run_rounds(
    rounds: int,
    one_pass: Pass,
    *,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    after_round: Callable[[dict[str, list[list[dict[str, Any]]]], bool], None] | None = None,
) -> tuple[dict[str, list[list[dict[str, Any]]]], bool]:
    """Both modes per round, in ABBA order; returns the levels per mode and round, and whether
    the deadline stopped the rounds early (a round is started only when two of the longest pass
    so far still fit)."""
    results: dict[str, list[list[dict[str, Any]]]] = {m: [] for m in MODES}
    longest = 0.0
    for r in range(rounds):
        if deadline is not None and r > 0 and clock() + 2 * longest > deadline:
            return results, True
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            t0 = clock()
            results[mode].append(await one_pass(mode, r + 1))
            longest = max(longest, clock() - t0)
        if after_round is not None:
            after_round(results, False)
    return results, False


def write_report(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "personas.json").write_text(json.dumps(report, indent=2))
    (out / "personas.md").write_text(markdown(report))


async def run_personas(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.monotonic()
    deadline = t_start + args.budget_s if args.budget_s else None
    model = args.model or str(build_demo_model(DEMO_MODEL_DIR))
    names = persona_adapter_names(args.personas)
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    root = args.adapter_dir or Path(tempfile.mkdtemp(prefix="avatar-personas-"))
    try:
        t0 = time.monotonic()
        adapters, seeds = build_adapters(
            model, root, names, rank=args.lora_rank, targets=targets, seed=args.adapter_seed
        )
        print(f"built {len(adapters)} adapters in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        lora = server_flags(adapters, args.lora_rank)
        flags = engine_flags(
            model,
            args.served_model_name,
            max_model_len=args.max_model_len,
            kv_cache_memory_bytes=args.kv_cache_memory_bytes,
            enforce_eager=args.enforce_eager,
            extra=[*shlex.split(args.engine_args), *lora],
        )
        env = dict(kv.split("=", 1) for kv in args.env)
        meta = _meta(args, model, seeds, targets, lora[: -len(adapters)], flags, env)
        port = free_port()
        srv = ServerProcess(
            "ours",
            ours_command(flags, port, args.ours_cmd),
            port,
            log_path=args.out / "ours.log",
            env=env,
            ready_paths=("/ready",),
        )
        with srv:
            t0 = time.monotonic()
            wait = args.ready_timeout if deadline is None else deadline - time.monotonic() - 30
            srv.wait_ready(min(args.ready_timeout, max(30.0, wait)))
            meta["ready_s"] = round(time.monotonic() - t0, 1)
            print(f"ours ready on {srv.base_url} ({meta['ready_s']:.0f} s)", file=sys.stderr)
            served = await list_models(srv.base_url + "/v1")
            if missing := [n for n in names if n not in served]:
                raise SystemExit(f"the server does not list the adapters {missing}: {served}")
            await warm_adapters(args, srv.base_url + "/v1", names)
            assert srv.proc is not None
            tree = _tree(srv.proc.pid)

            async def one_pass(mode: str, rnd: int) -> list[dict[str, Any]]:
                print(f"round {rnd}/{args.rounds}: {mode}", file=sys.stderr)
                margs = argparse.Namespace(**vars(args))
                margs.personas = len(names) if mode == "personas" else 0
                margs.label = f"{mode} round {rnd}"
                run_meta, lvls, runs = await bench_endpoint(
                    margs, srv.base_url + "/v1", args.served_model_name, None,
                    probe=level_probe(srv.base_url, tree),
                )  # fmt: skip
                for lv in lvls:
                    finish_level(lv, mode, args.served_model_name, names, tree)
                write_outputs(args.out / f"round{rnd}" / mode, run_meta, lvls, runs, plots=False)
                print(format_table(lvls), file=sys.stderr)
                return lvls

            def save(results: dict[str, list[list[dict[str, Any]]]], cut: bool) -> None:
                write_report(args.out, build_report(meta, results, cut))

            results, cut = await run_rounds(
                args.rounds, one_pass, deadline=deadline, after_round=save
            )
    finally:
        if args.adapter_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    meta["wall_s"] = round(time.monotonic() - t_start, 1)
    report = build_report(meta, results, cut)
    write_report(args.out, report)
    return report


def _meta(
    args: argparse.Namespace,
    model: str,
    seeds: dict[str, int],
    targets: list[str],
    lora: list[str],
    flags: list[str],
    env: dict[str, str],
) -> dict[str, Any]:
    mode, levels = sweep(args)
    return {
        "model": model,
        "served_model_name": args.served_model_name,
        "personas": len(seeds),
        "adapter_seeds": seeds,
        "seeds": f"{min(seeds.values())}-{max(seeds.values())}",
        "rank": args.lora_rank,
        "targets": targets,
        "server_flags": [*lora, f"<{len(seeds)} name=path pairs>"],
        "engine_flags": flags,
        "env": env,
        "rounds": args.rounds,
        "mode": mode,
        "levels": levels,
        # What each level sent: --num-requests, bench's default for the level, or --duration.
        "num_requests": None if args.duration else [level_size(args, mode, v) for v in levels],
        "duration": args.duration,
        "seed": args.seed,
        "turns": str(args.turns),
        "max_tokens": str(args.max_tokens),
        "ignore_eos": args.ignore_eos,
        "order": "ABBA (round 1: base, personas; round 2: personas, base; ...)",
    }


def _tree(pid: int) -> ProcessTree | None:
    try:
        return ProcessTree(pid)
    except ImportError:  # psutil: a measurement aid only (the device image may lack it)
        return None


def _sigterm_to_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwind through the finally blocks that stop the server


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.personas < 1 or args.rounds < 1:
        raise SystemExit("--personas and --rounds must be at least 1")
    signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    try:
        report = asyncio.run(run_personas(args))
    except KeyboardInterrupt:
        print("interrupted; server stopped", file=sys.stderr)
        return 130
    print("\n".join(summary_lines(report)))
    return 0 if report["meta"]["rounds_done"] else 1


if __name__ == "__main__":
    sys.exit(main())
