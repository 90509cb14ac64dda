"""Bearer-key authentication, compared in constant time.

With no key configured the server runs open (and says so loudly at start-up).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from serve.errors import unauthorized


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
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("Malformed Authorization header: expected `Bearer <key>`.")
        presented = token.strip().encode()
        # Compare against every key, without stopping early, so timing tells nothing.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(presented, key)
        if not matched:
            raise unauthorized("Incorrect API key provided.")


# Dependencies are async on purpose: FastAPI runs a plain `def` dependency in a worker thread,
# a thread hop per request before the first token.
async def require_api_key(request: Request) -> None:
    auth: BearerAuth = request.app.state.auth
    auth.check(request.headers.get("authorization"))


Authenticated = Annotated[None, Depends(require_api_key)]
