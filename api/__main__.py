"""python -m api: serve the chatq API with uvicorn (uvloop, httptools)."""

from __future__ import annotations

import logging
import socket
import sys

import uvicorn

from api.deadlines import BodyDeadline, HeaderDeadlineProtocol
from chatq.errors import ConfigError
from chatq.logs import setup_logging
from chatq.settings import Settings, load

log = logging.getLogger("chatq.api")


class _Server(uvicorn.Server):
    """uvicorn's server, with chatq's start and stop lines instead of its own."""

    def __init__(self, config: uvicorn.Config, settings: Settings, version: str) -> None:
        super().__init__(config)
        self._settings = settings
        self._version = version

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        bound = [s.getsockname() for server in self.servers for s in server.sockets]
        where = (
            ", ".join(f"{addr[0]}:{addr[1]}" for addr in bound)
            or f"{self._settings.host}:{self._settings.port}"
        )
        log.info(
            "chatq api %s listening on %s; models: %s",
            self._version,
            where,
            ", ".join(self._settings.models),
        )

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        log.info("chatq api stopping")
        await super().shutdown(sockets)


def main() -> int:
    setup_logging("api")
    from api.app import VERSION, create_app

    try:
        settings = load()
        app = create_app(settings)
    except ConfigError as exc:
        print(f"chatq api: {exc}", file=sys.stderr)
        return 2
    # Building the Litestar app configured logging its own way: chatq's format again.
    setup_logging("api")
    config = uvicorn.Config(
        BodyDeadline(app, settings.http_body_timeout_s),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        # httptools, with a bound on the time to send the request head.
        http=HeaderDeadlineProtocol.bounded(settings.http_header_timeout_s),
        # uvicorn's loggers go through chatq's format (no log_config of its own), warnings
        # only: the start line and one line per request are chatq's (api/generation.py).
        log_config=None,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=10,
        # The client address (request.client: login throttling, logs) is X-Forwarded-For's
        # only when the peer is one of these proxies; none listed, the headers are ignored.
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=list(settings.forwarded_allow_ips),
    )
    # Beside sibling API processes on the one port (./start --api-workers M): each binds it
    # with SO_REUSEPORT and the kernel spreads new connections over them.
    sockets = [_reuse_port_socket(settings.host, settings.port)] if settings.api_reuse_port else None
    _Server(config, settings, VERSION).run(sockets=sockets)
    return 0


def _reuse_port_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


if __name__ == "__main__":
    sys.exit(main())
