"""Several front ends (``serve/multiproc.py``): the limits split exactly, readiness waits for
every process, the parent's exit code survives a signal during its shutdown, and Ctrl-C reaches
the server process only. The real processes run in tests/e2e/test_multiproc_e2e.py."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from serve.app import create_app
from serve.engine.fake import FakeEngine
from serve.multiproc import Started, Supervisor, check_split, split_limit
from serve.settings import Settings
from tests.support import ROOT, wait_until
from tests.unit.conftest import make_settings, open_client


@pytest.mark.parametrize(("total", "count"), [(256, 2), (7, 3), (5, 5), (513, 4), (0, 3)])
def test_shares_add_up_to_the_server_wide_limit_and_differ_by_at_most_one(
    total: int, count: int
) -> None:
    shares = [split_limit(total, count, i) for i in range(count)]
    assert sum(shares) == total
    assert max(shares) - min(shares) <= 1


def test_more_processes_than_engine_slots_is_refused_at_start_up() -> None:
    with pytest.raises(SystemExit, match="--max-running-requests"):
        check_split(make_settings(api_server_count=4, max_running_requests=3))
    check_split(make_settings(api_server_count=4, max_running_requests=4))


async def test_ready_fails_until_every_front_end_serves(engine: FakeEngine) -> None:
    peers = [True, False]
    app: FastAPI = create_app(make_settings(), engine, peers_ready=lambda: all(peers))
    async with open_client(app) as client:
        r = await client.get("/ready")
        assert r.status_code == 503 and r.json()["error"]["code"] == "starting"
        peers[1] = True
        assert (await client.get("/ready")).status_code == 200


def _front_end_work(requests: int) -> None:
    from serve.telemetry import Metrics

    metrics = Metrics(multiprocess=True)
    metrics.requests.labels("chat", "200", "stop").inc(requests)
    metrics.running.set(requests)


def _scrape(out: multiprocessing.Queue[bytes]) -> None:
    from serve.telemetry import Metrics, render_latest

    out.put(render_latest(Metrics(multiprocess=True))[0])


def test_one_scrape_sums_every_front_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.support import metric_value

    # Spawned processes choose file-backed values at import, as the launcher's front ends do.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    ctx = multiprocessing.get_context("spawn")
    for requests in (3, 4):
        proc = ctx.Process(target=_front_end_work, args=(requests,))
        proc.start()
        proc.join(60)
        assert proc.exitcode == 0
    out: multiprocessing.Queue[bytes] = ctx.Queue()
    proc = ctx.Process(target=_scrape, args=(out,))
    proc.start()
    text = out.get(timeout=60).decode()
    proc.join(60)
    labels = {"endpoint": "chat", "status": "200", "finish_reason": "stop"}
    assert metric_value(text, "avatar_requests_total", **labels) == 7
    assert metric_value(text, "avatar_requests_running") == 7


# -- the parent: signals and exit codes (Supervisor), on small stand-in processes -----------


def _exit_at_once(code: int) -> None:
    sys.exit(code)


# What a stand-in front end shares with the test.
_SERVING, _DRAINING, _ENGINE_ALIVE, _MAY_EXIT = range(4)


def _front_end(flags: Any, drain_s: float = 0.0, exit_code: int = 0) -> None:
    """A stand-in front end: serves until SIGTERM, drains for ``drain_s``, exits; a second
    SIGTERM exits at once. Or, once the engine core has died and the test allows it, exits 1
    as a real one does."""
    termed = threading.Event()

    def on_term(signum: int, frame: object) -> None:
        if termed.is_set():
            os._exit(exit_code)  # the second SIGTERM, mid-drain
        termed.set()
        flags[_DRAINING] = 1

    signal.signal(signal.SIGTERM, on_term)
    flags[_SERVING] = 1
    # Woken by SIGTERM at once; between signals it watches the engine-death flag that the test
    # flips from another process (shared memory has nothing to wait on).
    while not termed.wait(0.01):
        if flags[_ENGINE_ALIVE] == 0 and flags[_MAY_EXIT] == 1:
            sys.exit(1)
    time.sleep(drain_s)  # the drain: a second SIGTERM ends it early (its handler exits)
    sys.exit(exit_code)


class _Processes:
    """vLLM's process managers as the supervisor uses them: .processes and .shutdown()."""

    def __init__(self, *procs: BaseProcess, on_shutdown: Callable[[], None] | None = None):
        self.processes = list(procs)
        self.on_shutdown = on_shutdown
        self.shut_down = False

    def shutdown(self, timeout: float) -> None:
        for proc in self.processes:
            if proc.is_alive():
                proc.terminate()
        if self.on_shutdown is not None:
            self.on_shutdown()
        for proc in self.processes:
            proc.join(timeout)
        self.shut_down = True


_CTX = multiprocessing.get_context("spawn")
Spawn = Callable[..., BaseProcess]


@pytest.fixture
def spawn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Spawn]:
    """Starts stand-in processes, and plays the parent: the supervisor installs process-wide
    signal handlers (pytest's are put back after) and marks front ends dead in the metric
    files. Whatever a failed test leaves running is killed."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    started: list[BaseProcess] = []

    def start(target: Callable[..., None], *args: object) -> BaseProcess:
        proc = _CTX.Process(target=target, args=args, daemon=True)
        proc.start()
        started.append(proc)
        return proc

    yield start
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    for proc in started:
        proc.kill()
        proc.join(10)


def _flags() -> Any:
    flags = _CTX.RawArray("b", 4)
    flags[_ENGINE_ALIVE] = 1
    return flags


def _serving(spawn: Spawn, flags: Any, *args: object) -> BaseProcess:
    """A stand-in front end, started and serving (its SIGTERM handler in place)."""
    proc = spawn(_front_end, flags, *args)
    wait_until(lambda: flags[_SERVING] == 1, 60, 0.01, "the stand-in serving")
    return proc


def _supervise(settings: Settings, parts: Started) -> tuple[Supervisor, Callable[[], int]]:
    supervisor = Supervisor(settings)
    supervisor.install_signal_handlers()

    def start(into: Started) -> None:  # what _start brings up, here ready-made
        for field in dataclasses.fields(Started):
            setattr(into, field.name, getattr(parts, field.name))

    return supervisor, lambda: supervisor.run(start)


def _wait_then(predicate: Callable[[], object], then: Callable[[], None]) -> threading.Thread:
    def run() -> None:
        wait_until(predicate, 30, 0.01, "the moment to act")
        then()

    helper = threading.Thread(target=run)
    helper.start()
    return helper


def test_a_signal_during_the_shutdown_after_a_death_still_exits_1(spawn: Spawn) -> None:
    """A front end died, so the exit is 1. The orchestrator's SIGTERM arriving while the parent
    stops the rest must neither turn it into 0 nor cut the cleanup short."""
    front = _Processes(
        spawn(_exit_at_once, 1),
        _serving(spawn, _flags(), 0.5),
        on_shutdown=lambda: os.kill(os.getpid(), signal.SIGTERM),
    )
    engine = _Processes(_serving(spawn, _flags()))
    parts = Started(sock=socket.socket(), engine_manager=engine, api=front, engine_alive=[1])
    supervisor, run = _supervise(make_settings(), parts)
    assert run() == 1
    assert supervisor.signals == 1, "the SIGTERM came during the shutdown"
    assert front.shut_down and engine.shut_down
    assert parts.sock is not None and parts.sock.fileno() == -1, "the cleanup ran to its end"


def test_a_signal_after_the_engine_core_died_still_exits_1(spawn: Spawn) -> None:
    """The engine core died; the SIGTERM arrives while the parent waits for the front ends to
    fail their requests and exit: still 1."""
    flags = _flags()
    front = _Processes(_serving(spawn, flags))
    engine = _Processes(spawn(_exit_at_once, 1))  # the engine core dies at once
    # The engine-alive flag the supervisor clears on the death is the stand-in's own.
    alive = _EngineFlag(flags)
    parts = Started(sock=socket.socket(), engine_manager=engine, api=front, engine_alive=alive)
    supervisor, run = _supervise(make_settings(engine_dead_exit_delay=0), parts)

    def signal_then_let_the_front_end_exit() -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # while the parent waits for the front ends
        flags[_MAY_EXIT] = 1

    helper = _wait_then(lambda: flags[_ENGINE_ALIVE] == 0, signal_then_let_the_front_end_exit)
    assert run() == 1
    helper.join()
    assert supervisor.signals == 1


class _EngineFlag:
    """``engine_alive[0] = 0`` as the supervisor writes it, landing in the stand-in's flags."""

    def __init__(self, flags: Any) -> None:
        self._flags = flags

    def __setitem__(self, index: int, value: int) -> None:
        self._flags[_ENGINE_ALIVE + index] = value

    def __getitem__(self, index: int) -> int:
        return int(self._flags[_ENGINE_ALIVE + index])


def _ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def test_one_signal_drains_and_exits_0_a_second_exits_at_once(spawn: Spawn) -> None:
    """Ctrl-C: the front ends drain (exit 0). Ctrl-C again: they stop at once, as one process
    does on its second signal."""
    flags = _flags()

    def second_ctrl_c_once_draining() -> None:
        wait_until(lambda: flags[_DRAINING] == 1, 30, 0.01, "the front end draining")
        _ctrl_c()

    front = _Processes(
        _serving(spawn, flags, 300.0),  # a drain far longer than the test
        on_shutdown=second_ctrl_c_once_draining,
    )
    engine = _Processes(_serving(spawn, _flags()))
    parts = Started(sock=socket.socket(), engine_manager=engine, api=front, engine_alive=[1])
    supervisor, run = _supervise(make_settings(), parts)
    helper = _wait_then(lambda: not supervisor._starting, _ctrl_c)
    began = time.monotonic()
    assert run() == 0
    helper.join()
    assert supervisor.signals == 2
    assert time.monotonic() - began < 20, "the second signal did not wait for the drain"


# -- Ctrl-C reaches the server process only --------------------------------------------------


def _report_mask_then_wait(out: Any) -> None:
    # What vLLM's engine core does: a SIGINT handler that would end the process.
    signal.signal(signal.SIGINT, lambda *_: os._exit(3))
    out.send(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))
    while True:
        signal.pause()  # until the test ends it


# Run in a fresh interpreter: its first spawn also starts multiprocessing's resource tracker,
# which unblocks SIGINT on its way out (as at the server's start-up).
_CTRL_C = """
import multiprocessing, os, signal
from serve.server import children_ignore_sigint
from tests.unit.test_multiproc import _report_mask_then_wait

ctx = multiprocessing.get_context("spawn")
reader, writer = ctx.Pipe(duplex=False)  # no lock: the tracker is not started before
with children_ignore_sigint():
    child = ctx.Process(target=_report_mask_then_wait, args=(writer,))
    child.start()
print("child blocks SIGINT:", reader.recv())
print("parent blocks SIGINT:", signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))
os.kill(child.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends to the whole group
child.join(1)
print("child alive after SIGINT:", child.exitcode is None)
child.terminate()  # the parent's order
child.join(30)
print("child exit code after SIGTERM:", child.exitcode)
"""


def test_processes_started_by_the_server_never_hear_ctrl_c() -> None:
    run = subprocess.run(
        [sys.executable, "-c", _CTRL_C], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.stdout.splitlines() == [
        "child blocks SIGINT: True",
        "parent blocks SIGINT: False",
        "child alive after SIGINT: True",
        f"child exit code after SIGTERM: {-signal.SIGTERM}",
    ], run.stdout + run.stderr
