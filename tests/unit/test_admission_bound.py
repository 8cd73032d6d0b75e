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
from broker.names import jobs_consumer
from broker.workers import SlotTimes, WorkerRegistry
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


@dataclass
class Announced:
    """What the workers announced last: free slots, when running jobs end, the last job taken."""

    free: int = 0
    releases: list[float] | None = None
    job_s: float = 10.0
    taken: int | None = None


def timed_monitor(fake: FakeBus, wall: Clock, said: Announced) -> QueueMonitor:
    """A latency monitor (1 s target) whose workers announce when their jobs end."""
    bus: Bus = fake  # type: ignore[assignment]
    return QueueMonitor(
        bus,
        bound=64,
        cache_s=0.0,
        policy="latency",
        wait_target_s=1.0,
        free_slots=lambda model: (said.free, 1.0),
        slot_times=lambda model, priority: (
            None if said.releases is None else SlotTimes(said.releases, said.job_s, said.taken)
        ),
        clock=fake.clock,
        wall=wall,
    )


async def test_the_bound_counts_the_slots_that_free_up_within_the_target() -> None:
    """Under a backlog, with the workers' release times known: the first in line is admitted
    only if a slot frees up within the target, even when nothing else waits."""
    fake, wall = FakeBus(Clock()), Clock(5000.0)
    said = Announced(releases=[5000.4, 5000.9, 5001.5, 5003.0])  # two within 1 s
    mon = timed_monitor(fake, wall, said)
    await backlog(fake, mon, rate=2, seconds=4, pending=10)
    said.taken = fake.started  # the workers had taken every job delivered so far
    assert mon.bound(MODEL) == 2
    fake.pending = 2
    with pytest.raises(Overloaded):
        await mon.admit(MODEL)
    wall.now = 5002.2  # three ended; two jobs taken since the announcement: one slot free
    fake.started += 2
    await mon.depth(MODEL)
    assert mon.bound(MODEL) == 2  # that one, and the release at 5003.0
    # No slot free and none due within the target: even an empty queue refuses.
    said.releases, said.taken = [5010.0, 5011.0], fake.started
    fake.pending = 0
    with pytest.raises(Overloaded) as refused:
        await mon.admit(MODEL)
    assert refused.value.retry_after >= 1
    assert "start 0 more within 1 s and 0 wait" in str(refused.value)


async def test_free_slots_and_ended_jobs_are_counted_with_release_times() -> None:
    """A job that ended since the announcement freed its slot: a burst at workers gone idle
    is admitted though the announcement showed them busy."""
    fake, wall = FakeBus(Clock()), Clock(5000.0)
    said = Announced(free=1, releases=[5000.5, 5000.6, 5009.0])
    mon = timed_monitor(fake, wall, said)
    await backlog(fake, mon, rate=2, seconds=4, pending=3)
    said.taken = fake.started
    assert mon.bound(MODEL) == 3  # 1 free + 2 due
    wall.now = 5001.0  # both ended, nothing delivered since: 3 free now
    fake.pending = 0
    await mon.depth(MODEL)
    for _ in range(3):
        await mon.admit(MODEL)
    with pytest.raises(Overloaded):
        await mon.admit(MODEL)
    # Delivered (the burst landed and was taken): no slot free until the next announcement.
    fake.started += 3
    await mon.depth(MODEL)
    assert mon.bound(MODEL) == 0


async def test_a_stream_this_process_saw_end_frees_its_slot_before_any_announcement() -> None:
    """A lone client after an overload: its answer stopped early (before max_tokens), so the
    announcement still shows the slot busy until a later release; the relay saw the end."""
    fake, wall = FakeBus(Clock()), Clock(5000.0)
    said = Announced(free=0, releases=[5008.0])
    mon = timed_monitor(fake, wall, said)
    await backlog(fake, mon, rate=2, seconds=4, pending=3)
    said.taken = fake.started
    fake.pending = 0
    with pytest.raises(Overloaded):
        await mon.admit(MODEL)
    wall.now = 5000.2
    mon.ended(MODEL)  # ended after the announcement (made at wall 1.0 in this test)
    await mon.admit(MODEL)


async def test_a_slot_frees_again_every_job_s_within_a_long_target() -> None:
    fake, wall = FakeBus(Clock()), Clock(5000.0)
    said = Announced(free=1, releases=[5000.2], job_s=0.3)
    mon = timed_monitor(fake, wall, said)
    await backlog(fake, mon, rate=20, seconds=4, pending=3)
    said.taken = fake.started
    # Free now: at 0, 0.3, 0.6, 0.9 s; the release at 0.2 s: then 0.5 and 0.8 s.
    assert mon.bound(MODEL) == 4 + 3


async def test_release_times_never_admit_more_than_the_measured_start_rate() -> None:
    """Slots announced as freeing up that the workers do not refill (a first-token hold
    leaves jobs in the queue) show in the start rate: the bound is the smaller of the two."""
    fake, wall = FakeBus(Clock()), Clock(5000.0)
    said = Announced(free=1, releases=[5000.2, 5000.3, 5000.4, 5000.5], job_s=10.0)
    mon = timed_monitor(fake, wall, said)
    await backlog(fake, mon, rate=1, seconds=4, pending=3)  # 1 job a second started
    said.taken = fake.started
    assert mon.bound(MODEL) == 1 + 1  # not 1 + 4: the free slot and 1 start within 1 s


async def test_without_a_backlog_release_times_never_refuse_a_single_client() -> None:
    fake, wall = FakeBus(Clock()), Clock(5000.0)
    mon = timed_monitor(fake, wall, Announced(releases=[5100.0], taken=0))
    for _ in range(5):
        await mon.admit(MODEL)  # nothing has waited: no capacity, the depth bound
        fake.clock.now += 10.0
        fake.started += 1


async def test_a_burst_before_any_backlog_is_bounded_by_the_slots_its_own_admissions_take() -> None:
    """The start of an overload: no reading has shown a job waiting yet (the burst is on its
    way to the stream), so there is no capacity; this process's own admissions still count,
    and past the free slots, with none due within the target, the next is refused."""
    fake, wall = FakeBus(Clock()), Clock(5000.0)
    mon = timed_monitor(fake, wall, Announced(free=2, releases=[5010.0, 5011.0], taken=0))
    await mon.admit(MODEL)
    await mon.admit(MODEL)
    with pytest.raises(Overloaded) as refused:
        await mon.admit(MODEL)
    assert "start 2 more within 1 s and 2 wait" in str(refused.value)


def test_the_registry_merges_the_workers_release_times() -> None:
    registry = WorkerRegistry(None)  # type: ignore[arg-type]  - fed by hand, never watching
    now = time.time()

    def worker(wid: str, job_s: float, releases: list[float] | None, taken: dict[str, int]) -> None:
        registry._entries[wid] = schemas.WorkerStatus(
            worker_id=wid, model=MODEL, engine="synthetic", state="ready",
            slots=8, free_slots=0, updated=now, job_s=job_s, releases=releases, taken=taken,
        )  # fmt: skip

    assert registry.slot_times(MODEL, "interactive") is None  # no worker
    interactive, background = jobs_consumer(MODEL, "interactive"), jobs_consumer(MODEL, "background")
    worker("a", 2.0, [now + 3, now + 1], {interactive: 40, background: 3})
    worker("b", 0.0, [now + 2], {interactive: 42})
    assert registry.slot_times(MODEL, "interactive") == SlotTimes([now + 1, now + 2, now + 3], 2.0, 42)
    assert registry.slot_times(MODEL, "background") == SlotTimes([now + 1, now + 2, now + 3], 2.0, 3)
    worker("c", 4.0, None, {})  # one that does not say: the capacity bound instead
    assert registry.slot_times(MODEL, "interactive") is None
