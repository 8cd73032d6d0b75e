"""python -m api: serve the chatq API with uvicorn (uvloop, httptools)."""

from __future__ import annotations

import sys

import uvicorn

from chatq.errors import ConfigError
from chatq.logs import setup_logging
from chatq.settings import load


def main() -> int:
    setup_logging("api")
    settings = load()
    from api.app import create_app

    try:
        app = create_app(settings)
    except ConfigError as exc:
        print(f"chatq api: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
