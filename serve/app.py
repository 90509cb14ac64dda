"""``create_app(settings, engine)``: the FastAPI application around one shared engine.

The engine is built (and the model loaded) before the app serves, so a listening port means a
servable model. The lifespan watches the engine: if it dies, ``on_engine_dead`` is called once
(the CLI exits the process non-zero after a grace period so the orchestrator restarts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp

from serve import __version__
from serve.admission import Admission
from serve.admission_predictor import WaitPredictor
from serve.api import adapters, generation, ops
from serve.api.auth import BearerAuth
from serve.api.errors import install_error_handlers
from serve.api.middleware import RequestGuard
from serve.engine.base import Engine
from serve.personas import Personas
from serve.service import GenerationService
from serve.settings import Settings
from serve.telemetry import Metrics

log = logging.getLogger(__name__)
ENGINE_WATCH_INTERVAL_S = 0.25
METRICS_REFRESH_INTERVAL_S = 1.0
LOOP_LAG_INTERVAL_S = 0.05


def create_app(
    settings: Settings,
    engine: Engine,
    *,
    on_engine_dead: Callable[[], None] | None = None,
    metrics: Metrics | None = None,
    peers_ready: Callable[[], bool] | None = None,
) -> FastAPI:
    """The app; it owns its metric families (``metrics``, a fresh set by default).

    ``peers_ready``: with several front-end processes, whether every one of them serves;
    ``/ready`` fails until it does.
    """
    metrics = metrics if metrics is not None else Metrics()
    personas = Personas(engine, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await personas.start()  # --lora-modules: a persona that cannot load fails the start
        watch = asyncio.create_task(_watch_engine(engine, on_engine_dead))
        refresh = asyncio.create_task(_refresh_metrics(metrics)) if metrics.multiprocess else None
        lag = asyncio.create_task(_watch_loop_lag(metrics))
        try:
            yield
        finally:
            watch.cancel()
            lag.cancel()
            app.state.service.close()
            if refresh is not None:
                refresh.cancel()

    app = _App(
        title="avatar-llm-serve",
        version=__version__,
        summary="OpenAI-compatible streaming for real-time avatars",
        lifespan=lifespan,
    )
    admission = Admission(
        settings.max_running_requests,
        settings.max_waiting_requests,
        settings.queue_timeout,
        metrics,
        WaitPredictor(_seats(settings, engine)),
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.admission = admission
    app.state.auth = BearerAuth(settings.api_key)
    app.state.admin_auth = BearerAuth(settings.admin_api_key)
    app.state.personas = personas
    app.state.service = GenerationService(engine, settings, admission, personas)
    app.state.metrics = metrics
    app.state.peers_ready = peers_ready
    metrics.bind_engine(engine)

    app.include_router(generation.router)
    app.include_router(ops.router)
    app.include_router(adapters.router)
    install_error_handlers(app, metrics)
    app.guard = partial(
        RequestGuard,
        metrics=metrics,
        auth=app.state.auth,
        max_body_bytes=settings.max_body_bytes,
        max_request_duration=settings.max_request_duration,
        write_timeout=settings.write_timeout,
    )
    _hoist_schema_defs(app)
    return app


def _seats(settings: Settings, engine: Engine) -> int:
    """Requests this front end can have running in the engine at once: its admission limit, or
    its share of the engine's batch (--max-num-seqs) when that is smaller. Past it a request
    waits for a seat, in our queue or the engine's, and the predictor must count that wait."""
    seats = settings.max_running_requests
    if engine.max_num_seqs is not None:
        seats = min(seats, max(1, engine.max_num_seqs // settings.api_server_count))
    return seats


class _App(FastAPI):
    """FastAPI with the request guard outside every other middleware.

    Outermost, the guard sees the server's own ``send``: it times the first byte where it
    really leaves, and the stream can write its frames without passing through the framework's
    send wrappers once per token (they only watch the response start and end).
    """

    guard: Callable[[ASGIApp], ASGIApp] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        return self.guard(stack) if self.guard is not None else stack


async def _watch_engine(engine: Engine, on_dead: Callable[[], None] | None) -> None:
    # Polled: the engine offers no death callback, and a quarter second is fast enough for
    # an orchestrator that probes every few seconds.
    while engine.is_alive:  # noqa: ASYNC110
        await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)
    log.critical("the engine has died: liveness and readiness now fail")
    if on_dead is not None:
        on_dead()


async def _watch_loop_lag(metrics: Metrics) -> None:
    # At overload a refusal took 15 ms (p99) in our handler and 147 ms at the client: the rest
    # is the wait for this loop, which only a timer sees (BENCHMARKS.md).
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + LOOP_LAG_INTERVAL_S
        await asyncio.sleep(LOOP_LAG_INTERVAL_S)
        metrics.loop_lag.observe(max(0.0, loop.time() - due))


async def _refresh_metrics(metrics: Metrics) -> None:
    # Several front ends: engine gauges are written to the shared files, not read at scrape.
    while True:
        metrics.refresh()
        await asyncio.sleep(METRICS_REFRESH_INTERVAL_S)


def _hoist_schema_defs(app: FastAPI) -> None:
    """Request bodies are documented through ``openapi_extra``; move their ``$defs`` into
    ``components/schemas`` so that the OpenAPI document is valid and self-contained."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                content = operation.get("requestBody", {}).get("content", {})
                body_schema = content.get("application/json", {}).get("schema", {})
                components.update(body_schema.pop("$defs", {}))
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
