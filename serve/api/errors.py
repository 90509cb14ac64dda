"""Errors on the wire: the HTTP response (or raw ASGI messages) for an ``APIError``, and the
framework's exception handlers. The error model and the mapping live in ``serve.errors``."""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Send

from serve.engine.base import EngineDeadError, EngineInputError
from serve.errors import APIError, Refused, error_json, reject_reason, to_api_error
from serve.telemetry import Metrics


def error_response(error: APIError) -> Response:
    return Response(
        error_json(error),
        status_code=error.status,
        media_type="application/json",
        headers=error.headers,
    )


async def send_error(send: Send, error: APIError) -> None:
    """The same response as ``error_response``, for middleware that speaks ASGI directly."""
    headers = [(b"content-type", b"application/json")]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": error_json(error), "more_body": False})


def count_refusal(metrics: Metrics, error: APIError) -> None:
    reason = reject_reason(error)
    if reason is not None:
        metrics.rejected.labels(reason).inc()


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    async def handle(request: Request, exc: Exception) -> Response:
        error = to_api_error(exc)
        count_refusal(metrics, error)
        return error_response(error)

    # Bodies are parsed by the routes themselves (serve.api.body), so FastAPI's own request
    # validation never runs; routing errors (404, 405) come as Starlette's HTTPException.
    # Each expected class is named: a handler for `Exception` alone would answer, then re-raise.
    for expected in (APIError, Refused, EngineDeadError, EngineInputError, StarletteHTTPException):
        app.add_exception_handler(expected, handle)
    # Anything else: the generic 500 body; the request guard logs it once.
    app.add_exception_handler(Exception, handle)
