"""GET /asyncapi.json (the AsyncAPI 3.0 document of the message plane) and /asyncapi (a table)."""

from __future__ import annotations

import functools
import html
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import msgspec
from litestar import Response, get
from litestar.di import NamedDependency

from api.services import Services
from broker import asyncapi

_json = msgspec.json.Encoder()


def chatq_version() -> str:
    try:
        return version("chatq")
    except PackageNotFoundError:  # a source tree that is not installed
        return "0.0.0"


@functools.lru_cache(maxsize=4)
def _document(nats_url: str) -> dict[str, Any]:
    return asyncapi.document(version=chatq_version(), nats_url=nats_url)


@get("/asyncapi.json", sync_to_thread=False)
def asyncapi_json(services: NamedDependency[Services]) -> Response[bytes]:
    """The AsyncAPI 3.0 document of every subject an integration may use; no auth."""
    body = _json.encode(_document(services.settings.nats_url))
    return Response(body, media_type="application/json")


def _type(schema: dict[str, Any]) -> str:
    """A JSON Schema property as a short type, for people."""
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if "enum" in schema:
        return " | ".join(repr(v) for v in schema["enum"])
    if "anyOf" in schema:
        return " | ".join(_type(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"list[{_type(schema.get('items', {}))}]"
    return str(schema.get("type", "any"))


def _fields(schema: dict[str, Any]) -> str:
    required = set(schema.get("required", []))
    rows = []
    for name, prop in schema.get("properties", {}).items():
        default = "" if name in required else f" = {_json.encode(prop.get('default')).decode()}"
        rows.append(f"<code>{html.escape(name)}: {html.escape(_type(prop))}{html.escape(default)}</code>")
    return "<br>".join(rows)


def render_html(doc: dict[str, Any]) -> str:
    """The document as one plain HTML page: a channel table, then each schema's fields."""
    e = html.escape
    channels = []
    for key, channel in doc["channels"].items():
        operation = doc["operations"].get(key, {})
        names = ", ".join(f'<a href="#{e(m)}">{e(m)}</a>' for m in channel["messages"])
        reply = operation.get("reply")
        if reply:
            replied = ", ".join(r["$ref"].rsplit("/", 1)[-1] for r in reply["messages"])
            names += f" → reply {e(replied)}"
        channels.append(
            f"<tr><td><code>{e(channel.get('address') or '(reply inbox)')}</code></td>"
            f"<td>{e(operation.get('action', ''))}</td><td>{names}</td>"
            f"<td>{e(channel.get('summary', ''))} {e(channel.get('description', ''))}</td></tr>"
        )
    schemas = [
        f'<tr id="{e(name)}"><td><code>{e(name)}</code></td><td>{_fields(schema)}</td>'
        f"<td>{e(schema.get('description', ''))}</td></tr>"
        for name, schema in doc["components"]["schemas"].items()
    ]
    info = doc["info"]
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{e(info['title'])} {e(info['version'])}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.3em .5em;vertical-align:top;text-align:left}</style>"
        f"</head><body><h1>{e(info['title'])} {e(info['version'])}</h1><p>{e(info['description'])}</p>"
        '<p>The machine-readable document: <a href="/asyncapi.json">/asyncapi.json</a> (AsyncAPI '
        f"{e(doc['asyncapi'])}).</p>"
        "<h2>Subjects</h2><table><tr><th>subject</th><th>chatq</th><th>messages</th><th>what</th></tr>"
        + "".join(channels)
        + "</table><h2>Messages</h2><table><tr><th>name</th><th>fields</th><th>what</th></tr>"
        + "".join(schemas)
        + "</table></body></html>"
    )


@get("/asyncapi", sync_to_thread=False, opt={"media": ["text/html"]})
def asyncapi_page(services: NamedDependency[Services]) -> Response[str]:
    """The same document as a plain HTML page (no scripts); no auth."""
    return Response(render_html(_document(services.settings.nats_url)), media_type="text/html")


ROUTES = [asyncapi_json, asyncapi_page]
