"""python -m workers.persistence: write chat events to PostgreSQL (DATABASE_URL)."""

from __future__ import annotations

import asyncio
import logging
import sys

from chatq.errors import ConfigError
from chatq.logs import setup_logging
from chatq.settings import load


def main() -> int:
    setup_logging("persistence")
    try:
        settings = load()
    except ConfigError as exc:
        print(f"chatq persistence: {exc}", file=sys.stderr)
        return 2
    dsn = settings.database_url
    if not dsn:
        print("chatq persistence: DATABASE_URL is not set", file=sys.stderr)
        return 2
    from broker.connect import NatsLogin
    from workers.persistence.app import build_app
    from workers.persistence.store import Store

    store = Store(
        dsn,
        connect_timeout_s=settings.database_connect_timeout_s,
        statement_timeout_ms=settings.database_statement_timeout_ms,
    )
    app, _ = build_app(
        settings.nats_url,
        store,
        login=NatsLogin.of(settings),
        max_deliver=settings.persistence_max_deliver,
        title_jobs=settings.title_jobs,
        stream_replicas=settings.nats_stream_replicas,
    )
    # FastStream's "app starting / started" lines at DEBUG: the worker logs its own start line.
    asyncio.run(app.run(log_level=logging.DEBUG))
    return 0


if __name__ == "__main__":
    sys.exit(main())
