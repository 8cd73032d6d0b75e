"""The live view of inference workers, watched on the workers KV bucket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Literal, NamedTuple

from nats.errors import TimeoutError as NatsTimeout
from nats.js.kv import KeyValue

import schemas
from broker import names, topology
from broker.bus import Bus
from schemas.messages import Priority

log = logging.getLogger(__name__)

ModelState = Literal["ready", "loading", "draining", "unavailable"]


class SlotTimes(NamedTuple):
    """What admission needs to count the slots that free up soon (api/admission.py)."""

    releases: list[float]  # unix seconds at which running jobs should end, soonest first
    job_s: float  # the average time a job holds a slot (0: unknown)
    # The consumer sequence of the newest job a worker had taken when it announced (None:
    # none says): the jobs delivered after it took slots the announcements do not show.
    # The newest of several workers': one that took a job after its own announcement,
    # before another's, is not counted (until its next announcement, at most 0.25 s
    # after a job of its ends).
    taken: int | None


# Workers announce themselves every couple of seconds; one silent for longer than this
# is gone (killed, say) even though its key lives on until the bucket's TTL.
STALE_AFTER_S = 5.0
# With workers up, updates arrive every few seconds: a watcher quiet for longer may have
# lost its consumer (a NATS restart) and is made anew.
QUIET_WATCH_S = 10.0


class WorkerRegistry:
    """Which workers are up, for which models, with how many free slots."""

    def __init__(self, bus: Bus, *, stale_after_s: float = STALE_AFTER_S) -> None:
        self._bus = bus
        self._stale_after_s = stale_after_s
        self._kv: KeyValue | None = None
        self._entries: dict[str, schemas.WorkerStatus] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def workers(self) -> dict[str, schemas.WorkerStatus]:
        """The workers heard from within the last STALE_AFTER_S."""
        oldest = time.time() - self._stale_after_s
        return {wid: w for wid, w in self._entries.items() if w.updated >= oldest}

    def _apply(self, entry: KeyValue.Entry) -> None:
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            self._entries = {k: w for k, w in self._entries.items() if entry.key != names.worker_key(k)}
            return
        try:
            status = schemas.decode_worker_status(entry.value)
        except Exception as exc:  # noqa: BLE001 - a malformed entry must not stop the watch
            log.warning("ignoring a malformed worker entry %s: %r", entry.key, exc)
            return
        self._entries[status.worker_id] = status

    async def _watch_once(self) -> None:
        if self._kv is None:
            self._kv = await topology.workers_kv(self._bus.js)
        watcher = await self._kv.watchall()
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout=QUIET_WATCH_S)  # type: ignore[no-untyped-call]
                except (NatsTimeout, TimeoutError):
                    return  # quiet for long: start a fresh watch
                if entry is not None:  # None marks the end of the initial values
                    self._apply(entry)
        finally:
            # Bounded: a stop that waits on a stuck subscription must not hold up a shutdown.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(watcher.stop(), 2.0)  # type: ignore[no-untyped-call]

    async def _loop(self) -> None:
        while True:
            try:
                await self._watch_once()
            except Exception as exc:  # noqa: BLE001 - NATS may be restarting; watched again
                log.warning("watching the workers bucket failed (%r); retrying", exc)
                self._kv = None
                await asyncio.sleep(1.0)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=3.0)

    def models(self) -> set[str]:
        """Every model a live worker serves, or is loading (a switch in progress included)."""
        return {w.model for w in self.workers.values()} | {
            w.switch_to for w in self.workers.values() if w.switch_to
        }

    def serving(self, model: str) -> list[schemas.WorkerStatus]:
        """The live workers that serve `model`, load it, drain it, or switch to it."""
        return [w for w in self.workers.values() if model in (w.model, w.switch_to)]

    def model_state(self, model: str) -> ModelState:
        """ready (a worker serves it), loading (one is on its way), draining, or unavailable."""
        workers = self.serving(model)
        if any(w.model == model and w.state == "ready" for w in workers):
            return "ready"
        if any(w.switch_to == model or (w.model == model and w.state == "loading") for w in workers):
            return "loading"
        if workers:
            return "draining"
        return "unavailable"

    def ready(self) -> list[schemas.WorkerStatus]:
        return [w for w in self.workers.values() if w.state == "ready"]

    def _ready_for(self, model: str) -> list[schemas.WorkerStatus]:
        return [w for w in self.ready() if w.model == model]

    def free_slots(self, model: str) -> tuple[int, float]:
        """Free slots the ready workers serving `model` announced last, and when the newest
        announcement was made (admission's F)."""
        workers = self._ready_for(model)
        return sum(w.free_slots for w in workers), max((w.updated for w in workers), default=0.0)

    def capacity_estimate(self, model: str) -> float | None:
        """Jobs per second the ready workers serving `model` can start, from their slots and
        the time a job holds one (slots / job_s; a worker with no job done yet counted at
        its neighbours' average), or None while no worker has completed a job."""
        workers = self._ready_for(model)
        known = [w.job_s for w in workers if w.job_s > 0]
        if not known:
            return None
        average = sum(known) / len(known)
        return sum(w.slots / (w.job_s or average) for w in workers)

    def slot_times(self, model: str, priority: Priority) -> SlotTimes | None:
        """When the ready workers serving `model` expect their running jobs to free a slot,
        the average time a job holds one, and the last job of `priority`'s queue they had
        taken; None while one of them does not say (admission then counts on capacity)."""
        workers = self._ready_for(model)
        if not workers or any(w.releases is None for w in workers):
            return None
        known = [w.job_s for w in workers if w.job_s > 0]
        consumer = names.jobs_consumer(model, priority)
        taken = [w.taken[consumer] for w in workers if consumer in w.taken]
        return SlotTimes(
            releases=sorted(r for w in workers for r in w.releases or ()),
            job_s=sum(known) / len(known) if known else 0.0,
            taken=max(taken) if taken else None,
        )
