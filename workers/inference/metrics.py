"""Prometheus metrics of an inference worker (vLLM adds its own vllm:* series)."""

from prometheus_client import Counter, Gauge, Histogram

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
