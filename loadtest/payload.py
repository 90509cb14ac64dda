"""The request body and headers, shared by the aiohttp client and the Locust user.

Kept free of aiohttp (and of anything heavy) so that the Locust file imports it under gevent.
"""

from __future__ import annotations

from typing import Any

from loadtest.workload import ChatRequest


def chat_payload(
    model: str, req: ChatRequest, *, ignore_eos: bool, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The request body; shared with the Locust user so both send the same thing.

    ``model`` is the client's model; a request that names its own (a persona adapter) wins.
    """
    payload: dict[str, Any] = {
        "model": req.model or model,
        "messages": req.messages,
        "max_tokens": req.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        payload["ignore_eos"] = True  # vLLM extension: decode exactly max_tokens tokens
    if extra:
        payload.update(extra)
    return payload


def auth_headers(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers
