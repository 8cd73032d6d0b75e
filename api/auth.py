"""API-key authentication: `Authorization: Bearer <key>` (the OpenAI SDK's api_key)."""

from __future__ import annotations

import hashlib
import hmac

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from chatq.errors import Unauthorized


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """The accepted keys, held as digests and compared in constant time."""

    def __init__(self, keys: frozenset[str], *, required: bool) -> None:
        self._digests = [_digest(k) for k in keys]
        self.required = required

    def check(self, authorization: str | None) -> None:
        if not self.required:
            return
        if not authorization or not authorization.lower().startswith("bearer "):
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        given = _digest(authorization[7:].strip())
        if not any(hmac.compare_digest(given, d) for d in self._digests):
            raise Unauthorized("invalid API key")


def api_key_guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:  # type: ignore[type-arg]
    """Litestar guard for the chat and model routes."""
    keys: ApiKeys = connection.app.state.services.keys
    keys.check(connection.headers.get("authorization"))
