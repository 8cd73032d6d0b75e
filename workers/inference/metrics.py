"""Prometheus metrics of an inference worker (vLLM adds its own vllm:* series)."""

import weakref
from collections.abc import Iterator, Mapping
from typing import Protocol

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

JOBS = Counter("chatq_worker_jobs_total", "Jobs finished by outcome", ["model", "outcome"])
ACTIVE = Gauge("chatq_worker_active_requests", "Requests running in the engine", ["model"])
SLOTS = Gauge("chatq_worker_slots", "Engine slots", ["model"])
TTFT = Histogram(
    "chatq_worker_ttft_seconds",
    "Job fetch to first token, in the worker",
    ["model"],
    buckets=_LATENCY,
)
QUEUE_WAIT = Histogram(
    "chatq_worker_queue_wait_seconds", "API accept to worker fetch", ["model"], buckets=_LATENCY
)
TOKENS = Counter("chatq_worker_output_tokens_total", "Output tokens generated", ["model"])
CHUNKS = Counter("chatq_worker_chunks_total", "Chunk messages published", ["model"])
ABORTS = Counter("chatq_engine_aborts_total", "Engine requests aborted, by reason", ["model", "reason"])
ENGINE_START = Gauge("chatq_engine_start_seconds", "How long the engine took to start", ["model"])
PROMPT_TOKENS = Counter("chatq_worker_prompt_tokens_total", "Prompt tokens read", ["model"])


class _Request(Protocol):
    @property
    def first_token_at(self) -> float | None: ...


class _Worker(Protocol):
    @property
    def model(self) -> str: ...

    @property
    def active(self) -> Mapping[str, _Request]: ...


class _EngineLoad(Collector):
    """chatq_engine_running_requests / _waiting_requests, read from the worker at scrape time.

    Running: the engine has produced its first token; waiting: taken from the queue, not
    yet at its first token (queued in the engine or in prefill). vLLM's own
    vllm:num_requests_running/waiting say the same from inside vLLM, with the vLLM engine.
    """

    def __init__(self) -> None:
        # Weak: a worker that is gone (tests make many) is no longer reported.
        self._workers: weakref.WeakSet[_Worker] = weakref.WeakSet()

    def watch(self, worker: _Worker) -> None:
        self._workers.add(worker)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        running = GaugeMetricFamily(
            "chatq_engine_running_requests", "Requests generating in the engine", labels=["model"]
        )
        waiting = GaugeMetricFamily(
            "chatq_engine_waiting_requests",
            "Requests taken by the worker, not yet at their first token",
            labels=["model"],
        )
        for worker in list(self._workers):
            started = sum(1 for r in list(worker.active.values()) if r.first_token_at is not None)
            running.add_metric([worker.model], started)
            waiting.add_metric([worker.model], len(worker.active) - started)
        yield running
        yield waiting


ENGINE_LOAD = _EngineLoad()
REGISTRY.register(ENGINE_LOAD)
