"""python -m workers.telemetry: Prometheus exporter for queues, workers and GPUs."""

from __future__ import annotations

import asyncio
import logging
import sys

from prometheus_client import REGISTRY, start_http_server

from broker import topology
from broker.bus import Bus, connect
from broker.workers import WorkerRegistry
from chatq.logs import setup_logging
from chatq.settings import Settings, load
from workers.telemetry.collector import Gauges, Nvml, collect

log = logging.getLogger("chatq.telemetry")


async def run(settings: Settings) -> None:
    nc = await connect(settings.nats_url, "chatq-telemetry")
    js = nc.jetstream()
    await topology.ensure_streams(js, jobs_max_msgs=settings.jobs_max_msgs)
    gauges = Gauges(REGISTRY)
    nvml = Nvml()
    workers = WorkerRegistry(Bus(nc))
    await workers.start()
    while True:
        try:
            await collect(js, gauges, nvml, list(workers.workers.values()))
        except Exception as exc:  # noqa: BLE001 - NATS restarting: try again next round
            log.warning("collect failed: %r", exc)
        await asyncio.sleep(settings.telemetry_interval_s)


def main() -> int:
    setup_logging("telemetry")
    settings = load()
    start_http_server(settings.telemetry_port, addr=settings.host)
    log.info("telemetry on http://%s:%d/metrics", settings.host, settings.telemetry_port)
    try:
        asyncio.run(run(settings))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
