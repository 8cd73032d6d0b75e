"""A live model switch with the real vLLM CPU engine, while requests stream.

Two model directories are made from the bundled SmolLM2 (the second without its chat
template, so it runs on chatq's ChatML fallback) under two profiles. One vLLM worker
starts on the first; streams to it are running when an admin switches the worker to the
second, and requests for the second, sent meanwhile, wait in its queue. None may fail.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from catalog.model_prep import prepare_default_model
from stack.servers import NatsServer
from tests.helpers import Proc, auth, base_env, start_api, start_worker, wait_for_model

pytestmark = pytest.mark.vllm

WORKER = "vllm-switcher"
PROFILE = """
[[profile]]
id = "{id}"
name = "{id}"
aliases = ["{id}-alias"]
model = "{model}"
cpu = true
engine = {{ dtype = "auto", max_model_len = 2048, gpu_memory_utilization = 0.1 }}
memory = {{ params_b = 0.135, layers = 30, kv_heads = 3, head_dim = 64 }}
"""


@dataclass
class Stack:
    url: str
    worker: Proc


def make_model_dirs(root: Path) -> tuple[Path, Path]:
    """Two model directories from the bundled model: one as it is, one without a chat template."""
    from chatq.settings import load

    bundled = prepare_default_model(load({}).models_dir, progress=False)
    first, second = root / "smol-a", root / "smol-b"
    first.symlink_to(bundled, target_is_directory=True)
    second.mkdir()
    for item in bundled.iterdir():
        if item.name != "chat_template.jinja":
            (second / item.name).symlink_to(item)
    assert "chat_template" not in json.loads((second / "tokenizer_config.json").read_text())
    return first, second


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("switch-vllm")
    first, second = make_model_dirs(root)
    profiles = root / "profiles.toml"
    profiles.write_text(PROFILE.format(id="smol-a", model=first) + PROFILE.format(id="smol-b", model=second))
    nats = NatsServer(root / "nats").start(root / "nats.log")
    env = base_env(
        nats.url,
        root / "home",
        PROFILES_FILE=str(profiles),
        MODEL_PROFILE="smol-a",
        SWITCH_GRACE_S="120",
        STREAM_WATCHDOG_S="30",
        CHATQ_REQUEST_TIMEOUT_S="500",
    )
    procs: list[Proc] = []
    try:
        api, url = start_api(env, root / "logs")
        procs.append(api)
        worker, _ = start_worker(env, root / "logs", name=WORKER)
        procs.append(worker)
        wait_for_model(url, "smol-a", 600, procs)
        yield Stack(url, worker)
    finally:
        for proc in reversed(procs):
            proc.stop(60)
        nats.stop()


@dataclass
class Answer:
    model: str | None = None
    text: str = ""
    finish: str | None = None
    error: Any = None
    status: int = 0


async def chat(client: httpx.AsyncClient, url: str, model: str, question: str, max_tokens: int) -> Answer:
    body = {
        "model": model,
        "stream": True,
        "temperature": 0,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": question}],
    }
    answer = Answer()
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=auth()) as resp:
        answer.status = resp.status_code
        if resp.status_code != 200:
            answer.error = (await resp.aread()).decode()
            return answer
        event = "message"
        async for line in resp.aiter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and line[5:].strip() != "[DONE]":
                payload = json.loads(line[5:])
                if event == "error":
                    answer.error = payload
                    continue
                answer.model = payload.get("model", answer.model)
                for choice in payload.get("choices", []):
                    answer.text += choice.get("delta", {}).get("content") or ""
                    answer.finish = choice.get("finish_reason") or answer.finish
            elif not line:
                event = "message"
    return answer


def entry_of(url: str) -> dict[str, Any]:
    models = httpx.get(url + "/api/models", headers=auth(), timeout=5).json()["models"]
    return {m["id"]: m for m in models}


async def test_switching_models_while_requests_stream_fails_none(stack: Stack) -> None:
    questions = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?", "Say hello."]
    progress: list[str] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10)) as client:
        before = [asyncio.create_task(chat(client, stack.url, "smol-a", q, 48)) for q in questions]
        await asyncio.sleep(1.5)  # the streams are running
        switch = await client.post(
            f"{stack.url}/api/admin/workers/{WORKER}/model", json={"profile": "smol-b-alias"}, headers=auth()
        )
        assert switch.status_code == 202, switch.text
        assert switch.json()["previous"] == "smol-a" and switch.json()["profile"] == "smol-b"
        # Sent while the worker drains and loads: they wait in smol-b's queue.
        during = [asyncio.create_task(chat(client, stack.url, "smol-b-alias", q, 32)) for q in questions]
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            entry = (await asyncio.to_thread(entry_of, stack.url))["smol-b"]
            workers = [w for w in entry["workers"] if w["id"] == WORKER]
            if workers and (not progress or progress[-1] != workers[0]["progress"]):
                progress.append(workers[0]["progress"])
            if entry["state"] == "ready":
                break
            await asyncio.sleep(0.5)
        old = await asyncio.gather(*before)
        new = await asyncio.gather(*during)
        paris = await chat(client, stack.url, "smol-b", "What is the capital of France?", 24)
    failed = [a for a in old + new if a.status != 200 or a.error is not None or not a.text]
    assert failed == [], failed
    assert all(a.model == "smol-a" and a.finish in ("stop", "length") for a in old)
    assert all(a.model == "smol-b" and a.finish in ("stop", "length") for a in new)
    assert any(p.startswith("loading") for p in progress), progress
    assert progress[-1] == "ready"
    # smol-b has no chat template of its own: the ChatML fallback makes it answer as before.
    assert "Paris" in paris.text, paris
    listed = await asyncio.to_thread(entry_of, stack.url)
    assert listed["smol-a"]["state"] == "unavailable"
    assert [w["id"] for w in listed["smol-b"]["workers"]] == [WORKER]
