"""Admission control: refuse work (429 + Retry-After) when a model's queue is over its bound."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field

from api import metrics
from broker.bus import Bus, ConsumerDepth
from chatq.errors import Overloaded, UpstreamUnavailable
from schemas.messages import Priority

MAX_RETRY_AFTER_S = 60
DEFAULT_RETRY_AFTER_S = 5
# The drain rate is measured over this window: long enough that the burst of jobs an
# idle worker takes at once does not read as the steady rate.
RATE_WINDOW_S = 10.0
MIN_RATE_SPAN_S = 2.0


@dataclass
class _ModelQueue:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    depth: ConsumerDepth | None = None
    # Admissions since `depth` was read: the cached reading does not know them yet.
    admitted_since: int = 0
    started: deque[tuple[float, int]] = field(default_factory=deque)  # (at, jobs started)


class QueueMonitor:
    """Reads each model's queue depth from its JetStream consumer, cached for a moment."""

    def __init__(self, bus: Bus, *, bound: int, cache_s: float) -> None:
        self._bus = bus
        self._bound = bound
        self._cache_s = cache_s
        self._queues: dict[tuple[str, Priority], _ModelQueue] = {}

    def _fresh(self, queue: _ModelQueue) -> bool:
        return queue.depth is not None and time.monotonic() - queue.depth.at < self._cache_s

    async def depth(self, model: str, priority: Priority = "interactive") -> ConsumerDepth:
        """The queue depth of a model and priority, at most cache_s old."""
        queue = self._queues.setdefault((model, priority), _ModelQueue())
        if not self._fresh(queue):
            async with queue.lock:  # one consumer-info request at a time per queue
                if not self._fresh(queue):
                    await self._refresh(model, priority, queue)
        assert queue.depth is not None
        return queue.depth

    async def _refresh(self, model: str, priority: Priority, queue: _ModelQueue) -> None:
        try:
            fresh = await self._bus.consumer_depth(model, priority)
        except Exception as exc:
            raise UpstreamUnavailable(f"the job queue is unreachable: {type(exc).__name__}") from exc
        queue.depth = fresh
        queue.admitted_since = 0
        queue.started.append((fresh.at, fresh.started))
        # Samples older than the window go, even after an idle spell with no readings.
        while len(queue.started) > 1 and fresh.at - queue.started[0][0] > RATE_WINDOW_S:
            queue.started.popleft()
        if priority == "interactive":
            metrics.QUEUE_DEPTH.labels(model=model).set(fresh.pending)

    def drain_rate(self, model: str, priority: Priority = "interactive") -> float | None:
        """Jobs per second that workers start (ack at the first token), over the window."""
        queue = self._queues.get((model, priority))
        if queue is None or len(queue.started) < 2:
            return None
        (t0, n0), (t1, n1) = queue.started[0], queue.started[-1]
        if t1 - t0 < MIN_RATE_SPAN_S:
            return None
        return max(0, n1 - n0) / (t1 - t0)

    def retry_after(self, model: str, excess: int, priority: Priority = "interactive") -> int:
        """Seconds until `excess` queued jobs have drained at the observed rate."""
        rate = self.drain_rate(model, priority)
        if not rate:
            return DEFAULT_RETRY_AFTER_S
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(excess / rate)))

    async def admit(self, model: str, priority: Priority = "interactive") -> None:
        """Raise Overloaded when the queue holds its bound of waiting jobs."""
        depth = await self.depth(model, priority)
        queue = self._queues[(model, priority)]
        waiting = depth.pending + queue.admitted_since
        if waiting >= self._bound:
            metrics.REJECTED.labels(model=model, reason="queue_depth").inc()
            raise Overloaded(
                f"the queue for model {model!r} is full ({waiting} waiting); retry later",
                retry_after=self.retry_after(model, waiting - self._bound + 1, priority),
            )
        queue.admitted_since += 1

    def refused(self, model: str, priority: Priority = "interactive") -> Overloaded:
        """The error for a publish the full JOBS stream refused."""
        metrics.REJECTED.labels(model=model, reason="stream_full").inc()
        return Overloaded(
            f"the queue for model {model!r} is at its hard limit; retry later",
            retry_after=self.retry_after(model, 1, priority),
        )
