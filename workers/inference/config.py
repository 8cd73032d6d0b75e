"""The inference worker's settings, as the worker's wiring passes them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str
    ack_wait_s: float
    heartbeat_s: float
    chunk_max_tokens: int
    chunk_max_delay_s: float
    status_interval_s: float = 2.0
    # A live switch: how long in-flight streams may run on before they are ended.
    switch_grace_s: float = 30.0
    # After a switch or shutdown cancels a request, how long it may take to end.
    cancel_wait_s: float = 5.0
    gpus: int = 0
    # Take no job while one has waited for its first token longer than this many times
    # the quickest of the engine's recent ones (WORKER_TTFT_HOLD; 0: off).
    ttft_hold: float = 0.0
