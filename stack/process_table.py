"""The process table: the chatq processes a supervisor starts, as data.

A row names a module, the environment it gets on top of the stack's, the embedded servers
it needs, the port it listens on and when it stops. `./start` runs PROCESS_TABLE; a test or
a load test builds its own rows (more API processes, a second worker) with with_env().
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chatq.settings import Settings

# The setting each port a process may listen on is read from: its variable, its Settings field.
PORT_SETTINGS = {
    "CHATQ_PORT": "port",
    "WORKER_METRICS_PORT": "worker_metrics_port",
    "TELEMETRY_PORT": "telemetry_port",
}


@dataclass(frozen=True)
class ProcessSpec:
    """One row of a process table: `python -m module`, with `env` on top of the stack's."""

    name: str
    module: str
    env: Mapping[str, str] = field(default_factory=dict)
    # What it needs before it starts: "database" (DATABASE_URL), "redis" (REDIS_URL), the
    # embedded servers it is given the URL of; "streams", the JetStream streams declared.
    needs: tuple[str, ...] = ()
    # The variable of the port it listens on (a key of PORT_SETTINGS), checked free at start.
    port_env: str | None = None
    stop_rank: int = 9  # lower stops first
    # Its NATS user (a service of broker/permissions.py); none: it connects as no one.
    nats_service: str | None = None

    def with_env(self, **env: str) -> ProcessSpec:
        """The same row, with more environment variables."""
        return replace(self, env={**self.env, **env})


# What ./start runs. The API stops first (no new work), then the worker (it drains), then the
# event consumers.
API = ProcessSpec(
    "api", "api", needs=("database", "redis"), port_env="CHATQ_PORT", stop_rank=0, nats_service="api"
)
INFERENCE_WORKER = ProcessSpec(
    "worker", "workers.inference", port_env="WORKER_METRICS_PORT", stop_rank=1, nats_service="inference"
)
PERSISTENCE = ProcessSpec(
    "persistence",
    "workers.persistence",
    needs=("database", "streams"),
    stop_rank=2,
    nats_service="persistence",
)
TELEMETRY = ProcessSpec(
    "telemetry", "workers.telemetry", port_env="TELEMETRY_PORT", stop_rank=3, nats_service="telemetry"
)
PROCESS_TABLE: tuple[ProcessSpec, ...] = (INFERENCE_WORKER, API, PERSISTENCE, TELEMETRY)

# Worker i (from 1) listens on WORKER_METRICS_PORT + 10·(i−1): 9101, 9111, 9121…, clear of
# the telemetry port (9102) beside it.
WORKER_PORT_STEP = 10


def scaled_table(s: Settings, gpus: int = 0) -> tuple[ProcessSpec, ...]:
    """What ./start runs: INFERENCE_WORKERS workers sharing each model's queue, API_WORKERS
    API processes on one port (SO_REUSEPORT: the kernel spreads the connections), then
    persistence and telemetry. One of each is PROCESS_TABLE itself.

    Worker i gets its own WORKER_ID and metrics port, WORKER_PROFILES' i-th profile if
    there are several, and with at least as many GPUs as workers, GPU i−1 alone
    (CUDA_VISIBLE_DEVICES): one worker per GPU.
    """
    workers = s.inference_workers
    if workers == 1 and s.api_workers == 1 and not s.worker_profiles:
        return PROCESS_TABLE
    rows: list[ProcessSpec] = []
    for i in range(1, workers + 1):
        env = {"WORKER_METRICS_PORT": str(s.worker_metrics_port + WORKER_PORT_STEP * (i - 1))}
        if workers > 1:
            env["WORKER_ID"] = f"{socket.gethostname()}-{i}"
        if s.worker_profiles:
            env["MODEL_PROFILE"] = s.worker_profiles[i - 1]
        if workers > 1 and gpus >= workers:
            env["CUDA_VISIBLE_DEVICES"] = str(i - 1)
        name = "worker" if workers == 1 else f"worker-{i}"
        rows.append(replace(INFERENCE_WORKER, name=name).with_env(**env))
    for i in range(1, s.api_workers + 1):
        if s.api_workers == 1:
            rows.append(API)
        else:
            rows.append(replace(API, name=f"api-{i}").with_env(CHATQ_REUSE_PORT="1"))
    return (*rows, PERSISTENCE, TELEMETRY)
