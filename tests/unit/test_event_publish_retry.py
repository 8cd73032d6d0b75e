"""An event outlasts a stream without a leader: JetStream refuses every publish at once
for the seconds a NATS cluster takes to elect one, and the event is stored after."""

from __future__ import annotations

import time
from typing import Any

import nats.errors
import pytest

import schemas
from broker.bus import Bus
from tests.helpers import one_line_job

LEADERLESS_S = 1.0


class ElectingJS:
    """Publishes fail with no responders for LEADERLESS_S, then are stored."""

    def __init__(self) -> None:
        self.until = time.monotonic() + LEADERLESS_S
        self.refused = 0
        self.stored: list[bytes] = []

    async def publish(self, subject: str, data: bytes, **options: Any) -> None:
        if time.monotonic() < self.until:
            self.refused += 1
            raise nats.errors.NoRespondersError
        self.stored.append(data)


class FakeNats:
    def __init__(self) -> None:
        self.js = ElectingJS()

    def jetstream(self, timeout: float) -> ElectingJS:
        return self.js


def completed() -> schemas.Completed:
    return schemas.Completed.for_job(
        one_line_job("m"),
        worker_id="w",
        text="hi",
        finish_reason="stop",
        usage=schemas.Usage(prompt_tokens=1, completion_tokens=1),
        ttft_s=0.1,
        duration_s=0.2,
    )


async def test_an_event_is_stored_once_the_stream_has_a_leader_again() -> None:
    nc: Any = FakeNats()
    await Bus(nc).publish_event(completed())
    assert nc.js.refused >= 3 and len(nc.js.stored) == 1


async def test_an_event_still_refused_after_its_time_is_raised() -> None:
    nc: Any = FakeNats()
    with pytest.raises(nats.errors.NoRespondersError):
        await Bus(nc).publish_event(completed(), within_s=0.3)
    assert nc.js.stored == []
