"""The telemetry worker's snapshot of queues and GPUs, and the operator's view of workers.

The snapshot travels as msgpack in the status KV bucket (broker/status.py); the API
answers it as JSON on /api/admin/status. Fields are only ever appended, with defaults.
"""

from __future__ import annotations

import msgspec

from schemas.messages import Priority, WorkerStatus


class QueueStatus(msgspec.Struct, frozen=True, omit_defaults=True):
    """One job queue (a model and a priority): jobs waiting, handed out, and the oldest wait."""

    model: str
    priority: Priority
    consumer: str
    depth: int  # jobs no worker has taken yet
    in_flight: int = 0  # taken by a worker, not yet acked (no first token)
    redelivered: int = 0
    # How long the oldest job nobody has taken yet has waited (None: the queue is empty).
    oldest_age_s: float | None = None


class ConsumerLag(msgspec.Struct, frozen=True):
    """A consumer of the EVENTS stream and the events it has not read yet."""

    consumer: str
    pending: int


class GpuStatus(msgspec.Struct, frozen=True, omit_defaults=True):
    index: int
    name: str
    utilization_ratio: float  # 0-1
    memory_used_bytes: int
    memory_total_bytes: int
    temperature_celsius: float | None = None
    power_watts: float | None = None


class Snapshot(msgspec.Struct, frozen=True, omit_defaults=True):
    """What the telemetry worker last read, published every TELEMETRY_INTERVAL_S."""

    time: float  # unix seconds, when it was read
    interval_s: float  # how often a new one comes
    host: str
    queues: list[QueueStatus] = []
    events: list[ConsumerLag] = []
    gpus: list[GpuStatus] = []
    # Why a part is missing (no NVIDIA driver, a JetStream call that failed).
    notes: list[str] = []


class WorkerView(msgspec.Struct, frozen=True):
    """An inference worker as the operator sees it (GET /api/admin/workers)."""

    id: str
    host: str | None
    model: str
    engine: str
    engine_version: str | None
    state: str
    slots: int
    free_slots: int
    last_seen: float  # unix seconds of its last heartbeat
    last_seen_age_s: float
    progress: str | None = None  # "loading 40%", "draining", when the worker says


def worker_view(status: WorkerStatus, now: float) -> WorkerView:
    """The operator's view of a worker's heartbeat; host and engine version when it sends them."""
    host = status.host or None
    version = status.engine_version or None
    progress = status.progress or None
    return WorkerView(
        id=status.worker_id,
        host=host,
        model=status.model,
        engine=status.engine,
        engine_version=version,
        state=status.state,
        slots=status.slots,
        free_slots=status.free_slots,
        last_seen=status.updated,
        last_seen_age_s=round(max(0.0, now - status.updated), 3),
        progress=progress,
    )


_encoder = msgspec.msgpack.Encoder()
encode_snapshot = _encoder.encode
decode_snapshot = msgspec.msgpack.Decoder(Snapshot).decode
