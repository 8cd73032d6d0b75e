"""The API's adapters, built once in the lifespan and handed to handlers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from api.admission import QueueMonitor, StreamCap
from api.auth import Authenticator
from api.content_policy import ContentPolicies
from api.ratelimit import RateLimiter
from broker.bus import Bus
from broker.workers import WorkerRegistry
from catalog.profiles import ProfileSet
from chatq.errors import ApiError, UpstreamUnavailable
from chatq.settings import Settings
from chatq.tasks import TaskSet

# The first statement of a transaction, before any query: its isolation and access mode.
_SNAPSHOT = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"


@dataclass
class Services:
    settings: Settings
    bus: Bus
    monitor: QueueMonitor
    registry: WorkerRegistry
    auth: Authenticator
    limiter: RateLimiter
    spawn: TaskSet
    pool: AsyncConnectionPool[Any] | None = None
    profiles: ProfileSet = field(default_factory=ProfileSet.empty)
    policies: ContentPolicies = field(default_factory=ContentPolicies)
    # The streams this process relays now, at most API_MAX_STREAMS.
    streams: StreamCap = field(default_factory=lambda: StreamCap(0))

    def known_models(self) -> list[str]:
        """Configured models first, then the profiles, then any other model a live worker serves."""
        models = list(self.settings.models)
        models += [p.id for p in self.profiles if p.id not in models]
        models += sorted(self.registry.models() - set(models))
        return models

    @asynccontextmanager
    async def db(self, *, snapshot: bool = False) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection in one transaction; the database missing or down is a 503.

        The transaction commits when the block ends and rolls back when it raises (an
        ApiError too), so a change of several statements happens whole or not at all.
        `snapshot`: read only, REPEATABLE READ, so every statement sees the same rows.
        """
        if self.pool is None:
            raise UpstreamUnavailable(
                "accounts and conversations need PostgreSQL: set DATABASE_URL (./start does)",
                code="accounts_unavailable",
            )
        try:
            # The pool's connections are autocommit: transaction() is an explicit BEGIN.
            async with self.pool.connection(timeout=5.0) as conn, conn.transaction():
                if snapshot:
                    await conn.execute(_SNAPSHOT)
                yield conn
        except ApiError:
            raise
        except (PoolTimeout, psycopg.OperationalError) as exc:
            raise UpstreamUnavailable(
                "the database is unreachable; try again shortly", code="database_unavailable"
            ) from exc
