"""Profiles, aliases and live model switching through the real API, NATS and a synthetic worker.

One worker (synthetic engine, 20 tokens/s, 1 s per model load) starts on profile `alpha`
of a profiles file written here; the tests run in order and move it between profiles.
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

from stack.servers import NatsServer
from tests.helpers import Proc, auth, base_env, start_api, start_worker, wait_for_model

PROFILES = """
[[profile]]
id = "alpha"
name = "Alpha"
aliases = ["a-model", "first"]
cpu = true
memory = { params_b = 0.1, layers = 2, kv_heads = 1, head_dim = 64 }

[[profile]]
id = "beta"
name = "Beta"
aliases = ["b-model"]
cpu = true
memory = { params_b = 0.1, layers = 2, kv_heads = 1, head_dim = 64 }

[[profile]]
id = "broken"
name = "A model whose directory is missing"
model = "/nonexistent/chatq-test-model"
cpu = true
memory = { params_b = 0.1, layers = 2, kv_heads = 1, head_dim = 64 }
"""
WORKER = "switcher"


@dataclass
class SwitchStack:
    url: str
    reject_url: str
    worker: Proc
    worker_port: int  # its metrics port, with /ready


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwitchStack]:
    root = tmp_path_factory.mktemp("switching")
    profiles = root / "profiles.toml"
    profiles.write_text(PROFILES)
    nats = NatsServer(root / "nats").start(root / "nats.log")
    env = base_env(
        nats.url,
        root / "home",
        INFERENCE_ENGINE="synthetic",
        PROFILES_FILE=str(profiles),
        MODEL_PROFILE="first",  # an alias works here too
        SYNTH_TOKENS_PER_S="20",
        SYNTH_START_S="1",
        SWITCH_GRACE_S="3",
        CHATQ_REQUEST_TIMEOUT_S="60",
    )
    procs: list[Proc] = []
    try:
        api, url = start_api(env, root / "logs")
        procs.append(api)
        reject_api, reject_url = start_api({**env, "UNSERVED_MODEL": "reject"}, root / "logs", "api-reject")
        procs.append(reject_api)
        worker, worker_port = start_worker(env, root / "logs", name=WORKER)
        procs.append(worker)
        wait_for_model(url, "alpha", 60, procs)
        wait_for_model(reject_url, "alpha", 60, procs)
        yield SwitchStack(url, reject_url, worker, worker_port)
    finally:
        for proc in reversed(procs):
            proc.stop()
        nats.stop()


@dataclass
class Answer:
    model: str | None
    text: str
    finish: str | None
    error: dict[str, Any] | None
    status: int


async def chat(client: httpx.AsyncClient, url: str, model: str, max_tokens: int) -> Answer:
    """One streaming chat request, read to its end."""
    body = {
        "model": model,
        "stream": True,
        "temperature": 0,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "hello"}],
    }
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=auth()) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return Answer(None, "", None, resp.json()["error"], resp.status_code)
        answer = Answer(None, "", None, None, 200)
        event = "message"
        async for line in resp.aiter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()
                if data == "[DONE]":
                    continue
                payload = json.loads(data)
                if event == "error":
                    answer.error = payload["error"]
                    continue
                answer.model = payload.get("model", answer.model)
                for choice in payload.get("choices", []):
                    answer.text += choice.get("delta", {}).get("content") or ""
                    answer.finish = choice.get("finish_reason") or answer.finish
            elif not line:
                event = "message"
        return answer


def models(url: str) -> dict[str, dict[str, Any]]:
    body = httpx.get(url + "/api/models", headers=auth(), timeout=5).json()
    return {m["id"]: m for m in body["models"]}


def worker_entry(url: str) -> dict[str, Any] | None:
    for model in models(url).values():
        for worker in model["workers"]:
            if worker["id"] == WORKER:
                return {"model": model["id"], **worker}
    return None


def switch(url: str, profile: str, worker: str = WORKER) -> httpx.Response:
    return httpx.post(
        f"{url}/api/admin/workers/{worker}/model", json={"profile": profile}, headers=auth(), timeout=10
    )


def wait_ready_on(url: str, model: str, timeout: float = 30) -> list[str]:
    """Wait until the worker is ready on `model`; returns the progress texts seen on the way."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = worker_entry(url)
        if entry is not None:
            if not seen or seen[-1] != entry["progress"]:
                seen.append(entry["progress"])
            if entry["model"] == model and entry["state"] == "ready":
                return seen
        time.sleep(0.1)
    raise TimeoutError(f"the worker is not ready on {model} after {timeout} s; seen {seen}")


async def test_an_alias_is_served_by_its_profiles_queue(stack: SwitchStack) -> None:
    listed = models(stack.url)
    assert listed["alpha"]["state"] == "ready"
    assert listed["alpha"]["aliases"] == ["a-model", "first"]
    assert [w["id"] for w in listed["alpha"]["workers"]] == [WORKER]
    assert listed["beta"]["state"] == "unavailable" and listed["beta"]["workers"] == []
    async with httpx.AsyncClient(timeout=30) as client:
        openai_list = (await client.get(stack.url + "/v1/models", headers=auth())).json()
        assert {"alpha", "beta", "broken"} <= {m["id"] for m in openai_list["data"]}
        one = (await client.get(stack.url + "/v1/models/a-model", headers=auth())).json()
        assert one["id"] == "alpha" and one["state"] == "ready"
        by_alias, by_id = await asyncio.gather(
            chat(client, stack.url, "A-Model", 5), chat(client, stack.url, "alpha", 5)
        )
        unknown = await client.post(
            stack.url + "/v1/chat/completions",
            json={"model": "gamma", "messages": [{"role": "user", "content": "hi"}]},
            headers=auth(),
        )
    assert by_alias.error is None and by_alias.model == "alpha" and by_alias.finish == "length"
    assert by_alias.text == by_id.text  # one model, whichever name was used
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


async def test_a_profile_no_worker_serves_waits_or_is_refused_per_setting(stack: SwitchStack) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        refused = await client.post(
            stack.reject_url + "/v1/chat/completions",
            json={"model": "b-model", "messages": [{"role": "user", "content": "hi"}]},
            headers=auth(),
        )
        served = await chat(client, stack.reject_url, "first", 3)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "model_unavailable"
    assert "beta" in refused.json()["error"]["message"]
    assert refused.headers["Retry-After"]
    assert served.error is None and served.finish == "length"


async def test_a_switch_finishes_streams_in_flight_and_serves_waiting_jobs(stack: SwitchStack) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        # Two seconds of tokens each, well inside the 3 s grace period.
        in_flight = [asyncio.create_task(chat(client, stack.url, "alpha", 40)) for _ in range(3)]
        # A request for beta, which no worker serves yet: it waits in beta's queue.
        waiting = asyncio.create_task(chat(client, stack.url, "beta", 5))
        await asyncio.sleep(0.5)
        assert not waiting.done()
        accepted = await asyncio.to_thread(switch, stack.url, "b-model")
        assert accepted.status_code == 202, accepted.text
        assert accepted.json() == {
            "worker_id": WORKER,
            "profile": "beta",
            "previous": "alpha",
            "state": "draining",
        }
        again = await asyncio.to_thread(switch, stack.url, "alpha")
        assert again.status_code == 409 and again.json()["error"]["code"] == "already_switching"
        seen = await asyncio.to_thread(wait_ready_on, stack.url, "beta")
        answers = await asyncio.gather(*in_flight)
        late = await waiting
    assert all(a.error is None and a.finish == "length" and a.model == "alpha" for a in answers), answers
    assert all(len(a.text.split()) == 40 for a in answers)
    assert late.error is None and late.model == "beta" and late.finish == "length"
    assert "draining" in seen and seen[-1] == "ready"
    assert seen.index("draining") < min(i for i, p in enumerate(seen) if p.startswith("loading"))
    assert any(p.startswith("loading") for p in seen), seen
    assert models(stack.url)["alpha"]["state"] == "unavailable"


async def test_streams_past_the_grace_period_end_with_the_standard_error(stack: SwitchStack) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        long = asyncio.create_task(chat(client, stack.url, "beta", 400))  # 20 s of tokens
        await asyncio.sleep(1.0)
        started = time.monotonic()
        assert (await asyncio.to_thread(switch, stack.url, "alpha")).status_code == 202
        answer = await long
        ended_after = time.monotonic() - started
        await asyncio.to_thread(wait_ready_on, stack.url, "alpha")
    assert answer.status == 200 and answer.text  # it had been streaming
    assert answer.error is not None and answer.error["code"] == "deadline_exceeded", answer
    assert ended_after < 15  # ended by the 3 s grace period, not by running to its end


def readiness_until_ready_on(stack: SwitchStack, model: str, timeout: float = 30) -> list[tuple[int, str]]:
    """The worker's /ready answers, each change once, until the API sees it ready on `model`."""
    seen: list[tuple[int, str]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = httpx.get(f"http://127.0.0.1:{stack.worker_port}/ready", timeout=5)
        answer = (probe.status_code, probe.text.strip())
        if not seen or seen[-1] != answer:
            seen.append(answer)
        entry = worker_entry(stack.url)
        if answer[0] == 200 and entry is not None and entry["model"] == model:
            return seen
        time.sleep(0.05)
    raise TimeoutError(f"/ready did not come back on {model} within {timeout} s; seen {seen}")


async def test_the_readiness_probe_fails_while_the_worker_drains_and_loads(stack: SwitchStack) -> None:
    """Kubernetes' readinessProbe (deploy/k8s) points at /ready on the metrics port."""
    async with httpx.AsyncClient(timeout=60) as client:
        ready = await client.get(f"http://127.0.0.1:{stack.worker_port}/ready")
        assert (ready.status_code, ready.text) == (200, "ready\n")
        in_flight = asyncio.create_task(chat(client, stack.url, "alpha", 30))  # 1.5 s: it drains
        await asyncio.sleep(0.3)
        assert (await asyncio.to_thread(switch, stack.url, "beta")).status_code == 202
        seen = await asyncio.to_thread(readiness_until_ready_on, stack, "beta")
        assert (await in_flight).error is None
        assert (await asyncio.to_thread(switch, stack.url, "alpha")).status_code == 202
        back = await asyncio.to_thread(readiness_until_ready_on, stack, "alpha")
    # The first probe may come before the worker has taken the switch in.
    seen = seen[1:] if seen[0] == (200, "ready") else seen
    assert seen[0] == (503, "draining") and seen[-1] == (200, "ready"), seen
    assert (503, "loading") in seen, seen
    assert back[-1] == (200, "ready") and (503, "loading") in back, back


def wait_failed(url: str, timeout: float = 30) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    entry = worker_entry(url)
    while time.monotonic() < deadline:
        entry = worker_entry(url)
        if entry and entry["progress"].startswith("failed") and entry["state"] == "ready":
            break
        time.sleep(0.1)
    return entry


async def test_a_failed_load_goes_back_to_the_previous_model(stack: SwitchStack) -> None:
    accepted = await asyncio.to_thread(switch, stack.url, "broken")
    assert accepted.status_code == 202
    entry = await asyncio.to_thread(wait_failed, stack.url)
    assert entry is not None
    assert entry["model"] == "alpha" and entry["state"] == "ready"
    assert entry["progress"] == "failed: the model directory /nonexistent/chatq-test-model does not exist"
    assert (await asyncio.to_thread(models, stack.url))["broken"]["state"] == "unavailable"
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await chat(client, stack.url, "alpha", 3)
    assert answer.error is None and answer.finish == "length"


def test_switch_requests_that_cannot_be_served(stack: SwitchStack) -> None:
    unknown = switch(stack.url, "gamma")
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "unknown_profile"
    assert "alpha" in unknown.json()["error"]["message"]
    nobody = switch(stack.url, "beta", worker="no-such-worker")
    assert nobody.status_code == 404
    same = switch(stack.url, "first")
    assert same.status_code == 409 and same.json()["error"]["code"] == "same_model"
    malformed = httpx.post(
        f"{stack.url}/api/admin/workers/{WORKER}/model", json={"model": "beta"}, headers=auth()
    )
    assert malformed.status_code == 400


def test_an_unknown_model_profile_stops_the_worker_with_a_clear_message(
    stack: SwitchStack, tmp_path: Path
) -> None:
    env = {**stack.worker.env, "MODEL_PROFILE": "gamma"}
    worker, _ = start_worker(env, tmp_path, name="bad-profile")
    try:
        worker.proc.wait(60)
    finally:
        worker.kill()
    assert worker.proc.returncode != 0
    assert "MODEL_PROFILE 'gamma' is not a profile in" in worker.tail(80)
