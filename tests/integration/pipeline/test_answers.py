"""What a client gets back through the whole pipeline (API, NATS, worker): the engine's text,
streamed or whole, on each endpoint; the models, health and metrics it reads; CORS for a page."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from tests.helpers import (
    Stack,
    auth,
    eventually,
    find_event,
    jobs_in_queue,
    sse_events,
    start_api,
)
from tests.metrics import metric_value
from tests.pipeline import MODEL, chat_body, expected_text


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

        async def all_queued() -> bool:
            return await jobs_in_queue(stack.nats.url, "unserved") >= 3

        await eventually("3 jobs queued for unserved", all_queued, 10, interval=0.05)
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
