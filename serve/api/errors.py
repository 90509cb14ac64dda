"""The one error model: OpenAI's ``{"error": {"message", "type", "param", "code"}}`` body, and the
one mapping from exception to HTTP status.

Everything the server refuses goes through ``APIError`` (or an engine error mapped below), so
every client sees the same shape whatever went wrong. Messages never carry internal details.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from serve.engine.base import EngineDeadError, EngineInputError
from serve.telemetry import METRICS


class APIError(Exception):
    """A refusal with an HTTP status and an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model `{model}` does not exist.",
        param="model",
        code="model_not_found",
    )


def unauthorized(message: str) -> APIError:
    return APIError(401, message, type="authentication_error", code="invalid_api_key")


def overloaded(message: str, retry_after_s: int) -> APIError:
    return APIError(
        429,
        message,
        type="rate_limit_error",
        code="server_overloaded",
        headers={"Retry-After": str(retry_after_s)},
    )


def unavailable(message: str, code: str = "service_unavailable") -> APIError:
    return APIError(503, message, type="service_unavailable_error", code=code)


def error_response(exc: APIError) -> Response:
    return Response(
        orjson.dumps(exc.body()),
        status_code=exc.status,
        media_type="application/json",
        headers=exc.headers,
    )


def to_api_error(exc: BaseException) -> APIError:
    """The single exception → status mapping, for responses and for in-stream error frames."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return unavailable("The model engine is not running; retry shortly.", "engine_dead")
    if isinstance(exc, EngineInputError):
        message = f"{exc}." if exc.public else "The engine rejected the request's input."
        return invalid_request(message, param=exc.param, code="invalid_input")
    if isinstance(exc, RequestValidationError):
        return _from_validation_errors(exc.errors())
    if isinstance(exc, StarletteHTTPException):
        return APIError(
            exc.status_code,
            str(exc.detail),
            type="invalid_request_error" if exc.status_code < 500 else "server_error",
            code=_HTTP_CODES.get(exc.status_code),
        )
    return APIError(
        500, "The server had an internal error.", type="server_error", code="internal_error"
    )


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def _from_validation_errors(errors: Any) -> APIError:
    first = next(iter(errors), None)
    if first is None:
        return invalid_request("Invalid request.")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = str(first.get("msg", "Invalid value"))
    if param:
        message = f"Invalid value for `{param}`: {message}"
    return invalid_request(message, param=param)


def reject_reason(error: APIError) -> str | None:
    """Why a request was refused before reaching the engine, for the rejected-requests counter."""
    if error.status == 401:
        return "auth"
    if error.status == 429:
        return "overload"
    if error.status == 503 and error.code in ("draining", "queue_timeout"):
        return error.code
    if (400 <= error.status < 500 and error.status != 404) or error.code == "model_not_found":
        return "validation"
    return None


def install_error_handlers(app: FastAPI) -> None:
    async def handle(request: Request, exc: Exception) -> Response:
        api_error = to_api_error(exc)
        reason = reject_reason(api_error)
        if reason is not None:
            METRICS.rejected.labels(reason).inc()
        return error_response(api_error)

    app.add_exception_handler(APIError, handle)
    app.add_exception_handler(RequestValidationError, handle)
    app.add_exception_handler(StarletteHTTPException, handle)
    app.add_exception_handler(EngineDeadError, handle)
    app.add_exception_handler(EngineInputError, handle)
    # Any other exception: the generic 500 body; RequestContextMiddleware logs it once.
    app.add_exception_handler(Exception, handle)
