"""The whole pipeline through real processes (nats-server, worker, API) with the synthetic engine.

The synthetic engine is deterministic, so a test knows exactly what text the engine produced.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from stack.servers import NatsServer
from tests.helpers import (
    Proc,
    Stack,
    auth,
    base_env,
    find_event,
    jobs_in_queue,
    sse_events,
    start_api,
    start_worker,
    synthetic_stack,
    wait_for_model,
)
from tests.metrics import metric_value
from workers.inference.synthetic import prompt_seed, synthetic_token

MODEL = "synthetic-model"
WATCHDOG_S = 2.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with synthetic_stack(
        tmp_path_factory.mktemp("stack"),
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
    """Engine requests the module's worker aborted because the client left."""
    text = httpx.get(f"http://127.0.0.1:{stack.worker_metrics}/metrics").text
    try:
        return metric_value(text, "chatq_engine_aborts_total", reason="client_disconnected")
    except KeyError:  # the counter appears with the first abort
        return 0.0


def expected_text(content: str, tokens: int) -> str:
    seed = prompt_seed(content)
    return "".join(synthetic_token(seed, i) for i in range(tokens))


def test_stream_arrives_in_order_and_equals_engine_output(stack: Stack) -> None:
    content = "tell me about queues"
    with httpx.stream(
        "POST",
        stack.url + "/v1/chat/completions",
        json=chat_body(content, max_tokens=30),
        headers=auth(),
        timeout=30,
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(resp.iter_lines()))
    assert events[-1].data == "[DONE]"
    chunks = [e.json() for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert text == expected_text(content, 30)
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [f["choices"][0]["finish_reason"] for f in finals] == ["length"]
    assert chunks[-1]["usage"]["completion_tokens"] == 30
    completed = asyncio.run(find_event(stack.nats.url, chunks[0]["id"], "completed"))
    assert completed.text == text
    assert completed.usage.completion_tokens == 30


def test_non_streaming_answer_is_the_same_text(stack: Stack) -> None:
    content = "the same prompt twice"
    resp = httpx.post(
        stack.url + "/v1/chat/completions",
        json=chat_body(content, max_tokens=12, stream=False),
        headers=auth(),
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == expected_text(content, 12)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 12, "total_tokens": 16}


def test_api_chat_endpoint_streams_the_same_chunks(stack: Stack) -> None:
    content = "original plan endpoint"
    with httpx.stream(
        "POST",
        stack.url + "/api/chat",
        json={
            "messages": [{"role": "user", "content": content}],
            "model": MODEL,
            "temperature": 0,
            "max_tokens": 8,
        },
        headers=auth(),
        timeout=30,
    ) as resp:
        assert resp.status_code == 200
        events = list(sse_events(resp.iter_lines()))
    assert events[-1].data == "[DONE]"
    text = "".join(
        e.json()["choices"][0]["delta"].get("content", "")
        for e in events[:-1]
        if e.event is None and e.json()["choices"]  # chatq's named events (queue, ...) aside
    )
    assert text == expected_text(content, 8)


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


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        # Refused by the engine (here the synthetic one) before any byte: still a 400.
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
            400,
            "invalid_request",
            "temperature",
        ),
        ({"model": MODEL, "messages": []}, 400, "invalid_request", "messages"),
        ({"model": MODEL}, 400, "invalid_request", "messages"),
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request", "model"),
        (
            {"model": MODEL, "messages": [{"role": 7, "content": "x"}]},
            400,
            "invalid_request",
            "messages.0.role",
        ),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6},
            400,
            "invalid_request",
            "max_tokens",
        ),
        (
            {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]},
            404,
            "model_not_found",
            "model",
        ),
    ],
)
def test_bad_input_gets_a_clear_4xx_in_the_standard_body(
    stack: Stack, body: dict[str, object], status: int, code: str, param: str | None
) -> None:
    resp = httpx.post(stack.url + "/v1/chat/completions", json=body, headers=auth(), timeout=10)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) >= {"type", "code", "message", "request_id"}
    assert error["code"] == code
    assert error["request_id"].startswith("chatcmpl-")
    if param:
        assert error["param"].startswith(param)


def test_not_json_and_oversized_bodies(stack: Stack) -> None:
    resp = httpx.post(stack.url + "/v1/chat/completions", content=b"{not json", headers=auth(), timeout=10)
    assert resp.status_code == 400
    assert "not valid JSON" in resp.json()["error"]["message"]
    big = chat_body("x" * 10_000)
    resp = httpx.post(stack.url + "/v1/chat/completions", json=big, headers=auth(), timeout=10)
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "request_too_large"


def test_authentication_is_required(stack: Stack) -> None:
    body = chat_body("hi")
    resp = httpx.post(stack.url + "/v1/chat/completions", json=body, timeout=10)
    assert resp.status_code == 401
    assert resp.json()["error"]["type"] == "authentication_error"
    resp = httpx.post(
        stack.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": "Bearer wrong-key-123456789012"},
        timeout=10,
    )
    assert resp.status_code == 401
    assert resp.json()["error"]["request_id"]
    assert httpx.get(stack.url + "/health", timeout=10).status_code == 200


def test_every_error_has_a_request_id_and_unserved_endpoints_say_so(stack: Stack) -> None:
    resp = httpx.post(stack.url + "/v1/embeddings", json={"model": MODEL, "input": "x"}, headers=auth())
    assert resp.status_code == 404
    error = resp.json()["error"]
    assert error["code"] == "unsupported_endpoint" and "/v1/embeddings" in error["message"]
    assert error["request_id"] and resp.headers["X-Request-Id"] == error["request_id"]
    resp = httpx.post(stack.url + "/v1/audio/transcriptions", headers=auth())
    assert resp.json()["error"]["code"] == "unsupported_endpoint"
    resp = httpx.get(stack.url + "/v1/chat/completions", headers=auth())
    assert resp.status_code == 405 and resp.json()["error"]["request_id"]
    resp = httpx.get(stack.url + "/nowhere")
    assert resp.status_code == 404 and resp.json()["error"]["request_id"]


def test_null_fields_mean_not_given(stack: Stack) -> None:
    body = {
        **chat_body("hi", max_tokens=3),
        "n": None,
        "temperature": None,
        "stream": None,
        "stream_options": None,
        "stop": None,
        "user": None,
        "priority": None,
    }
    resp = httpx.post(stack.url + "/v1/chat/completions", json=body, headers=auth(), timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json()["object"] == "chat.completion"


def test_completions_endpoint_and_model_lookup(stack: Stack) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4}
    resp = httpx.post(stack.url + "/v1/completions", json=body, headers=auth(), timeout=30)
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["object"] == "text_completion" and answer["choices"][0]["text"]
    with httpx.stream(
        "POST", stack.url + "/v1/completions", json={**body, "stream": True}, headers=auth(), timeout=30
    ) as resp:
        events = list(sse_events(resp.iter_lines()))
    assert events[-1].data == "[DONE]"
    assert all(e.json()["object"] == "text_completion" for e in events[:-1])
    assert httpx.get(stack.url + f"/v1/models/{MODEL}", headers=auth()).json()["id"] == MODEL
    resp = httpx.get(stack.url + "/v1/models/nope", headers=auth())
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"


def test_health_and_models(stack: Stack) -> None:
    health = httpx.get(stack.url + "/health", timeout=10).json()
    assert health["status"] == "healthy"
    assert health["service"] == "vLLM Chat Gateway"
    assert health["services"]["nats"] == "ok"
    assert health["services"]["workers"]["ready"] >= 1
    models = httpx.get(stack.url + "/v1/models", headers=auth(), timeout=10).json()
    assert MODEL in [m["id"] for m in models["data"]]


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


async def test_api_metrics_count_what_happened(stack: Stack) -> None:
    """A completed stream, a disconnect and a 429 each show on the API's /metrics."""

    def read() -> str:
        return httpx.get(stack.url + "/metrics", timeout=10).text

    def value(text: str, name: str, **labels: str) -> float:
        try:
            return metric_value(text, name, **labels)
        except KeyError:
            return 0.0

    names = [
        ("chatq_requests_total", {"model": MODEL, "outcome": "completed"}),
        ("chatq_ttft_seconds_count", {"model": MODEL}),
        ("chatq_inter_token_seconds_count", {"model": MODEL}),
        ("chatq_e2e_seconds_count", {"model": MODEL}),
        ("chatq_rejected_total", {"model": "unserved", "reason": "queue_depth"}),
        ("chatq_cancellations_total", {"model": MODEL, "reason": "client_disconnected"}),
    ]
    before = read()
    async with httpx.AsyncClient(base_url=stack.url, headers=auth(), timeout=30) as client:
        done = await client.post("/v1/chat/completions", json=chat_body("count me", max_tokens=5))
        assert done.status_code == 200
        async with client.stream(
            "POST", "/v1/chat/completions", json=chat_body("leave", max_tokens=500)
        ) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    break  # one chunk, then hang up
        body = chat_body("wait", model="unserved")
        held = [asyncio.create_task(client.post("/v1/chat/completions", json=body)) for _ in range(3)]
        while await jobs_in_queue(stack.nats.url, "unserved") < 3:
            await asyncio.sleep(0.05)
        refused = await client.post("/v1/chat/completions", json=body)
        assert refused.status_code == 429
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
    deadline = time.monotonic() + 5
    after = read()
    while value(after, *names[-1][:1], **names[-1][1]) <= value(before, *names[-1][:1], **names[-1][1]):
        assert time.monotonic() < deadline, "the cancellation was not counted"
        await asyncio.sleep(0.1)
        after = read()
    for name, labels in names:
        assert value(after, name, **labels) > value(before, name, **labels), name
    assert metric_value(after, "chatq_queue_depth", model="unserved") == 3


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
            while "busy" not in first_chunk:
                await asyncio.sleep(0.01)
            later = asyncio.create_task(ask(client, "later", "background", 3))
            await asyncio.sleep(0.2)  # queued first
            sooner = asyncio.create_task(ask(client, "sooner", "interactive", 3))
            await asyncio.gather(busy, later, sooner)
        assert first_chunk["sooner"] < first_chunk["later"]
    finally:
        worker.stop()


def test_cors_preflight_from_an_allowed_origin_needs_no_key(stack: Stack, tmp_path: Path) -> None:
    """A browser page on an allowed origin may call the API; other origins get no CORS grant."""
    api, url = start_api({**stack.env, "CORS_ORIGINS": "https://chat.example.com"}, tmp_path, name="cors-api")
    try:
        preflight = {
            "Origin": "https://chat.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        resp = httpx.options(url + "/v1/chat/completions", headers=preflight, timeout=10)
        assert resp.status_code in (200, 204), resp.text
        assert resp.headers["access-control-allow-origin"] == "https://chat.example.com"
        assert "authorization" in resp.headers["access-control-allow-headers"].lower()
        other = httpx.options(
            url + "/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"}, timeout=10
        )
        assert other.headers.get("access-control-allow-origin") != "https://evil.example"
        # The real request from the page still needs its key, and sees the request id header.
        answer = httpx.post(
            url + "/v1/chat/completions",
            json=chat_body("hi", max_tokens=2, stream=False),
            headers={**auth(), "Origin": "https://chat.example.com"},
            timeout=30,
        )
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == "https://chat.example.com"
        assert "x-request-id" in answer.headers["access-control-expose-headers"].lower()
    finally:
        api.stop()
