"""Wires the inference worker: settings, FastStream broker, engine, worker, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable

from faststream import FastStream
from faststream.nats import NatsBroker, NatsMessage
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

import schemas
from broker import names, topology
from broker.bus import Bus
from broker.connect import NatsLogin, server_urls
from catalog import hardware
from catalog.profiles import Profile, ProfileSet, load_profiles, settle_model_profile
from chatq.errors import ConfigError, EngineError
from chatq.gcfreeze import freeze_startup_objects
from chatq.settings import Settings
from schemas.messages import SwitchReply, decode_switch
from workers.inference import health, metrics
from workers.inference.engine import Engine
from workers.inference.worker import InferenceWorker, WorkerConfig

log = logging.getLogger("chatq.worker")


def make_engine(settings: Settings, profile: Profile | None = None) -> Engine:
    """The engine INFERENCE_ENGINE names for a profile (None: MODEL_ID); vLLM unless synthetic."""
    if settings.engine == "synthetic":
        from workers.inference.synthetic import SyntheticEngine

        return SyntheticEngine(
            model=profile.id if profile else settings.model_name,
            tokens_per_s=settings.synth_tokens_per_s,
            ttft_s=settings.synth_ttft_s,
            slots=settings.worker_slots or 256,
            start_s=settings.synth_start_s,
            source=profile.model if profile else "",
        )
    from workers.inference.vllm_engine import VllmEngine

    return VllmEngine(settings, profile)


def worker_profile(settings: Settings, profiles: ProfileSet) -> Profile | None:
    """The profile MODEL_PROFILE names (by id or alias); None without MODEL_PROFILE."""
    settled = settle_model_profile(settings, profiles)
    return None if settled.model_profile is None else profiles.resolve(settled.model_profile)


def fit_check(settings: Settings) -> tuple[int, Callable[[Profile, bool], str | None]]:
    """This host's GPU count, and the hardware check a switch runs (none for the synthetic engine)."""
    gpus = hardware.read_gpus()
    if settings.require_gpu and not gpus:
        raise ConfigError("REQUIRE_GPU=true but NVML finds no GPU this worker may use; not starting")

    def fits(profile: Profile, loaded: bool) -> str | None:
        if settings.engine == "synthetic":
            return None  # it uses no memory to speak of
        return hardware.check(
            profile, hardware.read_gpus(), host_available=hardware.host_available_bytes(), loaded=loaded
        )

    return len(gpus), fits


def make_worker(
    settings: Settings,
    bus: Bus,
    engine: Engine,
    profile: Profile | None,
    profiles: ProfileSet,
    *,
    gpus: int,
    fits: Callable[[Profile, bool], str | None],
) -> InferenceWorker:
    """The worker the settings describe, on this bus and engine; a switch builds engines with make_engine."""
    config = WorkerConfig(
        worker_id=settings.worker_id,
        ack_wait_s=settings.ack_wait_s,
        heartbeat_s=settings.heartbeat_s,
        chunk_max_tokens=settings.chunk_max_tokens,
        chunk_max_delay_s=settings.chunk_max_delay_s,
        switch_grace_s=settings.switch_grace_s,
        gpus=gpus,
        ttft_hold=settings.worker_ttft_hold,
    )
    return InferenceWorker(
        bus,
        engine,
        config,
        profile=profile,
        profiles=profiles,
        engine_factory=functools.partial(make_engine, settings),
        fits=fits,
    )


def build_app(
    settings: Settings, engine: Engine | None = None, profiles: ProfileSet | None = None
) -> tuple[FastStream, NatsBroker]:
    """The worker as a FastStream app; tests pass their own engine."""
    profiles = profiles if profiles is not None else load_profiles(settings.profiles_file)
    profile = worker_profile(settings, profiles)
    gpus, fits = fit_check(settings)
    if profile is not None and engine is None:
        refusal = fits(profile, False)
        if refusal is not None:
            raise EngineError(f"not loading {profile.id}: {refusal}")
    broker = NatsBroker(
        server_urls(settings.nats_url),
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        name=f"chatq-worker-{settings.worker_id}",
        graceful_timeout=settings.drain_grace_s,
        **NatsLogin.of(settings).broker_options(settings.nats_url),
    )
    engine = engine or make_engine(settings, profile)
    state: dict[str, InferenceWorker | asyncio.Task[None] | Subscription] = {}
    app = FastStream(broker)

    def worker_state() -> str:
        """The worker's state for /ready; loading until the worker exists (engine starting)."""
        worker = state.get("worker")
        return worker.state if isinstance(worker, InferenceWorker) else "loading"

    @broker.subscriber(names.CANCEL_ALL)
    async def on_cancel(msg: NatsMessage) -> None:
        worker = state.get("worker")
        if isinstance(worker, InferenceWorker):
            await worker.on_cancel(msg.body)

    @app.on_startup
    async def start_engine() -> None:
        if settings.worker_metrics_port:
            health.serve(settings.worker_metrics_port, settings.host, worker_state)
        await engine.start()
        start_s = getattr(engine, "start_seconds", None)
        if start_s is not None:
            metrics.ENGINE_START.labels(model=engine.model).set(start_s)

    @app.after_startup
    async def start_worker() -> None:
        bus = Bus(broker.connection)
        await topology.wait_for_stream(bus.js, names.JOBS_STREAM)
        worker = make_worker(settings, bus, engine, profile, profiles, gpus=gpus, fits=fits)
        state["worker"] = worker

        async def on_control(msg: Msg) -> None:
            try:
                reply = worker.request_switch(decode_switch(msg.data).profile)
            except Exception:  # noqa: BLE001 - a malformed request gets an answer, not a crash
                reply = SwitchReply(False, "invalid_request", "the switch request could not be read")
            with contextlib.suppress(Exception):
                await msg.respond(schemas.encode(reply))

        state["control"] = await bus.nc.subscribe(
            names.worker_control_subject(settings.worker_id), cb=on_control
        )
        freeze_startup_objects(f"worker {settings.worker_id}")
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
        control = state.get("control")
        if control is not None:
            with contextlib.suppress(Exception):
                await control.unsubscribe()  # type: ignore[union-attr]
        worker = state.get("worker")
        if isinstance(worker, InferenceWorker):
            await worker.drain(settings.drain_grace_s)
        task = state.get("task")
        if isinstance(task, asyncio.Task):
            task.cancel()
            # Its pull subscriptions must be gone before the broker drains the connection.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        worker = state.get("worker")
        # After a switch the worker runs another engine than the one it started with.
        await (worker.engine if isinstance(worker, InferenceWorker) else engine).stop()

    app.context.set_global("chatq_state", state)
    return app, broker
