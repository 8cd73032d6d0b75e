"""Parity with vLLM's own OpenAI server: the same request to both gives the same answer.

vLLM's server (`python -m vllm.entrypoints.openai.api_server`) and chatq (API, NATS,
one vLLM worker) run on the same bundled model with the same engine arguments, built
by one function (`engine_cli_args`). Each request below is sent to both, greedy or
seeded, one at a time, and the answers are compared after dropping what is unique to
a response (ids, timestamps).
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from stack.processes import spawn as spawn_argv
from stack.processes import wait_http
from stack.servers import NatsServer, free_port
from tests.helpers import (
    API_KEY,
    base_env,
    sse_events,
    start_api,
    start_worker,
    wait_for_workers,
)

pytestmark = pytest.mark.vllm

MODEL = "SmolLM2-135M-Instruct"
PARSER = "hermes"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city", "country"],
}


@dataclass
class Pair:
    chatq: str
    vllm: str


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    from vllm.platforms import current_platform

    from catalog.model_prep import resolve_model
    from chatq.settings import load
    from workers.inference.vllm_engine import engine_cli_args

    root = tmp_path_factory.mktemp("parity")
    models_home = load({}).home
    env = base_env("", models_home, VLLM_TOOL_CALL_PARSER=PARSER)
    settings = load(env)
    model_dir = resolve_model(None, settings.models_dir)
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        *engine_cli_args(settings, model_dir, on_cpu=current_platform.is_cpu()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    vllm_server = spawn_argv("vllm-server", argv, {"HF_HUB_OFFLINE": "1"}, root / "logs")
    nats = NatsServer(root / "nats").start(root / "nats.log")
    env = base_env(nats.url, models_home, VLLM_TOOL_CALL_PARSER=PARSER, STREAM_WATCHDOG_S="30")
    api, url = start_api(env, root / "logs")
    worker, _ = start_worker(env, root / "logs", name="parity-worker")
    try:
        wait_for_workers(url, 1, 600, [worker, api])
        vllm_url = f"http://127.0.0.1:{port}"
        wait_http(vllm_url + "/health", lambda r: r.status_code == 200, 600, [vllm_server], "vLLM's server")
        yield Pair(url, vllm_url)
    finally:
        worker.stop(60)
        api.stop()
        vllm_server.stop(60)
        nats.stop()


_UNIQUE = {"id", "created", "system_fingerprint"}


def normalise(value: Any) -> Any:
    """A response less what is unique to it: ids (also of tool calls) and timestamps."""
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items() if k not in _UNIQUE}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    return value


def ask(base: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    """Status and normalised answer: the JSON body, or the list of SSE data events."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if not body.get("stream"):
        resp = httpx.post(base + path, json=body, headers=headers, timeout=120)
        return resp.status_code, normalise(resp.json())
    with httpx.stream("POST", base + path, json=body, headers=headers, timeout=120) as resp:
        if resp.status_code != 200:
            resp.read()
            return resp.status_code, normalise(resp.json())
        events = [e.data for e in sse_events(resp.iter_lines())]
    return 200, by_choice([normalise(json.loads(d)) if d != "[DONE]" else d for d in events])


def by_choice(events: list[Any]) -> dict[str, list[Any]]:
    """Stream events per choice, in order: with n > 1 the choices' events interleave by timing."""
    grouped: dict[str, list[Any]] = {}
    for event in events:
        choices = event.get("choices") if isinstance(event, dict) else None
        key = str(choices[0].get("index")) if choices else "other"
        grouped.setdefault(key, []).append(event)
    return grouped


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 16, **extra}


# (name, path, body): each is sent streaming and not, unless the name says which.
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("plain", "/v1/chat/completions", chat()),
    ("frequency_presence_penalty", "/v1/chat/completions", chat(frequency_penalty=1.5, presence_penalty=1.0)),
    ("repetition_penalty", "/v1/chat/completions", chat(repetition_penalty=1.5)),
    ("logit_bias", "/v1/chat/completions", chat(logit_bias={"12095": 100})),
    ("top_k_min_p_seed", "/v1/chat/completions", chat(temperature=1.0, top_k=5, min_p=0.1, seed=7)),
    ("top_p_seed", "/v1/chat/completions", chat(temperature=0.9, top_p=0.5, seed=3)),
    ("min_tokens", "/v1/chat/completions", chat(min_tokens=12, max_tokens=14)),
    ("ignore_eos", "/v1/chat/completions", chat(ignore_eos=True, max_tokens=20)),
    ("stop", "/v1/chat/completions", chat(stop=["Paris"])),
    ("stop_token_ids", "/v1/chat/completions", chat(stop_token_ids=[314], max_tokens=20)),
    ("skip_special_tokens", "/v1/chat/completions", chat(skip_special_tokens=False, ignore_eos=True)),
    ("logprobs", "/v1/chat/completions", chat(logprobs=True, top_logprobs=3, max_tokens=6)),
    ("n_2_seed", "/v1/chat/completions", chat(n=2, temperature=1.0, seed=11, max_tokens=8)),
    ("include_usage", "/v1/chat/completions", chat(stream_options={"include_usage": True})),
    ("json_object", "/v1/chat/completions", chat(response_format={"type": "json_object"}, max_tokens=24)),
    (
        "json_schema",
        "/v1/chat/completions",
        chat(
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}},
            max_tokens=40,
        ),
    ),
    (
        "tools_named",
        "/v1/chat/completions",
        chat(
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=30,
        ),
    ),
    (
        "tools_required",
        "/v1/chat/completions",
        chat(tools=[WEATHER_TOOL], tool_choice="required", max_tokens=30),
    ),
    ("tools_auto", "/v1/chat/completions", chat(tools=[WEATHER_TOOL], tool_choice="auto")),
    (
        "completions",
        "/v1/completions",
        {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0},
    ),
    (
        "completions_logprobs_echo",
        "/v1/completions",
        {
            "model": MODEL,
            "prompt": "The capital of France is",
            "max_tokens": 6,
            "temperature": 0,
            "logprobs": 2,
            "echo": True,
        },
    ),
]


# stream_options belongs to streaming requests: these are sent streaming only.
STREAM_ONLY = {"include_usage"}


def answer_params() -> list[Any]:
    """Each case sent as JSON and streaming, less the combinations that make no request."""
    return [
        pytest.param(path, body, stream, id=f"{name}-{'stream' if stream else 'json'}")
        for name, path, body in CASES
        for stream in (False, True)
        if stream or name not in STREAM_ONLY
    ]


@pytest.mark.parametrize(("path", "body", "stream"), answer_params())
def test_same_answer_as_vllm_server(pair: Pair, path: str, body: dict[str, Any], stream: bool) -> None:
    body = {**copy.deepcopy(body), "stream": stream}
    want_status, want = ask(pair.vllm, path, body)
    got_status, got = ask(pair.chatq, path, body)
    assert want_status == 200, want
    assert got_status == want_status
    assert got == want


# Refused by vLLM's validation: chatq refuses them too, with a 400 before any byte.
REFUSALS: list[tuple[str, dict[str, Any]]] = [
    ("prompt_too_long", chat(messages=[{"role": "user", "content": "hello " * 5000}])),
    ("max_tokens_over_context", chat(max_tokens=100_000)),
    ("bad_temperature", chat(temperature="hot")),
    ("negative_n", chat(n=0)),
    ("empty_stop_string", chat(stop=["ok", ""])),
    (
        "tool_choice_unknown_function",
        chat(tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "nope"}}),
    ),
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(("name", "body"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_same_refusals_as_vllm_server(pair: Pair, name: str, body: dict[str, Any], stream: bool) -> None:
    body = {**body, "stream": stream}
    want_status, want = ask(pair.vllm, "/v1/chat/completions", body)
    got_status, got = ask(pair.chatq, "/v1/chat/completions", body)
    assert want_status >= 400, want
    assert got_status == want_status, got
    error = got["error"]
    assert error["request_id"] and error["message"]
    if name == "prompt_too_long":
        assert error["code"] == "context_length_exceeded"
        assert "maximum context length" in error["message"]
