"""The run's configuration: what the command line asked for, with the defaults filled in."""

from __future__ import annotations

import dataclasses
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Scenario = Literal["steps", "rate", "overload", "admission", "streams", "kpi", "soak"]
Arrival = Literal["poisson", "uniform"]

SCENARIOS: tuple[Scenario, ...] = ("steps", "rate", "overload", "admission", "streams", "kpi", "soak")
# chatq and synthetic-accounts run with accounts on (PostgreSQL, Redis) and are called with a
# user's API key under non-zero rate limits, so auth and the limit checks run on every
# request; synthetic is the pipeline alone (a service key, no limits).
# synthetic-depth and synthetic-latency are the synthetic target with ADMISSION_POLICY
# depth or latency (the admission scenario compares them).
ADMISSION_TARGETS = {"synthetic-depth": "depth", "synthetic-latency": "latency"}
TARGET_KINDS = ("chatq", "vllm-server", "synthetic", "synthetic-accounts", *ADMISSION_TARGETS)
# Scaled synthetic targets (the scaling benchmark): synthetic-<N>w runs N inference workers
# sharing the queue, synthetic-<M>api M API processes on one port, synthetic-<N>w-<M>api both.
SCALED_TARGET = re.compile(r"synthetic(?:-(?P<workers>[1-9][0-9]?)w)?(?:-(?P<apis>[1-9])api)?")


def scaled_shape(kind: str) -> tuple[int, int] | None:
    """(workers, APIs) of a scaled synthetic target's name, or None for another name."""
    match = SCALED_TARGET.fullmatch(kind)
    if match is None or not (match["workers"] or match["apis"]):
        return None
    return int(match["workers"] or 1), int(match["apis"] or 1)


def known_target(kind: str) -> bool:
    return kind in TARGET_KINDS or scaled_shape(kind) is not None


MODEL_NAME = "SmolLM2-135M-Instruct"
API_KEY = "loadtest-key-0123456789abcdef"

# Default targets per scenario when --targets is not given.
DEFAULT_TARGETS: dict[Scenario, tuple[str, ...]] = {
    "steps": ("chatq", "vllm-server", "synthetic"),
    "rate": ("chatq", "vllm-server", "synthetic"),
    "overload": ("chatq",),
    "admission": tuple(ADMISSION_TARGETS),
    "streams": ("synthetic",),
    "kpi": ("chatq", "vllm-server"),
}
# Default arrival rates (requests/s) of the open-loop scenarios.
DEFAULT_RATES: dict[Scenario, tuple[float, ...]] = {
    "rate": (2.0,),
    "overload": (20.0,),
}


@dataclass(frozen=True)
class EngineConfig:
    """vLLM settings shared by the chatq worker and vLLM's own server (kept identical)."""

    dtype: str = "float32"
    gpu_memory_utilization: float = 0.25
    enforce_eager: bool = True
    max_model_len: int = 4096
    max_num_seqs: int = 16  # WORKER_SLOTS for chatq, --max-num-seqs for vLLM's server


@dataclass(frozen=True)
class SynthConfig:
    """The synthetic engine's pace (recorded: the added latencies are measured against it)."""

    tokens_per_s: float = 50.0
    ttft_ms: float = 50.0
    slots: int = 2000


def request_max_tokens(max_tokens: int, range_ratio: float, seed: int, index: int) -> int:
    """The max_tokens of request `index`: max_tokens, or with a range ratio r drawn uniformly
    from max_tokens × [1 − r, 1 + r] (the same for every target: seeded by the index)."""
    if not range_ratio:
        return max_tokens
    low = max(1, math.floor(max_tokens * (1 - range_ratio)))
    high = max(low, math.ceil(max_tokens * (1 + range_ratio)))
    return random.Random(seed * 1_000_003 + index).randint(low, high)


def synthetic_capacity(slots: int, synth: SynthConfig, max_tokens: int) -> float:
    """Requests per second a synthetic worker serves: each holds a slot for TTFT + tokens/pace."""
    return slots / (synth.ttft_ms / 1000 + max_tokens / synth.tokens_per_s)


@dataclass(frozen=True)
class RunConfig:
    scenario: Scenario
    targets: tuple[str, ...]
    concurrency: tuple[int, ...] = (1, 5, 10)
    rates: tuple[float, ...] = ()
    arrival: Arrival = "poisson"
    step_seconds: float = 30.0
    prompt_tokens: int = 256
    max_tokens: int = 32
    output_range_ratio: float = 0.0  # each request's max_tokens spread over max_tokens × [1 − r, 1 + r]
    temperature: float = 0.0
    num_prompts: int = 1000
    seed: int = 1234
    warmup: int = 2
    streams: int = 1000
    ramp_seconds: float = 5.0
    lean_client: bool = True  # streams: the raw asyncio client (loadtest/rawclient.py)
    queue_max: int | None = None  # CHATQ_QUEUE_MAX for chatq targets; None = chatq's default
    overload_queue_max: int = 4
    request_timeout_s: float = 600.0
    start_timeout_s: float = 600.0
    max_inflight: int = 5000
    # admission: the arrival rates as multiples of the synthetic worker's capacity, the
    # ADMISSION_WAIT_TARGET_S of the latency policy (None: chatq's default), and which
    # 429s are retried once after their Retry-After (every n-th)
    loads: tuple[float, ...] = (1.0, 3.0)
    admission_wait_target_s: float | None = None
    # ADMISSION_POLICY of the other chatq targets (None: chatq's default)
    admission_policy: Literal["depth", "latency"] | None = None
    retry_every: int = 4
    kpi_context_tokens: int = 2048  # kpi: the whole model input (template included) of the TTFT step
    progress_s: float = 10.0  # a progress line on stderr this often while a step runs
    model_dir: Path = Path()
    model_name: str = MODEL_NAME
    out_dir: Path = Path()
    url: str | None = None
    api_key: str | None = None
    label: str = "external"
    metrics_url: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)

    def to_json(self) -> dict[str, Any]:
        """The configuration as plain JSON values (the API key is not recorded)."""
        raw = dataclasses.asdict(self)
        raw["api_key"] = "<set>" if self.api_key else None
        raw["model_dir"] = str(self.model_dir)
        raw["out_dir"] = str(self.out_dir)
        raw["targets"] = list(self.targets)
        raw["concurrency"] = list(self.concurrency)
        raw["rates"] = list(self.rates)
        raw["loads"] = list(self.loads)
        return raw


def parse_list(text: str, kind: type[int] | type[float]) -> tuple[Any, ...]:
    """'1,5,10' → (1, 5, 10); empty items are skipped, every value must be positive."""
    values = tuple(kind(part) for part in text.split(",") if part.strip())
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"expected a comma-separated list of positive numbers, got {text!r}")
    return values
