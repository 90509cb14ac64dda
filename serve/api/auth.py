"""Bearer-key authentication, compared in constant time.

Two sets of keys: the API keys (chat, completions, models) and, optionally, admin keys for the
adapter routes (``--admin-api-key``), so the key given to an avatar platform cannot unload or
repoint a persona. With no API key the server runs open (and says so loudly at start-up); with
no admin key the adapter routes take the API keys, as before.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from serve.errors import APIError, unauthorized


class BearerAuth:
    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> None:
        if not self._keys:
            return
        if not authorization:
            raise unauthorized("Missing API key: send `Authorization: Bearer <key>`.")
        presented = _bearer_token(authorization)
        if presented is None:
            raise unauthorized("Malformed Authorization header: expected `Bearer <key>`.")
        if not self._matches(presented):
            raise unauthorized("Incorrect API key provided.")

    def accepts(self, authorization: str | None) -> bool:
        """Whether the header carries one of these keys (False when none is configured)."""
        presented = _bearer_token(authorization or "")
        return presented is not None and self._matches(presented)

    def _matches(self, presented: bytes) -> bool:
        # Compare against every key, without stopping early, so timing tells nothing.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(presented, key)
        return matched


def _bearer_token(authorization: str) -> bytes | None:
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip().encode()


def check_admin(auth: BearerAuth, admin: BearerAuth, authorization: str | None) -> None:
    """The adapter routes: an admin key when admin keys are configured, else an API key."""
    if not admin.enabled:
        auth.check(authorization)
        return
    if auth.accepts(authorization) and not admin.accepts(authorization):
        # A valid key without the right (OpenAI answers a key that lacks a scope with 401).
        raise APIError(
            401,
            "This API key may not load or unload adapters: use an admin key.",
            type="authentication_error",
            code="insufficient_permissions",
        )
    admin.check(authorization)


# Dependencies are async on purpose: FastAPI runs a plain `def` dependency in a worker thread,
# a thread hop per request before the first token.
async def require_api_key(request: Request) -> None:
    auth: BearerAuth = request.app.state.auth
    auth.check(request.headers.get("authorization"))


async def require_admin_key(request: Request) -> None:
    state = request.app.state
    check_admin(state.auth, state.admin_auth, request.headers.get("authorization"))


Authenticated = Annotated[None, Depends(require_api_key)]
AdminAuthenticated = Annotated[None, Depends(require_admin_key)]
