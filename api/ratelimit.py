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

The algorithm is one Lua script (`_SCRIPT`), run with EVALSHA (loaded at start; loaded
again when Redis answers NOSCRIPT, after a restart or SCRIPT FLUSH). It reads the clock
from Redis (`TIME`), so API processes on hosts whose clocks differ share one clock. For
an admission it first checks every limit of every scope and, only when all pass, charges
all of them (RPM −1, TPM −prompt, ZADD the request id); a refusal charges nothing. Redis
runs a script atomically, so API processes bursting at the same scope together never
admit more than the limit. The refusal names the limit with the longest wait and
Retry-After is that wait rounded up to the second (for concurrency, whose wait depends
on when a stream ends, 1 s). A bucket is a hash {tk: tokens, ts: ms} that expires once
it would be full again, so idle scopes cost no memory.

Every admission is one Redis round trip (EVALSHA), and so is every release. The client
has short socket timeouts (`TIMEOUT_S`) and no retries. When Redis fails, the limiter
applies `RATE_LIMIT_FAILURE` — `open` admits (counted in
`chatq_rate_limit_bypassed_total`, a warning logged at most once a minute), `closed`
refuses with 503 `rate_limiter_unavailable` — and skips Redis for `BACKOFF_S`, after
which one request probes it while the others still apply the policy; so an outage
costs at most one timeout per `BACKOFF_S`, not one per request.

Counts are exact as long as Redis keeps its data. A call that times out after Redis ran
the script (or whose caller is cancelled mid-call) may have charged the scope and taken
a slot that is then held until `hold_s`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from chatq.errors import ClientError, UpstreamUnavailable
from chatq.settings import RoleLimits

log = logging.getLogger("chatq.api.ratelimit")

LimitKind = Literal["rpm", "tpm", "concurrency"]

# Socket connect and read timeout of every Redis call; a dead Redis costs at most this.
TIMEOUT_S = 0.25
# After a failure Redis is not asked for this long (the failure policy applies instead).
BACKOFF_S = 1.0
# Warnings about an unreachable Redis, at most one per this many seconds.
WARN_EVERY_S = 60.0
# Retry-After of a concurrency refusal: when a slot frees cannot be known.
CONCURRENCY_RETRY_S = 1
# What a failed Redis call raises (the builtin TimeoutError is an OSError).
_FAILURES = (RedisError, OSError)

BYPASSED = Counter(
    "chatq_rate_limit_bypassed_total",
    "Requests admitted without a rate-limit check because Redis was unreachable (RATE_LIMIT_FAILURE=open)",
)

# KEYS: three per scope, in order: its RPM bucket, its TPM bucket, its concurrency set.
# ARGV: op ('a' admit, 'r' release), request id, hold (ms), tokens (the prompt at
# admission; at release the output tokens plus the prompt correction, possibly < 0),
# then rpm, tpm, concurrency limits (one triple per scope; 0 = no limit).
# Returns {1} when admitted (or released), {0, scope index (1-based), limit, wait ms}.
_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local WINDOW = 60000
local CONC_WAIT = tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local op, rid = ARGV[1], ARGV[2]
local hold = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local n = #KEYS / 3

-- A bucket's tokens now: full when absent, else refilled at limit per WINDOW since ts.
local function level(key, limit)
  local v = redis.call('HMGET', key, 'tk', 'ts')
  if not v[1] then return limit end
  local elapsed = now - tonumber(v[2])
  if elapsed < 0 then elapsed = 0 end
  local tk = tonumber(v[1]) + elapsed * limit / WINDOW
  if tk > limit then tk = limit end
  return tk
end

-- Store a bucket's tokens; it expires when it would be full again (absent = full).
local function store(key, limit, tk)
  if tk >= limit then
    redis.call('DEL', key)
    return
  end
  redis.call('HSET', key, 'tk', string.format('%.17g', tk), 'ts', string.format('%.3f', now))
  -- (capped at a year: a PEXPIRE argument must print as an integer, not as 1e+14)
  redis.call('PEXPIRE', key, math.min(math.ceil((limit - tk) * WINDOW / limit) + 1, 31536000000))
end

local function limits(i)
  local b = 5 + 3 * (i - 1)
  return tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
end

if op == 'r' then
  for i = 1, n do
    local rpm, tpm, conc = limits(i)
    if tpm > 0 and cost ~= 0 then
      store(KEYS[3 * i - 1], tpm, level(KEYS[3 * i - 1], tpm) - cost)
    end
    if conc > 0 then redis.call('ZREM', KEYS[3 * i], rid) end
  end
  return {1}
end

-- Admission: check everything first, charge only when nothing refuses.
local refused, worst, wscope, wkind = false, -1, 0, ''
local levels = {}
local function refuse(i, kind, wait)
  refused = true
  if wait > worst then worst, wscope, wkind = wait, i, kind end
end
for i = 1, n do
  local rpm, tpm, conc = limits(i)
  if rpm > 0 then
    local tk = level(KEYS[3 * i - 2], rpm)
    levels[3 * i - 2] = tk
    if tk < 1 then refuse(i, 'rpm', (1 - tk) * WINDOW / rpm) end
  end
  if tpm > 0 then
    local tk = level(KEYS[3 * i - 1], tpm)
    levels[3 * i - 1] = tk
    local need = math.min(cost, tpm)
    if tk < need then refuse(i, 'tpm', (need - tk) * WINDOW / tpm) end
  end
  if conc > 0 then
    local ck = KEYS[3 * i]
    redis.call('ZREMRANGEBYSCORE', ck, '-inf', now)
    if not redis.call('ZSCORE', ck, rid) and redis.call('ZCARD', ck) >= conc then
      refuse(i, 'concurrency', CONC_WAIT)
    end
  end
end
if refused then return {0, wscope, wkind, math.ceil(worst)} end
for i = 1, n do
  local rpm, tpm, conc = limits(i)
  if rpm > 0 then store(KEYS[3 * i - 2], rpm, levels[3 * i - 2] - 1) end
  if tpm > 0 and cost ~= 0 then store(KEYS[3 * i - 1], tpm, levels[3 * i - 1] - cost) end
  if conc > 0 then
    local ck = KEYS[3 * i]
    redis.call('ZADD', ck, now + hold, rid)
    if redis.call('PTTL', ck) < hold then redis.call('PEXPIRE', ck, hold) end
  end
end
return {1}
"""
_SHA = hashlib.sha1(_SCRIPT.encode()).hexdigest()

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


class LoginThrottled(ClientError):
    """429: too many failed logins for this username from this client, or from this client."""

    status = 429
    type = "rate_limit_error"
    default_code = "too_many_login_attempts"

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many failed logins; try again in {retry_after} s", retry_after=retry_after)


# Login attempts. KEYS: the username+address counter, the address counter. ARGV: their
# limits (0 = none), the window (s). When a counter is at its limit, returns the ms until
# its window ends; otherwise counts the attempt in both (a new counter expires at the end
# of its window: fixed windows) and returns 0. Counting before the password is checked,
# in one script, means guesses sent at once cannot pass the limit together.
_LOGIN_ATTEMPT = """
local wait = 0
for i = 1, 2 do
  local limit = tonumber(ARGV[i])
  if limit > 0 and tonumber(redis.call('GET', KEYS[i]) or '0') >= limit then
    local ttl = redis.call('PTTL', KEYS[i])
    if ttl < 0 then ttl = 1000 end
    if ttl > wait then wait = ttl end
  end
end
if wait > 0 then return wait end
for i = 1, 2 do
  if tonumber(ARGV[i]) > 0 and redis.call('INCR', KEYS[i]) == 1 then
    redis.call('EXPIRE', KEYS[i], tonumber(ARGV[3]))
  end
end
return 0
"""

# A right password: the username+address counter is forgotten, the address gets its
# attempt back.
_LOGIN_SUCCEEDED = """
redis.call('DEL', KEYS[1])
if tonumber(redis.call('GET', KEYS[2]) or '0') > 0 then redis.call('DECR', KEYS[2]) end
return 1
"""


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


def _redact(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


class RateLimiter:
    """Checks and charges the rate limits of a request's scopes in Redis; see the module doc."""

    def __init__(
        self,
        redis_url: str | None,
        failure: Literal["open", "closed"],
        *,
        prefix: str = "chatq:rl:",
        timeout_s: float = TIMEOUT_S,
        backoff_s: float = BACKOFF_S,
    ) -> None:
        self.url = redis_url
        self.failure = failure
        self.prefix = prefix
        self._timeout_s = timeout_s
        self._backoff_s = backoff_s
        self._redis: Any = None  # redis.asyncio.Redis, once started
        self._login_attempt: Any = None  # its login scripts (redis.commands.core.AsyncScript)
        self._login_succeeded: Any = None
        # Circuit breaker: Redis is skipped until `_down_until` (monotonic; 0 = healthy),
        # then one call (`_probing`) finds out whether it is back.
        self._down_until = 0.0
        self._probing = False
        self._last_error = ""
        self._warned_at = -math.inf
        self._bypassed = 0  # since the last warning
        self._pending: set[asyncio.Future[None]] = set()

    @property
    def enabled(self) -> bool:
        return self.url is not None

    async def start(self) -> None:
        """Create the client and load the script; an unreachable Redis is only logged."""
        if self.url is None:
            return
        self._redis = aioredis.Redis.from_url(
            self.url,
            socket_timeout=self._timeout_s,
            socket_connect_timeout=self._timeout_s,
            retry=Retry(NoBackoff(), 0),
            # RESP2: with RESP3, redis-py turns on maintenance notifications, which turn off
            # its check for pooled connections the server closed (one failure each after a
            # Redis restart).
            protocol=2,
        )
        # redis-py's Script objects: EVALSHA, loading the script again after NOSCRIPT.
        self._login_attempt = self._redis.register_script(_LOGIN_ATTEMPT)
        self._login_succeeded = self._redis.register_script(_LOGIN_SUCCEEDED)
        try:
            await self._redis.script_load(_SCRIPT)
        except _FAILURES as exc:
            self._failed(exc)
            self._warn("Redis is unreachable at start")

    async def close(self) -> None:
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=2 * self._timeout_s + 0.5)
        if self._redis is not None:
            redis, self._redis = self._redis, None
            await redis.aclose()

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
        if self._redis is None or not (limits.rpm or limits.tpm or limits.concurrency) or not scopes:
            return ticket
        unique = tuple(dict.fromkeys(scopes))
        tokens = max(0, prompt_tokens)
        if not self._usable():
            return self._unavailable(ticket, None)
        probing = self._probing
        try:
            result = await self._run(
                unique, limits, "a", request_id, max(1, math.ceil(hold_s * 1000)), tokens
            )
        except _FAILURES as exc:
            self._failed(exc)
            return self._unavailable(ticket, exc)
        finally:
            if probing:
                self._probing = False
        self._succeeded()
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

    async def _release(self, ticket: Ticket, tokens: int) -> None:
        assert ticket.limits is not None
        if self._redis is None or not self._usable():
            self._warn(f"dropped the release of request {ticket.request_id}")
            return
        probing = self._probing
        try:
            await self._run(ticket.scopes, ticket.limits, "r", ticket.request_id, 0, tokens)
        except _FAILURES as exc:
            self._failed(exc)
            self._warn(f"could not release request {ticket.request_id}")
            return
        except Exception:
            log.exception("rate limiter: releasing %s failed", ticket.request_id)
            return
        finally:
            if probing:
                self._probing = False
        self._succeeded()

    async def _run(
        self, scopes: tuple[str, ...], limits: RoleLimits, op: str, request_id: str, hold_ms: int, tokens: int
    ) -> Any:
        """One EVALSHA of the script (and, after NOSCRIPT, a SCRIPT LOAD and a second try)."""
        keys: list[str] = []
        args: list[str | int] = [op, request_id, hold_ms, tokens, CONCURRENCY_RETRY_S * 1000]
        for scope in scopes:
            base = self.prefix + scope
            keys += (base + ":rpm", base + ":tpm", base + ":conc")
            args += (limits.rpm, limits.tpm, limits.concurrency)
        try:
            return await self._redis.evalsha(_SHA, len(keys), *keys, *args)
        except NoScriptError:
            await self._redis.script_load(_SCRIPT)
            return await self._redis.evalsha(_SHA, len(keys), *keys, *args)

    # Logins (POST /api/auth/login): attempts counted per username and client address, and
    # per client address, in fixed windows; a success gives its attempt back. Without
    # Redis nothing is throttled (logged).

    def _login_keys(self, username: str, client: str) -> tuple[str, str]:
        user = hashlib.sha256(username.strip().lower().encode()).hexdigest()[:24]
        return (f"{self.prefix}login:{user}:{client}", f"{self.prefix}login-client:{client}")

    async def _login_call(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """One Redis call for the login throttle, under the breaker; None when Redis fails."""
        if self._redis is None or not self._usable():
            return None
        probing = self._probing
        try:
            result = await call()
        except _FAILURES as exc:
            self._failed(exc)
            self._warn("failed logins are not throttled")
            return None
        finally:
            if probing:
                self._probing = False
        self._succeeded()
        return result

    async def login_attempt(
        self, username: str, client: str, max_failures: int, max_per_client: int, window_s: int
    ) -> int:
        """Count a login attempt, or say how many seconds until `username` may try again
        from `client` (then nothing is counted). A success gives the attempt back
        (`login_succeeded`), so what stays counted are the failures."""
        if not (max_failures or max_per_client):
            return 0
        keys = self._login_keys(username, client)
        wait_ms = await self._login_call(
            lambda: self._login_attempt(keys=keys, args=(max_failures, max_per_client, window_s))
        )
        return max(1, math.ceil(int(wait_ms) / 1000)) if wait_ms else 0

    async def login_succeeded(self, username: str, client: str) -> None:
        """A right password: this username's failures from this client are forgotten."""
        keys = self._login_keys(username, client)
        await self._login_call(lambda: self._login_succeeded(keys=keys))

    # The failure policy and the circuit breaker.

    def _usable(self) -> bool:
        """Whether to ask Redis now: always when healthy; after a failure, once the backoff
        has passed, one caller at a time (the probe)."""
        if self._down_until == 0.0:
            return True
        if self._probing or time.monotonic() < self._down_until:
            return False
        self._probing = True
        return True

    def _failed(self, exc: BaseException) -> None:
        self._down_until = time.monotonic() + self._backoff_s
        self._last_error = f"{type(exc).__name__}: {exc}"

    def _succeeded(self) -> None:
        if self._down_until != 0.0:
            self._down_until = 0.0
            log.info("rate limiter: Redis at %s is reachable again", _redact(self.url or ""))

    def _unavailable(self, ticket: Ticket, exc: BaseException | None) -> Ticket:
        if self.failure == "closed":
            raise UpstreamUnavailable(
                "rate limits cannot be checked right now (the rate limiter is unreachable); try again",
                code="rate_limiter_unavailable",
                retry_after=max(1, math.ceil(self._backoff_s)),
            ) from exc
        BYPASSED.inc()
        self._bypassed += 1
        self._warn("admitted a request unchecked")
        return ticket

    def _warn(self, what: str) -> None:
        """A warning about the unreachable Redis, at most one per WARN_EVERY_S."""
        now = time.monotonic()
        if now - self._warned_at < WARN_EVERY_S:
            return
        self._warned_at = now
        policy = "admitting requests unchecked" if self.failure == "open" else "refusing requests with 503"
        log.warning(
            "rate limiter: Redis at %s is unreachable (%s): %s; %s (RATE_LIMIT_FAILURE=%s); "
            "%d request(s) admitted unchecked since the last warning (next warning in %g s at the earliest)",
            _redact(self.url or ""),
            self._last_error,
            what,
            policy,
            self.failure,
            self._bypassed,
            WARN_EVERY_S,
        )
        self._bypassed = 0
