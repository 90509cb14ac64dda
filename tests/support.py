"""Helpers shared by the test suites: a real server process, free ports, metric reading."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from serve.demo_model import DEMO_MODEL_NAME

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL_DIR = ROOT / ".cache" / "demo-model"
MODEL = DEMO_MODEL_NAME  # the name the server gives the demo model
TEST_API_KEY = "test-key-123"
# Small enough that several engines fit beside each other on a 24 GiB machine.
TEST_KV_CACHE_BYTES = 256 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the server may not be listening yet
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout} s (last error: {last_exc!r})")


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> str:
        return httpx.get(f"{self.base_url}/metrics", timeout=10).text


def server_command(port: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "serve",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--demo-model-dir", str(DEMO_MODEL_DIR),
        "--kv-cache-memory-bytes", str(TEST_KV_CACHE_BYTES),
        "--max-model-len", "4096",
        *extra,
    ]  # fmt: skip


@contextlib.contextmanager
def running_server(
    log_path: Path, *extra: str, ready_timeout: float = 240.0, env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    """Start ``python -m serve`` on a free loopback port; stop it (SIGTERM, then SIGKILL) after."""
    port = free_port()
    log_file = log_path.open("wb")
    proc = subprocess.Popen(
        server_command(port, *extra),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path)
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()[-4000:]}")
            return httpx.get(f"{server.base_url}/ready", timeout=2).status_code == 200

        wait_until(ready, ready_timeout, interval=0.25, what="server readiness")
        yield server
    finally:
        stop_process_group(proc)
        log_file.close()


def stop_process_group(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    # The engine core is a child process: make sure nothing of the group is left behind.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        label_text = m.group(2) or ""
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(m.group(3))
    return total
