"""python -m workers.persistence: write chat events to PostgreSQL (DATABASE_URL)."""

from __future__ import annotations

import asyncio
import logging
import sys

from chatq.logs import setup_logging
from chatq.settings import load


def main() -> int:
    setup_logging("persistence")
    settings = load()
    dsn = settings.database_url
    if not dsn:
        print("chatq persistence: DATABASE_URL is not set", file=sys.stderr)
        return 2
    from workers.persistence.app import build_app
    from workers.persistence.store import Store

    app, _ = build_app(settings.nats_url, Store(dsn))
    asyncio.run(app.run(log_level=logging.INFO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
