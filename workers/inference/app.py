"""Wires the inference worker: settings, FastStream broker, engine, worker, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from faststream import FastStream
from faststream.nats import NatsBroker, NatsMessage
from prometheus_client import start_http_server

from broker import names, topology
from broker.bus import Bus
from chatq.settings import Settings
from workers.inference import metrics
from workers.inference.engine import Engine
from workers.inference.worker import InferenceWorker, WorkerConfig

log = logging.getLogger("chatq.worker")

DRAIN_GRACE_S = 30.0


def make_engine(settings: Settings) -> Engine:
    """The engine INFERENCE_ENGINE names; vLLM unless the synthetic engine is asked for."""
    if settings.engine == "synthetic":
        from workers.inference.synthetic import SyntheticEngine

        return SyntheticEngine(
            model=settings.model_name,
            tokens_per_s=settings.synth_tokens_per_s,
            ttft_s=settings.synth_ttft_s,
            slots=settings.worker_slots or 256,
            start_s=settings.synth_start_s,
        )
    from workers.inference.vllm_engine import VllmEngine

    return VllmEngine(settings)


def build_app(settings: Settings, engine: Engine | None = None) -> tuple[FastStream, NatsBroker]:
    """The worker as a FastStream app; tests pass their own engine."""
    broker = NatsBroker(
        settings.nats_url,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        name=f"chatq-worker-{settings.worker_id}",
        graceful_timeout=DRAIN_GRACE_S,
    )
    engine = engine or make_engine(settings)
    state: dict[str, InferenceWorker | asyncio.Task[None]] = {}
    app = FastStream(broker)

    @broker.subscriber(names.CANCEL_ALL)
    async def on_cancel(msg: NatsMessage) -> None:
        worker = state.get("worker")
        if isinstance(worker, InferenceWorker):
            await worker.on_cancel(msg.body)

    @app.on_startup
    async def start_engine() -> None:
        if settings.worker_metrics_port:
            start_http_server(settings.worker_metrics_port, addr=settings.host)
        await engine.start()
        start_s = getattr(engine, "start_seconds", None)
        if start_s is not None:
            metrics.ENGINE_START.labels(model=engine.model).set(start_s)

    @app.after_startup
    async def start_worker() -> None:
        bus = Bus(broker.connection)
        await topology.ensure_streams(bus.js, jobs_max_msgs=settings.jobs_max_msgs)
        worker = InferenceWorker(
            bus,
            engine,
            WorkerConfig(
                worker_id=settings.worker_id,
                ack_wait_s=settings.ack_wait_s,
                heartbeat_s=settings.heartbeat_s,
                chunk_max_tokens=settings.chunk_max_tokens,
                chunk_max_delay_s=settings.chunk_max_delay_s,
            ),
        )
        state["worker"] = worker
        task = asyncio.create_task(worker.run())
        state["task"] = task

        def on_done(done: asyncio.Task[None]) -> None:
            if not done.cancelled() and done.exception() is not None:
                log.error("the pull loop died: %r; stopping the worker", done.exception())
                state["failed"] = done
                app.exit()

        task.add_done_callback(on_done)
        log.info(
            "worker %s ready: model=%s engine=%s slots=%d",
            settings.worker_id,
            engine.model,
            engine.name,
            engine.slots,
        )

    @app.on_shutdown
    async def drain() -> None:
        worker = state.get("worker")
        if isinstance(worker, InferenceWorker):
            await worker.drain(DRAIN_GRACE_S)
        task = state.get("task")
        if isinstance(task, asyncio.Task):
            task.cancel()
            # Its pull subscriptions must be gone before the broker drains the connection.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await engine.stop()

    app.context.set_global("chatq_state", state)
    return app, broker
