"""Admission control: refuse work (429 + Retry-After) when a model's queue is over its bound."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

from api import metrics
from broker.bus import Bus, ConsumerDepth
from chatq.errors import Overloaded, UpstreamUnavailable

MAX_RETRY_AFTER_S = 60
DEFAULT_RETRY_AFTER_S = 5


@dataclass
class _ModelQueue:
    depth: ConsumerDepth | None = None
    drain_rate: float = 0.0  # jobs handed to workers per second, smoothed
    lock: asyncio.Lock | None = None


class QueueMonitor:
    """Reads each model's queue depth from its JetStream consumer, cached for a moment."""

    def __init__(self, bus: Bus, *, bound: int, cache_s: float) -> None:
        self._bus = bus
        self._bound = bound
        self._cache_s = cache_s
        self._queues: dict[str, _ModelQueue] = {}

    async def depth(self, model: str) -> ConsumerDepth:
        queue = self._queues.setdefault(model, _ModelQueue(lock=asyncio.Lock()))
        depth = queue.depth
        if depth is not None and time.monotonic() - depth.at < self._cache_s:
            return depth
        assert queue.lock is not None
        async with queue.lock:  # one consumer-info request at a time per model
            depth = queue.depth
            if depth is not None and time.monotonic() - depth.at < self._cache_s:
                return depth
            try:
                fresh = await self._bus.consumer_depth(model)
            except Exception as exc:
                raise UpstreamUnavailable(f"the job queue is unreachable: {type(exc).__name__}") from exc
            if depth is not None and fresh.at > depth.at:
                rate = max(0, fresh.delivered - depth.delivered) / (fresh.at - depth.at)
                queue.drain_rate = rate if queue.drain_rate == 0 else 0.7 * queue.drain_rate + 0.3 * rate
            queue.depth = fresh
            metrics.QUEUE_DEPTH.labels(model=model).set(fresh.pending)
            return fresh

    def retry_after(self, model: str, excess: int) -> int:
        """Seconds until `excess` queued jobs have drained at the observed rate."""
        queue = self._queues.get(model)
        rate = queue.drain_rate if queue else 0.0
        if rate <= 0:
            return DEFAULT_RETRY_AFTER_S
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(excess / rate)))

    async def admit(self, model: str) -> None:
        """Raise Overloaded when the model's queue holds its bound of waiting jobs."""
        depth = await self.depth(model)
        if depth.pending >= self._bound:
            metrics.REJECTED.labels(model=model, reason="queue_depth").inc()
            raise Overloaded(
                f"the queue for model {model!r} is full ({depth.pending} waiting); retry later",
                retry_after=self.retry_after(model, depth.pending - self._bound + 1),
            )

    def refused(self, model: str) -> Overloaded:
        """The error for a publish the full JOBS stream refused."""
        metrics.REJECTED.labels(model=model, reason="stream_full").inc()
        return Overloaded(
            f"the queue for model {model!r} is at its hard limit; retry later",
            retry_after=self.retry_after(model, 1),
        )
