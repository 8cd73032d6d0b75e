"""Clients that leave and workers that die: the engine stops for a client gone, a job a worker
loses before its first token is handed on, one lost later ends in an error event, and garbage
on the queue or an engine that cannot start never passes silently."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.helpers import (
    Proc,
    Stack,
    auth,
    base_env,
    find_event,
    jobs_in_queue,
    sse_events,
    start_worker,
    wait_for_model,
)
from tests.metrics import metric_value
from tests.pipeline import MODEL, WATCHDOG_S, chat_body, disconnect_aborts, expected_text


def test_client_disconnect_aborts_the_engine_request(stack: Stack) -> None:
    metrics_url = f"http://127.0.0.1:{stack.worker_metrics}/metrics"
    before = disconnect_aborts(stack)
    with httpx.stream(
        "POST",
        stack.url + "/v1/chat/completions",
        json=chat_body("a very long answer", max_tokens=2000),
        headers=auth(),
        timeout=30,
    ) as resp:
        lines = resp.iter_lines()
        first = next(e for e in sse_events(lines))
        request_id = first.json()["id"]
        # Leave mid-stream: closing the response drops the connection.
    deadline = time.monotonic() + 10
    while disconnect_aborts(stack) <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert disconnect_aborts(stack) == before + 1
    text = httpx.get(metrics_url).text
    assert metric_value(text, "chatq_worker_active_requests", model=MODEL) == 0
    cancelled = asyncio.run(find_event(stack.nats.url, request_id, "cancelled"))
    assert cancelled.reason == "client_disconnected"
    # The engine stopped: far fewer than the 2000 tokens asked for (50 tokens/s).
    assert 0 < cancelled.usage.completion_tokens < 200


def test_a_non_streaming_client_that_gives_up_stops_the_engine(stack: Stack) -> None:
    metrics_url = f"http://127.0.0.1:{stack.worker_metrics}/metrics"
    before = disconnect_aborts(stack)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            stack.url + "/v1/chat/completions",
            json=chat_body("patience", max_tokens=2000, stream=False),
            headers=auth(),
            timeout=httpx.Timeout(10, read=1.0),
        )
    deadline = time.monotonic() + 10
    while disconnect_aborts(stack) <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert disconnect_aborts(stack) == before + 1
    assert metric_value(httpx.get(metrics_url).text, "chatq_worker_active_requests", model=MODEL) == 0


def test_worker_killed_before_first_token_is_replaced(stack: Stack) -> None:
    """The job is acked only at the first token: a second worker finishes it."""
    hand_over(stack, "killed-before", "survive a crash", lambda first: first.kill())


def test_worker_stopped_before_first_token_hands_the_job_on(stack: Stack) -> None:
    """A graceful stop gives back a job with no token yet, as a model switch does."""

    def stop(first: Proc) -> None:
        first.stop()  # SIGTERM: the worker drains, then exits
        assert first.proc.returncode == 0, first.tail()

    hand_over(stack, "stopped-before", "survive a restart", stop, DRAIN_GRACE_S="0.5")


def hand_over(stack: Stack, model: str, content: str, end_first: Callable[[Proc], None], **env: str) -> None:
    """A worker slow to its first token takes a job and is ended; a second one answers it in full."""
    slow_env = {**stack.env, "MODEL_NAME": model, "SYNTH_TTFT_MS": "60000", **env}
    first, first_metrics = start_worker(slow_env, stack.logdir, name=f"first-{model}")
    try:
        wait_for_model(stack.url, model, 60, [first])
        with httpx.stream(
            "POST",
            stack.url + "/v1/chat/completions",
            json=chat_body(content, model=model, max_tokens=10),
            headers=auth(),
            timeout=60,
        ) as resp:
            assert resp.status_code == 200
            wait_until_running(first_metrics, model)
            end_first(first)
            fast_env = {**slow_env, "SYNTH_TTFT_MS": "20"}
            second, _ = start_worker(fast_env, stack.logdir, name=f"second-{model}")
            try:
                events = list(sse_events(resp.iter_lines()))
            finally:
                second.stop()
    finally:
        first.kill()
    assert events[-1].data == "[DONE]", events[-3:]
    chunks = [e.json() for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == expected_text(content, 10)
    completed = asyncio.run(find_event(stack.nats.url, chunks[0]["id"], "completed"))
    assert completed.worker_id == f"second-{model}"


def wait_until_running(metrics_port: int, model: str, timeout: float = 10) -> None:
    """Wait until the worker behind metrics_port runs a job of `model`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        try:
            if metric_value(text, "chatq_worker_active_requests", model=model) == 1:
                return
        except KeyError:  # the gauge appears with the worker's first job
            pass
        time.sleep(0.05)
    pytest.fail(f"the worker never took the {model} job")


def test_worker_killed_after_first_token_gives_an_error_event(stack: Stack) -> None:
    slow_env = {**stack.env, "MODEL_NAME": "killed-after", "SYNTH_TOKENS_PER_S": "5"}
    doomed, _ = start_worker(slow_env, stack.logdir, name="doomed-after")
    try:
        wait_for_model(stack.url, "killed-after", 60, [doomed])
        with httpx.stream(
            "POST",
            stack.url + "/v1/chat/completions",
            json=chat_body("crash mid-way", model="killed-after", max_tokens=200),
            headers=auth(),
            timeout=60,
        ) as resp:
            events = sse_events(resp.iter_lines())
            first = next(events)
            assert first.json()["choices"][0]["delta"]["content"]
            doomed.kill()
            killed_at = time.monotonic()
            rest = list(events)
            waited = time.monotonic() - killed_at
    finally:
        doomed.kill()
    errors = [e for e in rest if e.event == "error"]
    assert len(errors) == 1, rest
    error = errors[0].json()["error"]
    assert error["code"] == "worker_lost"
    assert error["request_id"] == first.json()["id"]
    # Detected by the watchdog (2 s), not by the request deadline (600 s).
    assert waited < WATCHDOG_S + 3


async def test_garbage_on_the_queue_cannot_crash_the_worker(stack: Stack) -> None:
    """A malformed job or cancel is dropped; the worker keeps serving."""
    import nats

    from broker import names

    nc = await nats.connect(stack.nats.url)
    try:
        js = nc.jetstream()
        await js.publish(names.job_subject(MODEL), b"\xc1 not msgpack", stream=names.JOBS_STREAM)
        await nc.publish(names.cancel_subject("whatever"), b"\x00\x01")
        await nc.flush()
    finally:
        await nc.close()
    deadline = time.monotonic() + 5
    while await jobs_in_queue(stack.nats.url, MODEL) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert await jobs_in_queue(stack.nats.url, MODEL) == 0  # terminated, not redelivered
    assert stack.worker.proc.poll() is None
    async with httpx.AsyncClient(base_url=stack.url, headers=auth(), timeout=30) as client:
        resp = await client.post(
            "/v1/chat/completions", json=chat_body("still alive", max_tokens=3, stream=False)
        )
    assert resp.status_code == 200
    assert resp.json()["choices"][0]["message"]["content"] == expected_text("still alive", 3)


def test_a_worker_whose_engine_cannot_start_fails_loudly(tmp_path: Path) -> None:
    """No silent fallback to the synthetic engine: the worker exits and says why."""
    env = base_env("nats://127.0.0.1:1", tmp_path / "home", MODEL_ID=str(tmp_path / "no-such-model"))
    worker, _ = start_worker(env, tmp_path, name="broken")
    try:
        code = worker.proc.wait(timeout=120)
    finally:
        worker.kill()
    assert code != 0
    log = worker.log.read_text()
    assert "no-such-model" in log
    assert "synthetic" not in log.lower()
