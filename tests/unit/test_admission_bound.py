"""The drain estimator (api/drain.py) and the latency-aware bound (api/admission.py),
with a fake clock and a fake consumer: no NATS, no sleeping."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest

import schemas
from api.admission import QueueMonitor
from api.drain import CAPACITY_MEMORY_S, DrainEstimator
from broker.bus import Bus, ConsumerDepth
from broker.workers import WorkerRegistry
from chatq.errors import Overloaded

MODEL = "m"


def test_no_rate_before_two_seconds_of_readings() -> None:
    drain = DrainEstimator()
    drain.observe(0.0, 0, 0)
    drain.observe(1.0, 5, 0)
    assert drain.rate() is None
    drain.observe(2.0, 10, 0)
    assert drain.rate() == 5.0


def test_capacity_counts_only_time_with_a_backlog() -> None:
    """Idle time is not capacity: 1 job/s at low load says nothing of what workers can do."""
    drain = DrainEstimator()
    for t in range(10):
        drain.observe(float(t), t, 0)  # one job a second, nothing ever waiting
    assert drain.rate() == 1.0
    assert drain.capacity(9.0) is None
    # A backlog from t=10: the workers start 4 jobs a second while jobs wait.
    for i, t in enumerate(range(10, 14)):
        drain.observe(float(t), 9 + 4 * i, 20)
    assert drain.capacity(13.0) == 4.0


def test_an_interval_with_an_empty_end_is_not_busy() -> None:
    drain = DrainEstimator()
    drain.observe(0.0, 0, 5)
    drain.observe(3.0, 2, 0)  # the queue ran dry somewhere in between: slots may have idled
    assert drain.capacity(3.0) is None


def test_capacity_is_remembered_after_the_backlog_then_forgotten() -> None:
    drain = DrainEstimator()
    for t in range(4):
        drain.observe(float(t), 3 * t, 10)
    drain.observe(4.0, 10, 0)
    assert drain.capacity(30.0) == 3.0
    assert drain.capacity(3.0 + CAPACITY_MEMORY_S + 0.1) is None


def test_capacity_follows_the_newest_ten_seconds_of_backlog() -> None:
    drain = DrainEstimator()
    started = 0
    for t in range(30):  # 2 jobs/s for 30 s, then 6 jobs/s for 10 s
        drain.observe(float(t), started, 10)
        started += 2
    for t in range(30, 41):
        drain.observe(float(t), started, 10)
        started += 6
    capacity = drain.capacity(40.0)
    assert capacity is not None and capacity == pytest.approx(6.0, rel=0.1)


def test_a_counter_that_goes_back_starts_afresh() -> None:
    drain = DrainEstimator()
    for t in range(5):
        drain.observe(float(t), 100 + 5 * t, 10)
    drain.observe(5.0, 0, 10)  # the consumer was made anew
    assert drain.capacity(5.0) is None and drain.rate() is None


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeBus:
    """consumer_depth() answers what the test sets, stamped with the fake clock."""

    clock: Clock
    pending: int = 0
    started: int = 0
    in_flight: int = 0
    readings: list[float] = field(default_factory=list)

    async def consumer_depth(self, model: str, priority: str = "interactive") -> ConsumerDepth:
        self.readings.append(self.clock.now)
        return ConsumerDepth(
            pending=self.pending,
            in_flight=self.in_flight,
            started=self.started,
            at=self.clock.now,
            arrived=self.pending + self.started,
        )


def monitor(
    fake: FakeBus, *, policy: str = "latency", free: int = 0, bound: int = 64, estimate: float | None = None
) -> QueueMonitor:
    bus: Bus = fake  # type: ignore[assignment]
    return QueueMonitor(
        bus,
        bound=bound,
        cache_s=0.0,
        policy=policy,  # type: ignore[arg-type]
        wait_target_s=1.0,
        free_slots=lambda model: (free, 1.0),
        capacity_estimate=lambda model: estimate,
        clock=fake.clock,
    )


async def backlog(fake: FakeBus, mon: QueueMonitor, *, rate: int, seconds: int, pending: int) -> None:
    """Readings over `seconds` with `pending` jobs waiting and workers starting `rate` a second."""
    for _ in range(seconds + 1):
        fake.pending = pending
        await mon.depth(MODEL)
        fake.clock.now += 1.0
        fake.started += rate


async def test_without_a_measured_capacity_the_depth_bound_applies() -> None:
    fake = FakeBus(Clock())
    mon = monitor(fake, bound=8)
    await mon.depth(MODEL)
    assert mon.bound(MODEL) == 8
    fake.pending = 7
    await mon.admit(MODEL)  # 7 waiting < 8
    with pytest.raises(Overloaded):
        await mon.admit(MODEL)


async def test_before_a_backlog_the_workers_announced_capacity_bounds_the_queue() -> None:
    """A burst meets the first backlog with what the workers say they start (slots / job_s),
    not with CHATQ_QUEUE_MAX: 2 jobs/s x 1 s target."""
    fake = FakeBus(Clock())
    mon = monitor(fake, bound=64, estimate=2.0)
    await mon.depth(MODEL)
    # Nothing waits: a burst goes to free slots the last announcement may not show yet.
    assert mon.bound(MODEL) == 64
    fake.pending = 1
    await mon.depth(MODEL)
    assert mon.bound(MODEL) == 2
    await mon.admit(MODEL)
    with pytest.raises(Overloaded) as refused:
        await mon.admit(MODEL)  # 1 waiting + 1 admitted since the reading
    assert refused.value.retry_after == 1
    # Once a backlog has been measured, the measurement wins over the announcement.
    await backlog(fake, mon, rate=5, seconds=4, pending=10)
    assert mon.capacity(MODEL) == 5.0 and mon.bound(MODEL) == 5


async def test_latency_bound_is_what_the_workers_start_within_the_target() -> None:
    fake = FakeBus(Clock())
    mon = monitor(fake)
    await backlog(fake, mon, rate=3, seconds=4, pending=10)
    assert mon.capacity(MODEL) == 3.0
    assert mon.bound(MODEL) == 3  # 3 jobs/s x 1 s target, no free slot
    fake.pending = 3
    with pytest.raises(Overloaded) as refused:
        await mon.admit(MODEL)
    assert refused.value.retry_after == 1  # one job too many drains in 1/3 s
    fake.pending = 12
    with pytest.raises(Overloaded) as refused:
        await mon.admit(MODEL)
    assert refused.value.retry_after == 4  # 10 jobs over the bound at 3 jobs/s
    fake.pending = 2
    await mon.admit(MODEL)


async def test_depth_policy_ignores_the_capacity() -> None:
    fake = FakeBus(Clock())
    mon = monitor(fake, policy="depth", bound=64)
    await backlog(fake, mon, rate=3, seconds=4, pending=10)
    assert mon.bound(MODEL) == 64
    fake.pending = 40
    await mon.admit(MODEL)


async def test_free_slots_are_admitted_at_once() -> None:
    """A burst at an idle worker with free slots is admitted, however slow its model."""
    fake = FakeBus(Clock())
    mon = monitor(fake, free=16)
    await backlog(fake, mon, rate=0, seconds=4, pending=3)  # a slow model: nothing started
    assert mon.capacity(MODEL) == 0.0
    assert mon.bound(MODEL) == 16


async def test_slots_announced_free_are_taken_by_the_jobs_started_since() -> None:
    """A stale announcement of 4 free slots: 3 jobs taken after it, so 1 is left."""
    fake = FakeBus(Clock())
    mon = monitor(fake, free=4)
    await backlog(fake, mon, rate=0, seconds=4, pending=3)
    assert mon.bound(MODEL) == 4
    fake.in_flight = 1  # taken, in prefill
    fake.started += 2
    await mon.depth(MODEL)
    assert mon.bound(MODEL) == 1


async def test_an_empty_queue_always_admits() -> None:
    """Never a false 429 for a single client: with nothing waiting the bound is at least 1."""
    fake = FakeBus(Clock())
    mon = monitor(fake, free=0)
    await backlog(fake, mon, rate=0, seconds=4, pending=3)
    fake.pending = 0
    for _ in range(20):
        await mon.admit(MODEL)
        fake.clock.now += 10.0  # each request's job lands and is taken before the next
        fake.started += 1


async def test_refusal_takes_a_fresh_reading() -> None:
    fake = FakeBus(Clock())
    mon = QueueMonitor(
        fake,  # type: ignore[arg-type]
        bound=64,
        cache_s=5.0,
        policy="latency",
        wait_target_s=1.0,
        clock=fake.clock,
    )
    await backlog(fake, mon, rate=3, seconds=4, pending=10)  # readings 5 s apart: each fresh
    fake.pending = 10
    await mon.depth(MODEL)
    fake.pending = 0  # the workers took them all since that cached reading
    readings = len(fake.readings)
    await mon.admit(MODEL)
    assert len(fake.readings) == readings + 1


def test_the_workers_capacity_estimate_is_their_slots_over_a_jobs_slot_time() -> None:
    registry = WorkerRegistry(None)  # type: ignore[arg-type]  - fed by hand, never watching
    now = time.time()

    def worker(wid: str, job_s: float, state: str = "ready", model: str = MODEL) -> None:
        registry._entries[wid] = schemas.WorkerStatus(
            worker_id=wid, model=model, engine="synthetic", state=state,  # type: ignore[arg-type]
            slots=8, free_slots=0, updated=now, job_s=job_s,
        )  # fmt: skip

    worker("a", 0.0)
    assert registry.capacity_estimate(MODEL) is None  # no job done anywhere yet
    worker("b", 2.0)
    worker("c", 4.0)
    worker("d", 1.0, state="loading")  # not serving yet: not counted
    worker("e", 1.0, model="other")
    # b: 8/2, c: 8/4, and a (no job yet) at their average slot time, 3 s: 8/3.
    assert registry.capacity_estimate(MODEL) == pytest.approx(4 + 2 + 8 / 3)
