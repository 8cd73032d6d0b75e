"""The telemetry collector against a real nats-server: queue depth, age and workers show up."""

from __future__ import annotations

import asyncio
import time

import nats
from prometheus_client import CollectorRegistry, generate_latest

import schemas
from broker import names, topology
from broker.bus import Bus
from broker.connect import connect
from broker.workers import WorkerRegistry
from stack.servers import NatsServer
from tests.metrics import metric_value
from workers.telemetry.collector import Gauges, Nvml, collect


def worker_status(wid: str, *, slots: int = 1, free_slots: int = 1) -> bytes:
    """A worker's announcement in the workers bucket, made now."""
    status = schemas.WorkerStatus(
        worker_id=wid,
        model="m",
        engine="synthetic",
        state="ready",
        slots=slots,
        free_slots=free_slots,
        updated=time.time(),
    )
    return schemas.encode(status)


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
        await kv.put("w1", worker_status("w1", slots=4, free_slots=3))
        workers = WorkerRegistry(bus)
        await workers.start()
        while "w1" not in workers.workers:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.1)  # the jobs have now waited more than a second
        registry = CollectorRegistry()
        snapshot = await collect(bus.js, Gauges(registry), Nvml(), list(workers.workers.values()))
        text = generate_latest(registry).decode()
        await workers.stop()
    finally:
        await nc.close()
    assert metric_value(text, "chatq_queue_pending", consumer=names.jobs_consumer("m")) == 3
    assert metric_value(text, "chatq_queue_pending", model="m", priority="background") == 0
    assert metric_value(text, "chatq_queue_oldest_age_seconds", model="m", priority="interactive") >= 1
    assert metric_value(text, "chatq_queue_oldest_age_seconds", model="m", priority="background") == 0
    queues = {q.priority: q for q in snapshot.queues}
    assert (queues["interactive"].model, queues["interactive"].depth) == ("m", 3)
    assert queues["interactive"].oldest_age_s is not None and queues["interactive"].oldest_age_s >= 1
    assert queues["background"].depth == 0 and queues["background"].oldest_age_s is None
    assert metric_value(text, "chatq_workers", model="m", state="ready") == 1
    assert metric_value(text, "chatq_worker_free_slots", model="m") == 3


async def test_the_worker_view_drops_silent_and_removed_workers(fresh_nats: NatsServer) -> None:
    """A worker killed without a goodbye leaves the view once its heartbeats stop."""
    async with asyncio.timeout(60):  # a hang is a failure, not a stuck suite
        nc = await connect(fresh_nats.url, "test-registry")
        try:
            bus = Bus(nc)
            kv = await topology.workers_kv(bus.js)
            workers = WorkerRegistry(bus, stale_after_s=1.0)
            await workers.start()

            await kv.put("alive", worker_status("alive"))
            await kv.put("killed", worker_status("killed"))
            await kv.put("leaving", worker_status("leaving"))
            deadline = time.monotonic() + 5
            while len(workers.ready()) < 3:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await kv.delete("leaving")  # a worker that drains says goodbye
            for _ in range(8):  # "alive" keeps announcing itself; "killed" went silent
                await asyncio.sleep(0.25)
                await kv.put("alive", worker_status("alive"))
            assert set(workers.workers) == {"alive"}
            await workers.stop()
        finally:
            await nc.close()
