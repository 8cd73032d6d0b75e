"""Latency-aware admission (ADMISSION_POLICY=latency) through the real pipeline: NATS, the
API and a synthetic worker with 2 slots. A single client is never refused; at about 3x
what the worker serves, the excess gets 429 with Retry-After in the standard error body,
by the wait target."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers import Stack, auth, synthetic_stack
from tests.metrics import metric_value

MODEL = "admission-latency"
SLOTS = 2
MAX_TOKENS = 10
TOKENS_PER_S = 20
TTFT_MS = 200
# One job takes 0.2 + 10/20 = 0.7 s on a slot: the worker serves about 2.9 requests/s.
SERVICE_S = TTFT_MS / 1000 + MAX_TOKENS / TOKENS_PER_S
CAPACITY = SLOTS / SERVICE_S
WAIT_TARGET_S = 0.5


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with synthetic_stack(
        tmp_path_factory.mktemp("admission-latency"),
        MODEL,
        WORKER_SLOTS=str(SLOTS),
        SYNTH_TOKENS_PER_S=str(TOKENS_PER_S),
        SYNTH_TTFT_MS=str(TTFT_MS),
        ADMISSION_POLICY="latency",
        ADMISSION_WAIT_TARGET_S=str(WAIT_TARGET_S),
        CHATQ_QUEUE_MAX="8",
    ) as stack:
        yield stack


async def ask(http: httpx.AsyncClient, url: str) -> httpx.Response:
    return await http.post(
        url + "/v1/chat/completions",
        headers=auth(),
        json={"model": MODEL, "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": "hi"}]},
        timeout=60,
    )


async def one_client(url: str, requests: int) -> list[int]:
    async with httpx.AsyncClient() as http:
        return [(await ask(http, url)).status_code for _ in range(requests)]


def rejected(url: str, reason: str) -> float:
    try:
        return metric_value(httpx.get(url + "/metrics").text, "chatq_rejected_total", reason=reason)
    except KeyError:
        return 0.0


async def overload(url: str, rate: float, seconds: float) -> list[httpx.Response]:
    """Requests at `rate` per second for `seconds`, whatever the answers (open loop)."""
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=None)) as http:
        tasks = []
        start = time.monotonic()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(ask(http, url)))
        return list(await asyncio.gather(*tasks))


def test_admission_refuses_the_excess_and_never_a_single_client(stack: Stack) -> None:
    # Low load: one client, one request after another, and a burst no larger than the slots.
    assert asyncio.run(one_client(stack.url, 8)) == [200] * 8

    async def burst() -> list[int]:
        async with httpx.AsyncClient() as http:
            return [
                r.status_code for r in await asyncio.gather(*(ask(http, stack.url) for _ in range(SLOTS)))
            ]

    assert asyncio.run(burst()) == [200] * SLOTS

    # Three times the capacity for 8 s.
    answers = asyncio.run(overload(stack.url, 3 * CAPACITY, 8.0))
    ok = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code == 429]
    assert len(ok) + len(refused) == len(answers), {r.status_code for r in answers}
    assert ok and refused
    for r in refused:
        assert r.json()["error"].keys() >= {"type", "code", "message", "request_id"}
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert r.json()["error"]["code"] == "queue_full"
        assert 1 <= int(r.headers["Retry-After"]) <= 60
    # The wait target refuses from the first backlog on: before one is measured, with the
    # capacity the worker announces (its slots over the time a job held one).
    assert rejected(stack.url, "queue_wait") > 0
    # Admitted at most what the worker serves over the run plus what may wait at once.
    assert len(ok) <= CAPACITY * 8.0 + 8 + SLOTS + 2

    # The overload is over: a capacity is measured now, but one client is never refused.
    assert asyncio.run(one_client(stack.url, 8)) == [200] * 8
