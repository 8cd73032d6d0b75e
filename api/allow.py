"""The `Allow` header of OPTIONS and 405 answers: every method the path has (RFC 9110).

Litestar answers OPTIONS, and a method the path lacks, from the one route object that
matched, which lists only the methods of the handlers registered with it: OPTIONS on
/api/keys said `GET, OPTIONS` though POST /api/keys exists. The middleware below puts
the methods of every handler of the path in OPTIONS answers; a 405 is raised while
routing, before any middleware, so api/app.py's error handler sets it there.
"""

from __future__ import annotations

import re

from litestar import Litestar
from litestar.enums import ScopeType
from litestar.routes import HTTPRoute
from litestar.types import ASGIApp, Message, Receive, Scope, Send


def _table(app: Litestar) -> list[tuple[re.Pattern[str], frozenset[str]]]:
    table: list[tuple[re.Pattern[str], frozenset[str]]] | None = getattr(app.state, "allow_table", None)
    if table is None:
        by_pattern: dict[str, set[str]] = {}
        for route in app.routes:
            if isinstance(route, HTTPRoute):
                # A `:path` parameter spans slashes (a model id like "org/name"); others do not.
                pattern = re.sub(r"\\\{[^}:]+:path\\\}", ".+", re.escape(route.path))
                pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", pattern)
                by_pattern.setdefault(pattern, set()).update(route.methods)
        table = [(re.compile(f"^{p}$"), frozenset(m)) for p, m in by_pattern.items()]
        app.state.allow_table = table
    return table


def allowed_methods(app: Litestar, path: str) -> list[str]:
    """Every method some handler serves on `path`, sorted."""
    return sorted({m for pattern, methods in _table(app) if pattern.match(path) for m in methods})


def full_allow_header(app: ASGIApp) -> ASGIApp:
    """ASGI middleware: OPTIONS answers carry the path's whole `Allow` (every other request
    passes straight through: nothing is added to the request path)."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or scope["method"] != "OPTIONS":
            await app(scope, receive, send)
            return

        async def send_allow(message: Message) -> None:
            if message["type"] == "http.response.start":
                methods = allowed_methods(scope["litestar_app"], scope["path"])
                if methods:
                    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"allow"]
                    headers.append((b"allow", ", ".join(methods).encode()))
                    message = {**message, "headers": headers}
            await send(message)

        await app(scope, receive, send_allow)

    return middleware
