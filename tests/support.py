"""Helpers shared by the test suites: real server processes (started ahead of their tests where
the run plans them), free ports, metric reading."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from loadtest.servers import CPU_ENGINE_ENV, free_port
from serve.demo_model import DEMO_MODEL_NAME

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL_DIR = ROOT / ".cache" / "demo-model"
MODEL = DEMO_MODEL_NAME  # the name the server gives the demo model
TEST_API_KEY = "test-key-123"
# Small enough that several engines fit beside each other on a 24 GiB machine.
TEST_KV_CACHE_BYTES = 256 * 1024 * 1024
# The test servers' context window: the demo model's 4,096 positions stretched with vLLM's own
# --hf-overrides (its rotary embedding has no length limit; 32,768 tokens of KV take 32 MiB).
# Tests that cut a stream (a disconnect, a kill, a deadline, a reload under load) ask for
# ENDLESS_TOKENS, which no machine we run on generates within a test (about 100 s here): a
# stream of 3,000-4,000 tokens, "seconds long" on one machine, ended before the cut on a faster
# CI machine, and the tests failed.
TEST_CONTEXT = 32768
ENDLESS_TOKENS = TEST_CONTEXT - 512


def tokens_lasting(base_url: str, seconds: float, headers: dict[str, str] | None = None) -> int:
    """``max_tokens`` of a stream that lasts about ``seconds`` on this machine now, for tests
    whose streams must still run when something happens and then end by themselves (a drain).
    Measured on one answer alone, its prefill and HTTP included: the estimate errs short, so ask
    for more seconds than the test needs (streams sharing a batch run a little slower). The
    faster of two answers: a fresh server's first one ran 1.6 times slower (its template built,
    its first steps cold), and streams meant for 8 s ended in 5, before the test's signal."""
    probe = 256
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": probe, "ignore_eos": True}  # fmt: skip
    took = []
    for _ in range(2):
        started = time.perf_counter()
        r = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=120)
        r.raise_for_status()
        took.append(time.perf_counter() - started)
    rate = probe / min(took)
    return max(probe, min(ENDLESS_TOKENS, int(rate * seconds)))


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


async def _poll_fresh(
    client: httpx.AsyncClient, url: str, done: Callable[[httpx.Response], bool], timeout: float
) -> None:
    """GET ``url`` until ``done`` says yes. Each poll on a connection of its own (with several
    front ends, either may answer) and with a short timeout of its own: on a crowded machine one
    poll was once held for a whole 5 s deadline, while a poll asked again is answered."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                r = await client.get(url, headers={"Connection": "close"}, timeout=2)
                if done(r):
                    return
            except httpx.TimeoutException:
                pass
            await asyncio.sleep(0.02)


async def wait_not_ready(client: httpx.AsyncClient, base_url: str, timeout: float) -> float:
    """Poll ``/ready`` until it fails (503); return the seconds that took."""
    started = time.perf_counter()
    await _poll_fresh(client, f"{base_url}/ready", lambda r: r.status_code == 503, timeout)
    return time.perf_counter() - started


async def wait_running(client: httpx.AsyncClient, base_url: str, n: int, timeout: float) -> None:
    """Poll ``/metrics`` until the server runs at least ``n`` requests (summed over its front
    ends): the server's own word that streams are in flight.

    Drain tests send their signal on this, not on their client's first chunks: in three full
    runs the client saw its streams' first chunks only about when the server had sent them
    whole (whatever their length: 5, 8 or 12 s), and the signal came after the streams.
    """

    def running(r: httpx.Response) -> bool:
        return metric_value(r.text, "avatar_requests_running") >= n

    await _poll_fresh(client, f"{base_url}/metrics", running, timeout)


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
        "--hf-overrides", f'{{"max_position_embeddings": {TEST_CONTEXT}}}',
        "--max-model-len", str(TEST_CONTEXT),
        *extra,
    ]  # fmt: skip


# Windows wide enough for a loaded 2-core machine: the admission test must see the waiting request
# while it waits, and the running ones (ENDLESS_TOKENS long) must outlive the queue timeout before
# the deadline cuts them.
LIMITED_QUEUE_TIMEOUT_S = 5
LIMITED_REQUEST_DURATION_S = 9

# The flags of the server fixtures, by fixture name (tests/conftest.py, tests/e2e/conftest.py,
# tests/loadtest/test_soak.py): tests/conftest.py plans them, and starts each ahead of its first
# test.
SERVER_FIXTURES: dict[str, tuple[str, ...]] = {
    # Tools and structured output need the tool flags; plain chat is not parsed, so the same
    # server serves the chat, production, hostile-input and load-tool tests.
    "server": (
        "--api-key", TEST_API_KEY, "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
    ),
    # Admission limits and a deadline.
    "limited_server": (
        "--max-running-requests", "2", "--max-waiting-requests", "1",
        "--queue-timeout", str(LIMITED_QUEUE_TIMEOUT_S),
        "--max-request-duration", str(LIMITED_REQUEST_DURATION_S),
    ),
    # Also vLLM's own request bound at 1 (an engine flag passed through): its one other test
    # sends one request at a time (tests/e2e/test_tools_e2e.py); a server of its own would
    # cost the run another start.
    "reasoning_server": ("--reasoning-parser", "deepseek_r1", "--max-num-queued-reqs", "1"),
    # Room for 2 running and 2 waiting: the soak's bursts must draw 429s. No tool or reasoning
    # parser, no deadline: forced calls here take vLLM's generic JSON route
    # (tests/e2e/test_tools_e2e.py).
    "small_server": (
        "--max-running-requests", "2", "--max-waiting-requests", "2", "--api-key", TEST_API_KEY,
    ),
    # Priority decides in vLLM's own queue: one sequence at a time. The write timeout outlasts a
    # test process kept off the CPU: the endless answers are cut by the tests, not the server
    # (tests/e2e/test_slo_e2e.py).
    "slo_server": (
        "--scheduling-policy", "priority", "--max-num-seqs", "1", "--write-timeout", "600",
    ),
}  # fmt: skip

ServerKey = tuple[tuple[str, ...], tuple[tuple[str, str], ...]]


def server_key(extra: tuple[str, ...], env: dict[str, str] | None = None) -> ServerKey:
    return tuple(extra), tuple(sorted((env or {}).items()))


def _die_with_parent() -> None:
    """In the server, before exec: SIGTERM when the test process dies, however it dies (a
    server started ahead of its test must not outlive a killed run)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# Linux's autogroup scheduling (on where /proc/sys/kernel/sched_autogroup_enabled is 1, as on
# this project's machines) shares the CPU equally between sessions, and a server leads a session
# of its own: a process's nice value ranks it only inside its session. The session's own nice
# value, in /proc/PID/autogroup, is what ranks it against the tests and the other servers.
def _set_session_nice(pid: int | str, nice: int) -> None:
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))


def _in_the_background() -> None:
    """In a server started ahead of its test, before exec (after setsid): the lowest CPU
    priority, so that its start-up takes only what the running tests leave idle (a crowded
    machine once let a 3,000-token stream finish before a test could kill its engine)."""
    _die_with_parent()
    os.nice(19)
    _set_session_nice("self", 19)


def _to_the_foreground(proc: subprocess.Popen[bytes]) -> None:
    """Back to normal priority (the server leads its process group: engine core included), for
    its test. Raising a priority needs root; elsewhere it stays low, as its neighbours do."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PGRP, proc.pid, 0)
    _set_session_nice(proc.pid, 0)


@dataclass
class _Started:
    key: ServerKey
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    log_file: IO[bytes]


# The load harness's CPU environment (loadtest/servers.py says why). Without it two busy cores per
# running server, on a 2-core machine, held the test's own client off the CPU for seconds
# (request bodies took 1.7 s to arrive, streams were read only after they had ended).
ENGINE_ENV = CPU_ENGINE_ENV


def _start(log_path: Path, key: ServerKey, *, ahead: bool = False) -> _Started:
    """Start ``python -m serve`` on a free loopback port (returns at once)."""
    port = free_port()
    log_file = log_path.open("wb")
    extra, env = key
    preexec = _in_the_background if ahead else _die_with_parent
    proc = subprocess.Popen(
        server_command(port, *extra),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, **ENGINE_ENV, **dict(env)},
        start_new_session=True,
        preexec_fn=preexec if sys.platform == "linux" else None,
    )
    return _Started(key, proc, port, log_path, log_file)


@dataclass
class Planned:
    key: ServerKey
    last_user: str  # the test after which nobody will claim it


class ServerPool:
    """Servers started ahead of the tests that will use them, at most ``ahead`` at a time.

    An engine takes half a minute to start, most of it importing in three processes one after
    another. Started while earlier tests run, at the lowest CPU priority, it is ready when its
    test asks. ``running_server`` takes a started one with the same flags, or starts its own.
    Each server still serves exactly one ``running_server`` block, as if that block had started
    it. A planned server that its last user did not take (flags changed) is stopped then.
    """

    def __init__(self, log_dir: Path, plan: list[Planned], ahead: int) -> None:
        self.log_dir = log_dir
        self.plan = plan
        self.ahead = ahead
        self.next = 0
        self.waiting: list[tuple[Planned, _Started]] = []
        self.unused: list[Planned] = []

    def advance(self) -> None:
        """Start the next planned servers while fewer than ``ahead`` wait unclaimed."""
        if self.next < len(self.plan):
            DEMO_MODEL_DIR.parent.mkdir(parents=True, exist_ok=True)
            from serve.demo_model import ensure_built

            ensure_built(DEMO_MODEL_DIR)  # once, rather than by every server starting at once
        while self.next < len(self.plan) and len(self.waiting) < self.ahead:
            planned = self.plan[self.next]
            self.next += 1
            log_path = self.log_dir / f"server-{self.next}.log"
            self.waiting.append((planned, _start(log_path, planned.key, ahead=True)))

    def claim(self, key: ServerKey) -> _Started | None:
        found = None
        for entry in [e for e in self.waiting if e[0].key == key]:
            self.waiting.remove(entry)
            started = entry[1]
            if started.proc.poll() is None:
                _to_the_foreground(started.proc)
                found = started
                break
            started.log_file.close()  # died waiting: the test starts its own, and shows why
        self.advance()
        return found

    def finished(self, nodeid: str) -> None:
        """After a test: stop what it was the last to need and did not take."""
        for entry in [e for e in self.waiting if e[0].last_user == nodeid]:
            self.waiting.remove(entry)
            self._stop(entry)
        self.advance()

    def close(self) -> list[Planned]:
        """Stop the servers nobody claimed; return every planned server nobody took."""
        for entry in self.waiting:
            self._stop(entry)
        self.waiting = []
        return self.unused

    def _stop(self, entry: tuple[Planned, _Started]) -> None:
        planned, started = entry
        stop_process_group(started.proc)
        started.log_file.close()
        self.unused.append(planned)


POOL: ServerPool | None = None  # set by tests/conftest.py for a run that plans servers


@contextlib.contextmanager
def running_server(
    log_path: Path, *extra: str, ready_timeout: float = 240.0, env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    """Start ``python -m serve`` on a free loopback port (or take one the run started ahead with
    the same flags); stop it (SIGTERM, then SIGKILL) after."""
    key = server_key(extra, env)
    started = POOL.claim(key) if POOL is not None else None
    if started is None:
        started = _start(log_path, key)
    elif not log_path.exists():
        log_path.symlink_to(started.log_path)  # the log where the test keeps its files
    proc = started.proc
    server = ServerProcess(proc, f"http://127.0.0.1:{started.port}", started.log_path)
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()[-4000:]}")
            return httpx.get(f"{server.base_url}/ready", timeout=2).status_code == 200

        # This wait holds an async test's event loop on purpose: not a stall to report
        # (tests/e2e/conftest.py re-arms its watchdog once the loop runs again).
        faulthandler.cancel_dump_traceback_later()
        try:
            wait_until(ready, ready_timeout, interval=0.25, what="server readiness")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; where it waits:\n{_stacks(server)}") from None
        yield server
    finally:
        stop_process_group(proc)
        started.log_file.close()


def _stacks(server: ServerProcess) -> str:
    """The stacks of a server that never came ready: the server process and its front ends
    print them to the log on SIGUSR1 (serve.server.enable_stack_dumps)."""
    import psutil

    before = len(server.log())
    ours = [server.proc.pid]
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(server.proc.pid).children(recursive=True):
            if "APIServer" in " ".join(child.cmdline()):
                ours.append(child.pid)
    for pid in ours:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: server.log().count("Current thread") >= len(ours), 10, what="dumps")
    return server.log()[before:][-12000:]


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
