"""python -m workers.inference: one inference worker (one engine, one model)."""

from __future__ import annotations

import asyncio
import logging
import sys

from chatq.errors import ConfigError
from chatq.logs import setup_logging
from chatq.settings import load


def main() -> int:
    setup_logging("worker")
    try:
        settings = load()
    except ConfigError as exc:
        logging.getLogger("chatq.worker").error("%s", exc)
        return 2
    from workers.inference.app import build_app

    app, _ = build_app(settings)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(app.run(log_level=logging.INFO))
    state = app.context.get("chatq_state")
    return 1 if state and state.get("failed") else 0


if __name__ == "__main__":  # vLLM spawns its engine core: the guard is required
    sys.exit(main())
