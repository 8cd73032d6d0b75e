"""The worker's metrics port: Prometheus metrics, and its state for a readiness probe.

`GET /ready` answers 200 `ready` while the worker takes jobs, 503 with its state
(`loading`, `draining`) otherwise: while its engine starts, while it drains for a model
switch or before it stops. `GET /live` answers 200 as long as the process serves this
port. Every other path is the Prometheus page, as prometheus_client's own server gives.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

READY = "ready"


class _Quiet(WSGIRequestHandler):
    """No access line on stderr per scrape or probe (prometheus_client's server logs none)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def health_app(state: Callable[[], str]) -> Callable[..., Iterable[bytes]]:
    """The WSGI app: /ready and /live from `state`, the metrics page on every other path."""
    metrics = make_wsgi_app(REGISTRY)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/ready", "/live"):
            current = state()
            ok = path == "/live" or current == READY
            start_response(
                "200 OK" if ok else "503 Service Unavailable",
                [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")],
            )
            return [f"{current}\n".encode()]
        result: Iterable[bytes] = metrics(environ, start_response)
        return result

    return app


def serve(port: int, addr: str, state: Callable[[], str]) -> WSGIServer:
    """Serve health_app on addr:port in a daemon thread; port 0 picks a free one (server_port)."""

    class Server(ThreadingWSGIServer):
        pass

    Server.address_family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0][0]
    httpd = make_server(addr, port, health_app(state), Server, handler_class=_Quiet)
    threading.Thread(target=httpd.serve_forever, name="worker-health", daemon=True).start()
    return httpd
