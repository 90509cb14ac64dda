"""Start, wait for and stop OpenAI-compatible server processes on loopback ports.

Used by ``loadtest.compare`` and by the test fixtures. Each server runs in its own process group
so that stopping it also stops anything it spawned (vLLM's engine-core process).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from loadtest import DEMO_MODEL_NAME


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies.

    The server runs in its own session, so a parent killed without running its cleanup (pytest
    or compare hit by SIGKILL or a CI timeout) would otherwise leave it, and its engine, running.
    """
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


# The environment every server gets on this CPU (the tests' too), the same for ours and vLLM's.
# The model runs in the engine core's process, as vLLM runs one GPU (its "uni" executor): the CPU
# build otherwise adds a worker process that the engine core spins on, two busy cores per server.
# One OpenMP thread: vLLM asks torch for one while serving, but its CPU worker has already
# disabled ``torch.set_num_threads``, so the model ran on two, the second spinning between steps
# (1.5-1.9 cores per decoding server, the demo model up to 1.9x slower; BENCHMARKS.md, "One
# OpenMP thread").
CPU_ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}

_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST_PORT = 10_000  # above the well-known and most registered services' ports
_ports = random.Random()  # its own generator: a run that seeds ``random`` must not pick alike


def _ephemeral_low() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default range starts here


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now, below the kernel's ephemeral range.

    A port the kernel hands out for ``bind(0)`` comes from the same range as the local port of
    every outgoing connection, so a client's connection could take it before the server bound
    it: a persona dry run's server died of ``address already in use`` that way. Ports below the
    range are never given to connections.
    """
    low = _ephemeral_low()
    for _ in range(64 if low - _LOWEST_PORT >= 1_024 else 0):  # else too few ports to pick from
        port = _ports.randrange(_LOWEST_PORT, low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def engine_flags(
    model: str,
    served_model_name: str,
    *,
    max_model_len: int | None = 2048,
    kv_cache_memory_bytes: int | None = 1 << 30,
    enforce_eager: bool = True,
    extra: Sequence[str] = (),
) -> list[str]:
    """The engine flags both servers and the raw engine get, so all three run the same engine."""
    flags = ["--model", model, "--served-model-name", served_model_name]
    if max_model_len:
        flags += ["--max-model-len", str(max_model_len)]
    if kv_cache_memory_bytes:
        flags += ["--kv-cache-memory-bytes", str(kv_cache_memory_bytes)]
    if enforce_eager:
        flags.append("--enforce-eager")
    return flags + list(extra)


def ours_command(flags: Sequence[str], port: int, base: str | None = None) -> list[str]:
    """``python -m serve`` (or ``base``) on ``port``."""
    cmd = shlex.split(base) if base else [sys.executable, "-m", "serve"]
    return [*cmd, "--host", "127.0.0.1", "--port", str(port), *flags]


def vllm_command(flags: Sequence[str], port: int, base: str | None = None) -> list[str]:
    """vLLM's own OpenAI server (or ``base``) on ``port``."""
    cmd = (
        shlex.split(base) if base else [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    )
    return [*cmd, "--host", "127.0.0.1", "--port", str(port), *flags]


class ServerProcess:
    """One server subprocess; ``with ServerProcess(...) as srv:`` stops it however the block ends.

    ``ready_paths`` are polled in order until one answers 200 (ours has ``/ready``; vLLM's server
    has ``/health``, which only answers once the engine is up).
    """

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        port: int,
        *,
        log_path: Path,
        env: dict[str, str] | None = None,
        ready_paths: Sequence[str] = ("/ready", "/health"),
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.port = port
        self.log_path = log_path
        self.env = env
        self.ready_paths = list(ready_paths)
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")  # append: --sequential restarts keep earlier logs
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(self.env or {})},
            cwd=self.cwd,
            start_new_session=True,  # own process group: stop() reaches the engine core too
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        return self

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _probe(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Poll the readiness paths until one answers 200; fail fast if the process exits."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        delay = 0.1
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self.proc.returncode} before it was ready; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if any(self._probe(p) for p in self.ready_paths):
                return
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)  # quick when it is fast, gentle while models load
        raise TimeoutError(
            f"{self.name} not ready after {timeout_s:.0f} s; log {self.log_path}:\n"
            f"{self.log_tail()}"
        )

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after ``grace_s``."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if proc is not None:
            # The leader may be gone while its children (engine core) still run.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None

    def cpu_seconds(self) -> float:
        """CPU time used so far by the server and its children, engine core included (needs
        psutil; 0 without). ``loadtest.cpu.ProcessTree`` splits the front end from the engine."""
        if self.proc is None:
            return 0.0
        try:
            import psutil

            root = psutil.Process(self.proc.pid)
            total = 0.0
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
            return total
        except Exception:  # a measurement aid only; never fail a run over it
            return 0.0

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def add_server_args(p: argparse.ArgumentParser) -> None:
    """The flags of a run that starts servers on one model: engine flags, commands, timeouts
    (``loadtest.compare`` and ``loadtest.personas``)."""
    p.add_argument("--served-model-name", default=DEMO_MODEL_NAME)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument(
        "--kv-cache-memory-bytes",
        type=int,
        default=1 << 30,
        help="KV cache size for every server (default 1 GiB); 0 to leave unset (GPU)",
    )
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--engine-args",
        default="--enable-prefix-caching",
        help="more engine flags for every server, one string "
        "(default: '--enable-prefix-caching', our server's default, made explicit)",
    )
    p.add_argument(
        "--ours-cmd", default=None, help="command that starts our server (default: python -m serve)"
    )
    p.add_argument("--rounds", type=int, default=2, help="A/B rounds (default 2)")
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument(
        "--env",
        action="append",
        default=[f"{k}={v}" for k, v in CPU_ENGINE_ENV.items()],
        metavar="KEY=VALUE",
        help="environment for every server (repeatable; a later KEY wins)",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, s")
    p.add_argument("--stall-timeout", type=float, default=60.0)
