"""Admission control: refuse work (429 + Retry-After) when a model's queue is over its bound.

A model's queue depth is the `num_pending` of its JetStream consumer. Admitting against
that reading alone would let a burst overshoot the bound: the jobs admitted a moment ago
are still on their way to the stream. So each process also counts its own admissions
that no reading has shown yet ("unseen") on top of the reading:

    waiting = reading.pending + unseen admissions of this process

An admission stops being unseen once a reading shows it has landed: the consumer's
`arrived` count (delivered plus pending) grows by one per job stored, and that growth
retires the oldest unseen admissions. Jobs that landed and were then taken by a worker
are neither pending nor unseen, so a finished request never counts as waiting. (The count
is not exact: a redelivery adds one, so may retire an admission early; a job withdrawn
before delivery takes one away, so an admission may stay unseen until UNSEEN_TTL_S.)

The reading is cached for `cache_s` so that a burst does not cost one consumer-info
request per request, but a refusal is never based on a cached reading: when the cached
reading says "full", admit() asks again (one request in flight per queue, shared by
every request that is waiting for it) and decides on a reading taken after it was called.

Across API processes the count is not shared: a process sees another's jobs only once
they have landed. Two processes whose readings both come before the other's burst lands
can each admit up to the bound, so with N processes the queue can briefly hold up to N
times the bound (the JetStream per-subject limit, JOBS_MAX_MSGS, is the exact hard cap).
Once the jobs have landed, every process sees them and refuses.

The bound itself depends on the policy (ADMISSION_POLICY). `depth`: the fixed
CHATQ_QUEUE_MAX (the default). `latency`: as many jobs as the workers can start within
the wait target T (ADMISSION_WAIT_TARGET_S), from their capacity μ (jobs started per
second while a backlog waited, api/drain.py; before a backlog has been measured, while
jobs wait, what the workers announce they can start: their slots over the time a job
holds one) and the
free slots F: what the
live workers announced last (the workers KV bucket, every couple of seconds) less the
jobs the consumer shows delivered since (started or still in prefill), since each took
one of those slots:

    bound = min(CHATQ_QUEUE_MAX, max(1, F + floor(μ · T)))

A job admitted with `waiting` jobs ahead of it gets a slot once the F free ones are
taken and (waiting − F) more jobs have started, about (waiting − F + 1) / μ seconds on;
admitting only below the bound keeps that within T. Its time to the first token is
then the engine's own TTFT plus at most about T.

A rate is an average: with jobs of equal length the slots free up in clusters, and the
first job in line may wait a whole slot time for the next one (measured: TTFT p99 2.5×
the unloaded one at 3× capacity). So where the workers also announce when each running
job should end (WorkerStatus.releases, from its token rate and max_tokens; announced
again at the worker's next tick, 0.25 s, after a job ends), the bound counts slots
instead: the free ones and those whose release falls within T, each again every `job_s`
after (_startable). A slot freed since the announcement counts as free: a release now
past, or a stream this process relayed to its end (a job that stopped before
max_tokens). Where there is a capacity μ, it is never above the rate bound on those
same free slots: a slot announced as freed may stay unused (a worker's first-token
hold), which a measured μ shows. That bound may be 0: with no slot free and none due
within T, even the first in line is refused. Its known errors: with several workers, a
job one took after its announcement but before another's newer one is not subtracted
(until its next announcement); the interactive and background queues each count every
slot.

Release times count as soon as anything waits, by a reading or by this process's own
admissions that no reading shows yet: at the start of a burst no backlog has been
measured, and the readings lag the burst. Without any capacity and with nothing waiting
(no backlog in the last CAPACITY_MEMORY_S) the bound is CHATQ_QUEUE_MAX, as with
`depth`: a request that finds nothing waiting (this process's unseen admissions
counted; one refused by its rate limit gives its place back) is admitted. Without
release times the bound is never below 1, so such a request is admitted too. μ, F and
the releases are read from NATS, which every API process shares, so every process
computes the same bound. Retry-After is the time for the excess to drain at μ (or,
without μ, at the recent start rate).
"""

from __future__ import annotations

import asyncio
import bisect
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from api import metrics
from api.drain import DrainEstimator
from broker.bus import Bus, ConsumerDepth
from broker.workers import SlotTimes
from chatq.errors import Overloaded, UpstreamUnavailable
from schemas.messages import Priority

MAX_RETRY_AFTER_S = 60
DEFAULT_RETRY_AFTER_S = 5
AdmissionPolicy = Literal["depth", "latency"]
# An admission that no reading has shown this long after it is taken as landed, so that
# one whose job never lands (its publish failed), or whose landing the `arrived` count
# missed (a job withdrawn from the queue before delivery offsets one arrival), cannot
# hold a place in the queue for ever. A publish is acknowledged, or has failed, well
# within this (the JetStream API timeout is 5 s).
UNSEEN_TTL_S = 6.0
# The stream ends of this process remembered per model (for the slots freed since the
# workers' last announcement): more than end between two announcements.
ENDS_MEMORY = 1024


@dataclass
class _ModelQueue:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    depth: ConsumerDepth | None = None
    # Readings requested so far, and which of them `depth` is: a reading numbered above
    # the count an admit() saw when called was requested after it, so it reflects
    # everything that happened before.
    readings: int = 0
    reading: int = 0
    # When each admission of this process that no reading has shown yet was made (monotonic).
    unseen: deque[float] = field(default_factory=deque)
    drain: DrainEstimator = field(default_factory=DrainEstimator)

    # The announcement of free slots last seen (its time) and the jobs delivered to
    # workers at the reading before the one that first saw it (so, before it was made, or
    # a little after): every job delivered since took a slot it counted as free.
    announced: float | None = None
    delivered_then: int = 0
    delivered_before: int = 0  # at the reading before the current one


def _delivered(depth: ConsumerDepth) -> int:
    """Jobs workers have taken: started, and in prefill (delivered, not yet acked)."""
    return depth.started + depth.in_flight


def _no_free_slots(model: str) -> tuple[int, float]:
    return 0, 0.0


def _no_estimate(model: str) -> float | None:
    return None


def _no_slot_times(model: str, priority: Priority) -> SlotTimes | None:
    return None


class QueueMonitor:
    """Reads each model's queue depth from its JetStream consumer, cached for a moment."""

    def __init__(
        self,
        bus: Bus,
        *,
        bound: int,
        cache_s: float,
        policy: AdmissionPolicy = "depth",
        wait_target_s: float = 2.0,
        free_slots: Callable[[str], tuple[int, float]] = _no_free_slots,
        capacity_estimate: Callable[[str], float | None] = _no_estimate,
        slot_times: Callable[[str, Priority], SlotTimes | None] = _no_slot_times,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._bus = bus
        self._bound = bound
        self._cache_s = cache_s
        self._policy = policy
        self._wait_target_s = wait_target_s
        self._free_slots = free_slots
        self._capacity_estimate = capacity_estimate
        self._slot_times = slot_times
        self._clock = clock  # the clock of ConsumerDepth.at (the bus's monotonic one)
        self._wall = wall  # the clock of WorkerStatus.releases
        self._queues: dict[tuple[str, Priority], _ModelQueue] = {}
        self._ends: dict[str, deque[float]] = {}  # when this process's streams ended, per model

    def _queue(self, model: str, priority: Priority) -> _ModelQueue:
        return self._queues.setdefault((model, priority), _ModelQueue())

    def _fresh(self, queue: _ModelQueue) -> bool:
        return queue.depth is not None and self._clock() - queue.depth.at < self._cache_s

    async def depth(self, model: str, priority: Priority = "interactive") -> ConsumerDepth:
        """The queue depth of a model and priority, at most cache_s old."""
        queue = self._queue(model, priority)
        if not self._fresh(queue):
            async with queue.lock:  # one consumer-info request at a time per queue
                if not self._fresh(queue):
                    await self._refresh(model, priority, queue)
        assert queue.depth is not None
        return queue.depth

    async def _read_after(self, model: str, priority: Priority, queue: _ModelQueue, seen: int) -> None:
        """Make sure the queue holds a reading requested after `seen` readings had been."""
        async with queue.lock:
            # Whoever held the lock may have just taken one: a burst shares a reading.
            if queue.reading <= seen:
                await self._refresh(model, priority, queue)

    async def _refresh(self, model: str, priority: Priority, queue: _ModelQueue) -> None:
        queue.readings += 1
        number = queue.readings
        try:
            fresh = await self._bus.consumer_depth(model, priority)
        except Exception as exc:
            raise UpstreamUnavailable(f"the job queue is unreachable: {type(exc).__name__}") from exc
        if queue.depth is not None:
            # Jobs stored since the last reading: the oldest of our unseen admissions have
            # landed (another process's jobs may be taken for ours; they are in `pending`).
            for _ in range(min(max(0, fresh.arrived - queue.depth.arrived), len(queue.unseen))):
                queue.unseen.popleft()
        if queue.depth is not None:
            queue.delivered_before = _delivered(queue.depth)
        queue.depth, queue.reading = fresh, number
        queue.drain.observe(fresh.at, fresh.started, fresh.pending)
        if priority == "interactive":
            metrics.QUEUE_DEPTH.labels(model=model).set(fresh.pending)

    def _waiting(self, queue: _ModelQueue) -> int:
        """Jobs waiting: the last reading's plus this process's admissions it does not show."""
        assert queue.depth is not None
        expired = self._clock() - UNSEEN_TTL_S
        while queue.unseen and queue.unseen[0] < expired:
            queue.unseen.popleft()
        return queue.depth.pending + len(queue.unseen)

    def drain_rate(self, model: str, priority: Priority = "interactive") -> float | None:
        """Jobs per second that workers start (ack at the first token), over the window."""
        queue = self._queues.get((model, priority))
        return None if queue is None else queue.drain.rate()

    def capacity(self, model: str, priority: Priority = "interactive") -> float | None:
        """Jobs per second the workers start while a backlog waits (api/drain.py); before
        one has been measured and while jobs wait, what the workers announce; or None."""
        queue = self._queues.get((model, priority))
        measured = None if queue is None else queue.drain.capacity(self._clock())
        if measured is not None or queue is None or queue.depth is None or not queue.depth.pending:
            # The announced figure only while jobs wait: a burst at idle workers goes to
            # their free slots, which an announcement made before the last jobs ended
            # (and counted as taken since) does not show.
            return measured
        return self._capacity_estimate(model)

    def bound(self, model: str, priority: Priority = "interactive") -> int:
        """How many jobs may wait: CHATQ_QUEUE_MAX, or what the workers start within the target."""
        if self._policy == "depth":
            return self._bound
        capacity = self.capacity(model, priority)
        queue = self._queue(model, priority)
        times = self._slot_times(model, priority)
        if times is not None and (capacity is not None or (queue.depth is not None and self._waiting(queue))):
            # Counted on release times also while no reading shows a job waiting but this
            # process's own admissions do: at the start of a burst the readings lag, and
            # without this the bound stayed CHATQ_QUEUE_MAX until one showed a backlog
            # (measured: 5 admitted behind 8 busy slots, TTFT up to 1.6 s).
            return min(self._bound, self._startable(model, queue, times, capacity))
        if capacity is None:
            return self._bound
        return min(self._bound, self._rate_bound(self._free(model, queue), capacity))

    def _rate_bound(self, free: int, capacity: float) -> int:
        """The free slots and what the workers start at `capacity` within the target; at least 1."""
        return max(1, free + math.floor(capacity * self._wait_target_s))

    def _startable(
        self, model: str, queue: _ModelQueue, times: SlotTimes, capacity: float | None = None
    ) -> int:
        """Jobs the workers start within the target, from when their slots free up: each free
        slot now and each release due by then, and again every job_s after it.

        A release already past freed a slot that is free now or that a job delivered since
        the announcement has taken (the consumer's deliveries after the last one a worker
        had taken). Jobs started since then free theirs later than the target as long as a
        job holds a slot longer than the time between announcements (one per job's end).

        With a `capacity` (measured, or announced while jobs wait), never more than the
        rate bound on the same free slots: a slot a worker announces as freed may stay
        unused (its first-token hold, workers/inference/pacing.py), which a measured start
        rate shows.
        """
        now = self._wall()
        horizon = now + self._wait_target_s
        releases = times.releases
        past, due = bisect.bisect_right(releases, now), bisect.bisect_right(releases, horizon)
        # Ended since the announcement: the releases now past, or the streams of this
        # process that ended since if more (a job ends a little before its estimate, or
        # long before at an early stop); those are taken to be the soonest releases.
        _, announced = self._free_slots(model)
        ends = self._ends.get(model, ())
        ended = max(past, next((i for i, at in enumerate(reversed(ends)) if at <= announced), len(ends)))
        free = self._free(model, queue, ended, times.taken)
        slots = [now] * free + releases[ended:due]
        if times.job_s <= 0:
            startable = len(slots)
        else:
            startable = sum(1 + math.floor((horizon - at) / times.job_s) for at in slots)
        return startable if capacity is None else min(startable, self._rate_bound(free, capacity))

    def _free(self, model: str, queue: _ModelQueue, released: int = 0, taken: int | None = None) -> int:
        """Free slots now: the workers' last announcement, plus the `released` since, less the
        jobs delivered since: counted from the reading before the announcement was seen,
        or, if fewer, after the last delivery a worker says it had taken (`taken`).

        Workers announce every couple of seconds; under load a slot that was free at the
        announcement has long been taken, and counting it would admit past the target.
        """
        free, announced = self._free_slots(model)
        assert queue.depth is not None
        if announced != queue.announced:
            queue.announced, queue.delivered_then = announced, queue.delivered_before
        delivered = _delivered(queue.depth)
        since = delivered - queue.delivered_then
        if taken is not None:
            since = min(since, max(0, delivered - taken))
        return max(0, free + released - since)

    def ended(self, model: str) -> None:
        """A stream of `model` this process relayed has ended: its worker has freed the slot
        (or will within moments), though no announcement shows it yet."""
        self._ends.setdefault(model, deque(maxlen=ENDS_MEMORY)).append(self._wall())

    def retry_after(self, model: str, excess: int, priority: Priority = "interactive") -> int:
        """Seconds until `excess` queued jobs have drained at the observed rate."""
        rate = self.capacity(model, priority) or self.drain_rate(model, priority)
        if not rate:
            return DEFAULT_RETRY_AFTER_S
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(excess / rate)))

    async def admit(self, model: str, priority: Priority = "interactive") -> None:
        """Raise Overloaded when the queue holds its bound of waiting jobs.

        The caller publishes the job next; until a reading shows it, it counts as waiting.
        """
        queue = self._queue(model, priority)
        seen = queue.readings
        await self.depth(model, priority)
        waiting = self._waiting(queue)
        if waiting >= self.bound(model, priority):
            # Never refuse on a cached reading: it may predate workers taking jobs. The
            # requests that would be refused meanwhile share the next reading.
            await self._read_after(model, priority, queue, seen)
            waiting = self._waiting(queue)
        bound = self.bound(model, priority)
        if waiting >= bound:
            if bound < self._bound:
                metrics.REJECTED.labels(model=model, reason="queue_wait").inc()
                message = (
                    f"the queue for model {model!r} is full: its workers start {bound} more within "
                    f"{self._wait_target_s:g} s and {waiting} wait; retry later"
                )
            else:
                metrics.REJECTED.labels(model=model, reason="queue_depth").inc()
                message = f"the queue for model {model!r} is full ({waiting} waiting); retry later"
            raise Overloaded(message, retry_after=self.retry_after(model, waiting - bound + 1, priority))
        queue.unseen.append(self._clock())

    def not_queued(self, model: str, priority: Priority = "interactive") -> None:
        """An admitted job whose publish failed no longer counts as waiting.

        Without this, while the JOBS stream has no leader (a NATS cluster electing one)
        every failed publish would hold a place for UNSEEN_TTL_S, and the queue would
        soon read as full: clients would get 429 queue_full instead of 503, for up to
        UNSEEN_TTL_S after the stream is back. A publish that timed out may yet have
        landed; then the next reading counts it in `pending`.
        """
        queue = self._queues.get((model, priority))
        if queue is not None and queue.unseen:
            queue.unseen.pop()

    def refused(self, model: str, priority: Priority = "interactive") -> Overloaded:
        """The error for a publish the full JOBS stream refused (after admit() let it in)."""
        self.not_queued(model, priority)  # that job will never land
        metrics.REJECTED.labels(model=model, reason="stream_full").inc()
        return Overloaded(
            f"the queue for model {model!r} is at its hard limit; retry later",
            retry_after=self.retry_after(model, 1, priority),
        )


class StreamCap:
    """At most `limit` streams relayed by this API process at once (API_MAX_STREAMS; 0:
    no cap); one more is refused with 429 `api_busy` before anything is queued.

    One process relays only so many chunks a second. Past that it reads NATS late, the
    server buffers what it has not read, and at 64 MiB cuts the connection as a slow
    consumer: every stream the process holds then fails at once (measured: one API
    process with 1000 streams of 20 tokens/s on 2 cores lost 708 of them). Refusing the
    excess keeps the accepted ones whole; with several API processes on one port
    (`./start --api-workers M`) the client's retry may land on one with room.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    def take(self, model: str) -> None:
        if self.limit and self.open >= self.limit:
            metrics.REJECTED.labels(model=model, reason="api_busy").inc()
            raise Overloaded(
                f"this API process relays {self.open} streams, its most (API_MAX_STREAMS); retry later",
                code="api_busy",
                retry_after=1,
            )
        self.open += 1

    def give_back(self) -> None:
        self.open -= 1
