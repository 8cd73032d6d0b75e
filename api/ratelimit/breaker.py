"""The Redis of the rate limits and the login throttle, behind a circuit breaker.

The client has short socket timeouts (`TIMEOUT_S`) and no retries. After a failure Redis
is skipped for `BACKOFF_S`, after which one call probes it while the others are told it
is unavailable at once; so an outage costs at most one timeout per `BACKOFF_S`, not one
per request. What a caller does without Redis (`RATE_LIMIT_FAILURE`) is the caller's.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Literal, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from chatq.logs import url_for_log

log = logging.getLogger("chatq.api.ratelimit")

T = TypeVar("T")

# Socket connect and read timeout of every Redis call; a dead Redis costs at most this.
TIMEOUT_S = 0.25
# After a failure Redis is not asked for this long (the failure policy applies instead).
BACKOFF_S = 1.0
# Warnings about an unreachable Redis, at most one per this many seconds.
WARN_EVERY_S = 60.0
# What a failed Redis call raises (the builtin TimeoutError is an OSError).
FAILURES = (RedisError, OSError)


class RedisUnavailable(Exception):
    """Redis was not asked (the breaker is open: `error` is None) or the call failed."""

    def __init__(self, error: BaseException | None) -> None:
        super().__init__(str(error) if error else "Redis is skipped after a failure")
        self.error = error


class RedisBreaker:
    """One Redis client (None without a URL) whose calls go through `call`."""

    def __init__(
        self,
        url: str | None,
        failure: Literal["open", "closed"],
        *,
        timeout_s: float = TIMEOUT_S,
        backoff_s: float = BACKOFF_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._clock = clock  # seconds, for the backoff and the warnings (a test's own)
        self.failure = failure
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        # Created now (redis-py connects on the first call), so scripts can be registered.
        self.client: Any = None  # redis.asyncio.Redis
        if url is not None:
            self.client = aioredis.Redis.from_url(
                url,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                retry=Retry(NoBackoff(), 0),
                # RESP2: with RESP3, redis-py turns on maintenance notifications, which turn
                # off its check for pooled connections the server closed (one failure each
                # after a Redis restart).
                protocol=2,
            )
        self._scripts: list[AsyncScript] = []
        # Redis is skipped until `_down_until` (by `clock`; 0 = healthy), then one call
        # (`_probing`) finds out whether it is back.
        self._down_until = 0.0
        self._probing = False
        self._last_error = ""
        self._warned_at = -math.inf
        self.unchecked = 0  # requests admitted unchecked since the last warning

    def script(self, name: str) -> AsyncScript | None:
        """This package's Lua file `name` as a redis-py Script (EVALSHA; loaded again after
        NOSCRIPT, when Redis restarted or its scripts were flushed); None without Redis."""
        if self.client is None:
            return None
        source = resources.files(__package__).joinpath(name).read_text()
        script: AsyncScript = self.client.register_script(source)
        self._scripts.append(script)
        return script

    async def start(self) -> None:
        """Load the registered scripts; an unreachable Redis is only logged."""
        if self.client is None:
            return
        try:
            for script in self._scripts:
                await self.client.script_load(script.script)
        except FAILURES as exc:
            self._failed(exc)
            self.warn("Redis is unreachable at start")

    async def aclose(self) -> None:
        if self.client is not None:
            client, self.client = self.client, None
            await client.aclose()

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """`fn()` (one Redis call) under the breaker; RedisUnavailable when Redis is skipped
        or fails."""
        if self.client is None or not self._usable():
            raise RedisUnavailable(None)
        probing = self._probing
        try:
            result = await fn()
        except FAILURES as exc:
            self._failed(exc)
            raise RedisUnavailable(exc) from exc
        finally:
            if probing:
                self._probing = False
        self._succeeded()
        return result

    def _usable(self) -> bool:
        """Whether to ask Redis now: always when healthy; after a failure, once the backoff
        has passed, one caller at a time (the probe)."""
        if self._down_until == 0.0:
            return True
        if self._probing or self._clock() < self._down_until:
            return False
        self._probing = True
        return True

    def _failed(self, exc: BaseException) -> None:
        self._down_until = self._clock() + self.backoff_s
        self._last_error = f"{type(exc).__name__}: {exc}"

    def _succeeded(self) -> None:
        if self._down_until != 0.0:
            self._down_until = 0.0
            log.info("rate limiter: Redis at %s is reachable again", url_for_log(self.url or ""))

    def warn(self, what: str) -> None:
        """A warning about the unreachable Redis, at most one per WARN_EVERY_S."""
        now = self._clock()
        if now - self._warned_at < WARN_EVERY_S:
            return
        self._warned_at = now
        policy = "admitting requests unchecked" if self.failure == "open" else "refusing requests with 503"
        log.warning(
            "rate limiter: Redis at %s is unreachable (%s): %s; %s (RATE_LIMIT_FAILURE=%s); "
            "%d request(s) admitted unchecked since the last warning (next warning in %g s at the earliest)",
            url_for_log(self.url or ""),
            self._last_error,
            what,
            policy,
            self.failure,
            self.unchecked,
            WARN_EVERY_S,
        )
        self.unchecked = 0
