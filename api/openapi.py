"""The HTTP API's OpenAPI 3.1 document, served at /schema/openapi.json (a page at /schema).

Litestar builds the paths, parameters and operation ids from the route handlers. The
handlers read their bodies themselves (so that every malformed body is a 400 naming the
field, and the body deadline and size limit apply), so each one says what it reads in its
`opt`: `body` (the msgspec Struct), `body_optional`, `admin` (an admin's token or key
only), `generates` (it queues a job: rate limits and queue bounds apply, the answer may
stream), `media` (what a success answers in, if not JSON). From those this module adds
the request bodies, the bearer security, and the error responses each route can give,
all in the standard error body.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Litestar, Request, Response, Router
from litestar.exceptions import NotFoundException
from litestar.handlers import HTTPRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, ScalarRenderPlugin
from litestar.routes import HTTPRoute
from litestar.utils import ensure_async_callable

from api.auth import authenticated
from chatq.errors import ErrorBody

_REF = "#/components/schemas/{name}"
_json = msgspec.json.Encoder()

# What each error status means on this API (chatq/errors.py holds the codes).
_ERRORS = {
    "400": (
        "The request cannot be served as sent: a field, a parameter or the JSON (`param` names it), "
        "or the operator's rules (`content_policy`, `system_prompt_locked`)"
    ),
    "401": "No credentials, or a login token or API key that is not (or no longer) valid",
    "403": "The caller's role may not do this",
    "404": "No such thing, or one that belongs to someone else",
    "405": "The path exists but not with this method",
    "408": "The request's head or body did not arrive in time",
    "409": "A conflict: a taken name, a conversation still answering, a switch under way",
    "413": "The body is larger than this server (or one queued job) accepts",
    "429": "A rate limit or the queue is full; `Retry-After` says when to try again",
    "500": "An error of chatq's own",
    "502": "The stream from the worker broke",
    "503": "A service chatq needs (NATS, PostgreSQL, Redis) is unreachable",
    "504": "No answer before the request's deadline",
}


def _is_protected(handler: HTTPRouteHandler) -> bool:
    return authenticated in handler.resolve_guards()


def _error_codes(handler: HTTPRouteHandler, path: str, method: str) -> list[str]:
    opt = handler.opt
    codes = {"400", "405", "500"}
    if "{" in path or method in {"PATCH", "DELETE"}:
        codes.add("404")
    if opt.get("body") is not None:
        codes |= {"408", "413"}
    if _is_protected(handler):
        codes |= {"401", "403", "503"}
    if method in {"POST", "PATCH", "PUT", "DELETE"}:
        codes.add("409")
    if opt.get("generates"):
        codes |= {"401", "404", "429", "502", "503", "504"}
    if path == "/api/auth/login":
        codes |= {"401", "429", "503"}
    if path == "/health":
        codes.add("503")  # a service chatq needs is down
    return sorted(codes)


def _operations(app: Litestar) -> dict[tuple[str, str], HTTPRouteHandler]:
    found: dict[tuple[str, str], HTTPRouteHandler] = {}
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler in route.route_handlers:
            for method in handler.http_methods:
                found[(route.path_format, method.lower())] = handler
    return found


def build(app: Litestar, litestar_schema: dict[str, Any]) -> dict[str, Any]:
    """The whole document, as JSON-ready data: Litestar's, completed from the handlers' opt."""
    doc: dict[str, Any] = msgspec.json.decode(_json.encode(litestar_schema))  # a deep copy
    handlers = _operations(app)
    bodies = {h.opt["body"] for h in handlers.values() if h.opt.get("body") is not None}
    structs = sorted(bodies, key=lambda t: t.__name__)
    (error_ref, *body_refs), defs = msgspec.json.schema_components([ErrorBody, *structs], ref_template=_REF)
    refs = dict(zip(structs, body_refs, strict=True))
    components = doc.setdefault("components", {})
    components.setdefault("schemas", {}).update(defs)
    components["securitySchemes"] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "A login token (POST /api/auth/login) or an API key (`sk-…`)",
        }
    }
    for path, item in doc.get("paths", {}).items():
        for method, operation in item.items():
            handler = handlers.get((path, method))
            if handler is None:
                continue
            opt = handler.opt
            if _is_protected(handler):
                operation["security"] = [{"bearer": []}]
                if opt.get("admin"):
                    operation["description"] = (operation.get("description", "") + "\n\nAdmin only.").strip()
            if (body := opt.get("body")) is not None:
                required = not opt.get("body_optional", False)
                content = {"application/json": {"schema": refs[body]}}
                operation["requestBody"] = {"required": required, "content": content}
            responses = operation.setdefault("responses", {})
            for code, response in responses.items():
                # The handlers encode their answers themselves (Response[bytes]): the body is
                # described in the docs and the handler's docstring, not as a schema here.
                if code.startswith("2") and code != "204":
                    media = opt.get("media", ["application/json"])
                    response["content"] = {kind: {"schema": {}} for kind in media}
            for code in _error_codes(handler, path, method.upper()):
                responses.setdefault(code, {"description": _ERRORS[code]})
                responses[code]["content"] = {"application/json": {"schema": error_ref}}
    return doc


class _Document(JsonRenderPlugin):
    """/schema/openapi.json: the completed document, built once per app."""

    def render(self, request: Request, openapi_schema: dict[str, Any]) -> bytes:  # type: ignore[type-arg]
        app = request.app
        cached: bytes | None = getattr(app.state, "openapi_json", None)
        if cached is None:
            cached = _json.encode(build(app, openapi_schema))
            app.state.openapi_json = cached
        return cached

    def receive_router(self, router: Router) -> None:
        # Litestar answers an unknown page under /schema with an HTML 404 of its own;
        # raised instead, it gets the standard error body like every other 404.
        router.after_request = ensure_async_callable(_standard_not_found)


def _standard_not_found(response: Response) -> Response:  # type: ignore[type-arg]
    if response.status_code == 404:
        raise NotFoundException("there is no such page under /schema")
    return response


def config(version: str) -> OpenAPIConfig:
    """Litestar's OpenAPI wiring: the interactive page (Scalar, from its CDN) and the JSON."""
    return OpenAPIConfig(
        title="chatq",
        version=version,
        description="chatq's HTTP API: OpenAI-compatible /v1, the chat page's /api. "
        'Every error has the body `{"error": {"type", "code", "message", "request_id"}}`.',
        path="/schema",
        render_plugins=[ScalarRenderPlugin(path="/"), _Document()],
    )
