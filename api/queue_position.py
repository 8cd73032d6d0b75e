"""Where a queued job stands: its place in its model's queue, for /api/chat's `event: queue`.

A job's place is read from its JetStream consumer (the admission monitor's reading,
`ConsumerDepth`): the jobs still waiting (`pending`) and the stream sequence of the last
job handed to a worker (`delivered_seq`).
A job with stream sequence `seq` has at most `seq - delivered_seq` jobs up to and
including itself still waiting, and never more than all that wait, so its place is

    place = max(1, min(pending, seq - delivered_seq))

exact when the stream holds only this queue's jobs in that range, otherwise an upper
bound (the JOBS stream interleaves every model and priority, and a withdrawn job leaves
a gap). Once `delivered_seq` reaches `seq` a worker has the job: no place.

The monitor caches its reading (CHATQ_QUEUE_DEPTH_CACHE_S) and takes one at a time per
queue, so a thousand waiting streams do not make a thousand requests a second.
"""

from __future__ import annotations

import msgspec

from api.admission import QueueMonitor
from schemas.messages import Priority


class QueuePlace(msgspec.Struct):
    """The data of an `event: queue`: place (1 = next), jobs waiting, expected wait (s, or null)."""

    position: int
    depth: int
    wait_s: float | None = None


async def place(monitor: QueueMonitor, model: str, priority: Priority, seq: int | None) -> QueuePlace | None:
    """The job's place in its queue, or None once a worker has it (or it cannot be told)."""
    if seq is None:
        return None
    try:
        reading = await monitor.depth(model, priority)
    except Exception:  # noqa: BLE001 - a place is a courtesy; the stream goes on without one
        return None
    if seq <= reading.delivered_seq:
        return None
    position = max(1, min(reading.pending, seq - reading.delivered_seq))
    rate = monitor.drain_rate(model, priority)
    wait = round(position / rate, 1) if rate else None
    return QueuePlace(position=position, depth=max(reading.pending, position), wait_s=wait)
