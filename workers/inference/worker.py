"""One engine, one model at a time: serves its queues and switches live to another profile."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable

from nats.js import JetStreamContext
from nats.js.kv import KeyValue

import schemas
from broker import names, topology
from broker.bus import Bus
from catalog.profiles import Profile, ProfileSet
from chatq import gcfreeze
from chatq.errors import EngineError
from chatq.tasks import TaskSet
from schemas.messages import Priority, SwitchReply
from workers.inference import heartbeat, metrics
from workers.inference.active import ActiveRequest
from workers.inference.config import WorkerConfig
from workers.inference.engine import Engine
from workers.inference.jobs import JobRunner
from workers.inference.pull import pull_loop

__all__ = ["EngineFactory", "FitCheck", "InferenceWorker", "WorkerConfig"]

log = logging.getLogger(__name__)
# How often the worker asks its engine whether it is still alive.
ENGINE_WATCH_S = 0.2
_HOST = socket.gethostname()

# Builds an engine for a profile (None: the worker's MODEL_ID model), and the hardware
# check: why a profile cannot load here (one sentence), or None; its flag says the
# worker still holds a model (so judge on total, not free, memory).
EngineFactory = Callable[[Profile | None], Engine]
FitCheck = Callable[[Profile, bool], str | None]


def _no_check(profile: Profile, loaded: bool) -> str | None:
    return None


class InferenceWorker:
    """One engine, one model at a time: its queues, its jobs (jobs.py), heartbeats
    (heartbeat.py), and live switches to another profile (drain, unload, check, load,
    or roll back)."""

    def __init__(
        self,
        bus: Bus,
        engine: Engine,
        config: WorkerConfig,
        *,
        profile: Profile | None = None,
        profiles: ProfileSet | None = None,
        engine_factory: EngineFactory | None = None,
        fits: FitCheck = _no_check,
    ) -> None:
        self.bus = bus
        self.config = config
        self.model = engine.model
        self.profile = profile
        self.profiles = profiles or ProfileSet.empty()
        self._engine_factory = engine_factory
        self._fits = fits
        self._switch_target: Profile | None = None
        self._switch_to: str | None = None
        self._progress = "loading"
        self._shutting_down = False
        self._engine_dead = False
        self._stopping = asyncio.Event()
        # Acks, naks, heartbeats, announcements, and each job's own task.
        self.spawn = TaskSet("worker task")
        self.jobs = JobRunner(bus, engine, config, self.spawn)
        self._kv: KeyValue | None = None
        self._state: str = "loading"
        metrics.ENGINE_LOAD.watch(self)

    @property
    def state(self) -> str:
        """What it last announced: loading, ready or draining (its /ready probe reads it)."""
        return self._state

    @property
    def engine(self) -> Engine:
        return self.jobs.engine

    @property
    def active(self) -> dict[str, ActiveRequest]:
        return self.jobs.active

    @property
    def free_slots(self) -> int:
        return self.jobs.free_slots

    def cancel(self, request_id: str, reason: str) -> bool:
        """Abort a running request; the engine frees its slot on its next step."""
        return self.jobs.cancel(request_id, reason)

    async def on_cancel(self, data: bytes) -> None:
        """Handle a chat.cancel.<id> message; malformed ones are ignored."""
        await self.jobs.on_cancel(data)

    # --- lifecycle ------------------------------------------------------------------

    async def announce(self, state: str) -> None:
        """Publish this worker's state and free slots to the workers KV bucket."""
        self._state = state
        if self._kv is None:
            self._kv = await topology.workers_kv(self.bus.js)
        if state == "loading" and self._progress.startswith("loading"):
            fraction = getattr(self.engine, "load_fraction", None)
            if callable(fraction):
                self._progress = f"loading {round(100 * min(1.0, max(0.0, fraction())))}%"
        status = schemas.WorkerStatus(
            worker_id=self.config.worker_id,
            model=self.model,
            engine=self.engine.name,
            state=state,  # type: ignore[arg-type]
            slots=self.jobs.slots,  # fewer than the engine's while WORKER_TTFT_HOLD holds back
            free_slots=self.free_slots if state == "ready" else 0,
            updated=time.time(),
            profile=None if self.profile is None else self.profile.id,
            switch_to=self._switch_to,
            progress=self._progress,
            gpus=self.config.gpus,
            host=_HOST,
            engine_version=str(getattr(self.engine, "version", "") or ""),
            job_s=round(self.jobs.pacing.job_s, 4),
            releases=self.jobs.releases() if state == "ready" else None,
            taken=dict(self.jobs.taken),
        )
        try:
            await self._kv.put(names.worker_key(self.config.worker_id), schemas.encode(status))
        except Exception as exc:  # noqa: BLE001 - retried at the next status interval
            log.warning("announcing %s to the workers bucket failed: %r", state, exc)

    async def run(self) -> None:
        """Fetch and run jobs until stop() is called; between models during a switch."""
        housekeeping = asyncio.create_task(
            heartbeat.housekeeping(self.jobs, self.config, lambda: self.announce(self._state))
        )
        # Without heartbeats every stream would fail its watchdog: a worker whose
        # housekeeping died stops, to be restarted, rather than limp on.
        housekeeping.add_done_callback(lambda _: self.stop_fetching())
        watch = asyncio.create_task(self._watch_engine())
        try:
            while True:
                await self._serve_model()
                if housekeeping.done() and not housekeeping.cancelled():
                    raise RuntimeError(f"the housekeeping task died: {housekeeping.exception()!r}")
                if self._engine_dead:
                    # Its streams end with engine_error as the engine fails each of them.
                    await self.jobs.wait_idle(self.config.cancel_wait_s)
                    raise EngineError(f"the {self.engine.name} engine of {self.model} died; restarting")
                target, self._switch_target = self._switch_target, None
                if target is None or self._shutting_down:
                    return
                await self._switch(target)
                if self._shutting_down:
                    return
                self._stopping.clear()
        finally:
            housekeeping.cancel()
            watch.cancel()

    async def _watch_engine(self) -> None:
        """Leave the queue as soon as the engine is dead (vLLM's engine core gone)."""
        while not self._engine_dead:
            await asyncio.sleep(ENGINE_WATCH_S)
            if self._switch_to is None and self.engine.dead:
                log.error("the %s engine of %s is dead: no more jobs; exiting", self.engine.name, self.model)
                self._engine_dead = True
                self._progress = "failed: the engine died"
                self.stop_fetching()
                await self.announce("draining")

    async def _serve_model(self) -> None:
        """Bind this model's queues and pull from them until fetching stops."""
        metrics.SLOTS.labels(**self.jobs.labels).set(self.engine.slots)
        await topology.ensure_model(self.bus.js, self.model, ack_wait_s=self.config.ack_wait_s)
        subs: dict[Priority, JetStreamContext.PullSubscription] = {}
        try:
            for priority in names.PRIORITIES:
                subs[priority] = await self.bus.js.pull_subscribe_bind(
                    durable=names.jobs_consumer(self.model, priority), stream=names.JOBS_STREAM
                )
                with contextlib.suppress(Exception):  # then announced from its first job on
                    info = await subs[priority].consumer_info()
                    seq = info.delivered.consumer_seq if info.delivered else 0
                    self.jobs.taken[info.name] = int(seq or 0)
            if not self._progress.startswith("failed"):
                self._progress = "ready"
            await self.announce("ready")
            await pull_loop(subs, self.jobs, self._stopping)
        finally:
            for sub in subs.values():
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    # --- live model switch ------------------------------------------------------------

    def request_switch(self, profile_name: str) -> SwitchReply:
        """Accept (and start) a switch to another profile, or say why not; answers at once."""
        me = self.config.worker_id
        if self._switch_target is not None or self._switch_to is not None:
            return SwitchReply(False, "already_switching", f"worker {me} is already switching models")
        if self._shutting_down or self._engine_factory is None:
            return SwitchReply(False, "already_switching", f"worker {me} is stopping")
        profile = self.profiles.resolve(profile_name)
        if profile is None:
            return SwitchReply(False, "unknown_profile", f"worker {me} has no profile {profile_name!r}")
        if profile.id == self.model:
            return SwitchReply(False, "same_model", f"worker {me} already serves {profile.id}")
        refusal = self._fits(profile, True)
        if refusal is not None:
            return SwitchReply(False, "does_not_fit", refusal)
        log.info("switching from %s to %s: draining", self.model, profile.id)
        self._switch_target = profile
        self._switch_to = profile.id
        self._progress = "draining"
        self._stopping.set()
        self.jobs.slot_freed.set()
        self.spawn(self.announce("draining"))  # at once, not when the pull loop notices
        return SwitchReply(True, previous=self.model)

    async def _switch(self, target: Profile) -> None:
        """Drain, unload, check, load the target; on any failure load the previous model again."""
        old_engine, old_profile, old_model = self.engine, self.profile, self.model
        await self.announce("draining")
        await self.jobs.end_active(self.config.switch_grace_s, "model_switch")
        await old_engine.stop()
        gcfreeze.thaw()  # the old engine's objects may be collected now
        reason = self._fits(target, False)
        if reason is None:
            assert self._engine_factory is not None
            new_engine = self._engine_factory(target)
            self.jobs.use(new_engine)
            self.profile, self.model = target, target.id
            self._switch_to = None
            self._progress = "loading 0%"
            await self.announce("loading")
            try:
                await new_engine.start()
            except Exception as exc:  # any failure to load rolls back
                log.exception("loading %s failed; going back to %s", target.id, old_model)
                reason = str(exc) or type(exc).__name__
                with contextlib.suppress(Exception):
                    await new_engine.stop()
        if reason is None:
            log.info("switched from %s to %s", old_model, target.id)
            gcfreeze.freeze_startup_objects(f"engine {target.id}")
            self._progress = "ready"
            return
        log.warning("switch to %s failed: %s; loading %s again", target.id, reason, old_model)
        self.jobs.use(old_engine)
        self.profile, self.model = old_profile, old_model
        self._switch_to = None
        self._progress = "loading 0%"
        await self.announce("loading")
        # If the old model cannot come back either, the worker stops (and is restarted).
        await old_engine.start()
        gcfreeze.freeze_startup_objects(f"engine {old_model}")
        self._progress = f"failed: {reason}"

    # --- stopping -------------------------------------------------------------------

    def stop_fetching(self) -> None:
        self._shutting_down = True
        self._stopping.set()
        self.jobs.slot_freed.set()

    async def drain(self, grace_s: float) -> None:
        """Stop taking jobs and end running ones as a switch does, then leave the workers bucket."""
        self.stop_fetching()
        self._progress = "draining"
        await self.announce("draining")
        await self.jobs.end_active(grace_s, "worker_shutdown")
        with contextlib.suppress(Exception):
            if self._kv is not None:
                await self._kv.delete(names.worker_key(self.config.worker_id))
