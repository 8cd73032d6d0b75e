"""Per-user and per-API-key rate limits, shared by every API process through one Redis.

Three limits per scope (a scope is a string the caller picks, "user:42" or "key:7"),
each from the role's `RoleLimits`; 0 turns a limit off:

- requests per minute (RPM), a token bucket of `rpm` requests refilled at rpm/60 per second;
- tokens per minute (TPM), a token bucket of `tpm` tokens refilled at tpm/60 per second.
  The prompt (an estimate, see `estimate_prompt_tokens`) is charged at admission; the
  output tokens, and the difference between the estimate and the real prompt count, are
  charged at `release`, when the stream ends however it ends (cancelled streams
  included, with the tokens they produced). That late charge may take the bucket below
  zero: the scope's next requests then wait until it has refilled to their own cost. A
  request whose prompt alone is larger than the whole bucket is admitted when the bucket
  is full (it could never be admitted otherwise) and takes it below zero;
- concurrent streams, a sorted set per scope of request ids scored by when the slot
  expires (admission time + `hold_s`, the caller's request timeout): a slot whose API
  process crashed before releasing it frees itself then.

The algorithm is one Lua script (`admit.lua`), a redis-py Script: EVALSHA, loaded at start
and again when Redis answers NOSCRIPT (after a restart or SCRIPT FLUSH). It reads the clock
from Redis (`TIME`), so API processes on hosts whose clocks differ share one clock. For
an admission it first checks every limit of every scope and, only when all pass, charges
all of them (RPM −1, TPM −prompt, ZADD the request id); a refusal charges nothing. Redis
runs a script atomically, so API processes bursting at the same scope together never
admit more than the limit. The refusal names the limit with the longest wait and
Retry-After is that wait rounded up to the second (for concurrency, whose wait depends
on when a stream ends, 1 s). A bucket is a hash {tk: tokens, ts: ms} that expires once
it would be full again, so idle scopes cost no memory.

Every admission is one Redis round trip (EVALSHA), and so is every release. Redis is
asked through a circuit breaker (`breaker.py`: short timeouts, no retries, skipped for
`BACKOFF_S` after a failure). When Redis fails or is skipped, the limiter applies
`RATE_LIMIT_FAILURE` — `open` admits (counted in `chatq_rate_limit_bypassed_total`, a
warning logged at most once a minute), `closed` refuses with 503
`rate_limiter_unavailable`.

Counts are exact as long as Redis keeps its data. A call that times out after Redis ran
the script (or whose caller is cancelled mid-call) may have charged the scope and taken
a slot that is then held until `hold_s`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from prometheus_client import Counter
from redis.exceptions import ConnectionError as RedisConnectionError

from api.ratelimit.breaker import BACKOFF_S, TIMEOUT_S, RedisBreaker, RedisUnavailable
from api.ratelimit.login import LoginThrottle
from chatq.errors import ClientError, UpstreamUnavailable
from chatq.settings import RoleLimits

log = logging.getLogger("chatq.api.ratelimit")
# At most this many missed releases wait for Redis to come back (each a few hundred bytes).
MAX_UNRELEASED = 10_000

LimitKind = Literal["rpm", "tpm", "concurrency"]

# Retry-After of a concurrency refusal: when a slot frees cannot be known.
CONCURRENCY_RETRY_S = 1

BYPASSED = Counter(
    "chatq_rate_limit_bypassed_total",
    "Requests admitted without a rate-limit check because Redis was unreachable (RATE_LIMIT_FAILURE=open)",
)

_NOUNS: dict[LimitKind, tuple[str, str]] = {
    "rpm": ("request per minute", "requests per minute"),
    "tpm": ("token per minute", "tokens per minute"),
    "concurrency": ("concurrent stream", "concurrent streams"),
}


def scope_kind(scope: str) -> str:
    """How a message names a scope: "user:42" → "user", "key:7" → "API key"."""
    kind = scope.partition(":")[0]
    return {"user": "user", "key": "API key"}.get(kind, kind or "scope")


class RateLimited(ClientError):
    """429: a scope is over one of its rate limits; `retry_after` is the wait in seconds."""

    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_rpm"

    def __init__(self, limit: LimitKind, value: int, scope: str, retry_after: int) -> None:
        noun = _NOUNS[limit][0 if value == 1 else 1]
        super().__init__(
            f"rate limit reached: {value} {noun} for this {scope_kind(scope)}; retry in {retry_after} s",
            code=f"rate_limit_{limit}",
            retry_after=retry_after,
        )
        self.limit: LimitKind = limit
        self.value = value
        self.scope = scope


def estimate_prompt_tokens(body: bytes) -> int:
    """A cheap estimate of a request's prompt tokens, charged to TPM at admission:
    one token per 4 bytes of the request body (JSON included, so usually an
    overestimate). `RateLimiter.release` corrects it by the real prompt count."""
    return max(1, math.ceil(len(body) / 4))


@dataclass(slots=True)
class Ticket:
    """An admission: what `release` needs to charge the output and free the slot."""

    request_id: str
    scopes: tuple[str, ...] = ()
    limits: RoleLimits | None = None
    prompt_tokens: int = 0
    # Whether Redis holds charges for it (False: limiter disabled, no limits, or bypassed).
    recorded: bool = False
    released: bool = field(default=False, compare=False)


class RateLimiter:
    """Checks and charges the rate limits of a request's scopes in Redis; see the module doc.
    Its Redis also counts the logins (`logins`)."""

    def __init__(
        self,
        redis_url: str | None,
        failure: Literal["open", "closed"],
        *,
        prefix: str = "chatq:rl:",
        timeout_s: float = TIMEOUT_S,
        backoff_s: float = BACKOFF_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = RedisBreaker(redis_url, failure, timeout_s=timeout_s, backoff_s=backoff_s, clock=clock)
        self.url = redis_url
        self.failure = failure
        self.prefix = prefix
        self.logins = LoginThrottle(self.redis, prefix)
        self._admit = self.redis.script("admit.lua")
        self._pending: set[asyncio.Future[None]] = set()
        # Releases Redis missed (down, or skipped by the breaker), sent again once it
        # answers: else each stream that ended during an outage would hold its concurrency
        # slot for `hold_s` (the request timeout) and lock its user out meanwhile.
        self._unreleased: dict[str, tuple[Ticket, int]] = {}
        self._resending: asyncio.Future[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.url is not None

    async def start(self) -> None:
        """Load the scripts; an unreachable Redis is only logged."""
        await self.redis.start()

    async def close(self) -> None:
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=2 * self.redis.timeout_s + 0.5)
        await self.redis.aclose()

    async def acquire(
        self,
        scopes: Sequence[str],
        limits: RoleLimits,
        *,
        prompt_tokens: int,
        request_id: str,
        hold_s: float,
    ) -> Ticket:
        """Admit a request against every limit of every scope and charge them, or refuse.

        Raises RateLimited (429) when a limit is reached — nothing is charged then — and
        UpstreamUnavailable (503, `rate_limiter_unavailable`) when Redis cannot be asked
        and the failure policy is `closed`. `hold_s` is how long the concurrency slot is
        held at most should `release` never come (the request's timeout).
        """
        ticket = Ticket(request_id)
        if self.redis.client is None or not (limits.rpm or limits.tpm or limits.concurrency) or not scopes:
            return ticket
        unique = tuple(dict.fromkeys(scopes))
        tokens = max(0, prompt_tokens)
        resending = self._release_missed()
        if resending is not None:
            # Releases Redis missed go first: the caller's own last request may hold the
            # slot it now asks for (a stream that ended while Redis was away).
            await asyncio.shield(resending)
        try:
            result = await self._run(
                unique, limits, "a", request_id, max(1, math.ceil(hold_s * 1000)), tokens
            )
        except RedisUnavailable as exc:
            return self._unavailable(ticket, exc.error)
        self._release_missed()
        if int(result[0]) != 1:
            scope = unique[int(result[1]) - 1]
            kind: LimitKind = result[2].decode()
            value = {"rpm": limits.rpm, "tpm": limits.tpm, "concurrency": limits.concurrency}[kind]
            wait_s = math.ceil(int(result[3]) / 1000)
            raise RateLimited(kind, value, scope, max(1, wait_s))
        ticket.scopes = unique
        ticket.limits = limits
        ticket.prompt_tokens = tokens
        ticket.recorded = True
        return ticket

    async def release(self, ticket: Ticket, *, prompt_tokens: int | None, completion_tokens: int) -> None:
        """The request is over (done, failed or cancelled): charge its output tokens (and the
        correction of the prompt estimate when `prompt_tokens` is given — pass 0 for a request
        that never ran) to TPM and free its concurrency slot. Idempotent; never raises (a
        failure is logged: the slot then frees itself after `hold_s`). The Redis call runs
        on even if the caller is cancelled meanwhile."""
        if not ticket.recorded or ticket.released:
            return
        ticket.released = True
        tokens = max(0, completion_tokens)
        if prompt_tokens is not None:
            tokens += max(0, prompt_tokens) - ticket.prompt_tokens
        task = asyncio.ensure_future(self._release(ticket, tokens))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        await asyncio.shield(task)

    async def _release(self, ticket: Ticket, tokens: int, *, again: bool = True) -> None:
        assert ticket.limits is not None
        try:
            await self._run(ticket.scopes, ticket.limits, "r", ticket.request_id, 0, tokens)
        except RedisUnavailable as exc:
            if len(self._unreleased) < MAX_UNRELEASED:
                # Not asked or not reached: the script did not run. A timeout may have run
                # it: then only the slot is freed again (idempotent), its tokens not twice.
                unsent = exc.error is None or isinstance(exc.error, ConnectionError | RedisConnectionError)
                self._unreleased[ticket.request_id] = (ticket, tokens if unsent else 0)
                self.redis.warn(f"could not release request {ticket.request_id} (again once Redis answers)")
            else:
                self.redis.warn(f"dropped the release of request {ticket.request_id}")
        except Exception:
            log.exception("rate limiter: releasing %s failed", ticket.request_id)
        else:
            if again:
                self._release_missed()

    def _release_missed(self) -> asyncio.Future[None] | None:
        """Redis answers: send the releases it missed (in a task of their own); returns the
        task sending them, while it runs."""
        if not self._unreleased:
            return self._resending
        missed, self._unreleased = self._unreleased, {}

        async def send() -> None:
            for ticket, tokens in missed.values():
                await self._release(ticket, tokens, again=False)

        task = self._resending = asyncio.ensure_future(send())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        task.add_done_callback(self._resent)
        return task

    def _resent(self, task: asyncio.Future[None]) -> None:
        if self._resending is task:
            self._resending = None

    async def _run(
        self, scopes: tuple[str, ...], limits: RoleLimits, op: str, request_id: str, hold_ms: int, tokens: int
    ) -> Any:
        """One run of admit.lua, under the breaker."""
        keys: list[str] = []
        args: list[str | int] = [op, request_id, hold_ms, tokens, CONCURRENCY_RETRY_S * 1000]
        for scope in scopes:
            base = self.prefix + scope
            keys += (base + ":rpm", base + ":tpm", base + ":conc")
            args += (limits.rpm, limits.tpm, limits.concurrency)
        script = self._admit
        if script is None:
            raise RedisUnavailable(None)
        return await self.redis.call(lambda: script(keys=keys, args=args))

    def _unavailable(self, ticket: Ticket, exc: BaseException | None) -> Ticket:
        if self.failure == "closed":
            raise UpstreamUnavailable(
                "rate limits cannot be checked right now (the rate limiter is unreachable); try again",
                code="rate_limiter_unavailable",
                retry_after=max(1, math.ceil(self.redis.backoff_s)),
            ) from exc
        BYPASSED.inc()
        self.redis.unchecked += 1
        self.redis.warn("admitted a request unchecked")
        return ticket
