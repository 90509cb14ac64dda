"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter: personas added and removed at runtime,
with vLLM's paths, bodies and plain-text success answers. Behind the admin keys
(--admin-api-key), or the API keys when no admin key is set; the key is checked before the body
is read. Off unless the server was started with --allow-runtime-lora-updating (404 then, as vLLM
has no such routes)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import PlainTextResponse

from serve.api.auth import AdminAuthenticated
from serve.api.body import parse_body
from serve.personas import Personas
from serve.protocol import LoadAdapterRequest, UnloadAdapterRequest

router = APIRouter()


@router.post("/v1/load_lora_adapter", summary="Load a persona adapter (runtime updates on)")
async def load_adapter(request: Request, _: AdminAuthenticated) -> PlainTextResponse:
    personas: Personas = request.app.state.personas
    personas.check_runtime_updates()  # off: 404 whatever the body
    body = await parse_body(request, LoadAdapterRequest)
    await personas.load(body.lora_name, body.lora_path, inplace=body.load_inplace)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", summary="Unload a persona adapter (runtime updates on)")
async def unload_adapter(request: Request, _: AdminAuthenticated) -> PlainTextResponse:
    personas: Personas = request.app.state.personas
    personas.check_runtime_updates()  # off: 404 whatever the body
    body = await parse_body(request, UnloadAdapterRequest)
    await personas.unload(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
