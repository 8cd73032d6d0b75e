"""The web interface: web/dist/ (built by stack.web) served at `/`.

Hashed assets under /assets/ are cached for a year (immutable: a new build has new
names); index.html is served for `/` and every client route (`/c/<id>`, `/admin`,
`/login`) with `no-cache`, so a new build is picked up on the next load. When the
bundle is not built, those routes answer a short page that says how to build it.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

from litestar import Response, Router, get
from litestar.datastructures import CacheControlHeader
from litestar.handlers import BaseRouteHandler
from litestar.static_files import create_static_files_router

DEFAULT_DIST = Path(__file__).resolve().parent.parent / "web" / "dist"
CLIENT_ROUTES = ["/", "/login", "/admin", "/c/{conversation_id:str}"]

_NOT_BUILT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>chatq: web interface not built</title></head>
<body style="font-family: system-ui, sans-serif; max-width: 40rem; margin: 10vh auto; padding: 1rem">
<h1>The web interface is not built</h1>
<p>The API is running, but <code>{dist}</code> holds no built interface.
<code>./start</code> builds it when its sources change; to build it by hand, run
<code>.venv/bin/python -m stack.web</code> (it needs Node 20.19+ or installs Node from PyPI),
then reload this page.</p>
<p>The API itself works: <code>/v1/chat/completions</code>, <code>/api/chat</code>, <code>/health</code>.</p>
</body></html>
"""


# The page's own scripts and styles only: no inline script, no framing, no other origin.
# ('unsafe-inline' styles: the not-built page's attributes; React sets styles via CSSOM.)
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def _nosniff(response: Response) -> Response:  # type: ignore[type-arg]
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def dist_dir() -> Path:
    """Where the built interface is: CHATQ_WEB_DIST, or web/dist/ beside the code."""
    return Path(os.environ.get("CHATQ_WEB_DIST") or DEFAULT_DIST)


def routes(dist: Path | None = None) -> list[BaseRouteHandler | Router]:
    """The route handlers that serve the interface from `dist`."""
    folder = dist or dist_dir()

    @get(CLIENT_ROUTES, sync_to_thread=False, include_in_schema=False)
    def index() -> Response[bytes]:
        """index.html for the page and its client routes (the client router picks the view)."""
        try:
            body = (folder / "index.html").read_bytes()
        except OSError:
            page = _NOT_BUILT.format(dist=html.escape(str(folder)))
            return Response(
                page.encode(),
                status_code=503,
                media_type="text/html",
                headers={"Cache-Control": "no-store", **SECURITY_HEADERS},
            )
        return Response(
            body, media_type="text/html", headers={"Cache-Control": "no-cache", **SECURITY_HEADERS}
        )

    assets = create_static_files_router(
        path="/assets",
        directories=[folder / "assets"],
        cache_control=CacheControlHeader(max_age=31_536_000, public=True, immutable=True),
        include_in_schema=False,
        name="web-assets",
        after_request=_nosniff,
    )
    return [index, assets]
