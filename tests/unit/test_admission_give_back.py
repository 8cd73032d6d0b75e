"""An admission whose job never lands gives its place back (api/generation.py, ChatCall.open).

admit() counts a request as waiting as soon as it lets it in; the job is published after
the caller's rate limits. A request refused by its rate limit (or cancelled) in between
must not go on counting as waiting: a few such refusals would otherwise make an idle
worker's queue read as full, and refuse everyone on that API process with queue_full.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from api.admission import StreamCap
from api.auth import Principal
from api.generation import ChatCall
from api.ratelimit import RateLimited
from chatq.settings import RoleLimits
from tests.unit.test_admission_bound import MODEL, Announced, Clock, FakeBus, timed_monitor


class RefusingLimiter:
    async def acquire(self, *args: Any, **kwargs: Any) -> None:
        raise RateLimited("rpm", 2, "user:1", 30)


def call(monitor: Any) -> ChatCall:
    settings = SimpleNamespace(
        log_prompts=False,
        rate_limits={"user": RoleLimits(rpm=2, tpm=0, concurrency=0)},
        request_timeout_s=60.0,
        watchdog_s=5.0,
    )
    services: Any = SimpleNamespace(
        settings=settings, streams=StreamCap(0), monitor=monitor, limiter=RefusingLimiter()
    )
    line: Any = SimpleNamespace(request_id="r", queued=lambda job, log_prompts: None)
    return ChatCall(services, line, Principal(user_id=1, username="u", role="user"))


async def test_a_request_refused_by_its_rate_limit_does_not_hold_a_place_in_the_queue() -> None:
    fake, wall = FakeBus(Clock()), Clock(5000.0)
    # An idle worker with one free slot, whose running job ends long after the wait target.
    monitor = timed_monitor(fake, wall, Announced(free=1, releases=[5100.0], taken=0))
    job: Any = SimpleNamespace(model=MODEL, priority="interactive", body=b"hi", request_id="r")
    for _ in range(3):
        with pytest.raises(RateLimited):
            await call(monitor).open(job)
    # The next request from anyone finds nothing waiting, and is admitted.
    await monitor.admit(MODEL)
