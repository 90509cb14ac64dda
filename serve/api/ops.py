"""Models, health, readiness and metrics routes. Health, readiness and metrics stay open."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from serve.api.auth import Authenticated
from serve.api.errors import error_response
from serve.errors import APIError, unavailable
from serve.telemetry import render_latest

router = APIRouter()


@router.get("/v1/models")
@router.get("/models")
async def list_models(request: Request, _: Authenticated) -> JSONResponse:
    """The base model, then its personas (LoRA adapters) with ``parent`` naming the base."""
    return JSONResponse({"object": "list", "data": request.app.state.personas.cards()})


@router.get("/v1/models/{model:path}")
@router.get("/models/{model:path}")
async def show_model(request: Request, model: str, _: Authenticated) -> Response:
    """OpenAI's model object of one served name (a persona's ``root`` is its adapter, and
    ``parent`` its base model, as vLLM writes them); 404 ``model_not_found`` otherwise."""
    try:
        return JSONResponse(request.app.state.personas.card(model))
    except APIError as exc:
        return error_response(exc)


@router.get("/version")
async def version(request: Request) -> JSONResponse:
    """vLLM's route: the engine's version."""
    return JSONResponse({"version": request.app.state.engine.version})


@router.get("/load")
async def load(request: Request) -> JSONResponse:
    """vLLM's route: generation requests in this process, running or waiting for admission."""
    return JSONResponse({"server_load": request.app.state.admission.in_flight})


@router.get("/health")
async def health(request: Request) -> Response:
    """Liveness: the engine is alive. Fails once it has died, so the orchestrator restarts us."""
    if not request.app.state.engine.is_alive:
        return _unavailable("The engine is not running.", "engine_dead")
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> Response:
    """Readiness: the model is loaded and requests are being taken (not draining, not dead)."""
    state = request.app.state
    if not state.engine.is_alive:
        return _unavailable("The engine is not running.", "engine_dead")
    if state.admission.draining:
        return _unavailable("The server is draining.", "draining")
    if state.peers_ready is not None and not state.peers_ready():
        # Several front-end processes share the port: ready only when every one serves.
        return _unavailable("Not every front-end process is serving.", "starting")
    return JSONResponse({"status": "ready", "models": state.settings.served_model_names})


def _unavailable(message: str, code: str) -> Response:
    return error_response(unavailable(message, code))


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body, content_type = render_latest(request.app.state.metrics)
    return Response(body, media_type=content_type)
