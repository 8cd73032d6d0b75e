"""The persistence worker's readiness probe (deploy/k8s runs it as an exec probe)."""

from __future__ import annotations

import os
import subprocess
import sys

from psycopg.conninfo import make_conninfo

from tests.helpers import free_port
from tests.persistence import Env


def probe(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.persistence.probe"],
        env={**os.environ, "DATABASE_CONNECT_TIMEOUT_S": "2", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_probe_passes_with_nats_and_postgres_up(env: Env) -> None:
    ok = probe(NATS_URL=env.nats.url, DATABASE_URL=env.dsn)
    assert (ok.returncode, ok.stderr) == (0, "")


def test_the_probe_names_what_is_down(env: Env) -> None:
    port = free_port()
    down = probe(NATS_URL=f"nats://127.0.0.1:{port}", DATABASE_URL=make_conninfo(env.dsn, port=str(port)))
    assert down.returncode == 1
    lines = down.stderr.splitlines()
    assert len(lines) == 2, down.stderr
    assert lines[0].startswith(f"chatq persistence probe: NATS at 127.0.0.1:{port}: ")
    assert lines[1].startswith("chatq persistence probe: PostgreSQL: ")
