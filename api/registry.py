"""The live view of inference workers, read from the workers KV bucket every few seconds."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.js.errors import NoKeysError
from nats.js.kv import KeyValue

import schemas
from broker import topology
from broker.bus import Bus

log = logging.getLogger(__name__)


class WorkerRegistry:
    """Which workers are up, for which models, with how many free slots."""

    def __init__(self, bus: Bus, *, interval_s: float = 1.0) -> None:
        self._bus = bus
        self._interval_s = interval_s
        self._kv: KeyValue | None = None
        self.workers: dict[str, schemas.WorkerStatus] = {}
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        if self._kv is None:
            self._kv = await topology.workers_kv(self._bus.js)
        try:
            keys = await self._kv.keys()
        except NoKeysError:
            keys = []
        workers: dict[str, schemas.WorkerStatus] = {}
        for key in keys:
            with contextlib.suppress(Exception):
                entry = await self._kv.get(key)
                if entry.value:
                    status = schemas.decode_worker_status(entry.value)
                    workers[status.worker_id] = status
        self.workers = workers

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - NATS may be restarting; retried next round
                log.debug("worker registry refresh failed: %r", exc)
                self.workers = {}
            await asyncio.sleep(self._interval_s)

    async def start(self) -> None:
        with contextlib.suppress(Exception):
            await self.refresh()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def models(self) -> set[str]:
        return {w.model for w in self.workers.values()}

    def ready(self) -> list[schemas.WorkerStatus]:
        return [w for w in self.workers.values() if w.state == "ready"]
