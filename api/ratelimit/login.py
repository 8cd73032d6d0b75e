"""The login throttle (POST /api/auth/login): attempts counted per username and client
address, and per client address, in fixed windows, in Redis; a success gives its attempt
back, so what stays counted are the failures. Without Redis nothing is throttled (logged)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Awaitable, Callable
from typing import Any

from api.ratelimit.breaker import RedisBreaker, RedisUnavailable
from chatq.errors import ClientError


class LoginThrottled(ClientError):
    """429: too many failed logins for this username from this client, or from this client."""

    status = 429
    type = "rate_limit_error"
    default_code = "too_many_login_attempts"

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many failed logins; try again in {retry_after} s", retry_after=retry_after)


class LoginThrottle:
    """Counts login attempts in the breaker's Redis under `prefix`; see the module doc."""

    def __init__(self, redis: RedisBreaker, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self._attempt = redis.script("login_attempt.lua")
        self._succeeded = redis.script("login_succeeded.lua")

    def _keys(self, username: str, client: str) -> tuple[str, str]:
        user = hashlib.sha256(username.strip().lower().encode()).hexdigest()[:24]
        return (f"{self.prefix}login:{user}:{client}", f"{self.prefix}login-client:{client}")

    async def attempt(
        self, username: str, client: str, max_failures: int, max_per_client: int, window_s: int
    ) -> int:
        """Count a login attempt, or say how many seconds until `username` may try again
        from `client` (then nothing is counted). A success gives the attempt back
        (`succeeded`), so what stays counted are the failures."""
        if not (max_failures or max_per_client) or self._attempt is None:
            return 0
        script, keys = self._attempt, self._keys(username, client)
        wait_ms = await self._call(lambda: script(keys=keys, args=(max_failures, max_per_client, window_s)))
        return max(1, math.ceil(int(wait_ms) / 1000)) if wait_ms else 0

    async def succeeded(self, username: str, client: str) -> None:
        """A right password: this username's failures from this client are forgotten."""
        if self._succeeded is None:
            return
        script, keys = self._succeeded, self._keys(username, client)
        await self._call(lambda: script(keys=keys))

    async def _call(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        """One script call; None when Redis is skipped or fails (a failure is logged)."""
        try:
            return await self.redis.call(fn)
        except RedisUnavailable as exc:
            if exc.error is not None:
                self.redis.warn("failed logins are not throttled")
            return None
