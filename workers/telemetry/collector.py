"""Reads queue depth, consumer lag, workers and GPU stats, and sets Prometheus gauges."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Gauge

import schemas
from broker import names

log = logging.getLogger(__name__)


class Gauges:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.pending = Gauge(
            "chatq_queue_pending", "Jobs waiting for a worker", ["consumer"], registry=registry
        )
        self.in_flight = Gauge(
            "chatq_queue_in_flight", "Jobs handed out, not yet acked", ["consumer"], registry=registry
        )
        self.redelivered = Gauge(
            "chatq_queue_redelivered", "Jobs being redelivered", ["consumer"], registry=registry
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
        self.gpu_util = Gauge(
            "chatq_gpu_utilization_ratio", "GPU utilization (0-1)", ["gpu", "name"], registry=registry
        )
        self.gpu_mem_used = Gauge(
            "chatq_gpu_memory_used_bytes", "GPU memory used", ["gpu", "name"], registry=registry
        )
        self.gpu_mem_total = Gauge(
            "chatq_gpu_memory_total_bytes", "GPU memory in total", ["gpu", "name"], registry=registry
        )
        self.gpu_temp = Gauge(
            "chatq_gpu_temperature_celsius", "GPU temperature", ["gpu", "name"], registry=registry
        )
        self.scrape = Gauge(
            "chatq_telemetry_last_scrape_timestamp",
            "When the collector last succeeded",
            registry=registry,
        )


class Nvml:
    """NVIDIA GPUs through nvidia-ml-py; absent GPUs or drivers just mean no GPU series."""

    def __init__(self) -> None:
        self.available = False
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.available = True
        except Exception as exc:  # noqa: BLE001 - no driver, no library, no GPU
            log.info("no NVIDIA GPU stats (%s)", exc)

    def read(self, gauges: Gauges) -> None:
        if not self.available:
            return
        nv = self._nvml
        for index in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            labels = {"gpu": str(index), "name": str(nv.nvmlDeviceGetName(handle))}
            util = nv.nvmlDeviceGetUtilizationRates(handle)
            mem = nv.nvmlDeviceGetMemoryInfo(handle)
            gauges.gpu_util.labels(**labels).set(util.gpu / 100)
            gauges.gpu_mem_used.labels(**labels).set(mem.used)
            gauges.gpu_mem_total.labels(**labels).set(mem.total)
            with contextlib.suppress(Exception):
                gauges.gpu_temp.labels(**labels).set(nv.nvmlDeviceGetTemperature(handle, 0))


async def collect(
    js: JetStreamContext, gauges: Gauges, nvml: Nvml, workers: list[schemas.WorkerStatus]
) -> None:
    """One pass over JetStream consumers, the live workers and the GPUs."""
    for info in await js.consumers_info(names.JOBS_STREAM):
        name = info.name
        gauges.pending.labels(consumer=name).set(info.num_pending or 0)
        gauges.in_flight.labels(consumer=name).set(info.num_ack_pending or 0)
        gauges.redelivered.labels(consumer=name).set(info.num_redelivered or 0)
    for info in await js.consumers_info(names.EVENTS_STREAM):
        gauges.events_lag.labels(consumer=info.name).set(info.num_pending or 0)
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
    nvml.read(gauges)
    gauges.scrape.set(time.time())
