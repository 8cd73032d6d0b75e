"""End to end through the HTTP API with the real vLLM engine and the bundled SmolLM2 model.

One vLLM worker and one API for the module: nats-server, worker and API are real
processes on free loopback ports.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest

from stack.servers import NatsServer
from tests.helpers import (
    API_KEY,
    Proc,
    auth,
    base_env,
    find_event,
    sse_events,
    start_api,
    start_worker,
    wait_for_workers,
)
from tests.metrics import metric_value

pytestmark = pytest.mark.vllm

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass
class VllmStack:
    nats: NatsServer
    url: str
    worker: Proc
    metrics_url: str


@pytest.fixture(scope="module")
def vllm_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmStack]:
    root = tmp_path_factory.mktemp("vllm")
    nats = NatsServer(root / "nats").start(root / "nats.log")
    from chatq.settings import load

    # The prepared model lives in the default CHATQ_HOME (./test prepares it once);
    # this stack's own state lives under the test's folder.
    models_home = load({}).home
    env = base_env(nats.url, models_home, STREAM_WATCHDOG_S="30")
    api, url = start_api(env, root / "logs")
    worker, metrics_port = start_worker(env, root / "logs", name="vllm-worker")
    try:
        wait_for_workers(url, 1, 600, [worker, api])
        yield VllmStack(nats, url, worker, f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        worker.stop(60)
        api.stop()
        nats.stop()


@pytest.fixture
def client(vllm_stack: VllmStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=vllm_stack.url + "/v1", api_key=API_KEY, max_retries=0)


def test_openai_sdk_streams_paris(client: openai.OpenAI, vllm_stack: VllmStack) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts: list[str] = []
    finish = None
    usage = None
    request_id = None
    for chunk in stream:
        request_id = chunk.id
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    text = "".join(parts)
    assert "Paris" in text
    assert finish == "stop"
    assert usage is not None and usage.prompt_tokens > 5 and 0 < usage.completion_tokens < 32
    # What the client got is exactly what the engine produced.
    completed = asyncio.run(find_event(vllm_stack.nats.url, str(request_id), "completed"))
    assert completed.text == text
    assert completed.usage.completion_tokens == usage.completion_tokens


def test_openai_sdk_non_streaming_paris_and_length(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=32)
    assert "Paris" in (answer.choices[0].message.content or "")
    assert answer.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=2)
    assert short.choices[0].finish_reason == "length"
    assert short.usage is not None and short.usage.completion_tokens == 2


def test_api_chat_streams_paris(vllm_stack: VllmStack) -> None:
    with httpx.stream(
        "POST",
        vllm_stack.url + "/api/chat",
        json={"messages": QUESTION, "model": MODEL, "temperature": 0, "max_tokens": 32},
        headers=auth(),
        timeout=60,
    ) as resp:
        assert resp.status_code == 200
        events = list(sse_events(resp.iter_lines()))
    assert events[-1].data == "[DONE]"
    text = "".join(
        e.json()["choices"][0]["delta"].get("content", "")
        for e in events[:-1]
        if e.event is None and e.json()["choices"]  # chatq's named events (queue, ...) aside
    )
    assert "Paris" in text


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert MODEL in [m.id for m in client.models.list()]


def test_unknown_model_is_a_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-nope", messages=QUESTION)
    assert info.value.code == "model_not_found"


def test_client_disconnect_aborts_the_vllm_request(vllm_stack: VllmStack) -> None:
    """Observed on the engine: vLLM's own gauges show the request gone, tokens stop."""

    def engine() -> tuple[float, float]:
        text = httpx.get(vllm_stack.metrics_url, timeout=5).text
        return (
            metric_value(text, "vllm:num_requests_running"),
            metric_value(text, "vllm:generation_tokens_total"),
        )

    with httpx.stream(
        "POST",
        vllm_stack.url + "/v1/chat/completions",
        json={
            "model": MODEL,
            "stream": True,
            "max_tokens": 1500,
            "temperature": 0.8,
            "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
        },
        headers=auth(),
        timeout=60,
    ) as resp:
        events = sse_events(resp.iter_lines())
        first = next(events)
        request_id = first.json()["id"]
        for _ in range(3):
            next(events)
        assert engine()[0] == 1  # running in the engine now
    deadline = time.monotonic() + 10
    while engine()[0] != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    running, tokens = engine()
    assert running == 0
    time.sleep(1.0)
    assert engine()[1] == tokens  # no more tokens generated after the abort
    cancelled = asyncio.run(find_event(vllm_stack.nats.url, request_id, "cancelled"))
    assert cancelled.reason == "client_disconnected"
    assert 3 <= cancelled.usage.completion_tokens < 1500


# --- clients nobody here wrote ----------------------------------------------------------


def test_langchain_chat_openai_invoke_stream_and_structured_output(vllm_stack: VllmStack) -> None:
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    llm = ChatOpenAI(
        model=MODEL,
        base_url=vllm_stack.url + "/v1",
        api_key=API_KEY,
        temperature=0,
        max_tokens=32,
        max_retries=0,
    )
    assert "Paris" in str(llm.invoke("What is the capital of France?").content)
    streamed = "".join(str(chunk.content) for chunk in llm.stream("What is the capital of France?"))
    assert "Paris" in streamed

    class City(BaseModel):
        city: str
        country: str

    # Tool calls go through (tests/e2e/test_parity.py compares them with vLLM's server), but
    # this 135M model writes malformed arguments ("arguments": "Paris") that LangChain's
    # bind_tools rejects; structured output, constrained by vLLM's grammar, is reliable.
    roomy = llm.model_copy(update={"max_tokens": 150})
    structured = roomy.with_structured_output(City, method="json_schema").invoke("Paris is in which country?")
    assert isinstance(structured, City) and structured.city


def test_litellm_completion_text_completion_and_a_context_error_it_does_not_retry(
    vllm_stack: VllmStack,
) -> None:
    import litellm

    common = {"api_base": vllm_stack.url + "/v1", "api_key": API_KEY, "temperature": 0, "max_tokens": 32}
    answer = litellm.completion(model=f"openai/{MODEL}", messages=QUESTION, **common)
    assert "Paris" in answer.choices[0].message.content
    chunks = litellm.completion(model=f"openai/{MODEL}", messages=QUESTION, stream=True, **common)
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks)
    text = litellm.text_completion(
        model=f"text-completion-openai/{MODEL}", prompt="Once upon a time", **common
    )
    assert text.choices[0].text
    # Too long for the context: a 400 before any byte, which litellm classifies as a
    # context-window error (not a retryable connection error), streaming or not.
    long = [{"role": "user", "content": "hello " * 5000}]
    for stream in (False, True):
        with pytest.raises(litellm.ContextWindowExceededError):
            litellm.completion(model=f"openai/{MODEL}", messages=long, stream=stream, num_retries=0, **common)


def test_a_parameter_vllm_would_ignore_is_refused_by_name(client: openai.OpenAI) -> None:
    """vLLM's server logs and drops unknown fields (even its removed guided_json): chatq says 400."""
    for extra in ({"guided_json": {"type": "object"}}, {"no_such_option": 1}):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, extra_body=extra)
        assert info.value.code == "unsupported_parameter"
        assert info.value.body["param"] == next(iter(extra))  # type: ignore[index]
