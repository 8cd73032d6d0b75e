"""Stream updates at a process's start keep the replica count an operator set on a cluster."""

from __future__ import annotations

from typing import Any

from nats.js.api import StreamConfig, StreamInfo, StreamState
from nats.js.errors import NotFoundError

from broker import names, topology


class FakeJS:
    def __init__(self, existing: dict[str, StreamConfig]) -> None:
        self.existing = existing
        self.added: list[StreamConfig] = []
        self.updated: list[StreamConfig] = []

    async def stream_info(self, name: str) -> StreamInfo:
        if name not in self.existing:
            raise NotFoundError
        state = StreamState(messages=0, bytes=0, first_seq=0, last_seq=0, consumer_count=0)
        return StreamInfo(config=self.existing[name], state=state)

    async def add_stream(self, config: StreamConfig) -> None:
        self.added.append(config)

    async def update_stream(self, config: StreamConfig) -> None:
        self.updated.append(config)


async def test_an_update_keeps_the_replicas_and_a_new_stream_gets_the_servers_default() -> None:
    scaled = StreamConfig(name=names.JOBS_STREAM, num_replicas=3)
    js: Any = FakeJS({names.JOBS_STREAM: scaled, names.EVENTS_STREAM: StreamConfig(name=names.EVENTS_STREAM)})
    await topology.ensure_streams(js, jobs_max_msgs=50)
    jobs, events = js.updated
    assert jobs.name == names.JOBS_STREAM and jobs.num_replicas == 3 and jobs.max_msgs == 50
    assert events.name == names.EVENTS_STREAM and events.num_replicas is None
    (deadletter,) = js.added
    assert deadletter.name == names.DEADLETTER_STREAM and deadletter.num_replicas is None
