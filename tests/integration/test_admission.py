"""Admission control (api.admission.QueueMonitor) against a real nats-server: no false
refusal when the queue is below its bound, no overshoot of the bound by a burst."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from nats.js import JetStreamContext

import schemas
from api.admission import QueueMonitor
from broker import names, topology
from broker.bus import Bus
from broker.connect import connect
from chatq.errors import Overloaded
from stack.servers import NatsServer
from tests.helpers import one_line_job

MODEL = "admission-model"
# JetStream's own per-subject limit, far above the bounds tested: every refusal below
# comes from the monitor, and no publish is refused by the stream.
JOBS_MAX_MSGS = 1000
# Long enough that a stale cached reading would decide every admission in a test.
CACHE_S = 5.0


def job() -> schemas.Job:
    return one_line_job(MODEL)


@pytest.fixture
async def bus(fresh_nats: NatsServer) -> AsyncIterator[Bus]:
    bus = Bus(await connect(fresh_nats.url, "test-admission"))
    await topology.ensure_streams(bus.js, jobs_max_msgs=JOBS_MAX_MSGS)
    await topology.ensure_model(bus.js, MODEL, ack_wait_s=30)
    yield bus
    await bus.close()


async def take(js: JetStreamContext, count: int) -> None:
    """Take `count` jobs off the queue as a worker does, and ack them (finished)."""
    sub = await js.pull_subscribe_bind(names.jobs_consumer(MODEL), stream=names.JOBS_STREAM)
    try:
        taken = 0
        while taken < count:
            for msg in await sub.fetch(count - taken, timeout=5):
                await msg.ack_sync()
                taken += 1
    finally:
        await sub.unsubscribe()


async def sequential_refusals(monitor: QueueMonitor, bus: Bus, requests: int = 20) -> int:
    """One client, one request at a time, each finished before the next: the refusals."""
    refusals = 0
    for _ in range(requests):
        try:
            await monitor.admit(MODEL)
        except Overloaded:
            refusals += 1
            continue
        await bus.publish_job(job())
        await take(bus.js, 1)
    return refusals


async def admit_and_publish(monitor: QueueMonitor, bus: Bus) -> bool:
    """What the API does for a request (api.generation, api.relay.Relay.open): True if queued."""
    try:
        await monitor.admit(MODEL)
    except Overloaded as exc:
        assert exc.retry_after is not None and exc.retry_after >= 1
        return False
    await bus.publish_job(job())
    return True


async def burst(monitor: QueueMonitor, bus: Bus, size: int) -> int:
    return sum(await asyncio.gather(*(admit_and_publish(monitor, bus) for _ in range(size))))


async def test_no_false_refusal_when_jobs_finished(bus: Bus) -> None:
    """The issue's case: bound 2, one sequential client, nothing ever waiting."""
    monitor = QueueMonitor(bus, bound=2, cache_s=CACHE_S)
    assert await sequential_refusals(monitor, bus) == 0
    assert await bus.jobs_in_stream() == 0


async def test_burst_does_not_overshoot(bus: Bus) -> None:
    """50 concurrent requests, no worker: exactly the bound is queued, in either direction."""
    monitor = QueueMonitor(bus, bound=4, cache_s=CACHE_S)
    assert await burst(monitor, bus, 50) == 4
    assert await bus.jobs_in_stream() == 4

    # A full queue, now landed: another burst is refused entirely.
    assert await burst(monitor, bus, 50) == 0
    assert await bus.jobs_in_stream() == 4

    # A worker takes two; the cached reading still says full, but a refusal needs a
    # fresh reading: exactly the two free places are filled.
    await take(bus.js, 2)
    assert await burst(monitor, bus, 50) == 2
    assert await bus.jobs_in_stream() == 4


async def test_two_processes_share_the_bound(bus: Bus, fresh_nats: NatsServer) -> None:
    """Two API processes (two connections, two monitors) on one queue of bound 4.

    The monitors share no count: each sees the other's jobs only once they have landed.
    When both read the queue before either's burst lands, each may admit up to the bound,
    so simultaneous bursts may queue up to 2 x 4 (the documented slack: one bound per
    further process). Once the jobs have landed, both refuse, and bursts that do not
    overlap are held to the bound exactly. JetStream's own limit is never reached.
    """
    bound = 4
    other = Bus(await connect(fresh_nats.url, "test-admission-2"))
    try:
        first = QueueMonitor(bus, bound=bound, cache_s=CACHE_S)
        second = QueueMonitor(other, bound=bound, cache_s=CACHE_S)

        async def both() -> int:
            counts = await asyncio.gather(burst(first, bus, 25), burst(second, other, 25))
            return sum(counts)

        admitted = await both()
        assert bound <= admitted <= 2 * bound
        assert await bus.jobs_in_stream() == admitted

        assert await both() == 0
        assert await bus.jobs_in_stream() == admitted

        # Empty the queue; then one process's burst, then the other's.
        await take(bus.js, admitted)
        assert await burst(first, bus, 25) == bound
        assert await burst(second, other, 25) == 0
        await take(bus.js, 1)
        assert await burst(second, other, 25) == 1
        assert await burst(first, bus, 25) == 0
        assert await bus.jobs_in_stream() == bound
    finally:
        await other.close()
