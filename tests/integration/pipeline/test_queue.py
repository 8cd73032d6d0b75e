"""The job queue: its bound answers 429 and queues nothing, even in a burst or when JetStream
refuses; clients that leave withdraw their jobs; interactive jobs go before background ones."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from stack.servers import NatsServer
from tests.helpers import (
    Stack,
    auth,
    base_env,
    eventually,
    jobs_in_queue,
    start_api,
    start_worker,
    wait_for_model,
)
from tests.pipeline import chat_body


async def test_full_queue_answers_429_and_queues_nothing(stack: Stack) -> None:
    """No worker serves 'unserved': jobs wait; past CHATQ_QUEUE_MAX=3 the API refuses."""
    async with httpx.AsyncClient(base_url=stack.url, headers=auth(), timeout=30) as client:
        # Queued requests get no answer yet (nothing is sent before an engine accepts).
        waiting = [
            asyncio.create_task(client.post("/v1/chat/completions", json=chat_body("wait", model="unserved")))
            for _ in range(3)
        ]
        deadline = time.monotonic() + 5
        while await jobs_in_queue(stack.nats.url, "unserved") < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await jobs_in_queue(stack.nats.url, "unserved") == 3
        refused = await client.post("/v1/chat/completions", json=chat_body("one more", model="unserved"))
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
        assert await jobs_in_queue(stack.nats.url, "unserved") == 3
        assert not any(task.done() for task in waiting)
        for task in waiting:  # the clients leave
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
    # Their queued jobs are withdrawn, nothing is left behind.
    deadline = time.monotonic() + 5
    while await jobs_in_queue(stack.nats.url, "unserved") and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert await jobs_in_queue(stack.nats.url, "unserved") == 0


async def test_a_burst_cannot_overshoot_the_queue_bound(stack: Stack, tmp_path: Path) -> None:
    """Even with the depth reading cached, admissions since the reading count against the bound."""
    env = {**stack.env, "CHATQ_QUEUE_DEPTH_CACHE_S": "30", "CHATQ_MODELS": "burst-model"}
    api, url = start_api(env, tmp_path, name="burst-api")
    try:
        async with httpx.AsyncClient(base_url=url, headers=auth(), timeout=30) as client:
            body = chat_body("burst", model="burst-model")
            burst = [asyncio.create_task(client.post("/v1/chat/completions", json=body)) for _ in range(6)]
            done, waiting = await asyncio.wait(burst, timeout=5)
            # Three are queued (no answer yet: no worker serves the model), three refused.
            assert [task.result().status_code for task in done] == [429, 429, 429]
            assert len(waiting) == 3
            assert await jobs_in_queue(stack.nats.url, "burst-model") == 3
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
    finally:
        api.stop()


async def test_a_publish_the_full_stream_refuses_is_a_429(fresh_nats: NatsServer, tmp_path: Path) -> None:
    """JOBS_MAX_MSGS is the hard bound: JetStream refuses the publish, the client gets 429, not 500."""
    env = base_env(
        fresh_nats.url, tmp_path / "home", CHATQ_MODELS="capped", JOBS_MAX_MSGS="2", CHATQ_QUEUE_MAX="100"
    )
    api, url = start_api(env, tmp_path)
    try:
        async with httpx.AsyncClient(base_url=url, headers=auth(), timeout=30) as client:
            body = chat_body("x", model="capped")
            held = [asyncio.create_task(client.post("/v1/chat/completions", json=body)) for _ in range(2)]
            deadline = time.monotonic() + 5
            while await jobs_in_queue(fresh_nats.url, "capped") < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            refused = await client.post("/v1/chat/completions", json=chat_body("x", model="capped"))
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == "queue_full"
            assert int(refused.headers["Retry-After"]) >= 1
            assert await jobs_in_queue(fresh_nats.url, "capped") == 2
            for task in held:
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)
    finally:
        api.stop()


async def test_interactive_jobs_go_before_background_jobs(stack: Stack) -> None:
    """One busy slot: of a waiting background and a waiting interactive job, the interactive runs first."""
    env = {**stack.env, "MODEL_NAME": "prio", "WORKER_SLOTS": "1", "SYNTH_TOKENS_PER_S": "50"}
    worker, _ = start_worker(env, stack.logdir, name="one-slot")
    try:
        await asyncio.to_thread(wait_for_model, stack.url, "prio", 60, [worker])
        first_chunk: dict[str, float] = {}

        async def ask(client: httpx.AsyncClient, name: str, priority: str, tokens: int) -> None:
            body = {**chat_body(name, model="prio", max_tokens=tokens), "priority": priority}
            async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    if line.startswith("data:") and name not in first_chunk:
                        first_chunk[name] = time.monotonic()

        async with httpx.AsyncClient(base_url=stack.url, headers=auth(), timeout=60) as client:
            busy = asyncio.create_task(ask(client, "busy", "interactive", 50))
            await eventually("the busy request's first chunk", lambda: "busy" in first_chunk, 30, 0.01)
            later = asyncio.create_task(ask(client, "later", "background", 3))
            # The background job is in the queue before the interactive one is asked for.
            await eventually(
                "the background job queued", lambda: jobs_in_queue(stack.nats.url, "prio", "background"), 10
            )
            sooner = asyncio.create_task(ask(client, "sooner", "interactive", 3))
            await asyncio.gather(busy, later, sooner)
        assert first_chunk["sooner"] < first_chunk["later"]
    finally:
        worker.stop()
