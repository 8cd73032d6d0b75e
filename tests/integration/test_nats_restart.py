"""Accepted means queued durably: a NATS restart loses no accepted job."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from stack.servers import NatsServer
from tests.helpers import (
    SseEvent,
    auth,
    base_env,
    jobs_in_queue,
    sse_events,
    start_api,
    start_worker,
    wait_for_workers,
)


def test_a_job_queued_before_a_nats_restart_is_answered_after_it(tmp_path: Path) -> None:
    nats = NatsServer(tmp_path / "nats").start(tmp_path / "nats.log")
    env = base_env(
        nats.url,
        tmp_path / "home",
        INFERENCE_ENGINE="synthetic",
        MODEL_NAME="durable",
        CHATQ_MODELS="durable",
        SYNTH_TTFT_MS="10",
        STREAM_WATCHDOG_S="5",
    )
    api, url = start_api(env, tmp_path / "logs")
    worker = None
    body = {
        "model": "durable",
        "messages": [{"role": "user", "content": "hold on"}],
        "stream": True,
        "max_tokens": 5,
        "temperature": 0,
    }

    def ask() -> tuple[int, list[SseEvent]]:
        chat = url + "/v1/chat/completions"
        with httpx.stream("POST", chat, json=body, headers=auth(), timeout=90) as resp:
            return resp.status_code, list(sse_events(resp.iter_lines()))

    try:
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(ask)
            # Accepted: the job is in JetStream, and no worker exists yet.
            deadline = time.monotonic() + 10
            while asyncio.run(jobs_in_queue(nats.url, "durable")) < 1:
                assert time.monotonic() < deadline, "the job was not queued"
                time.sleep(0.05)
            nats.stop()
            time.sleep(1.0)
            nats.start(tmp_path / "nats.log")  # same port, same store
            # Chunks published while the API is still reconnecting would be lost (core
            # NATS); the relay would then end the stream with stream_gap. Here the API is
            # back before any worker exists, as after a real NATS restart.
            deadline = time.monotonic() + 30
            while httpx.get(url + "/health", timeout=5).json()["services"]["nats"] != "ok":
                assert time.monotonic() < deadline, "the API did not reconnect to NATS"
                time.sleep(0.1)
            worker, _ = start_worker(env, tmp_path / "logs", name="after-restart")
            wait_for_workers(url, 1, 60, [worker, api])
            status, events = answer.result(timeout=60)
        assert status == 200
        assert events[-1].data == "[DONE]", [e.data for e in events[-3:]]
        text = "".join(
            e.json()["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e.json()["choices"]
        )
        assert len(text.split()) == 5
    finally:
        if worker is not None:
            worker.stop()
        api.stop()
        nats.stop()
