"""Stream replicas at a process's start: NATS_STREAM_REPLICAS raises a stream, and the
count an operator set on a cluster is kept when it is higher."""

from __future__ import annotations

from typing import Any

import pytest
from nats.js.api import KeyValueConfig, StreamConfig, StreamInfo, StreamState
from nats.js.errors import APIError, BucketNotFoundError, NotFoundError

from broker import names, topology
from broker.connect import server_urls
from chatq.errors import ConfigError


class FakeJS:
    def __init__(self, existing: dict[str, StreamConfig]) -> None:
        self.existing = existing
        self.added: list[StreamConfig] = []
        self.updated: list[StreamConfig] = []
        self.buckets: list[KeyValueConfig] = []

    async def stream_info(self, name: str) -> StreamInfo:
        if name not in self.existing:
            raise NotFoundError
        state = StreamState(messages=0, bytes=0, first_seq=0, last_seq=0, consumer_count=0)
        return StreamInfo(config=self.existing[name], state=state)

    async def add_stream(self, config: StreamConfig) -> None:
        self.added.append(config)

    async def update_stream(self, config: StreamConfig) -> None:
        self.updated.append(config)

    async def key_value(self, bucket: str) -> Any:
        raise BucketNotFoundError

    async def create_key_value(self, config: KeyValueConfig) -> Any:
        self.buckets.append(config)
        return None


async def test_an_update_keeps_a_higher_replica_count_and_a_new_stream_gets_the_setting() -> None:
    scaled = StreamConfig(name=names.JOBS_STREAM, num_replicas=3)
    js: Any = FakeJS({names.JOBS_STREAM: scaled, names.EVENTS_STREAM: StreamConfig(name=names.EVENTS_STREAM)})
    await topology.ensure_streams(js, jobs_max_msgs=50)
    jobs, events = js.updated
    assert jobs.name == names.JOBS_STREAM and jobs.num_replicas == 3 and jobs.max_msgs == 50
    assert events.name == names.EVENTS_STREAM and events.num_replicas == 1
    (deadletter,) = js.added
    assert deadletter.name == names.DEADLETTER_STREAM and deadletter.num_replicas == 1
    (workers,) = js.buckets
    assert workers.bucket == names.WORKERS_BUCKET and workers.replicas == 1


async def test_the_setting_raises_a_stream_made_with_fewer_replicas() -> None:
    js: Any = FakeJS(
        {
            names.JOBS_STREAM: StreamConfig(name=names.JOBS_STREAM, num_replicas=1),
            names.EVENTS_STREAM: StreamConfig(name=names.EVENTS_STREAM, num_replicas=5),
        }
    )
    await topology.ensure_streams(js, jobs_max_msgs=50, replicas=3)
    assert [(c.name, c.num_replicas) for c in js.updated] == [
        (names.JOBS_STREAM, 3),
        (names.EVENTS_STREAM, 5),
    ]
    assert [(c.name, c.num_replicas) for c in js.added] == [(names.DEADLETTER_STREAM, 3)]
    assert [(c.bucket, c.replicas) for c in js.buckets] == [(names.WORKERS_BUCKET, 3)]


def test_nats_url_names_each_server_of_a_cluster() -> None:
    assert server_urls("nats://a:4222, nats://b:4223,,nats://c:4224") == [
        "nats://a:4222",
        "nats://b:4223",
        "nats://c:4224",
    ]
    assert server_urls("nats://127.0.0.1:4222") == ["nats://127.0.0.1:4222"]


class SingleServerJS(FakeJS):
    """JetStream on one server: it refuses more than one replica (err_code 10074)."""

    async def create_key_value(self, config: KeyValueConfig) -> Any:
        if (config.replicas or 1) > 1:
            raise APIError(
                code=500, err_code=10074, description="replicas > 1 not supported in non-clustered mode"
            )
        return await super().create_key_value(config)


async def test_replicas_on_a_single_server_are_refused_with_the_setting_to_change() -> None:
    js: Any = SingleServerJS({})
    with pytest.raises(
        ConfigError, match="NATS_STREAM_REPLICAS is 3 but the NATS server is not in a cluster"
    ):
        await topology.ensure_streams(js, jobs_max_msgs=50, replicas=3)
