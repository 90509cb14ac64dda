"""Voice-agent traffic: how many avatar sessions one engine serves within a latency SLO.

    # ours and vLLM's server side by side, same engine flags, alternating rounds
    python -m loadtest.voice --sessions 4,8,16,32 --duration 35 --rounds 2 --out results/voice
    # one running server (the GPU kit)
    python -m loadtest.voice --base-url http://HOST:8000/v1 --sessions 64,128,256 --out results/v

Sessions arrive open loop (``voice_plan``): each has a persona prompt of realistic length and
a growing history; per user turn zero to two speculative requests are cancelled before the
confirmed one (LiveKit's preemptive generation), some replies are cut by the user and the
history keeps what was heard, a speech-rate listener counts underruns (``voice_speech``), some
turns call a tool. Per level: confirmed-turn TTFT and time to first sentence p50/p95/p99, the
underrun rate, goodput (confirmed turns per second meeting the SLO), refusals and how fast they
came, the prefix-cache share, and the engine tokens spent on cancelled requests after the
cancel (``voice_metrics``). Capacity at SLO is the most offered sessions at which at least 95 %
of confirmed turns meet it.

Side by side, both servers start at once (``--sequential``: one at a time, for one GPU) with
identical engine flags (``loadtest.servers``) and, when turns call tools, the same
``--enable-auto-tool-choice --tool-call-parser`` (vLLM's server refuses a forced call without
a parser, which it builds only with auto tool choice on); each level runs on
every target in turn, the order alternating from level to level and round to round. vLLM's
server also gets ``--enable-prompt-tokens-details`` (a front-end flag: its usage then reports
cached tokens as ours does). Writes voice.json, voice.md, voice.png and per-run turns CSVs
under --out.

The SLO: ``--slo gpu`` is TTFT <= 300 ms and first sentence <= 700 ms; ``--slo scaled``
carries those over to the engine measured at the start of the run (``voice_report.scaled_slo``);
``auto`` (default) is gpu where this machine has an NVIDIA GPU or the target is not on loopback,
scaled otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import ipaddress
import json
import os
import shlex
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from loadtest import DEMO_MODEL_NAME
from loadtest.client import resolve_model
from loadtest.compare import DEMO_MODEL_DIR, build_demo_model
from loadtest.servers import ServerProcess, engine_flags, free_port, ours_command, vllm_command
from loadtest.voice_args import build_parser, run_options, workload
from loadtest.voice_plan import schedule
from loadtest.voice_report import VoiceSlo, combine, markdown, plot, scaled_slo, slo_dict
from loadtest.voice_run import (
    LevelRaw,
    Target,
    calibrate,
    log,
    progress_line,
    run_level,
    warm_personas,
)
from loadtest.voice_session import TurnRecord

TARGETS = ("ours", "vllm")
VLLM_FRONT_END_FLAGS = ("--enable-prompt-tokens-details",)


def gpu_here() -> bool:
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or shutil.which("nvidia-smi") is not None


def loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def choose_slo(args: argparse.Namespace, cal: dict[str, Any] | None) -> VoiceSlo:
    preset = args.slo
    if preset == "auto":
        remote = args.base_url is not None and not loopback(args.base_url)
        preset = "gpu" if gpu_here() or remote else "scaled"
    if preset == "gpu":
        slo = VoiceSlo(source="gpu")
    else:
        assert cal is not None
        ttft, ttfs = scaled_slo(
            cal["ttft_ms"],
            cal["tpot_ms"],
            ref_ttft_ms=args.ref_ttft_ms,
            ref_tpot_ms=args.ref_tpot_ms,
        )
        slo = VoiceSlo(ttft, ttfs, source="scaled from the unloaded engine")
    if args.slo_ttft_ms is not None or args.slo_ttfs_ms is not None:
        slo = VoiceSlo(
            args.slo_ttft_ms if args.slo_ttft_ms is not None else slo.ttft_ms,
            args.slo_ttfs_ms if args.slo_ttfs_ms is not None else slo.ttfs_ms,
            source=slo.source + ", set by flags",
        )
    return VoiceSlo(slo.ttft_ms, slo.ttfs_ms, not args.underrun_ok, args.slo_share, slo.source)


def pooled(cals: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every target's calibration together: the median of each figure (the same engine)."""
    keys = ("ttft_ms", "tpot_ms", "chars_per_token")
    return {k: statistics.median(c[k] for c in cals.values()) for k in keys}


def _servers(args: argparse.Namespace, targets: list[str]) -> tuple[dict[str, ServerProcess], str]:
    model = args.model or str(build_demo_model(DEMO_MODEL_DIR))
    flags = engine_flags(
        model,
        args.served_model_name or DEMO_MODEL_NAME,
        max_model_len=args.max_model_len,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        enforce_eager=args.enforce_eager,
        extra=shlex.split(args.engine_args),
    )
    if args.tool_share > 0 and args.tool_call_parser:
        # Front-end flags of both. vLLM 0.32's server builds its tool parser only with auto
        # tool choice on, and refuses a forced call without a parser.
        flags += ["--enable-auto-tool-choice", "--tool-call-parser", args.tool_call_parser]
    env = dict(kv.split("=", 1) for kv in args.env)
    out: dict[str, ServerProcess] = {}
    for name in targets:
        port = free_port()
        if name == "ours":
            cmd = ours_command([*flags, *shlex.split(args.ours_args)], port, args.ours_cmd)
            ready: tuple[str, ...] = ("/ready",)
        else:
            extra = [*VLLM_FRONT_END_FLAGS, *shlex.split(args.vllm_args)]
            cmd, ready = vllm_command([*flags, *extra], port, args.vllm_cmd), ("/health",)
        out[name] = ServerProcess(
            name, cmd, port, log_path=args.out / f"{name}.log", env=env, ready_paths=ready
        )
    return out, model


def _write_turns(path: Path, turns: Sequence[TurnRecord]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [t.to_row() for t in turns]
    with path.open("w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


class Runner:
    """The whole run: targets (started here or given), calibration, the rounds of levels."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.wl = workload(args)
        self.opts = run_options(args)
        self.cals: dict[str, dict[str, Any]] = {}
        self.raw: dict[str, list[list[LevelRaw]]] = {}
        self.arrivals: dict[int, Any] = {}
        self.slo_hint: float | None = None
        self.t0 = time.monotonic()

    async def prepare(self, target: Target) -> None:
        """Calibrate and warm a target the first time it is up."""
        if target.name in self.cals:
            return
        cal = await calibrate(target, self.opts, self.args.calibration_requests, self.wl.seed)
        self.cals[target.name] = cal
        log(
            f"{target.name} unloaded: TTFT p50 {cal['ttft_ms']:.1f} ms, TPOT p50 "
            f"{cal['tpot_ms']:.2f} ms, {cal['chars_per_token']:.2f} chars/token"
        )
        await warm_personas(target, self.wl, self.opts, self.opts.session.tools)
        if not self.arrivals:  # the schedule needs the model's characters per token
            cpt = self.args.chars_per_token or cal["chars_per_token"]
            for level in self.args.sessions:
                self.arrivals[level] = schedule(
                    level,
                    self.wl,
                    self.args.duration,
                    speech_s_per_token=cpt / self.args.cps,
                    arrival=self.args.arrival,
                )

    async def level(self, target: Target, r: int, level: int) -> None:
        if self.args.send_slo_header and self.slo_hint is None:
            # Every target started so far is calibrated by now (all of them, side by side).
            self.slo_hint = choose_slo(self.args, pooled(self.cals)).ttft_ms
        t0 = time.monotonic()
        raw = await run_level(
            target, level, self.arrivals[level], self.opts, slo_ttft_ms=self.slo_hint
        )
        self.raw.setdefault(target.name, [])
        while len(self.raw[target.name]) <= r:
            self.raw[target.name].append([])
        self.raw[target.name][r].append(raw)
        _write_turns(
            self.args.out / f"round{r + 1}" / target.name / f"turns-{level}.csv", raw.turns
        )
        log(progress_line(target.name, raw) + f" ({time.monotonic() - t0:.0f} s)")
        for w in raw.warnings:
            log(f"  WARNING: {w}")

    async def run(self) -> dict[str, Any]:
        args = self.args
        if args.base_url:
            model = await resolve_model(args.base_url, args.served_model_name, args.api_key)
            target = Target(args.label or "target", args.base_url, model, args.api_key)
            await self.prepare(target)
            for r in range(args.rounds):
                for level in args.sessions:
                    await self.level(target, r, level)
            return self.report(model, [])
        names = [t.strip() for t in args.targets.split(",") if t.strip()]
        if unknown := set(names) - set(TARGETS):
            raise SystemExit(f"unknown targets: {sorted(unknown)}")
        servers, model = _servers(args, names)
        served = args.served_model_name or DEMO_MODEL_NAME
        targets = {n: Target(n, s.base_url + "/v1", served) for n, s in servers.items()}
        try:
            if args.sequential:
                await self._sequential(servers, targets, names)
            else:
                for srv in servers.values():
                    srv.start()
                for srv in servers.values():
                    srv.wait_ready(args.ready_timeout)
                for name in names:
                    await self.prepare(targets[name])
                for r in range(args.rounds):
                    for i, level in enumerate(args.sessions):
                        order = names if (r + i) % 2 == 0 else names[::-1]
                        for name in order:
                            await self.level(targets[name], r, level)
        finally:
            for srv in servers.values():
                srv.stop()
        return self.report(model, [" ".join(s.cmd) for s in servers.values()])

    async def _sequential(
        self, servers: dict[str, ServerProcess], targets: dict[str, Target], names: list[str]
    ) -> None:
        for r in range(self.args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                srv = servers[name]
                srv.start()
                try:
                    srv.wait_ready(self.args.ready_timeout)
                    await self.prepare(targets[name])
                    for level in self.args.sessions:
                        await self.level(targets[name], r, level)
                finally:
                    srv.stop()

    def report(self, model: str, commands: list[str]) -> dict[str, Any]:
        args = self.args
        cal = pooled(self.cals)
        slo = choose_slo(args, cal)
        results = {
            name: [[raw.summary(slo) for raw in rnd] for rnd in rounds]
            for name, rounds in self.raw.items()
        }
        wl = {k: str(v) for k, v in vars(self.wl).items()}
        return {
            "meta": {
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "elapsed_s": time.monotonic() - self.t0,
                "model": model,
                "target": args.base_url,
                "server_commands": commands,
                "sequential": args.sequential,
                "rounds": args.rounds,
                "sessions": args.sessions,
                "duration_s": args.duration,
                "arrival": args.arrival,
                "workload": wl,
                "speech": vars(self.opts.speech),
                "ignore_eos": self.opts.ignore_eos,
                "priority": self.opts.priority,
                "slo_header": self.opts.slo_header,
                "slo": slo_dict(slo),
                "calibration": cal,
                "calibration_per_target": self.cals,
                "reference_gpu": {"ttft_ms": args.ref_ttft_ms, "tpot_ms": args.ref_tpot_ms},
                "host": {"cpus": os.cpu_count()},
            },
            "combined": combine(results, slo),
            "results": results,
        }


def _sigterm_to_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through the finally that stops the servers


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(__doc__).parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        report = asyncio.run(Runner(args).run())
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return 130
    (args.out / "voice.json").write_text(json.dumps(report, indent=2, default=str))
    md = markdown(report)
    (args.out / "voice.md").write_text(md)
    if not args.no_plot:
        plot(report, args.out / "voice.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
