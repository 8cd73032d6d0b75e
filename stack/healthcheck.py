"""python -m stack.healthcheck SERVICE: a container's health check, exit 0 when healthy.

The port each check asks is the service's own setting (stack.process_table.PORT_SETTINGS),
read from the same environment the service runs with, so the check and the process agree.

  api          GET /health answers 200 (degraded, no worker yet, still counts: the API serves)
  inference    the worker's metrics endpoint answers (it opens before the engine loads)
  telemetry    its metrics endpoint answers
  persistence  its durable consumer on EVENTS holds a pull request open (a live subscriber)
"""

from __future__ import annotations

import asyncio
import sys
import urllib.request
from collections.abc import Callable

from chatq.settings import Settings, load

TIMEOUT_S = 4.0


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return bool(response.status == 200)
    except OSError:
        return False


async def _consumer_alive(settings: Settings) -> bool:
    from broker import names
    from broker.bus import Bus
    from broker.connect import NatsLogin, connect
    from workers.persistence.app import DURABLE

    # As the persistence worker's own NATS user (its container's NATS_USER/NATS_PASSWORD).
    bus = Bus(await connect(settings.nats_url, "chatq-healthcheck", NatsLogin.of(settings)))
    try:
        return await bus.pulls_waiting(names.EVENTS_STREAM, DURABLE) > 0
    finally:
        await bus.close()


def _api(settings: Settings) -> bool:
    return _answers(f"http://127.0.0.1:{settings.port}/health")


def _inference(settings: Settings) -> bool:
    return _answers(f"http://127.0.0.1:{settings.worker_metrics_port}/metrics")


def _telemetry(settings: Settings) -> bool:
    return _answers(f"http://127.0.0.1:{settings.telemetry_port}/metrics")


def _persistence(settings: Settings) -> bool:
    try:
        return asyncio.run(asyncio.wait_for(_consumer_alive(settings), TIMEOUT_S))
    except Exception:  # noqa: BLE001 - NATS away or no consumer: unhealthy, either way
        return False


# compose.yaml's service names, each checked from inside its own container.
CHECKS: dict[str, Callable[[Settings], bool]] = {
    "api": _api,
    "inference": _inference,
    "telemetry": _telemetry,
    "persistence": _persistence,
}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in CHECKS:
        print(f"usage: python -m stack.healthcheck {'|'.join(CHECKS)}", file=sys.stderr)
        return 2
    return 0 if CHECKS[argv[0]](load()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
