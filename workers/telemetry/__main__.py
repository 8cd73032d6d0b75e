"""python -m workers.telemetry: Prometheus exporter for queues, workers and GPUs."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from prometheus_client import REGISTRY, start_http_server

from broker import topology
from broker.bus import connect
from chatq.logs import setup_logging
from chatq.settings import load
from workers.telemetry.collector import Gauges, Nvml, collect

log = logging.getLogger("chatq.telemetry")


async def run(nats_url: str, interval_s: float) -> None:
    nc = await connect(nats_url, "chatq-telemetry")
    js = nc.jetstream()
    await topology.ensure_streams(js, jobs_max_msgs=load().jobs_max_msgs)
    gauges = Gauges(REGISTRY)
    nvml = Nvml()
    while True:
        try:
            await collect(js, gauges, nvml)
        except Exception as exc:  # noqa: BLE001 - NATS restarting: try again next round
            log.warning("collect failed: %r", exc)
        await asyncio.sleep(interval_s)


def main() -> int:
    setup_logging("telemetry")
    settings = load()
    port = int(os.environ.get("TELEMETRY_PORT", "9102"))
    start_http_server(port, addr=settings.host)
    log.info("telemetry on http://%s:%d/metrics", settings.host, port)
    try:
        asyncio.run(run(settings.nats_url, float(os.environ.get("TELEMETRY_INTERVAL_S", "5"))))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
