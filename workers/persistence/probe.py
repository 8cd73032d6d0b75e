"""python -m workers.persistence.probe: exit 0 when what the persistence worker writes through is up.

The worker serves no port, so Kubernetes' readinessProbe runs this in its container: it
reads the same settings, opens a TCP connection to the first NATS server and runs
`SELECT 1` on DATABASE_URL, each within DATABASE_CONNECT_TIMEOUT_S. It prints what failed
and exits 1; nothing is written. The worker itself waits out either being down (events
stay in JetStream), so this gates readiness only; a crash ends the process, and the
container restarts.
"""

from __future__ import annotations

import socket
import sys
from urllib.parse import urlsplit

import psycopg

from chatq.errors import ConfigError
from chatq.settings import Settings, load


def nats_address(url: str) -> tuple[str, int]:
    """(host, port) of the first server in NATS_URL (a comma-separated list is allowed)."""
    first = urlsplit(url.split(",")[0].strip())
    return first.hostname or "127.0.0.1", first.port or 4222


def problems(settings: Settings) -> list[str]:
    """What is not reachable, one line each; empty when both are."""
    found: list[str] = []
    timeout = settings.database_connect_timeout_s
    host, port = nats_address(settings.nats_url)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        found.append(f"NATS at {host}:{port}: {exc}")
    if not settings.database_url:
        found.append("DATABASE_URL is not set")
    else:
        try:
            with psycopg.connect(settings.database_url, connect_timeout=timeout) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error as exc:
            found.append(f"PostgreSQL: {' '.join(str(exc).split())}")
    return found


def main() -> int:
    try:
        settings = load()
    except ConfigError as exc:
        print(f"chatq persistence probe: {exc}", file=sys.stderr)
        return 2
    found = problems(settings)
    for line in found:
        print(f"chatq persistence probe: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
