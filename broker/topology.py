"""Creates every stream, consumer and KV bucket chatq uses, idempotently."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from broker import names
from chatq.errors import ConfigError
from schemas.messages import Priority

log = logging.getLogger(__name__)

WORKER_TTL_S = 10.0
DUPLICATE_WINDOW_S = 120.0
MAX_DELIVER = 5


def jobs_stream_config(max_msgs: int, replicas: int = 1) -> StreamConfig:
    # Work-queue retention: a job leaves the stream once a worker acks it. discard=new
    # makes a full queue refuse the publish (a 429 for the client) instead of dropping
    # an older accepted job; per subject so one model's backlog cannot starve another's.
    return StreamConfig(
        name=names.JOBS_STREAM,
        subjects=[names.JOBS_ALL],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        max_msgs=max_msgs,
        max_msgs_per_subject=max_msgs,
        discard=DiscardPolicy.NEW,
        discard_new_per_subject=True,
        duplicate_window=DUPLICATE_WINDOW_S,
        num_replicas=replicas,
    )


def events_stream_config(replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=names.EVENTS_STREAM,
        subjects=[names.EVENTS_ALL],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=7 * 24 * 3600.0,
        duplicate_window=DUPLICATE_WINDOW_S,
        num_replicas=replicas,
    )


def deadletter_stream_config(replicas: int = 1) -> StreamConfig:
    # What a consumer gave up on, kept for a person to look at or replay; bounded, since
    # nothing consumes it: the oldest go first once it is full.
    return StreamConfig(
        name=names.DEADLETTER_STREAM,
        subjects=[names.DEADLETTER_ALL],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=30 * 24 * 3600.0,
        max_msgs=100_000,
        max_bytes=256 << 20,
        discard=DiscardPolicy.OLD,
        duplicate_window=DUPLICATE_WINDOW_S,
        num_replicas=replicas,
    )


def jobs_consumer_config(model: str, priority: Priority, ack_wait_s: float) -> ConsumerConfig:
    name = names.jobs_consumer(model, priority)
    return ConsumerConfig(
        name=name,
        durable_name=name,
        filter_subject=names.job_subject(model, priority),
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        # A job that kills every worker it reaches must not loop forever.
        max_deliver=MAX_DELIVER,
        max_ack_pending=-1,
        max_waiting=512,
    )


@contextmanager
def _replicas_allowed(replicas: int) -> Iterator[None]:
    """A single server's refusal of replicas, as what to change (not `ServerError()`)."""
    try:
        yield
    except APIError as exc:
        # 10074: replicas > 1 not supported in non-clustered mode
        if exc.err_code == 10074:
            raise ConfigError(
                f"NATS_STREAM_REPLICAS is {replicas} but the NATS server is not in a cluster: "
                "set it to 1, or point NATS_URL at a cluster"
            ) from None
        raise


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    assert config.name is not None
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        with _replicas_allowed(config.num_replicas or 1):
            await js.add_stream(config)
        log.info("created stream %s", config.name)
        return
    # The larger replica count wins: NATS_STREAM_REPLICAS raises a stream, and one an
    # operator raised further (`nats stream edit JOBS --replicas 5`) keeps its count, so a
    # process started with the default of 1 never takes copies away. Lowering is the
    # operator's, with `nats stream edit`.
    replicas = max(config.num_replicas or 1, info.config.num_replicas or 1)
    if replicas != (info.config.num_replicas or 1):
        log.info("stream %s: %s replicas, now %d", config.name, info.config.num_replicas or 1, replicas)
    with _replicas_allowed(replicas):
        await js.update_stream(dataclasses.replace(config, num_replicas=replicas))


async def ensure_streams(js: JetStreamContext, *, jobs_max_msgs: int, replicas: int = 1) -> None:
    """Create or update the JOBS, EVENTS and DEADLETTER streams, and create the workers
    bucket, each kept on `replicas` servers of a cluster (at least)."""
    # The bucket before JOBS: a worker waits for JOBS (wait_for_stream), then finds it.
    await workers_kv(js, replicas=replicas)
    await _ensure_stream(js, jobs_stream_config(jobs_max_msgs, replicas))
    await _ensure_stream(js, events_stream_config(replicas))
    await ensure_deadletter(js, replicas=replicas)


async def wait_for_stream(js: JetStreamContext, stream: str, every_s: float = 1.0) -> None:
    """Wait until a stream exists: a worker may read and write it, not declare it (the
    launcher or the API does, broker/permissions.py)."""
    waiting = False
    while True:
        try:
            await js.stream_info(stream)
            return
        except NotFoundError:
            if not waiting:
                log.warning("waiting for the %s stream (the API declares it)", stream)
                waiting = True
        await asyncio.sleep(every_s)


async def ensure_deadletter(js: JetStreamContext, *, replicas: int = 1) -> None:
    """Create or update the DEADLETTER stream (the persistence worker's own, at its start)."""
    await _ensure_stream(js, deadletter_stream_config(replicas))


async def ensure_model(js: JetStreamContext, model: str, *, ack_wait_s: float) -> None:
    """Create or update the durable job consumers of one model (one per priority)."""
    for priority in names.PRIORITIES:
        # CONSUMER.CREATE with a name creates the consumer or updates its editable
        # fields (ack wait, max deliver), so a changed setting takes effect on restart.
        await js.add_consumer(names.JOBS_STREAM, jobs_consumer_config(model, priority, ack_wait_s))


async def workers_kv(js: JetStreamContext, *, replicas: int = 1) -> KeyValue:
    """The heartbeat bucket: a worker's key vanishes WORKER_TTL_S after its last beat.

    `replicas` counts only when the bucket is made here; ensure_streams makes it first,
    with NATS_STREAM_REPLICAS. An existing bucket keeps its count: only the admin user
    may edit it (`nats stream edit KV_workers --replicas 3`).
    """
    try:
        return await js.key_value(names.WORKERS_BUCKET)
    except (BucketNotFoundError, NotFoundError):
        # Only a missing bucket is created here: a timeout or a lost connection is raised.
        with _replicas_allowed(replicas):
            return await js.create_key_value(
                KeyValueConfig(bucket=names.WORKERS_BUCKET, ttl=WORKER_TTL_S, history=1, replicas=replicas)
            )
