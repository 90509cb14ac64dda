"""Side by side: our server vs vLLM's own OpenAI server vs the raw engine, same model and settings.

    python -m loadtest.compare --concurrency 1,16,64 --rounds 3 --out results/compare

By default both servers start at once on two free loopback ports, with identical engine flags,
and stay up for the whole comparison; only one of them is under load at any time (an idle
server costs almost no CPU: the idle one's CPU use is measured and reported). Starting them
once instead of per round saves minutes of engine start-up on a small machine and keeps both
equally warm. ``--sequential`` instead starts each server for its turn only: needed on one GPU
that cannot hold two engines, and a way to rule out idle-server interference entirely.
Each round runs the same seeded workload against every target in turn, in ABBA order (rounds
alternate direction) so slow drift of the machine, such as other jobs on shared cores, does not
favour one side. The raw engine (``loadtest.engine``, AsyncLLM in process, no HTTP) runs as a
child process for its turn, and is the floor both servers are compared to.

Around every level on a server it reads the CPU time of that server's processes, front end
(everything but vLLM's engine core and its workers: see ``loadtest.cpu``) and engine apart, and
reports front-end CPU µs per output token, the figure where two servers on one engine differ.

``--client vllm`` makes vLLM's own benchmark client (``vllm.benchmarks.serve``) the load
generator instead of ours, on vLLM's random dataset (``loadtest.vllm_client``); it needs an
HTTP endpoint, so the raw engine is skipped then.

Writes compare.json, compare.md and per-target, per-round bench outputs under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest import vllm_client
from loadtest.bench import add_load_args, add_workload_args, bench_endpoint, sweep
from loadtest.compare_report import absolute, markdown, plot_compare, ratios, server_cpu
from loadtest.cpu import ProcessTree, attach_cpu, cpu_from_probe, probe_cpu
from loadtest.report import format_table, write_outputs
from loadtest.servers import (
    ServerProcess,
    add_server_args,
    engine_flags,
    free_port,
    ours_command,
    vllm_command,
)

TARGETS = ("ours", "vllm", "engine")
DEMO_MODEL_DIR = Path.home() / ".cache" / "avatar-llm-serve" / "demo-model"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"model folder or id (default: the demo model, built in {DEMO_MODEL_DIR})",
    )
    p.add_argument(
        "--vllm-cmd",
        default=None,
        help="command that starts vLLM's server "
        "(default: python -m vllm.entrypoints.openai.api_server)",
    )
    p.add_argument(
        "--targets", default=",".join(TARGETS), help="comma-separated subset of ours,vllm,engine"
    )
    p.add_argument(
        "--client",
        choices=("ours", "vllm"),
        default="ours",
        help="load generator: ours (loadtest.bench, the avatar workload) or vLLM's "
        "benchmark client (vllm.benchmarks.serve, random dataset; skips the raw engine)",
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="run only one server at a time, started for its turn and stopped after it (for "
        "one GPU that cannot hold two engines, or to rule out any idle-server interference)",
    )
    add_server_args(p)
    p.add_argument("--out", type=Path, default=Path("results/compare"))
    add_workload_args(p)
    add_load_args(p)
    vllm_client.add_vllm_client_args(p)
    p.set_defaults(ignore_eos=True)
    return p


def _forwarded_load_args(args: argparse.Namespace) -> list[str]:
    """The bench flags again, for the engine child, so it runs exactly the same sweep."""
    mode, levels = sweep(args)
    out = [
        f"--{mode}",
        ",".join(f"{v:g}" for v in levels),
        "--seed",
        str(args.seed),
        "--turns",
        str(args.turns),
        "--max-tokens",
        str(args.max_tokens),
        "--warmup",
        str(args.warmup),
        "--slo-ttft-ms",
        str(args.slo_ttft_ms),
        "--slo-itl-ms",
        str(args.slo_itl_ms),
        "--no-progress",
    ]
    if args.ignore_eos:
        out.append("--ignore-eos")
    if args.num_requests:
        out += ["--num-requests", str(args.num_requests)]
    if args.duration:
        out += ["--duration", str(args.duration)]
    if args.max_concurrency:
        out += ["--max-concurrency", str(args.max_concurrency)]
    return out


def run_engine_round(
    args: argparse.Namespace, flags: list[str], env: dict[str, str], out_dir: Path
) -> list[dict[str, Any]]:
    cmd = [
        sys.executable,
        "-m",
        "loadtest.engine",
        *_forwarded_load_args(args),
        "--out",
        str(out_dir),
        *flags,
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "engine.log").open("wb") as log:
        # Its own process: the engine's CPU use must not be billed to this process's client,
        # and a crash there must not take the comparison down.
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )
        try:
            rc = proc.wait(timeout=args.ready_timeout + 3600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if rc != 0 or not (out_dir / "results.json").exists():
        raise RuntimeError(f"raw engine run failed (rc {rc}); see {out_dir / 'engine.log'}")
    levels: list[dict[str, Any]] = json.loads((out_dir / "results.json").read_text())["levels"]
    return levels


def _start_all(servers: list[ServerProcess], timeout_s: float) -> None:
    for srv in servers:
        srv.start()
    for srv in servers:
        t0 = time.monotonic()
        srv.wait_ready(timeout_s)
        print(
            f"{srv.name} ready on {srv.base_url} ({time.monotonic() - t0:.0f} s)", file=sys.stderr
        )


def build_demo_model(folder: Path) -> Path:
    """The server's demo model, built by the server's own command: this package is a client
    and imports nothing of the server, so it runs ``python -m serve.demo_model``."""
    done = subprocess.run(
        [sys.executable, "-m", "serve.demo_model", "--ensure", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"building the demo model failed:\n{done.stderr[-2000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


async def run_compare(args: argparse.Namespace) -> dict[str, Any]:
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if unknown := set(targets) - set(TARGETS):
        raise SystemExit(f"unknown targets: {sorted(unknown)}")
    skipped: dict[str, str] = {}
    if args.client == "vllm" and "engine" in targets:
        targets.remove("engine")
        skipped["engine"] = (
            "vLLM's benchmark client needs an HTTP endpoint; the raw engine has none"
        )
        print(f"skipping the raw engine: {skipped['engine']}", file=sys.stderr)
    model = args.model
    if model is None:
        model = str(build_demo_model(DEMO_MODEL_DIR))
    flags = engine_flags(
        model,
        args.served_model_name,
        max_model_len=args.max_model_len,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        enforce_eager=args.enforce_eager,
        extra=shlex.split(args.engine_args),
    )
    env = dict(kv.split("=", 1) for kv in args.env)
    args.out.mkdir(parents=True, exist_ok=True)

    servers: dict[str, ServerProcess] = {}
    if "ours" in targets:
        port = free_port()
        servers["ours"] = ServerProcess(
            "ours",
            ours_command(flags, port, args.ours_cmd),
            port,
            log_path=args.out / "ours.log",
            env=env,
            ready_paths=("/ready",),
        )
    if "vllm" in targets:
        port = free_port()
        servers["vllm"] = ServerProcess(
            "vllm",
            vllm_command(flags, port, args.vllm_cmd),
            port,
            log_path=args.out / "vllm.log",
            env=env,
            ready_paths=("/health",),
        )
    results: dict[str, list[list[dict[str, Any]]]] = {t: [] for t in targets}
    idle_cpu: dict[str, list[float]] = {name: [] for name in servers}
    try:
        if not args.sequential:
            _start_all(list(servers.values()), args.ready_timeout)
        for r in range(args.rounds):
            order = targets if r % 2 == 0 else targets[::-1]
            for target in order:
                print(f"round {r + 1}/{args.rounds}: {target}", file=sys.stderr)
                out_dir = args.out / f"round{r + 1}" / target
                if target == "engine":
                    results[target].append(run_engine_round(args, flags, env, out_dir))
                    continue
                srv = servers[target]
                if args.sequential:
                    _start_all([srv], args.ready_timeout)
                peers = [s for s in servers.values() if s is not srv and s.proc is not None]
                peer_cpu0 = [s.cpu_seconds() for s in peers]
                t0 = time.monotonic()
                args.label = f"{target} round {r + 1}"
                assert srv.proc is not None
                tree = ProcessTree(srv.proc.pid)  # anew: --sequential restarts the server
                if args.client == "vllm":
                    out_dir.mkdir(parents=True, exist_ok=True)  # its logs go there
                    meta, levels = await vllm_client.run_sweep(
                        args, srv.base_url, model, tree, out_dir
                    )
                else:
                    meta, levels, runs = await bench_endpoint(
                        args,
                        srv.base_url + "/v1",
                        args.served_model_name,
                        None,
                        probe=probe_cpu(tree),
                    )
                    for lv in levels:
                        attach_cpu(lv, cpu_from_probe(lv, tree))
                wall = time.monotonic() - t0
                for s, c0 in zip(peers, peer_cpu0, strict=True):
                    idle_cpu[s.name].append((s.cpu_seconds() - c0) / wall)
                if args.sequential:
                    srv.stop()
                if args.client == "vllm":
                    (out_dir / "results.json").write_text(
                        json.dumps({"meta": meta, "levels": levels}, indent=2)
                    )
                else:
                    write_outputs(out_dir, meta, levels, runs)
                print(format_table(levels), file=sys.stderr)
                print(cpu_lines(levels), file=sys.stderr)
                results[target].append(levels)
    finally:
        for srv in servers.values():
            srv.stop()

    mode, sweep_levels = sweep(args)
    report: dict[str, Any] = {
        "meta": {
            "model": model,
            "engine_flags": flags,
            "env": env,
            "targets": targets,
            "rounds": args.rounds,
            "mode": mode,
            "levels": sweep_levels,
            "num_requests": args.num_requests,
            "seed": args.seed,
            "turns": str(args.turns),
            "max_tokens": str(args.max_tokens),
            "ignore_eos": args.ignore_eos,
            "servers": (
                "one at a time, restarted for each turn"
                if args.sequential
                else "both up at once, one loaded at a time"
            ),
            "order": "ABBA (rounds alternate direction)",
            "client": (
                "vLLM's benchmark client (vllm.benchmarks.serve, random dataset, "
                f"input {args.vllm_input_len}, output {args.vllm_output_len} tokens, "
                f"range ratio {args.vllm_range_ratio})"
                if args.client == "vllm"
                else "ours (loadtest.bench, avatar workload)"
            ),
            "skipped": skipped,
        },
        "ratios": {
            "ours_vs_vllm": ratios(results, "ours", "vllm"),
            "ours_vs_engine": ratios(results, "ours", "engine"),
            "vllm_vs_engine": ratios(results, "vllm", "engine"),
        },
        "absolute": absolute(results),
        "server_cpu": server_cpu(results),
        "idle_peer_cpu": {k: statistics.fmean(v) for k, v in idle_cpu.items() if v},
        "results": results,
    }
    return report


def cpu_lines(levels: Sequence[dict[str, Any]]) -> str:
    """One line per level: the server's CPU per output token, front end and engine."""
    out = []
    for lv in levels:
        c = lv.get("server_cpu")
        if not c:
            continue
        fe, en = c["front_end_us_per_token"], c["engine_us_per_token"]
        out.append(
            f"  level {lv['level']:g}: front-end CPU "
            + ("-" if fe is None else f"{fe:.1f}")
            + " µs/token ("
            + f"{c['front_end_s']:.2f} s, {c['front_end_cores'] or 0:.2f} cores), engine "
            + ("-" if en is None else f"{en:.1f}")
            + f" µs/token, {c['output_tokens']} output tokens"
        )
    return "\n".join(out)


def _sigterm_to_interrupt(signum: int, frame: object) -> None:
    # SIGTERM (a CI timeout, kill) then unwinds like Ctrl-C, through the finally that stops
    # the servers; they run in their own sessions, so nothing else would stop them.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    try:
        report = asyncio.run(run_compare(args))
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return 130
    (args.out / "compare.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (args.out / "compare.md").write_text(md)
    plot_compare(report, args.out / "compare.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
