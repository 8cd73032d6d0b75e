"""The telemetry collector against a real nats-server: queue depth and workers show up."""

from __future__ import annotations

import time

import nats
from prometheus_client import CollectorRegistry, generate_latest

import schemas
from broker import names, topology
from broker.bus import Bus
from chatq.servers import NatsServer
from tests.helpers import metric_value
from workers.telemetry.collector import Gauges, Nvml, collect


async def test_queue_depth_and_workers_are_exported(fresh_nats: NatsServer) -> None:
    nc = await nats.connect(fresh_nats.url)
    try:
        bus = Bus(nc)
        await topology.ensure_streams(bus.js, jobs_max_msgs=100)
        await topology.ensure_model(bus.js, "m", ack_wait_s=30)
        for i in range(3):
            await bus.publish_job(
                schemas.Job(
                    request_id=f"r{i}",
                    model="m",
                    messages=[schemas.ChatMessage("user", "x")],
                    sampling=schemas.Sampling(),
                    created=time.time(),
                    deadline=time.time() + 60,
                )
            )
        kv = await topology.workers_kv(bus.js)
        status = schemas.WorkerStatus(
            worker_id="w1",
            model="m",
            engine="synthetic",
            state="ready",
            slots=4,
            free_slots=3,
            updated=time.time(),
        )
        await kv.put("w1", schemas.encode(status))
        registry = CollectorRegistry()
        await collect(bus.js, Gauges(registry), Nvml())
        text = generate_latest(registry).decode()
    finally:
        await nc.close()
    assert metric_value(text, "chatq_queue_pending", consumer=names.jobs_consumer("m")) == 3
    assert metric_value(text, "chatq_workers", model="m", state="ready") == 1
    assert metric_value(text, "chatq_worker_free_slots", model="m") == 3
