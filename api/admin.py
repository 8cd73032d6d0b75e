"""The operator's view: workers, queues and GPUs, for admins only.

- `GET /api/admin/workers`: the inference workers heard from within the last few
  seconds (the API's own watch of the workers bucket), so a worker whose heartbeat
  stops leaves the list within `broker.workers.STALE_AFTER_S`.
- `GET /api/admin/status`: the service's health, the workers, and the telemetry
  worker's newest snapshot (queues per model and priority with depth and oldest job
  age, EVENTS consumers' lag, GPUs), saying how old it is. A telemetry worker that is
  down, or NATS unreachable, makes the answer `degraded` with the reasons; never a 500.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

import msgspec
from litestar import Request, Response, get
from litestar.di import NamedDependency
from nats.js.errors import KeyNotFoundError, NotFoundError

from api.accounts import json_response
from api.auth import principal_of
from api.services import Services
from broker.status import SNAPSHOT_KEY, status_kv
from schemas.status import (
    ConsumerLag,
    GpuStatus,
    QueueStatus,
    Snapshot,
    WorkerView,
    decode_snapshot,
    worker_view,
)

# How long reading the snapshot from NATS may take before the answer goes out without it.
SNAPSHOT_READ_TIMEOUT_S = 2.0
# A snapshot older than this many of its intervals (plus a little slack) is stale: the
# telemetry worker stopped writing.
STALE_INTERVALS = 3
STALE_SLACK_S = 2.0

TelemetryState = Literal["ok", "stale", "missing", "unknown"]


class TelemetryHealth(msgspec.Struct, frozen=True):
    status: TelemetryState
    snapshot_time: float | None = None
    snapshot_age_s: float | None = None
    interval_s: float | None = None
    host: str | None = None


class WorkerCounts(msgspec.Struct, frozen=True):
    ready: int
    total: int
    free_slots: int
    slots: int


class ServiceHealth(msgspec.Struct, frozen=True):
    nats: Literal["ok", "down"]
    telemetry: TelemetryHealth
    workers: WorkerCounts


class AdminStatus(msgspec.Struct, frozen=True):
    status: Literal["healthy", "degraded"]
    reasons: list[str]
    time: float
    services: ServiceHealth
    workers: list[WorkerView]
    queues: list[QueueStatus]
    events: list[ConsumerLag]
    gpus: list[GpuStatus]
    notes: list[str]


def live_workers(services: Services, now: float) -> list[WorkerView]:
    """The workers heard from recently, by model then id."""
    views = [worker_view(w, now) for w in services.registry.workers.values()]
    return sorted(views, key=lambda w: (w.model, w.id))


async def read_snapshot(services: Services) -> tuple[Snapshot | None, str | None]:
    """The telemetry worker's newest snapshot, or None and why there is none."""
    if not services.bus.nc.is_connected:
        return None, "NATS is unreachable from the API"
    try:
        async with asyncio.timeout(SNAPSHOT_READ_TIMEOUT_S):
            kv = await status_kv(services.bus.js, replicas=services.settings.nats_stream_replicas)
            entry = await kv.get(SNAPSHOT_KEY)
    except TimeoutError:
        return None, "reading the telemetry snapshot from NATS timed out"
    except (KeyNotFoundError, NotFoundError):  # KeyDeletedError is a NotFoundError too
        return None, "no telemetry snapshot: is the telemetry worker running?"
    except Exception as exc:  # noqa: BLE001 - NATS trouble: said in the answer, not a 500
        return None, f"reading the telemetry snapshot failed: {exc!r}"
    if not entry.value:
        return None, "no telemetry snapshot: is the telemetry worker running?"
    try:
        return decode_snapshot(entry.value), None
    except msgspec.DecodeError as exc:
        return None, f"the telemetry snapshot does not decode: {exc}"


def telemetry_health(snapshot: Snapshot | None, now: float) -> tuple[TelemetryHealth, str | None]:
    """How fresh the snapshot is, and the reason to call the service degraded, if any."""
    if snapshot is None:
        return TelemetryHealth(status="missing"), None
    age = round(max(0.0, now - snapshot.time), 3)
    health = TelemetryHealth(
        status="ok",
        snapshot_time=snapshot.time,
        snapshot_age_s=age,
        interval_s=snapshot.interval_s,
        host=snapshot.host,
    )
    if age > STALE_INTERVALS * snapshot.interval_s + STALE_SLACK_S:
        reason = (
            f"the telemetry snapshot is {age:.0f} s old (it is written every "
            f"{snapshot.interval_s:g} s): the telemetry worker is down or cannot reach NATS"
        )
        return msgspec.structs.replace(health, status="stale"), reason
    return health, None


async def build_status(services: Services) -> AdminStatus:
    """Everything /api/admin/status answers."""
    now = time.time()
    reasons: list[str] = []
    nats_ok = services.bus.nc.is_connected
    if not nats_ok:
        reasons.append("NATS is unreachable from the API")
    workers = live_workers(services, now)
    ready = [w for w in workers if w.state == "ready"]
    if not ready:
        reasons.append("no inference worker is ready")
    else:
        served = {w.model for w in ready}
        reasons += [
            f"no ready worker serves the configured model {m!r}"
            for m in services.settings.models
            if m not in served
        ]
    snapshot, missing = await read_snapshot(services)
    telemetry, stale = telemetry_health(snapshot, now)
    if missing is not None and nats_ok:
        reasons.append(missing)
    if stale is not None:
        reasons.append(stale)
    return AdminStatus(
        status="degraded" if reasons else "healthy",
        reasons=reasons,
        time=now,
        services=ServiceHealth(
            nats="ok" if nats_ok else "down",
            telemetry=telemetry,
            workers=WorkerCounts(
                ready=len(ready),
                total=len(workers),
                free_slots=sum(w.free_slots for w in ready),
                slots=sum(w.slots for w in ready),
            ),
        ),
        workers=workers,
        queues=snapshot.queues if snapshot else [],
        events=snapshot.events if snapshot else [],
        gpus=snapshot.gpus if snapshot else [],
        notes=snapshot.notes if snapshot else [],
    )


@get("/api/admin/workers", opt={"admin": True})
async def admin_workers(request: Request, services: NamedDependency[Services]) -> Response[bytes]:  # type: ignore[type-arg]
    """The live inference workers (admins only)."""
    principal_of(request).require_admin()
    return json_response({"workers": live_workers(services, time.time())})


@get("/api/admin/status", opt={"admin": True})
async def admin_status(request: Request, services: NamedDependency[Services]) -> Response[bytes]:  # type: ignore[type-arg]
    """Health, workers, queues and GPUs in one answer (admins only)."""
    principal_of(request).require_admin()
    return json_response(await build_status(services))


ROUTES = [admin_workers, admin_status]
