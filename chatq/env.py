"""Typed reads of environment variables, and the one table of numeric settings' ranges.

Every error is a ConfigError that names the variable and, for a number, what it may be
(`VLLM_GPU_MEMORY_UTILIZATION must be a number from 0.01 to 1, got '7'`): the process
prints that one line and exits, no traceback.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

from chatq.errors import ConfigError


class Range(NamedTuple):
    """What a numeric setting may be: `low` to `high` (None: no upper bound), inclusive."""

    low: float
    high: float | None = None
    whole: bool = False  # a whole number

    def describe(self) -> str:
        kind = "a whole number" if self.whole else "a number"
        if self.high is None:
            return f"{kind} of at least {_number(self.low)}"
        return f"{kind} from {_number(self.low)} to {_number(self.high)}"


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


def _whole(low: float, high: float | None = None) -> Range:
    return Range(low, high, whole=True)


_PORT = _whole(1, 65535)
_PORT_OR_OFF = _whole(0, 65535)  # 0: not served
_DAY_S = 86_400.0
_RATE_LIMITS = {
    f"RATE_LIMIT_{role}_{kind}": _whole(0)  # 0: no limit
    for role in ("USER", "ADMIN")
    for kind in ("RPM", "TPM", "CONCURRENCY")
}

# Every numeric setting and what it may be; docs/configuration.md names each.
RANGES: dict[str, Range] = {
    "DATABASE_CONNECT_TIMEOUT_S": _whole(2, 3600),  # libpq treats anything under 2 as 2
    "DATABASE_STATEMENT_TIMEOUT_MS": _whole(0, 3_600_000),  # 0: no timeout
    "PERSISTENCE_MAX_DELIVER": _whole(1, 1000),
    "JWT_EXPIRE_MINUTES": _whole(1, 525_600),
    "API_KEY_CACHE_S": Range(0, 3600),
    "CONVERSATION_WAIT_S": Range(0, 3600),
    "API_DB_POOL_MAX": _whole(1, 1000),
    **_RATE_LIMITS,
    "LOGIN_MAX_FAILURES": _whole(0),
    "LOGIN_MAX_FAILURES_PER_CLIENT": _whole(0),
    "LOGIN_WINDOW_S": _whole(1, 7 * _DAY_S),
    "CHATQ_PORT": _PORT,
    "HTTP_HEADER_TIMEOUT_S": Range(0.1, 3600),
    "HTTP_BODY_TIMEOUT_S": Range(0.1, 3600),
    "CHATQ_QUEUE_MAX": _whole(1),
    "CHATQ_REQUEST_TIMEOUT_S": Range(1, _DAY_S),
    "STREAM_WATCHDOG_S": Range(0.1, 3600),
    "STREAM_HEARTBEAT_S": Range(0.01, 600),
    "STREAM_BUFFER_BYTES": _whole(4096, 1 << 30),
    "API_MAX_STREAMS": _whole(0),
    "CHATQ_MAX_REQUEST_BYTES": _whole(1024, 1 << 30),
    "CHATQ_MAX_TOKENS": _whole(1),
    "CHATQ_DEFAULT_MAX_TOKENS": _whole(1),
    "CHATQ_QUEUE_DEPTH_CACHE_S": Range(0, 60),
    "ADMISSION_WAIT_TARGET_S": Range(0.01, 3600),
    "JOBS_MAX_MSGS": _whole(1),
    # JetStream keeps a stream on at most 5 servers.
    "NATS_STREAM_REPLICAS": _whole(1, 5),
    "JOBS_ACK_WAIT_S": Range(0.5, 3600),
    "SWITCH_GRACE_S": Range(0, _DAY_S),
    "DRAIN_GRACE_S": Range(0, _DAY_S),
    "WORKER_SLOTS": _whole(0, 4096),  # 0: the engine's own count
    "WORKER_METRICS_PORT": _PORT_OR_OFF,
    "INFERENCE_WORKERS": _whole(1, 64),
    "API_WORKERS": _whole(1, 64),
    "CHUNK_MAX_TOKENS": _whole(1, 4096),
    "CHUNK_MAX_DELAY_MS": Range(0, 10_000),
    "WORKER_TTFT_HOLD": Range(0, 1000),  # 0: off
    "VLLM_GPU_MEMORY_UTILIZATION": Range(0.01, 1),  # a fraction of the GPU's memory
    "VLLM_MAX_MODEL_LEN": _whole(64),
    "SYNTH_TOKENS_PER_S": Range(0.001, 1_000_000),
    "SYNTH_TTFT_MS": Range(0, 3_600_000),
    "SYNTH_START_S": Range(0, 3600),
    "TELEMETRY_PORT": _PORT_OR_OFF,
    "TELEMETRY_INTERVAL_S": Range(0.1, 3600),
}


class Env:
    """Typed reads of environment variables; every error names the variable."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._env = environ

    def text(self, name: str, default: str) -> str:
        return self._env.get(name, "").strip() or default

    def given(self, name: str) -> bool:
        """Whether the variable is set at all (set empty counts: it turns a default off)."""
        return name in self._env

    def optional(self, name: str) -> str | None:
        return self._env.get(name, "").strip() or None

    def integer(self, name: str, default: int) -> int:
        """A whole-number setting of RANGES, or its default when unset."""
        value = self.optional_number(name)
        return default if value is None else int(value)

    def number(self, name: str, default: float) -> float:
        """A numeric setting of RANGES, or its default when unset."""
        value = self.optional_number(name)
        return default if value is None else value

    def optional_number(self, name: str) -> float | None:
        """A numeric setting of RANGES, checked against its range; None when unset."""
        allowed = RANGES[name]
        raw = self.optional(name)
        if raw is None:
            return None
        try:
            value = float(int(raw)) if allowed.whole else float(raw)
        except ValueError:
            value = math.nan
        if (
            not math.isfinite(value)
            or value < allowed.low
            or (allowed.high is not None and value > allowed.high)
        ):
            raise ConfigError(f"{name} must be {allowed.describe()}, got {raw!r}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        raw = self.optional(name)
        if raw is None:
            return default
        if raw.lower() in {"1", "true", "yes", "on"}:
            return True
        if raw.lower() in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{name} must be true or false, got {raw!r}")

    def items(self, name: str) -> list[str]:
        return [part.strip() for part in self._env.get(name, "").split(",") if part.strip()]
