"""Device side of the persona benchmark: ``loadtest.personas`` on the kit's model, time-boxed.

Run by ``scripts/device/run_gpu_bench.sh --personas``: an optional call after the benchmark
call, on the warm machine that already holds the install and the model. One server of ours with
N rank-R LoRA adapters (random, built here in seconds); base-only traffic against the N
personas interleaved, at each level, in ABBA rounds (see ``loadtest/personas.py``).

Its own deadline (``--budget-s``) bounds everything: the persona run gets it less a margin for
stopping and packing, stops starting rounds that would not fit, and writes its report after
every round, so even a run cut short brings figures back. A server that cannot start with the
default flags (torch.compile and CUDA graphs, now with LoRA) is retried once with
``--enforce-eager`` when there is time; the table then says so.

Writes under $OUT (at most 8 files come back): personas/personas.{json,md},
personas-summary.md and personas-all.tar.gz (everything: per-round outputs, the server log).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# Below this many seconds left, a failed start is not retried in eager mode: an eager start on
# the 8B model is about a minute, and the rounds need the rest.
RETRY_MIN_S = 150.0
# Kept back from the persona run: its SIGTERM teardown (server drain and stop) and packing.
MARGIN_S = 25.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def persona_command(args: argparse.Namespace, budget_s: float, eager: bool) -> list[str]:
    """``python -m loadtest.personas`` with the kit's engine flags and the call's levels."""
    cmd = [args.python, "-m", "loadtest.personas", "--model", args.model]
    cmd += ["--served-model-name", "bench", "--personas", str(args.personas)]
    cmd += ["--lora-rank", str(args.rank), "--max-model-len", str(args.max_model_len)]
    cmd += ["--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes or 0)]
    cmd += ["--enforce-eager" if eager else "--no-enforce-eager"]
    # "=": a value that starts with "--" would otherwise read as a flag of its own.
    cmd += [f"--engine-args=--enable-prefix-caching {args.engine_extra}".strip()]
    # The engine core in its own process, as in the kit's two servers and in production.
    cmd += ["--env", "VLLM_ENABLE_V1_MULTIPROCESSING=1"]
    cmd += ["--budget-s", f"{budget_s:.0f}", "--ready-timeout", f"{max(30.0, budget_s - 30):.0f}"]
    cmd += ["--out", str(Path(args.work) / "personas")]
    return cmd + args.persona_args.split()


def run_once(cmd: list[str], timeout_s: float) -> int:
    """Run the persona benchmark; past ``timeout_s`` SIGTERM it (it stops its server on
    SIGTERM), then SIGKILL. Output streams through, so progress shows in the call's output."""
    log(" ".join(cmd))
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        return proc.wait(timeout=max(10.0, timeout_s))
    except subprocess.TimeoutExpired:
        log("persona benchmark cut at the deadline")
        proc.terminate()
        try:
            return proc.wait(timeout=MARGIN_S - 5)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


def collect(work: Path, out: Path, table: str) -> None:
    """The report, the table and one archive of everything (logs included)."""
    out.mkdir(parents=True, exist_ok=True)
    src = work / "personas"
    for fname in ("personas.json", "personas.md"):
        if (src / fname).is_file():
            (out / "personas").mkdir(exist_ok=True)
            shutil.copyfile(src / fname, out / "personas" / fname)
    (out / "personas-summary.md").write_text("```\n" + table + "\n```\n")
    with tarfile.open(out / "personas-all.tar.gz", "w:gz") as tar:
        tar.add(work, arcname="personas-bench")


def summary(report: dict[str, Any] | None, eager_retry: bool) -> list[str]:
    sys.path.insert(0, str(ROOT))
    from loadtest.personas_report import summary_lines

    if not report or not report["meta"].get("rounds_done"):
        return ["personas: FAILED or cut before a round ended (ours.log in personas-all.tar.gz)"]
    lines = summary_lines(report)
    if eager_retry:
        lines.append("personas: the default start failed; these ran with --enforce-eager")
    return lines


def run(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.budget_s
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    report_path = work / "personas" / "personas.json"
    eager = args.enforce_eager
    retried = False
    while True:
        left = deadline - time.monotonic()
        rc = run_once(persona_command(args, left - MARGIN_S, eager), left - MARGIN_S + 5)
        left = deadline - time.monotonic()
        # No report at all means no round ended: most likely the server never became ready.
        if report_path.is_file() or eager or left < RETRY_MIN_S:
            break
        log(f"personas: exit {rc} before any round ended; retrying with --enforce-eager")
        eager = retried = True
        if (work / "personas").exists():  # its server log goes into the archive too
            shutil.move(str(work / "personas"), str(work / "personas-first-try"))
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    table = "\n".join(summary(report, retried))
    collect(work, Path(args.out), table)
    print(table, flush=True)
    return 0 if report and report["meta"].get("rounds_done") else 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/avatar-personas")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--personas", type=int, default=8, help="adapters (default 8)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--kv-cache-memory-bytes", type=int, default=0)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--engine-extra", default="", help="more engine flags")
    ap.add_argument("--persona-args", default="", help="more flags for loadtest.personas")
    ap.add_argument("--budget-s", type=float, default=250.0, help="time for the whole step")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
