"""``--api-server-count N``: N front-end processes on one port, over one engine core.

vLLM's own machinery, as ``vllm serve --api-server-count`` uses it in the pinned release: the
parent binds the listening socket and the engine's ZMQ listeners, launches the engine core
headless (``launch_core_engines``), and starts the front ends with ``APIServerProcessManager``,
whose target we replace with our own (``_front_end_main``). Each front end is an ``AsyncLLM``
client with its client index and the engine's addresses, and accepts on the shared socket with
vLLM's least-loaded accept (``NoSignalServer`` with ``peer_loads``), so connections spread by
load rather than by which process woke first.

Decisions:
- Admission limits are split exactly: process i of N admits ``max_running // N`` requests,
  plus one while ``i < max_running % N`` (the waiting queue likewise), so the server as a whole
  never admits more than ``--max-running-requests``. Connections go to the least loaded process,
  which keeps the split fair.
- Metrics: prometheus_client's multiprocess mode; one scrape of any process shows the sum.
- ``/ready`` is true only while every front end serves (a shared flag per process).
- SIGTERM (or Ctrl-C) to the parent drains every front end (each runs the single-process
  drain), then the engine stops. The children never act on a terminal's SIGINT
  (``serve.server.children_ignore_sigint``; front ends ignore it): the front ends take their
  order from the parent, once, and the engine core does not abort what they are draining.
- If the engine core dies, each front end notices and exits 1 after
  ``--engine-dead-exit-delay``; if any front end dies, the rest are stopped. Either way the
  parent exits 1 so the orchestrator restarts the whole server, whatever signal arrives while
  it stops (``Supervisor``).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.connection
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from serve.settings import Settings

if TYPE_CHECKING:
    from serve.engine.vllm_engine import VllmEngine

log = logging.getLogger("serve")

# Past the drain, how long the parent gives front ends to exit before killing them.
_EXIT_GRACE_S = 10.0
# How often a front end reads the parent's engine-alive flag (the engine watch polls as often).
_ENGINE_FLAG_POLL_S = 0.25


@dataclass
class _FrontEndSpec:
    """Handed to every front-end process (pickled at spawn)."""

    settings: Settings
    ready: Any  # multiprocessing RawArray of N bytes: 1 while front end i serves
    engine_alive: Any  # RawArray of 1 byte: set to 0 by the parent when the engine core dies


def split_limit(total: int, count: int, index: int) -> int:
    """Front end ``index``'s exact share of a server-wide limit."""
    return total // count + (1 if index < total % count else 0)


def check_split(settings: Settings) -> None:
    """Refuse at start-up a process count that would leave a front end no engine slot."""
    if settings.max_running_requests < settings.api_server_count:
        raise SystemExit(
            f"--api-server-count {settings.api_server_count} needs --max-running-requests of at "
            f"least {settings.api_server_count} (got {settings.max_running_requests}): each "
            "front-end process admits its share of the limit."
        )


def serve_multi(settings: Settings) -> int:
    """Run the engine core and N front ends until SIGTERM or a death; the exit code."""
    from vllm.v1.metrics.prometheus import setup_multiprocess_prometheus

    check_split(settings)
    # Before any front end is spawned: they choose file-backed metric values at import.
    setup_multiprocess_prometheus()
    supervisor = Supervisor(settings)
    supervisor.install_signal_handlers()
    return supervisor.run(lambda started: _start(settings, started))


@dataclass
class Started:
    """What the start-up has brought up so far: what the shutdown stops."""

    sock: socket.socket | None = None
    engine_manager: Any = None  # vLLM's engine process manager: .processes, .shutdown(timeout)
    api: Any = None  # vLLM's APIServerProcessManager: .processes, .shutdown(timeout)
    engine_alive: Any = None  # the shared flag the front ends read
    # vLLM's listeners of the engine core's ZMQ connections (ipc paths). Held for the server's
    # life: once collected they unlink their paths, and an engine core that had not yet
    # connected then never reached a front end (a front end never ready, or one whose
    # requests and persona loads went unanswered: seen in 3 of 7 starts on a loaded machine).
    zmq_listeners: Any = None


def _start(settings: Settings, started: Started) -> None:
    import multiprocessing as mp

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.utils import bind_engine_zmq_listeners, launch_core_engines
    from vllm.v1.executor import Executor
    from vllm.v1.utils import APIServerProcessManager

    from serve.engine.vllm_engine import engine_config
    from serve.server import children_ignore_sigint

    count = settings.api_server_count
    args = AsyncEngineArgs(**settings.engine_args)
    args._api_process_count = count
    args._api_process_rank = -1
    vllm_config = engine_config(args)
    sock = started.sock = _listen(settings.host, settings.port)
    listen_address = f"http://{settings.host}:{settings.port}"
    ctx = mp.get_context("spawn")
    engine_alive = started.engine_alive = ctx.RawArray("b", [1])
    spec = _FrontEndSpec(settings, ctx.RawArray("b", count), engine_alive)
    listeners = started.zmq_listeners = bind_engine_zmq_listeners(vllm_config, count)
    began = time.perf_counter()
    with children_ignore_sigint(), launch_core_engines(
        vllm_config, Executor.get_class(vllm_config), not args.disable_log_stats,
        listeners.addresses,
    ) as launch:  # fmt: skip
        started.engine_manager = launch.engine_manager
        coordinator = launch.coordinator
        started.api = APIServerProcessManager(
            listen_address=listen_address,
            sock=sock,
            args=spec,  # type: ignore[arg-type]  # passed through to our target only
            num_servers=count,
            input_listeners=listeners.inputs,
            output_listeners=listeners.outputs,
            target_server_fn=_front_end_main,
            stats_update_address=(coordinator.get_stats_publish_address() if coordinator else None),
            tensor_queue=launch.tensor_queue,
        )
        launch.watched_frontend_processes = started.api.processes
    log.info(
        "engine core up in %.1f s; %d front-end processes on %s",
        time.perf_counter() - began,
        count,
        listen_address,
    )


class Supervisor:
    """The parent process: watches the front ends and the engine core, decides the exit code.

    Signals are flag flips, as uvicorn's are: a handler counts the signal and wakes the watch,
    and never raises into a shutdown under way. The exit code is 1 once anything died (or a
    front end failed its drain), whatever signal comes after; a signal only asks for a stop.
    A second signal makes every front end exit at once (their own second signal). Only the
    start-up, which waits inside vLLM, is interrupted by the first signal (exit 0).
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.signals = 0
        self.failed = False
        self._starting = True
        self._front_ends: list[Any] = []
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_write.setblocking(False)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.on_signal)

    def on_signal(self, signum: int, frame: object) -> None:
        self.signals += 1
        if self._starting:
            if self.signals == 1:
                raise SystemExit(0)  # vLLM's start-up loops know nothing of our flags
            return
        name = signal.Signals(signum).name
        if self.signals == 1:
            log.info("%s: every front end drains, then the engine core stops", name)
            with contextlib.suppress(OSError):
                self._wake_write.send(b"\0")
            return
        log.warning("second signal (%s): front ends exit without waiting for requests", name)
        for proc in self._front_ends:
            if proc.is_alive():
                proc.terminate()

    def run(self, start: Callable[[Started], None]) -> int:
        """Start (filling ``Started`` as processes come up), watch, stop; the exit code."""
        started = Started()
        try:
            start(started)
            self._front_ends = list(started.api.processes)
            self._starting = False
            self._watch(started)
        except SystemExit:
            pass  # a signal during the start-up: stop what started
        except BaseException:
            self.failed = True
            raise
        finally:
            self._starting = False  # from here on a signal never interrupts the cleanup
            self._stop(started)
            self._wake_read.close()
            self._wake_write.close()
        return self.exit_code

    def _watch(self, started: Started) -> None:
        """Block until a signal, or until a front end or the engine core exits."""
        front = {proc.sentinel: proc for proc in self._front_ends}
        engines = {p.sentinel for p in started.engine_manager.processes}
        ended = multiprocessing.connection.wait([*front, *engines, self._wake_read])
        dead = [front[s] for s in ended if s in front]
        if dead:
            self.failed = True
            log.critical(
                "front-end process %s exited (code %s): stopping the server",
                dead[0].name,
                dead[0].exitcode,
            )
        elif any(s in engines for s in ended):
            self.failed = True
            # Front ends do not own the engine core, so they learn of its death from us; each
            # then fails its requests and probes, and exits 1 after --engine-dead-exit-delay.
            log.critical("the engine core has died: front ends exit, then the server exits 1")
            started.engine_alive[0] = 0
            delay = self._settings.engine_dead_exit_delay + _EXIT_GRACE_S
            deadline = time.monotonic() + delay
            for proc in self._front_ends:
                proc.join(max(0.0, deadline - time.monotonic()))

    def _stop(self, started: Started) -> None:
        from prometheus_client import multiprocess as prom_mp

        if started.api is not None:
            self._front_ends = list(started.api.processes)
            # SIGTERM to each front end: each drains its own requests in flight.
            started.api.shutdown(timeout=self._settings.drain_timeout + _EXIT_GRACE_S)
            for proc in self._front_ends:
                if proc.exitcode not in (0, None):
                    self.failed = True  # died, failed its drain, or was killed past the grace
                if proc.pid is not None:
                    prom_mp.mark_process_dead(proc.pid)
        if started.engine_manager is not None:
            started.engine_manager.shutdown(timeout=_EXIT_GRACE_S)
        if started.zmq_listeners is not None:
            started.zmq_listeners.cleanup()  # closes them and removes their ipc paths
        if started.sock is not None:
            started.sock.close()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _front_end_main(
    listen_address: str, sock: socket.socket, spec: _FrontEndSpec, client: dict[str, Any]
) -> None:
    """The entry point of front-end process ``client["client_index"]`` (spawned)."""
    # A terminal's Ctrl-C is the parent's to relay (as SIGTERM, once). SIGINT arrives blocked,
    # as in every process the server starts; a front end, ours to write, ignores it outright
    # instead of running with a signal blocked for its whole life.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    from vllm.utils.system_utils import set_process_title

    from serve.server import configure_logging, enable_stack_dumps

    index = int(client["client_index"])
    set_process_title("APIServer", str(index))
    settings = spec.settings
    configure_logging(settings.log_level)
    enable_stack_dumps()
    count = settings.api_server_count
    # Each process admits its exact share, so the server as a whole keeps the configured limits.
    settings = settings.model_copy(
        update={
            "max_running_requests": split_limit(settings.max_running_requests, count, index),
            "max_waiting_requests": split_limit(settings.max_waiting_requests, count, index),
        }
    )
    import uvloop

    sys.exit(uvloop.run(_run_front_end(settings, sock, spec, index, dict(client))))


async def _run_front_end(
    settings: Settings, sock: socket.socket, spec: _FrontEndSpec, index: int, client: dict[str, Any]
) -> int:
    import asyncio

    from vllm.engine.arg_utils import AsyncEngineArgs

    from serve.engine.vllm_engine import VllmEngine, engine_config
    from serve.server import FrontEnd, serve_engine
    from serve.telemetry import Metrics

    peer_loads = client.pop("api_server_loads", None)
    args = AsyncEngineArgs(**settings.engine_args)
    args._api_process_count = settings.api_server_count
    args._api_process_rank = index
    started = time.perf_counter()
    engine = VllmEngine.from_engine_args(
        settings.engine_args, vllm_config=engine_config(args), client=client
    )
    ready = spec.ready
    front_end = FrontEnd(
        index=index,
        sockets=[sock],
        server_cls=_peer_server_class(peer_loads, index, ready),
        metrics=Metrics(multiprocess=True),
        peers_ready=lambda: all(ready),
    )
    watch = asyncio.create_task(_watch_engine_flag(spec.engine_alive, engine))
    try:
        return await serve_engine(
            settings, engine, time.perf_counter() - started, front_end=front_end
        )
    finally:
        watch.cancel()


async def _watch_engine_flag(engine_alive: Any, engine: VllmEngine) -> None:
    import asyncio

    while engine_alive[0]:  # noqa: ASYNC110 - a flag in shared memory has no waiter to await
        await asyncio.sleep(_ENGINE_FLAG_POLL_S)
    engine.engine_core_died()


def _peer_server_class(peer_loads: Any, index: int, ready: Any) -> type[Any]:
    """Our draining server, accepting on the shared socket as vLLM's front ends do."""
    import uvicorn
    from vllm.entrypoints.launchers.launcher import NoSignalServer

    from serve.server import DrainingServer

    class PeerServer(DrainingServer, NoSignalServer):
        # NoSignalServer leaves signals to its caller; ours drains on SIGTERM, so keep
        # uvicorn's own signal capture (DrainingServer.handle_exit is the handler).
        capture_signals = uvicorn.Server.capture_signals

        def __init__(self, config: Any, app_state: Any, drain_timeout: float) -> None:
            super().__init__(config, app_state, drain_timeout)
            self.peer_loads = (peer_loads, index) if peer_loads is not None else None

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            ready[index] = 1 if self.started else 0

        def handle_exit(self, sig: int, frame: Any) -> None:
            if sig == signal.SIGINT:
                return  # Ctrl-C: the parent relays it as SIGTERM (uvicorn would listen)
            ready[index] = 0
            super().handle_exit(sig, frame)

        def engine_died(self, delay: float) -> None:
            ready[index] = 0
            super().engine_died(delay)

    return PeerServer
