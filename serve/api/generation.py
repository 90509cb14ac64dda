"""POST /v1/chat/completions, /v1/completions, and the same without /v1 (avatar platforms are
configured both ways). Thin: parse the headers and the body, hand them to the service.

Two headers steer admission: ``x-slo-ttft-ms``, the request's time-to-first-token budget in
milliseconds (the name llm-d's predicted-latency routing reads, so a gateway and this server
agree), and ``X-Vllm-Priority`` (vLLM's own header; it wins over the body's ``priority``). A
malformed value is a 400 naming the header: a deadline or priority silently dropped would be
found only under load.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel
from starlette.responses import Response

from serve.api.auth import Authenticated
from serve.api.body import parse_body
from serve.errors import invalid_request
from serve.protocol import ChatCompletionRequest, CompletionRequest
from serve.request_record import RequestRecord
from serve.service import GenerationService

router = APIRouter()

# ASGI header names are lower-case bytes.
SLO_HEADER = b"x-slo-ttft-ms"
PRIORITY_HEADER = b"x-vllm-priority"
MAX_BUDGET_MS = 3_600_000  # an hour: past it a budget is surely a unit mistake
_INT = re.compile(r"^\s*[+-]?[0-9]{1,19}\s*$")
_INT64 = 2**63


def openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """An ``openapi_extra`` that documents a body the route parses itself (to control errors)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema}},
        }
    }


async def get_service(request: Request) -> GenerationService:
    # async: a plain `def` dependency would cost a worker-thread hop per request.
    service: GenerationService = request.app.state.service
    return service


Service = Annotated[GenerationService, Depends(get_service)]


def _context(request: Request) -> tuple[RequestRecord, str]:
    return request.state.record, request.state.request_id


def _hints(request: Request) -> tuple[float | None, int | None]:
    """The request's TTFT budget in seconds and its priority, from the headers (None: absent).
    One pass over the raw headers: a request with neither pays a scan of its headers."""
    budget = priority = None
    for key, value in request.scope["headers"]:
        if key == SLO_HEADER:
            budget = _budget(value.decode("latin-1"))
        elif key == PRIORITY_HEADER:
            priority = _priority(value.decode("latin-1"))
    return budget, priority


def _budget(raw: str) -> float:
    try:
        ms = float(raw)
    except ValueError:
        ms = math.nan
    if not 0 < ms <= MAX_BUDGET_MS:  # NaN fails too
        raise invalid_request(
            f"The {SLO_HEADER.decode()} header is a time-to-first-token budget in milliseconds, "
            f"more than 0 and at most {MAX_BUDGET_MS}; got {raw[:40]!r}.",
            param=SLO_HEADER.decode(),
            code="invalid_value",
        )
    return ms / 1000


def _priority(raw: str) -> int:
    if not _INT.match(raw) or not -_INT64 <= int(raw) < _INT64:
        raise invalid_request(
            f"The {PRIORITY_HEADER.decode()} header is an integer (lower is served earlier); "
            f"got {raw[:40]!r}.",
            param=PRIORITY_HEADER.decode(),
            code="invalid_value",
        )
    return int(raw)


@router.post(
    "/v1/chat/completions",
    openapi_extra=openapi_body(ChatCompletionRequest),
    summary="Chat completion (streaming with stream=true)",
)
@router.post("/chat/completions", openapi_extra=openapi_body(ChatCompletionRequest))
async def chat_completions(request: Request, service: Service, _: Authenticated) -> Response:
    record, request_id = _context(request)
    budget, priority = _hints(request)
    body = await parse_body(request, ChatCompletionRequest)
    prepared = await service.prepare_chat(body, record, request_id, budget, priority)
    return await service.respond(prepared, record)


@router.post(
    "/v1/completions",
    openapi_extra=openapi_body(CompletionRequest),
    summary="Text completion (streaming with stream=true)",
)
@router.post("/completions", openapi_extra=openapi_body(CompletionRequest))
async def completions(request: Request, service: Service, _: Authenticated) -> Response:
    record, request_id = _context(request)
    budget, priority = _hints(request)
    body = await parse_body(request, CompletionRequest)
    prepared = await service.prepare_completion(body, record, request_id, budget, priority)
    return await service.respond(prepared, record)
