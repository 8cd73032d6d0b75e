"""Reads queue depth and age, consumer lag, workers and GPU stats: Prometheus gauges and a snapshot."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterable
from typing import Any

from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Gauge

import schemas
from broker.queues import queues_of_streams
from schemas.status import GpuStatus, Snapshot

log = logging.getLogger(__name__)

_QUEUE = ["consumer", "model", "priority"]
_GPU = ["gpu", "name"]


class Gauges:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.pending = Gauge("chatq_queue_pending", "Jobs waiting for a worker", _QUEUE, registry=registry)
        self.in_flight = Gauge(
            "chatq_queue_in_flight", "Jobs handed out, not yet acked", _QUEUE, registry=registry
        )
        self.redelivered = Gauge(
            "chatq_queue_redelivered", "Jobs being redelivered", _QUEUE, registry=registry
        )
        self.oldest_age = Gauge(
            "chatq_queue_oldest_age_seconds",
            "How long the oldest job no worker has taken yet has waited (0: none waits)",
            ["model", "priority"],
            registry=registry,
        )
        self.events_lag = Gauge(
            "chatq_events_lag",
            "Events not yet consumed, per EVENTS consumer",
            ["consumer"],
            registry=registry,
        )
        self.workers = Gauge(
            "chatq_workers", "Inference workers by model and state", ["model", "state"], registry=registry
        )
        self.free_slots = Gauge(
            "chatq_worker_free_slots", "Free engine slots by model", ["model"], registry=registry
        )
        self.gpu_util = Gauge("chatq_gpu_utilization_ratio", "GPU utilization (0-1)", _GPU, registry=registry)
        self.gpu_mem_used = Gauge("chatq_gpu_memory_used_bytes", "GPU memory used", _GPU, registry=registry)
        self.gpu_mem_total = Gauge(
            "chatq_gpu_memory_total_bytes", "GPU memory in total", _GPU, registry=registry
        )
        self.gpu_temp = Gauge("chatq_gpu_temperature_celsius", "GPU temperature", _GPU, registry=registry)
        self.gpu_power = Gauge("chatq_gpu_power_watts", "GPU power draw", _GPU, registry=registry)
        self.scrape = Gauge(
            "chatq_telemetry_last_scrape_timestamp_seconds",
            "When the collector last succeeded (unix seconds)",
            registry=registry,
        )


class Nvml:
    """NVIDIA GPUs through nvidia-ml-py; absent GPUs or drivers just mean no GPU series."""

    def __init__(self) -> None:
        self.available = False
        self.note: str | None = None
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.available = True
        except Exception as exc:  # noqa: BLE001 - no driver, no library, no GPU
            self.note = f"no NVIDIA GPU stats: {exc}"
            log.info("%s", self.note)

    def read(self) -> list[GpuStatus]:
        if not self.available:
            return []
        nv = self._nvml
        gpus = []
        for index in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            util = nv.nvmlDeviceGetUtilizationRates(handle)
            mem = nv.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                GpuStatus(
                    index=index,
                    name=str(nv.nvmlDeviceGetName(handle)),
                    utilization_ratio=util.gpu / 100,
                    memory_used_bytes=int(mem.used),
                    memory_total_bytes=int(mem.total),
                    temperature_celsius=_optional(nv.nvmlDeviceGetTemperature, handle, 0),
                    power_watts=_milli(_optional(nv.nvmlDeviceGetPowerUsage, handle)),
                )
            )
        return gpus


def _optional(read: Any, *args: Any) -> float | None:
    """A reading some GPUs do not offer (power on consumer cards, say): None then."""
    try:
        return float(read(*args))
    except Exception:  # noqa: BLE001 - NVMLError_NotSupported and its kin
        return None


def _milli(value: float | None) -> float | None:
    return None if value is None else value / 1000


def export(gauges: Gauges, snapshot: Snapshot, workers: list[schemas.WorkerStatus]) -> None:
    """Set the Prometheus gauges from one snapshot and the live workers."""
    for gauge in (gauges.pending, gauges.in_flight, gauges.redelivered, gauges.oldest_age):
        gauge.clear()
    for q in snapshot.queues:
        labels = {"consumer": q.consumer, "model": q.model, "priority": q.priority}
        gauges.pending.labels(**labels).set(q.depth)
        gauges.in_flight.labels(**labels).set(q.in_flight)
        gauges.redelivered.labels(**labels).set(q.redelivered)
        gauges.oldest_age.labels(model=q.model, priority=q.priority).set(q.oldest_age_s or 0.0)
    gauges.events_lag.clear()
    for lag in snapshot.events:
        gauges.events_lag.labels(consumer=lag.consumer).set(lag.pending)
    counts: dict[tuple[str, str], int] = {}
    free: dict[str, int] = {}
    for status in workers:
        counts[(status.model, status.state)] = counts.get((status.model, status.state), 0) + 1
        free[status.model] = free.get(status.model, 0) + status.free_slots
    gauges.workers.clear()
    for (model, state), count in counts.items():
        gauges.workers.labels(model=model, state=state).set(count)
    gauges.free_slots.clear()
    for model, slots in free.items():
        gauges.free_slots.labels(model=model).set(slots)
    for gpu in snapshot.gpus:
        gpu_labels = {"gpu": str(gpu.index), "name": gpu.name}
        gauges.gpu_util.labels(**gpu_labels).set(gpu.utilization_ratio)
        gauges.gpu_mem_used.labels(**gpu_labels).set(gpu.memory_used_bytes)
        gauges.gpu_mem_total.labels(**gpu_labels).set(gpu.memory_total_bytes)
        if gpu.temperature_celsius is not None:
            gauges.gpu_temp.labels(**gpu_labels).set(gpu.temperature_celsius)
        if gpu.power_watts is not None:
            gauges.gpu_power.labels(**gpu_labels).set(gpu.power_watts)
    gauges.scrape.set(snapshot.time)


async def collect(
    js: JetStreamContext,
    gauges: Gauges,
    nvml: Nvml,
    workers: list[schemas.WorkerStatus],
    *,
    models: Iterable[str] = (),
    interval_s: float = 5.0,
) -> Snapshot:
    """One pass over JetStream consumers, the live workers and the GPUs; the gauges set."""
    queues, lags, notes = await queues_of_streams(js, [*models, *(w.model for w in workers)])
    try:
        gpus = nvml.read()
    except Exception as exc:  # noqa: BLE001 - a GPU fallen off the bus must not hide the queues
        gpus = []
        notes.append(f"reading the GPUs failed: {exc!r}")
    if nvml.note:
        notes.append(nvml.note)
    snapshot = Snapshot(
        time=time.time(),
        interval_s=interval_s,
        host=socket.gethostname(),
        queues=queues,
        events=lags,
        gpus=gpus,
        notes=notes,
    )
    export(gauges, snapshot, workers)
    return snapshot
