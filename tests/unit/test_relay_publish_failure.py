"""A job whose publish fails (the JOBS stream has no leader, say) answers 503 and does not
hold a place in the queue: the requests after it are not refused as if the queue were full."""

from __future__ import annotations

import time
from typing import Any

import nats.errors
import pytest

import schemas
from api.admission import QueueMonitor
from api.relay import Relay
from broker.bus import ConsumerDepth, StreamSubscription
from chatq.errors import UpstreamUnavailable
from chatq.tasks import TaskSet
from tests.helpers import one_line_job

MODEL = "no-leader"
BOUND = 3


class LeaderlessBus:
    """A bus whose queue reads empty and whose every job publish times out."""

    async def consumer_depth(self, model: str, priority: str = "interactive") -> ConsumerDepth:
        return ConsumerDepth(pending=0, in_flight=0, started=0, at=time.monotonic())

    async def subscribe_stream(self, request_id: str, **options: Any) -> StreamSubscription:
        return StreamSubscription()

    async def publish_job(self, job: schemas.Job) -> Any:
        raise nats.errors.TimeoutError


async def test_failed_publishes_answer_503_and_never_fill_the_queue() -> None:
    bus: Any = LeaderlessBus()
    # A cached reading for longer than the test: only this process's admissions count.
    monitor = QueueMonitor(bus, bound=BOUND, cache_s=60)
    for _ in range(3 * BOUND):
        await monitor.admit(MODEL)  # never Overloaded
        relay = Relay(bus, one_line_job(MODEL), watchdog_s=5, spawn=TaskSet())
        with pytest.raises(UpstreamUnavailable, match="the job queue is unreachable: TimeoutError"):
            await relay.open(monitor)
