"""A request's clean-up against real NATS and Redis: whatever closing its relay meets (a
JetStream call that times out, an error), its concurrency slot is freed and its log line
written at once, not when the slot expires ten minutes later."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nats
import pytest

import schemas
from api.generation import ChatCall, RequestLine, abandon
from api.ratelimit import RateLimiter
from api.relay import Relay
from broker import topology
from broker.bus import Bus
from chatq.settings import RoleLimits
from chatq.tasks import TaskSet
from stack.servers import NatsServer, RedisServer

MODEL = "cleanup-model"
ONE_SLOT = RoleLimits(rpm=0, tpm=0, concurrency=1)


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    server = RedisServer(tmp_path / "redis").start(tmp_path / "redis.log")
    yield server.url
    server.stop()


@pytest.fixture
async def bus(fresh_nats: NatsServer) -> AsyncIterator[Bus]:
    nc = await nats.connect(fresh_nats.url)
    bus = Bus(nc)
    await topology.ensure_streams(bus.js, jobs_max_msgs=100)
    await topology.ensure_model(bus.js, MODEL, ack_wait_s=30)
    bus.js = nc.jetstream(timeout=0.5)  # so a stalled server times out quickly
    yield bus
    await nc.close()


@contextmanager
def stalled(server: NatsServer) -> Iterator[None]:
    """The NATS server stops answering (SIGSTOP) while the block runs."""
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


def job() -> schemas.Job:
    now = time.time()
    return schemas.Job(
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
        model=MODEL,
        messages=[schemas.ChatMessage(role="user", content="hi")],
        sampling=schemas.Sampling(max_tokens=2),
        created=now,
        deadline=now + 600,
        body=b'{"model": "cleanup-model", "messages": [{"role": "user", "content": "hi"}]}',
        meta=schemas.RequestMeta(user_id=1),
    )


async def queued_call(bus: Bus, limiter: RateLimiter, spawn: TaskSet) -> tuple[ChatCall, Relay]:
    """A request admitted (holding the user's one slot) and queued, no worker taking it."""
    services: Any = SimpleNamespace(limiter=limiter, spawn=spawn)
    the_job = job()
    call = ChatCall(services, RequestLine(the_job.request_id, "/v1/chat/completions", 1), Any)  # type: ignore[arg-type]
    call._ticket = await limiter.acquire(
        ["user:1"], ONE_SLOT, prompt_tokens=1, request_id=the_job.request_id, hold_s=600
    )
    relay = Relay(bus, the_job, watchdog_s=15, spawn=spawn)
    await relay.open(monitor=None)  # type: ignore[arg-type]
    return call, relay


async def slot_is_free(limiter: RateLimiter) -> bool:
    try:
        ticket = await limiter.acquire(["user:1"], ONE_SLOT, prompt_tokens=1, request_id="probe", hold_s=600)
    except Exception:  # noqa: BLE001 - RateLimited: the slot is still held
        return False
    await limiter.release(ticket, prompt_tokens=0, completion_tokens=0)
    return True


async def test_withdrawing_a_job_that_times_out_is_logged_not_raised(
    bus: Bus, fresh_nats: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    seq = (await bus.publish_job(job())).seq
    with stalled(fresh_nats):
        assert await bus.withdraw_job(seq) is False
    assert "timed out" in caplog.text


async def test_a_client_gone_while_queued_frees_its_slot_though_the_withdrawal_times_out(
    bus: Bus, fresh_nats: NatsServer, redis_url: str
) -> None:
    limiter, spawn = RateLimiter(redis_url, "closed"), TaskSet()
    await limiter.start()
    try:
        call, relay = await queued_call(bus, limiter, spawn)
        assert not await slot_is_free(limiter)
        with stalled(fresh_nats):
            await abandon(call, relay)
        await spawn.wait()
        assert call.line.written
        assert await slot_is_free(limiter)
    finally:
        await limiter.close()


async def test_the_slot_is_freed_and_the_line_written_whatever_closing_the_relay_raises(
    bus: Bus, redis_url: str
) -> None:
    limiter, spawn = RateLimiter(redis_url, "closed"), TaskSet()
    await limiter.start()
    try:
        call, relay = await queued_call(bus, limiter, spawn)

        async def broken_close(reason: object) -> None:
            raise RuntimeError("the clean-up failed")

        relay.close = broken_close  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            await abandon(call, relay)
        await spawn.wait()
        assert call.line.written
        assert await slot_is_free(limiter)
    finally:
        await limiter.close()
