"""POST /v1/chat/completions, /v1/completions, and the same without /v1 (avatar platforms are
configured both ways). Thin: parse the body, hand it to the service."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel
from starlette.responses import Response

from serve.api.auth import Authenticated
from serve.api.body import parse_body
from serve.protocol import ChatCompletionRequest, CompletionRequest
from serve.service import GenerationService
from serve.telemetry import RequestRecord

router = APIRouter()


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


@router.post(
    "/v1/chat/completions",
    openapi_extra=openapi_body(ChatCompletionRequest),
    summary="Chat completion (streaming with stream=true)",
)
@router.post("/chat/completions", openapi_extra=openapi_body(ChatCompletionRequest))
async def chat_completions(request: Request, service: Service, _: Authenticated) -> Response:
    record, request_id = _context(request)
    body = await parse_body(request, ChatCompletionRequest)
    prepared = await service.prepare_chat(body, record, request_id)
    return await service.respond(prepared, record)


@router.post(
    "/v1/completions",
    openapi_extra=openapi_body(CompletionRequest),
    summary="Text completion (streaming with stream=true)",
)
@router.post("/completions", openapi_extra=openapi_body(CompletionRequest))
async def completions(request: Request, service: Service, _: Authenticated) -> Response:
    record, request_id = _context(request)
    body = await parse_body(request, CompletionRequest)
    prepared = await service.prepare_completion(body, record, request_id)
    return await service.respond(prepared, record)
