"""python -m workers.telemetry: Prometheus exporter for queues, workers and GPUs, and the status snapshot."""

from __future__ import annotations

import asyncio
import logging
import sys

from nats.js.kv import KeyValue
from prometheus_client import REGISTRY, start_http_server

from broker.bus import Bus
from broker.connect import NatsLogin, connect
from broker.status import SNAPSHOT_KEY, status_kv
from broker.workers import WorkerRegistry
from catalog.profiles import load_profiles
from chatq.errors import ConfigError
from chatq.logs import setup_logging
from chatq.settings import Settings, load
from schemas.status import encode_snapshot
from workers.telemetry.collector import Gauges, Nvml, collect

log = logging.getLogger("chatq.telemetry")


async def run(settings: Settings) -> None:
    nc = await connect(settings.nats_url, "chatq-telemetry", NatsLogin.of(settings))
    js = nc.jetstream()
    # Telemetry only reads the streams (the launcher or the API declares them): until
    # they exist, a round fails with a warning and the next one tries again.
    gauges = Gauges(REGISTRY)
    nvml = Nvml()
    workers = WorkerRegistry(Bus(nc))
    await workers.start()
    kv: KeyValue | None = None
    profiles = load_profiles(settings.profiles_file)
    while True:
        try:
            snapshot = await collect(
                js,
                gauges,
                nvml,
                list(workers.workers.values()),
                # Profile ids too: their queues exist (the API declares them) and get names.
                models=(*settings.models, *(p.id for p in profiles)),
                interval_s=settings.telemetry_interval_s,
            )
            if kv is None:
                kv = await status_kv(js, replicas=settings.nats_stream_replicas)
            await kv.put(SNAPSHOT_KEY, encode_snapshot(snapshot))
        except Exception as exc:  # noqa: BLE001 - NATS restarting: try again next round
            log.warning("collect failed: %r", exc)
            kv = None  # the bucket (memory storage) is gone after a NATS restart
        await asyncio.sleep(settings.telemetry_interval_s)


def main() -> int:
    setup_logging("telemetry")
    try:
        settings = load()
    except ConfigError as exc:
        print(f"chatq telemetry: {exc}", file=sys.stderr)
        return 2
    start_http_server(settings.telemetry_port, addr=settings.host)
    log.info("telemetry on http://%s:%d/metrics", settings.host, settings.telemetry_port)
    try:
        asyncio.run(run(settings))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
