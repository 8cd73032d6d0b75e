"""Rate limits (api.ratelimit.RateLimiter) against a real redis-server (stack.servers.RedisServer):
RPM, TPM and concurrency per scope, exact under concurrent bursts from two OS processes,
refusals that charge nothing, and the failure policy while Redis is down or hung."""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import socket
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from api.ratelimit import RateLimited, RateLimiter, Ticket, estimate_prompt_tokens
from chatq.errors import UpstreamUnavailable
from chatq.settings import RoleLimits
from stack.servers import RedisServer, free_port

HOLD_S = 60.0


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the module; every test uses key prefixes of its own."""
    data = tmp_path_factory.mktemp("redis")
    server = RedisServer(data).start(data / "redis.log")
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid.uuid4().hex[:8]}:"


@pytest.fixture
async def limiter(redis_server: RedisServer, prefix: str) -> AsyncIterator[RateLimiter]:
    # A generous socket timeout: these tests are about the limits, not about a slow Redis,
    # and on a loaded box a 0.25 s timeout lets the `open` policy admit past a limit.
    rl = RateLimiter(redis_server.url, "open", prefix=prefix, timeout_s=5.0)
    await rl.start()
    yield rl
    await rl.close()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Any]:
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


class Clock:
    """A limiter's clock (its breaker's backoff) that moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rid() -> str:
    return uuid.uuid4().hex


async def attempt(
    rl: RateLimiter,
    scopes: list[str],
    limits: RoleLimits,
    *,
    prompt: int = 1,
    hold_s: float = HOLD_S,
    request_id: str | None = None,
) -> Ticket | RateLimited:
    """A ticket when admitted, the RateLimited error when refused."""
    try:
        return await rl.acquire(
            scopes, limits, prompt_tokens=prompt, request_id=request_id or rid(), hold_s=hold_s
        )
    except RateLimited as exc:
        return exc


async def burst(
    rl: RateLimiter, scopes: list[str], limits: RoleLimits, size: int, **kw: Any
) -> list[Ticket | RateLimited]:
    return list(await asyncio.gather(*(attempt(rl, scopes, limits, **kw) for _ in range(size))))


def admitted(results: list[Ticket | RateLimited]) -> list[Ticket]:
    return [r for r in results if isinstance(r, Ticket)]


def refused(results: list[Ticket | RateLimited]) -> list[RateLimited]:
    return [r for r in results if isinstance(r, RateLimited)]


async def tokens_left(raw: Any, prefix: str, scope: str, kind: str, limit: int) -> float:
    """A bucket's stored level, refilled to now (Redis' clock) as the script does."""
    stored = await raw.hmget(f"{prefix}{scope}:{kind}", "tk", "ts")
    if stored[0] is None:
        return float(limit)
    sec, usec = await raw.time()
    now_ms = int(sec) * 1000 + int(usec) / 1000
    return min(float(limit), float(stored[0]) + (now_ms - float(stored[1])) * limit / 60000)


async def assert_level(
    raw: Any, prefix: str, scope: str, kind: str, limit: int, expected: float, since: float
) -> None:
    """A bucket holds `expected` plus at most what it refilled since `since` (monotonic,
    taken before the first charge): Redis' clock runs on, so the tolerance is the refill
    the elapsed time allows, not a fixed figure that a slow run can overstep."""
    left = await tokens_left(raw, prefix, scope, kind, limit)
    refill = (time.monotonic() - since) * limit / 60
    assert expected - 0.01 <= left <= min(float(limit), expected + refill + 0.01), (left, expected, refill)


async def advance(raw: Any, prefix: str, scope: str, ms: float) -> None:
    """Move Redis' clock `ms` on, as far as one scope's limits can tell: the times its
    buckets were stored and its slots' expiries move back (the script reads TIME)."""
    base = prefix + scope
    for kind in ("rpm", "tpm"):
        if await raw.exists(f"{base}:{kind}"):
            await raw.hincrbyfloat(f"{base}:{kind}", "ts", -ms)
    slots = await raw.zrange(f"{base}:conc", 0, -1, withscores=True)
    if slots:
        await raw.zadd(f"{base}:conc", {member: score - ms for member, score in slots})


def bypassed() -> float:
    return float(REGISTRY.get_sample_value("chatq_rate_limit_bypassed_total") or 0.0)


# RPM


async def test_rpm_burst_admits_exactly_the_limit(limiter: RateLimiter, raw: Any, prefix: str) -> None:
    """Limit 20 a minute (one request every 3 s): a burst of 30 admits 20; the refusal's
    Retry-After is the true wait, to the second, and the message names the limit."""
    limits = RoleLimits(rpm=20, tpm=0, concurrency=0)
    skipped = bypassed()
    results = await burst(limiter, ["user:1"], limits, 30)
    assert bypassed() == skipped  # every request was asked of Redis, none let through unasked
    assert len(admitted(results)) == 20
    errors = refused(results)
    assert len(errors) == 10
    exc = errors[0]
    assert exc.status == 429 and exc.type == "rate_limit_error" and exc.code == "rate_limit_rpm"
    # The bucket started refilling at the last admission: the 21st request fits 3 s after it.
    assert exc.retry_after == 3
    assert exc.message == "rate limit reached: 20 requests per minute for this user; retry in 3 s"
    assert (exc.limit, exc.value, exc.scope) == ("rpm", 20, "user:1")

    # Just before the wait is over: still refused, with the rest of the wait.
    await advance(raw, prefix, "user:1", 2700)
    early = await attempt(limiter, ["user:1"], limits)
    assert isinstance(early, RateLimited) and early.retry_after == 1
    # Once it is over: admitted (exactly one), then refused again for a full interval.
    await advance(raw, prefix, "user:1", 350)
    later = await burst(limiter, ["user:1"], limits, 3)
    assert len(admitted(later)) == 1
    assert {e.retry_after for e in refused(later)} == {3}


async def test_limits_of_zero_are_off(limiter: RateLimiter, raw: Any, prefix: str) -> None:
    results = await burst(limiter, ["user:1"], RoleLimits(0, 0, 0), 50, prompt=10**6)
    assert len(admitted(results)) == 50
    assert not any(t.recorded for t in admitted(results))
    assert await raw.keys(prefix + "*") == []


# TPM


async def test_tpm_counts_prompt_at_admission_and_output_at_release(
    limiter: RateLimiter, raw: Any, prefix: str
) -> None:
    t0 = time.monotonic()
    limits = RoleLimits(rpm=0, tpm=1000, concurrency=0)
    ticket = await limiter.acquire(["key:1"], limits, prompt_tokens=300, request_id=rid(), hold_s=HOLD_S)
    await assert_level(raw, prefix, "key:1", "tpm", 1000, 700, t0)
    await limiter.release(ticket, prompt_tokens=None, completion_tokens=500)
    await assert_level(raw, prefix, "key:1", "tpm", 1000, 200, t0)
    # Releasing twice charges once.
    await limiter.release(ticket, prompt_tokens=None, completion_tokens=500)
    await assert_level(raw, prefix, "key:1", "tpm", 1000, 200, t0)

    # 300 more do not fit in the ~200 left: the wait is for the missing ~100 at 1000 a minute.
    t = time.monotonic()
    exc = await attempt(limiter, ["key:1"], limits, prompt=300)
    assert isinstance(exc, RateLimited) and exc.code == "rate_limit_tpm"
    left = await tokens_left(raw, prefix, "key:1", "tpm", 1000)
    assert exc.retry_after == math.ceil((300 - left) * 60 / 1000 - (time.monotonic() - t))
    assert exc.message.startswith("rate limit reached: 1000 tokens per minute for this API key; retry in")
    # The refusal charged nothing.
    await assert_level(raw, prefix, "key:1", "tpm", 1000, 200, t0)
    # 150 fit.
    assert isinstance(await attempt(limiter, ["key:1"], limits, prompt=150), Ticket)


async def test_tpm_cancelled_stream_and_prompt_correction(
    limiter: RateLimiter, raw: Any, prefix: str
) -> None:
    t0 = time.monotonic()
    limits = RoleLimits(rpm=0, tpm=10_000, concurrency=0)
    # The estimate (400) charged at admission, the real prompt (250) at release: 150 back.
    estimate = estimate_prompt_tokens(b"x" * 1600)
    assert estimate == 400
    ticket = await limiter.acquire(["user:7"], limits, prompt_tokens=estimate, request_id=rid(), hold_s=60)
    await limiter.release(ticket, prompt_tokens=250, completion_tokens=0)
    await assert_level(raw, prefix, "user:7", "tpm", 10_000, 9750, t0)
    # A stream cancelled after 120 tokens is charged those 120 (and its prompt).
    cancelled = await limiter.acquire(["user:7"], limits, prompt_tokens=100, request_id=rid(), hold_s=60)
    await limiter.release(cancelled, prompt_tokens=None, completion_tokens=120)
    await assert_level(raw, prefix, "user:7", "tpm", 10_000, 9530, t0)
    # A request that never ran (its publish failed): prompt_tokens=0 gives the estimate back.
    unrun = await limiter.acquire(["user:7"], limits, prompt_tokens=500, request_id=rid(), hold_s=60)
    await limiter.release(unrun, prompt_tokens=0, completion_tokens=0)
    await assert_level(raw, prefix, "user:7", "tpm", 10_000, 9530, t0)


async def test_tpm_goes_negative_and_oversized_prompt_waits_for_a_full_bucket(
    limiter: RateLimiter, raw: Any, prefix: str
) -> None:
    t0 = time.monotonic()
    limits = RoleLimits(rpm=0, tpm=600, concurrency=0)  # 10 tokens a second
    ticket = await limiter.acquire(["user:8"], limits, prompt_tokens=100, request_id=rid(), hold_s=60)
    await limiter.release(ticket, prompt_tokens=None, completion_tokens=1000)
    left = await tokens_left(raw, prefix, "user:8", "tpm", 600)
    await assert_level(raw, prefix, "user:8", "tpm", 600, -500, t0)
    exc = await attempt(limiter, ["user:8"], limits, prompt=10)
    assert isinstance(exc, RateLimited) and exc.retry_after == math.ceil((10 - left) / 10)  # ~51 s

    # A prompt larger than the whole bucket: admitted only when the bucket is full.
    limits = RoleLimits(rpm=0, tpm=600, concurrency=0)
    big = await attempt(limiter, ["user:9"], limits, prompt=2000)
    assert isinstance(big, Ticket)
    await assert_level(raw, prefix, "user:9", "tpm", 600, -1400, t0)
    again = await attempt(limiter, ["user:9"], limits, prompt=2000)
    assert isinstance(again, RateLimited) and again.retry_after == 200  # 2000 tokens at 10 a second


# Concurrency


async def test_concurrency_slots(limiter: RateLimiter, raw: Any, prefix: str) -> None:
    limits = RoleLimits(rpm=0, tpm=0, concurrency=2)
    first = await attempt(limiter, ["user:3"], limits, hold_s=10.0)
    second = await attempt(limiter, ["user:3"], limits, hold_s=10.0)
    assert isinstance(first, Ticket) and isinstance(second, Ticket)
    third = await attempt(limiter, ["user:3"], limits, hold_s=10.0)
    assert isinstance(third, RateLimited)
    assert third.code == "rate_limit_concurrency" and third.retry_after == 1
    assert third.message == "rate limit reached: 2 concurrent streams for this user; retry in 1 s"
    # A release frees its slot at once.
    await limiter.release(first, prompt_tokens=None, completion_tokens=10)
    assert isinstance(await attempt(limiter, ["user:3"], limits, hold_s=10.0), Ticket)
    assert isinstance(await attempt(limiter, ["user:3"], limits, hold_s=10.0), RateLimited)
    # Slots never released (their API process died) are held until hold_s has passed ...
    await advance(raw, prefix, "user:3", 9000)
    assert isinstance(await attempt(limiter, ["user:3"], limits, hold_s=10.0), RateLimited)
    # ... and then expire.
    await advance(raw, prefix, "user:3", 1050)
    assert len(admitted(await burst(limiter, ["user:3"], limits, 5, hold_s=10.0))) == 2


# Scopes


async def test_user_and_key_limits_both_apply_and_refusals_charge_nothing(
    limiter: RateLimiter, raw: Any, prefix: str
) -> None:
    t0 = time.monotonic()
    limits = RoleLimits(rpm=3, tpm=1000, concurrency=10)
    # Key a used up by user 1 (3 requests).
    assert len(admitted(await burst(limiter, ["user:1", "key:a"], limits, 3, prompt=10))) == 3
    # User 2 through key a: refused by the key's limit ...
    exc = await attempt(limiter, ["user:2", "key:a"], limits, prompt=10)
    assert isinstance(exc, RateLimited) and exc.scope == "key:a" and "for this API key" in exc.message
    # ... and user 1 through another key: refused by the user's limit.
    exc = await attempt(limiter, ["user:1", "key:b"], limits, prompt=10)
    assert isinstance(exc, RateLimited) and exc.scope == "user:1" and "for this user" in exc.message
    # Neither refusal charged the scope that had room: user 2 and key b still have 3 each.
    assert await raw.exists(f"{prefix}user:2:rpm", f"{prefix}key:b:rpm", f"{prefix}user:2:conc") == 0
    assert len(admitted(await burst(limiter, ["user:2", "key:b"], limits, 5, prompt=10))) == 3
    await assert_level(raw, prefix, "user:2", "tpm", 1000, 970, t0)

    # A refusal by one limit (TPM of the key) charges none of the other limits either.
    limits = RoleLimits(rpm=100, tpm=1000, concurrency=2)
    held = await attempt(limiter, ["user:5", "key:c"], limits, prompt=900)
    assert isinstance(held, Ticket)
    exc = await attempt(limiter, ["user:6", "key:c"], limits, prompt=200)
    assert isinstance(exc, RateLimited) and exc.code == "rate_limit_tpm" and exc.scope == "key:c"
    assert await raw.exists(f"{prefix}user:6:rpm", f"{prefix}user:6:tpm", f"{prefix}user:6:conc") == 0
    assert await raw.zcard(f"{prefix}key:c:conc") == 1
    await assert_level(raw, prefix, "user:5", "rpm", 100, 99, t0)


async def test_scripts_reloaded_after_flush(limiter: RateLimiter, raw: Any) -> None:
    """SCRIPT FLUSH (or a Redis restart) forgets the scripts: the limiter and the login
    throttle load them again (redis-py's Script, on NOSCRIPT) and count on where they were."""
    limits = RoleLimits(rpm=2, tpm=0, concurrency=0)
    assert isinstance(await attempt(limiter, ["user:1"], limits), Ticket)
    assert await limiter.logins.attempt("alice", "10.0.0.1", 2, 0, 60) == 0
    await raw.script_flush()
    assert isinstance(await attempt(limiter, ["user:1"], limits), Ticket)
    assert isinstance(await attempt(limiter, ["user:1"], limits), RateLimited)
    assert await limiter.logins.attempt("alice", "10.0.0.1", 2, 0, 60) == 0
    assert await limiter.logins.attempt("alice", "10.0.0.1", 2, 0, 60) == 60
    await raw.script_flush()
    await limiter.logins.succeeded("alice", "10.0.0.1")
    assert await limiter.logins.attempt("alice", "10.0.0.1", 2, 0, 60) == 0


async def test_admission_latency(limiter: RateLimiter) -> None:
    """One round trip per admission: well under a millisecond on loopback."""
    limits = RoleLimits(rpm=10**6, tpm=10**8, concurrency=10**4)
    times = []
    for i in range(400):
        t = time.perf_counter()
        await limiter.acquire(["user:1", "key:1"], limits, prompt_tokens=100, request_id=f"r{i}", hold_s=60)
        times.append(time.perf_counter() - t)
    p50 = statistics.median(times[50:])
    print(f"acquire p50 {p50 * 1000:.3f} ms")
    assert p50 < 0.002  # generous for a loaded test machine; typically ~0.2 ms


# Two API processes


def _child(
    url: str, prefix: str, phases: list[tuple[tuple[int, int, int], int, int]], barrier: Any
) -> list[int]:
    """One API process: per phase, wait for the other, then burst; the admissions per phase."""

    async def run() -> list[int]:
        rl = RateLimiter(url, "closed", prefix=prefix)
        await rl.start()
        counts = []
        try:
            for i, (limits, size, prompt) in enumerate(phases):
                await asyncio.to_thread(barrier.wait, 60)
                # In waves of 5, so that the two processes' requests interleave.
                results = []
                for _ in range(size // 5):
                    results += await burst(rl, [f"user:p{i}"], RoleLimits(*limits), 5, prompt=prompt)
                counts.append(len(admitted(results)))
        finally:
            await rl.close()
        return counts

    return asyncio.run(run())


def _child_main(url: str, prefix: str, phases: Any, barrier: Any, results: Any, index: int) -> None:
    results.put((index, _child(url, prefix, phases, barrier)))


def test_two_processes_admit_exactly_the_limit(redis_server: RedisServer, prefix: str) -> None:
    """Two OS processes, each its own event loop and limiter, burst at one scope together:
    RPM 30, TPM 3000 (100 a request: 30), concurrency 7: exactly that many in total."""
    phases = [((30, 0, 0), 40, 1), ((0, 3000, 0), 40, 100), ((0, 0, 7), 40, 1)]
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_child_main, args=(redis_server.url, prefix, phases, barrier, results, i))
        for i in range(2)
    ]
    for p in procs:
        p.start()
    try:
        counts = dict(results.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    per_phase = [counts[0][i] + counts[1][i] for i in range(len(phases))]
    assert per_phase == [30, 30, 7], counts
    # Both processes got some of each (the bursts really overlapped, mostly).
    print("admissions per process and phase:", counts)


# Redis down


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start(tmp_path / "redis.log")
    yield server
    server.stop()


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_redis_down_then_back(
    own_redis: RedisServer, prefix: str, policy: Literal["open", "closed"]
) -> None:
    clock = Clock()
    rl = RateLimiter(own_redis.url, policy, prefix=prefix, backoff_s=0.5, clock=clock)
    await rl.start()
    limits = RoleLimits(rpm=2, tpm=0, concurrency=0)
    try:
        assert len(admitted(await burst(rl, ["user:1"], limits, 3))) == 2
        held = await rl.acquire(
            ["user:2"], RoleLimits(0, 1000, 1), prompt_tokens=1, request_id="h", hold_s=60
        )
        own_redis.stop()

        before = bypassed()
        for _ in range(2):  # the first finds Redis down, the second is within the backoff
            t = time.monotonic()
            if policy == "open":
                ticket = await rl.acquire(["user:1"], limits, prompt_tokens=1, request_id=rid(), hold_s=60)
                assert not ticket.recorded
            else:
                with pytest.raises(UpstreamUnavailable) as info:
                    await rl.acquire(["user:1"], limits, prompt_tokens=1, request_id=rid(), hold_s=60)
                exc = info.value
                assert (exc.status, exc.code, exc.retry_after) == (503, "rate_limiter_unavailable", 1)
            assert time.monotonic() - t < 0.3
        assert bypassed() - before == (2 if policy == "open" else 0)
        # A release while Redis is down neither raises nor stalls.
        t = time.monotonic()
        await rl.release(held, prompt_tokens=None, completion_tokens=5)
        assert time.monotonic() - t < 0.3

        own_redis.start()  # same port; its snapshot is back, its scripts are not (NOSCRIPT)
        # Within the backoff the limiter does not ask Redis yet ...
        if policy == "open":
            unchecked = await attempt(rl, ["user:1"], limits)
            assert isinstance(unchecked, Ticket) and not unchecked.recorded
        else:
            with pytest.raises(UpstreamUnavailable):
                await attempt(rl, ["user:1"], limits)
        clock.now += 0.6  # ... after it, it does
        exc2 = await attempt(rl, ["user:1"], limits)
        assert isinstance(exc2, RateLimited)  # the limit applies again
        assert len(admitted(await burst(rl, ["user:3"], limits, 3))) == 2
    finally:
        await rl.close()


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_hung_redis_costs_one_timeout(prefix: str, policy: Literal["open", "closed"]) -> None:
    """A Redis that accepts connections but never answers: the first requests wait for the
    socket timeout (together, not one after another), the next ones not at all."""
    port = free_port()
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", port))
        hung.listen(64)  # never accepted: connects succeed, nothing is ever answered
        clock = Clock()
        rl = RateLimiter(f"redis://127.0.0.1:{port}/0", policy, prefix=prefix, clock=clock)
        t = time.monotonic()
        await rl.start()
        assert time.monotonic() - t < 0.4
        limits = RoleLimits(rpm=1, tpm=0, concurrency=0)
        try:
            before = bypassed()

            async def one() -> str:
                try:
                    ticket = await rl.acquire(
                        ["user:1"], limits, prompt_tokens=1, request_id=rid(), hold_s=60
                    )
                except UpstreamUnavailable:
                    return "503"
                return "bypassed" if not ticket.recorded else "checked"

            t = time.monotonic()
            outcomes = await asyncio.gather(*(one() for _ in range(10)))
            assert time.monotonic() - t < 0.4  # the start's failure opened the breaker already
            clock.now += 1.0  # the backoff is over: the next requests probe, together
            t = time.monotonic()
            outcomes += await asyncio.gather(*(one() for _ in range(10)))
            assert time.monotonic() - t < 0.4
            expected = "bypassed" if policy == "open" else "503"
            assert set(outcomes) == {expected}
            assert bypassed() - before == (20 if policy == "open" else 0)
        finally:
            await rl.close()
