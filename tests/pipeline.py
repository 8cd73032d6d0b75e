"""Helpers for tests of the whole pipeline with the synthetic engine: the stack's settings,
request bodies, the text the engine answers, and the worker's metrics.

The synthetic engine is deterministic, so a test knows exactly what text the engine produced.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.helpers import Stack, synthetic_stack
from tests.metrics import metric_value
from workers.inference.synthetic import prompt_seed, synthetic_token

MODEL = "synthetic-model"
WATCHDOG_S = 2.0


@contextmanager
def pipeline_stack(root: Path) -> Iterator[Stack]:
    """nats-server, an API and a synthetic worker serving MODEL; the API also knows the models
    the tests start workers for (and `unserved`, which no worker serves)."""
    with synthetic_stack(
        root,
        MODEL,
        CHATQ_MODELS=f"{MODEL},killed-before,stopped-before,killed-after,unserved",
        SYNTH_TOKENS_PER_S="50",
        SYNTH_TTFT_MS="20",
        STREAM_WATCHDOG_S=str(WATCHDOG_S),
        STREAM_HEARTBEAT_S="0.3",
        JOBS_ACK_WAIT_S="2",
        CHATQ_QUEUE_MAX="3",
        CHATQ_QUEUE_DEPTH_CACHE_S="0",
        CHATQ_MAX_REQUEST_BYTES="4096",
    ) as stack:
        yield stack


def chat_body(
    content: str, *, model: str = MODEL, max_tokens: int = 20, stream: bool = True
) -> dict[str, object]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "stream_options": {"include_usage": True},
    }


def disconnect_aborts(stack: Stack) -> float:
    """Engine requests the stack's worker aborted because the client left."""
    return worker_disconnect_aborts(stack.worker_metrics)


def worker_disconnect_aborts(metrics_port: int) -> float:
    """Engine requests the worker with this metrics port aborted because the client left."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    try:
        return metric_value(text, "chatq_engine_aborts_total", reason="client_disconnected")
    except KeyError:  # the counter appears with the first abort
        return 0.0


def expected_text(content: str, tokens: int) -> str:
    seed = prompt_seed(content)
    return "".join(synthetic_token(seed, i) for i in range(tokens))
