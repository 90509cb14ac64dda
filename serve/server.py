"""One front end: the app over an engine, served by uvicorn until SIGTERM.

``python -m serve`` runs one in its own process (``serve_single``); with ``--api-server-count N``
each of N processes runs one over a shared engine core (``serve.multiproc``).

Shutdown sequence: on SIGTERM (or Ctrl-C) ``/ready`` fails at once and new generation requests
get 503; requests in flight run to completion for up to ``--drain-timeout`` seconds; then the
server closes and the process exits 0. A second signal exits at once. If the engine dies,
in-flight requests end with an error, ``/health`` and ``/ready`` fail, and after
``--engine-dead-exit-delay`` seconds the process exits 1 so the orchestrator restarts it; a
signal that arrives meanwhile, or while the engine shuts down, does not change that code.

Ctrl-C in a terminal sends SIGINT to the whole process group, and vLLM's engine core aborts
every request in flight on SIGINT: the processes this server starts are kept deaf to SIGINT
(``children_ignore_sigint``), so only this process hears it, drains, then stops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import logging
import multiprocessing.process
import multiprocessing.resource_tracker
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn

from serve.app import create_app
from serve.cli import DEMO_SERVED_NAME
from serve.engine.base import Engine
from serve.settings import Settings
from serve.telemetry import Metrics

log = logging.getLogger("serve")


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain before its own shutdown."""

    def __init__(self, config: uvicorn.Config, app_state: object, drain_timeout: float) -> None:
        super().__init__(config)
        self._state = app_state
        self._drain_timeout = drain_timeout
        self._draining = False
        self._drain_task: asyncio.Task[None] | None = None  # held: the loop keeps weak refs
        self.exit_code = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining:
            log.warning("second signal: exiting without waiting for requests in flight")
            self.force_exit = True
            self.should_exit = True
            return
        self._draining = True
        # uvicorn calls this from its signal handler, on the loop's thread but outside a task.
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        admission = self._state.admission  # type: ignore[attr-defined]
        admission.draining = True
        started = time.perf_counter()
        log.info(
            "draining: /ready now fails; waiting up to %.0f s for %d request(s) in flight",
            self._drain_timeout,
            admission.in_flight,
        )
        try:
            await asyncio.wait_for(admission.wait_idle(), self._drain_timeout)
            log.info("drained in %.2f s", time.perf_counter() - started)
        except TimeoutError:
            log.warning("drain timeout: %d request(s) still in flight are cut", admission.in_flight)
        self.should_exit = True

    def engine_died(self, delay: float) -> None:
        self.exit_code = 1

        def stop() -> None:
            log.critical("exiting so that the orchestrator restarts the server")
            self.should_exit = True

        asyncio.get_running_loop().call_later(delay, stop)


def _freeze_startup_heap() -> None:
    """Move everything allocated at start-up out of the garbage collector's sight.

    The model stack leaves ~600k tracked objects behind (torch, transformers, vLLM). A full
    collection walks them all: 250+ ms on a small CPU, during which no stream gets a token.
    Frozen, they are never walked again, and the collections that serving triggers only see
    the few objects requests allocate (measured here: 276 ms → under 1 ms).
    """
    gc.collect()
    gc.freeze()


def _announce(settings: Settings, engine: Engine, startup_s: float) -> None:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    base = f"http://{host}:{settings.port}/v1"
    model = settings.served_model_names[0]
    auth = ' -H "Authorization: Bearer $KEY"' if settings.api_key else ""
    log.info("engine ready in %.1f s; context window %d tokens", startup_s, engine.max_model_len)
    if model == DEMO_SERVED_NAME and settings.engine_args.get("served_model_name") == [model]:
        log.warning(
            "serving the built-in DEMO model (tiny, random weights): it answers gibberish. "
            "Serve a real model with --model <path or hub id>, e.g. "
            "python -m serve --model meta-llama/Llama-3.1-8B-Instruct"
        )
    if not settings.api_key:
        log.warning(
            "NO API KEY CONFIGURED: the server is open to anyone who can reach it. "
            "Set --api-key (or AVATAR_API_KEY) in production."
        )
    log.info("OpenAI base URL: %s  (model %r)", base, model)
    if settings.lora_modules:
        # A persona is asked for by name in `model`, exactly like the base model.
        names = ", ".join(m.name for m in settings.lora_modules)
        log.info("personas (send one as `model`): %s", names)
    log.info(
        "try: curl -N %s/chat/completions -H 'Content-Type: application/json'%s "
        '-d \'{"model": "%s", "stream": true, '
        '"messages": [{"role": "user", "content": "Hello!"}]}\'',
        base,
        auth,
        model,
    )


@contextlib.contextmanager
def children_ignore_sigint() -> Iterator[None]:
    """Processes started inside this block never receive SIGINT; this process still does.

    A terminal's Ctrl-C sends SIGINT to its whole foreground process group. vLLM's engine core
    takes SIGINT as an order to abort every request in flight and exit, and with
    ``--api-server-count`` each front end would start a drain of its own and then take the
    parent's SIGTERM as a second signal (exit at once). The server process alone must decide:
    it drains, then stops its children.

    A blocked signal stays blocked across fork and exec, and Python's ``signal.signal`` (which
    vLLM's processes use) does not unblock it, so a child started while SIGINT is blocked in
    the starting thread never sees one. The block lasts only while a process starts (vLLM
    starts its processes with ``multiprocessing``), so a Ctrl-C during the model load still
    stops this process at once. Children get SIGTERM from this process, as before.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signals only reach the main thread's handlers; nothing to keep from anyone
        return
    start = multiprocessing.process.BaseProcess.start

    def start_without_sigint(process: Any) -> None:
        # Starting the resource tracker (on the first spawn) unblocks SIGINT on its way out,
        # which would undo the block below: have it running first.
        multiprocessing.resource_tracker.ensure_running()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            start(process)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    multiprocessing.process.BaseProcess.start = start_without_sigint  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        multiprocessing.process.BaseProcess.start = start  # type: ignore[method-assign]


async def serve_single(settings: Settings) -> int:
    """Load the engine in this process (its core in a child process) and serve it."""
    from serve.engine.vllm_engine import VllmEngine

    started = time.perf_counter()
    with children_ignore_sigint():
        engine = VllmEngine.from_engine_args(settings.engine_args)
    return await serve_engine(settings, engine, time.perf_counter() - started)


async def serve_engine(
    settings: Settings,
    engine: Engine,
    startup_s: float,
    *,
    front_end: FrontEnd | None = None,
) -> int:
    """Serve ``engine`` until shutdown; the exit code (0 after a drain, 1 after engine death).

    ``front_end`` makes this one of several front-end processes: it brings the shared listening
    socket, the server class that accepts on it, the metrics mode and the readiness of peers.
    """
    server: DrainingServer | None = None

    def on_engine_dead() -> None:
        if server is not None:
            server.engine_died(settings.engine_dead_exit_delay)

    app = create_app(
        settings,
        engine,
        on_engine_dead=on_engine_dead,
        metrics=front_end.metrics if front_end else None,
        peers_ready=front_end.peers_ready if front_end else None,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http="httptools",
        lifespan="on",
        log_config=None,
        access_log=False,  # our middleware writes a structured access log
        timeout_graceful_shutdown=5,
    )
    server_cls = front_end.server_cls if front_end else DrainingServer
    server = server_cls(config, app.state, settings.drain_timeout)
    _freeze_startup_heap()
    if front_end is None or front_end.index == 0:
        _announce(settings, engine, startup_s)
    try:
        await server.serve(sockets=front_end.sockets if front_end else None)
    finally:
        # uvicorn has put the default handlers back: a SIGTERM now would kill the process
        # (exit 143) while the engine stops, whatever the code already decided.
        with _signals_noted("the server is already stopping"):
            await engine.shutdown()
    return server.exit_code


@contextlib.contextmanager
def _signals_noted(why: str) -> Iterator[None]:
    """SIGTERM and SIGINT only logged (flag-flip style) for the duration of the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def note(sig: int, frame: FrameType | None) -> None:
        log.warning("%s ignored: %s", signal.Signals(sig).name, why)

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class FrontEnd:
    """What a front end needs when it is one of several processes (``serve.multiproc``)."""

    index: int
    sockets: list[socket.socket]
    server_cls: type[DrainingServer]
    metrics: Metrics
    peers_ready: Callable[[], bool]


def enable_stack_dumps() -> None:
    """``kill -USR1 PID`` writes every thread's stack to stderr (the log): how an operator, or a
    test whose server never came ready, sees where a process waits."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
        stream=sys.stdout,
    )
