"""The one error model and the one mapping from exception to status.

Every refusal is an ``APIError``: an HTTP status and OpenAI's
``{"error": {"message", "type", "param", "code"}}`` body. Lower layers raise their own domain
errors (the engine's ``EngineDeadError`` / ``EngineInputError``, admission's ``Refused``);
``to_api_error`` turns any exception into an ``APIError``, for a response and for an error frame
inside a stream alike, and ``error_json`` is the one place its body is written. Messages never
carry internal details. No web framework is imported here: this module sits below the HTTP layer.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import orjson

from serve.engine.base import (
    EngineBusyError,
    EngineDeadError,
    EngineInputError,
    EngineRequestError,
)

log = logging.getLogger("serve.errors")


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
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


RefusalReason = Literal["overload", "queue_timeout", "draining", "slo_unattainable", "slo_expired"]
# Refusals of a request's TTFT budget: 429, so that a client (or a gateway) retries elsewhere.
SLO_REFUSALS = ("slo_unattainable", "slo_expired")


class Refused(Exception):
    """Admission turned a request away: at capacity, waited too long, draining, or its TTFT
    budget cannot be met. ``retry_after``: seconds, for the header (default 1)."""

    def __init__(self, reason: RefusalReason, message: str, retry_after: str = "1") -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


def error_json(error: APIError) -> bytes:
    """The error body as bytes: the only serialization of an error, for HTTP and SSE."""
    return orjson.dumps(error.body())


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(
        404, f"The model `{model}` does not exist.", param="model", code="model_not_found"
    )


def unauthorized(message: str) -> APIError:
    return APIError(401, message, type="authentication_error", code="invalid_api_key")


def unavailable(message: str, code: str = "service_unavailable") -> APIError:
    return APIError(503, message, type="service_unavailable_error", code=code)


def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body exceeds {limit} bytes.", code="request_too_large")


def timed_out() -> APIError:
    return unavailable("The request exceeded the server's maximum duration.", "request_timeout")


def internal_error() -> APIError:
    return APIError(
        500, "The server had an internal error.", type="server_error", code="internal_error"
    )


def aborted() -> APIError:
    """The engine ended a request we did not end (it reports "abort"): not a normal finish."""
    return APIError(503, "The generation was aborted.", type="server_error", code="aborted")


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def to_api_error(exc: BaseException) -> APIError:
    """The single exception → status mapping."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineBusyError):
        # The operator's engine-side bound (vLLM's --max-num-queued-reqs): refused as our own
        # capacity bound refuses, with a status a voice platform retries on another replica.
        exc = Refused("overload", "The engine is at its request limit; retry shortly.")
    if isinstance(exc, Refused):
        if exc.reason == "overload" or exc.reason in SLO_REFUSALS:
            return APIError(
                429,
                str(exc),
                type="rate_limit_error",
                code="server_overloaded" if exc.reason == "overload" else exc.reason,
                headers={"Retry-After": exc.retry_after},
            )
        return unavailable(str(exc), exc.reason)
    if isinstance(exc, EngineDeadError):
        return unavailable("The model engine is not running; retry shortly.", "engine_dead")
    if isinstance(exc, EngineRequestError):
        return APIError(
            500,
            "The engine failed to finish this generation; retry the request.",
            type="server_error",
            code="engine_error",
        )
    if isinstance(exc, EngineInputError):
        message = "The engine rejected the request's input."
        if exc.public:
            message = str(exc).rstrip(".") + "."
        return invalid_request(message, param=exc.param, code="invalid_input")
    status = getattr(exc, "status_code", None)  # the framework's own HTTP errors (404, 405)
    if isinstance(status, int) and 400 <= status < 500:
        return APIError(status, str(getattr(exc, "detail", "")), code=_HTTP_CODES.get(status))
    # A stream's error frame comes here, past the request guard that logs the others: the
    # client is told nothing of the cause, so the log must be.
    log.error("unexpected error, answered as internal_error", exc_info=exc)
    return internal_error()


def reject_reason(error: APIError) -> str | None:
    """Why a request was refused before reaching the engine, for the rejected-requests counter."""
    if error.status == 401:
        return "auth"
    if error.status == 413:
        return "too_large"
    if error.status == 429:
        return error.code if error.code in SLO_REFUSALS else "overload"
    if error.status == 503 and error.code in ("draining", "queue_timeout"):
        return error.code
    if (400 <= error.status < 500 and error.status != 404) or error.code == "model_not_found":
        return "validation"
    return None
