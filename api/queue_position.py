"""Where a queued job stands: its place in its model's queue, for /api/chat's `event: queue`.

A job's place is read from its JetStream consumer: the jobs still waiting (`num_pending`)
and the stream sequence of the last job handed to a worker (`delivered.stream_seq`).
A job with stream sequence `seq` has at most `seq - delivered` jobs up to and including
itself still waiting, and never more than all that wait, so its place is

    place = max(1, min(num_pending, seq - delivered.stream_seq))

exact when the stream holds only this queue's jobs in that range, otherwise an upper
bound (the JOBS stream interleaves every model and priority, and a withdrawn job leaves
a gap). Once `delivered.stream_seq` reaches `seq` a worker has the job: no place.

One consumer-info request per queue per READING_S serves every waiting request of this
process (a thousand waiting streams do not make a thousand requests a second).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

import msgspec

from api.admission import QueueMonitor
from broker import names
from broker.bus import Bus
from schemas.messages import Priority

READING_S = 0.9


@dataclass
class _Reading:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    at: float = -math.inf
    pending: int = 0
    delivered: int = 0


class QueuePlace(msgspec.Struct):
    """The data of an `event: queue`: place (1 = next), jobs waiting, expected wait (s, or null)."""

    position: int
    depth: int
    wait_s: float | None = None


_readings: dict[tuple[int, str, Priority], _Reading] = {}


async def _read(bus: Bus, model: str, priority: Priority) -> _Reading:
    reading = _readings.setdefault((id(bus), model, priority), _Reading())
    if time.monotonic() - reading.at < READING_S:
        return reading
    async with reading.lock:
        if time.monotonic() - reading.at >= READING_S:
            info = await bus.js.consumer_info(names.JOBS_STREAM, names.jobs_consumer(model, priority))
            reading.pending = int(info.num_pending or 0)
            reading.delivered = int(info.delivered.stream_seq or 0) if info.delivered else 0
            reading.at = time.monotonic()
    return reading


async def place(
    bus: Bus, monitor: QueueMonitor, model: str, priority: Priority, seq: int | None
) -> QueuePlace | None:
    """The job's place in its queue, or None once a worker has it (or it cannot be told)."""
    if seq is None:
        return None
    try:
        reading = await _read(bus, model, priority)
    except Exception:  # noqa: BLE001 - a place is a courtesy; the stream goes on without one
        return None
    if seq <= reading.delivered:
        return None
    position = max(1, min(reading.pending, seq - reading.delivered))
    rate = monitor.drain_rate(model, priority)
    wait = round(position / rate, 1) if rate else None
    return QueuePlace(position=position, depth=max(reading.pending, position), wait_s=wait)
