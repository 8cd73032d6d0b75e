"""What the logs show: real API, worker and persistence processes (synthetic engine,
PostgreSQL, Redis, NATS) and their log files.

Every line is one JSON object with the same first keys; the API writes exactly one line
per generation request when it ends, with its id, user, model, tokens, status and
latency, whatever the ending; `./logs --request ID` collects one request's lines from
every process in time order; secrets and personal details never reach a file, and the
prompt only with LOG_PROMPTS=true.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker import permissions
from stack import nats_auth
from tests.helpers import (
    AccountsStack,
    Proc,
    accounts_stack,
    auth,
    create_account,
    login,
    run_python,
    sse_events,
    start_api,
    wait_log,
    wait_until,
)

MODEL = "synthetic-model"
KEYS = ["ts", "level", "service", "logger", "msg"]
# Each kind of secret, as a user might paste it into a prompt, and what must never be logged.
SECRETS = {
    "email": ("mail carol.jones@example.org", "carol.jones@example.org"),
    "phone": ("phone +44 20 7946 0958", "7946 0958"),
    "bearer": ("Authorization: Bearer abcdefghijklmnopqrstuvwxyz", "abcdefghijklmnopqrstuvwxyz"),
    "key": ("my key cq-ZZZZyyyyXXXXwwwwVVVVuuuu0000", "cq-ZZZZyyyyXXXXwwwwVVVVuuuu0000"),
    "jwt": ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiI5OSJ9.c2lnbmF0dXJlc2lnbmF0dXJl", "eyJzdWIiOiI5OSJ9"),
    "password": ('{"password": "correct horse battery"}', "correct horse battery"),
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AccountsStack]:
    with accounts_stack(
        tmp_path_factory.mktemp("logs"),
        MODEL,
        CHATQ_MODELS=MODEL,
        SYNTH_TOKENS_PER_S="50",
        SYNTH_TTFT_MS="20",
        # DEBUG: every line a request can cause (FastStream's per message included).
        LOG_LEVEL="DEBUG",
        LOG_PROMPTS="true",
    ) as stack:
        yield stack


def proc(stack: AccountsStack, name: str) -> Proc:
    return next(p for p in stack.procs if p.name == name)


def records(p: Proc) -> list[dict[str, Any]]:
    return [json.loads(line) for line in p.log.read_text(errors="replace").splitlines()]


def lines_of(p: Proc, request_id: str) -> list[dict[str, Any]]:
    return [r for r in records(p) if r.get("request_id") == request_id and "status_code" in r]


def request_lines(p: Proc, url: str, request_id: str, timeout: float = 10) -> list[dict[str, Any]]:
    """The request lines the API `p` (at `url`) wrote for a request, once it wrote one."""
    try:
        wait_until(f"a request line for {request_id}", lambda: lines_of(p, request_id), timeout, 0.05)
        # That there is no second line, a later request's line shows: sent once the first
        # request has ended and its line is written, it is logged after anything that
        # ending still writes (a fixed pause would only guess how long that takes).
        later = httpx.post(
            url + "/v1/chat/completions", json=chat("x", model="no-such-model"), headers=auth()
        )
        wait_until(
            "the later request's line", lambda: lines_of(p, later.headers["X-Request-Id"]), timeout, 0.05
        )
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}:\n{p.tail()}") from None
    return lines_of(p, request_id)


def one_line(stack: AccountsStack, request_id: str) -> dict[str, Any]:
    lines = request_lines(proc(stack, "api0"), stack.url, request_id)
    assert len(lines) == 1, lines
    line = lines[0]
    assert list(line)[:5] == KEYS, line
    assert (line["level"], line["service"], line["logger"]) == ("INFO", "api", "chatq.api")
    return line


def chat(content: str, **extra: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 10, **extra}


def logs_cli(stack: AccountsStack, *args: str) -> subprocess.CompletedProcess[str]:
    """./logs, reading the stack's log folder (CHATQ_HOME/logs)."""
    env = {**os.environ, "CHATQ_HOME": str(stack.logdir.parent)}
    return run_python("-m", "stack.cli", "logs", *args, env=env, timeout=60)


def test_every_line_of_every_process_is_one_json_object(stack: AccountsStack) -> None:
    httpx.post(
        stack.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, headers=auth()
    )
    for p in stack.procs:
        text = p.log.read_text(errors="replace")
        assert "\x1b[" not in text, f"{p.name}: {text}"
        service = "api" if p.name.startswith("api") else p.name
        lines = records(p)  # raises on a line that is not JSON
        assert lines, p.name
        for line in lines:
            assert list(line)[:5] == KEYS, line
            assert line["service"] == service, line


def test_the_nats_passwords_reach_no_log(stack: AccountsStack) -> None:
    """Each process logs in to the embedded NATS as its service's user (NATS_PASSWORD in its
    environment): the persistence worker names its server at start, and no log of any
    process (nor the launcher's, nor nats-server's) holds a password."""
    start = [r for r in records(proc(stack, "persistence")) if "persistence worker started" in r["msg"]]
    assert len(start) == 1, start
    assert "NATS nats://127.0.0.1:" in start[0]["msg"], start
    passwords = nats_auth.read_passwords(stack.logdir.parent / "home")
    assert len(passwords) == len(permissions.SERVICES), passwords.keys()
    for log in stack.logdir.glob("*.log"):
        text = log.read_text(errors="replace")
        assert not [user for user, pw in passwords.items() if pw in text], log.name


def test_login_tokens_keys_and_passwords_reach_no_log(stack: AccountsStack) -> None:
    """At DEBUG, a user who logs in (once with a wrong password), chats with the token,
    makes a key and uses it, and a caller with a forged token: none of them in any log."""
    account = create_account(stack.url, "log-secrets")
    wrong = httpx.post(
        stack.url + "/api/auth/login", json={"username": account.username, "password": "wrong-pw-98765"}
    )
    assert wrong.status_code == 401
    session = login(stack.url, account.username, account.password)
    token = session["Authorization"].removeprefix("Bearer ")
    assert (
        httpx.post(stack.url + "/v1/chat/completions", json=chat("hello"), headers=session).status_code == 200
    )
    key = httpx.post(stack.url + "/api/keys", json={"name": "k"}, headers=session).json()["key"]
    used = httpx.post(
        stack.url + "/v1/completions",
        json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert used.status_code == 200, used.text
    forged = token[:-6] + "AAAAAA"
    assert (
        httpx.get(stack.url + "/api/me/settings", headers={"Authorization": f"Bearer {forged}"}).status_code
        == 401
    )
    # The key's request is the last: its line written, everything before it is too.
    wait_until(
        "the key's request line",
        lambda: lines_of(proc(stack, "api0"), used.headers["X-Request-Id"]),
        10,
        0.05,
    )
    for p in stack.procs:
        text = p.log.read_text(errors="replace")
        for name, secret in [
            ("token", token),
            ("forged token", forged),
            ("key", key),
            ("password", account.password),
            ("wrong password", "wrong-pw-98765"),
        ]:
            assert secret not in text, f"{p.name} logged the {name}"


def test_the_api_logs_a_start_line(stack: AccountsStack) -> None:
    port = stack.url.rsplit(":", 1)[1]
    start = [r for r in records(proc(stack, "api0")) if "listening on" in r["msg"]]
    assert len(start) == 1, start
    assert start[0]["msg"].startswith("chatq api ")
    assert start[0]["msg"].endswith(f" listening on 127.0.0.1:{port}; models: {MODEL}")


def test_a_streamed_request_is_one_line_with_its_numbers(stack: AccountsStack) -> None:
    with httpx.stream(
        "POST",
        stack.url + "/v1/chat/completions",
        json=chat("hello", stream=True, stream_options={"include_usage": True}),
        headers=auth(),
        timeout=30,
    ) as resp:
        assert resp.status_code == 200
        request_id = resp.headers["X-Request-Id"]
        events = list(sse_events(resp.iter_lines()))
    assert events[-1].data == "[DONE]"
    usage = json.loads(events[-2].data)["usage"]
    line = one_line(stack, request_id)
    assert line["msg"] == "/v1/chat/completions 200 completed"
    assert line["request_id"] == request_id
    assert line["user_id"] is None  # a service key
    assert line["model"] == MODEL
    assert (line["status_code"], line["outcome"], line["ctx_len"]) == (200, "completed", 1)
    assert (line["input_tokens"], line["output_tokens"]) == (usage["prompt_tokens"], 10)
    assert line["latency_ms"] > 0


def test_a_whole_answer_is_one_line(stack: AccountsStack) -> None:
    resp = httpx.post(
        stack.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 5}, headers=auth()
    )
    assert resp.status_code == 200, resp.text
    line = one_line(stack, resp.headers["X-Request-Id"])
    assert (line["endpoint"], line["status_code"], line["outcome"]) == ("/v1/completions", 200, "completed")
    assert line["output_tokens"] == 5


@pytest.mark.parametrize(
    ("body", "status", "outcome"),
    [
        (chat("x", model="no-such-model"), 404, "model_not_found"),
        ({"model": MODEL}, 400, "invalid_request"),
        (chat("x", max_tokens=10**9), 400, "invalid_request"),
        # Refused by the engine after it was queued: the 4xx path of a relayed request.
        (chat("x", temperature="hot"), 400, None),
    ],
)
def test_a_refused_request_is_one_line(
    stack: AccountsStack, body: dict[str, object], status: int, outcome: str | None
) -> None:
    resp = httpx.post(stack.url + "/v1/chat/completions", json=body, headers=auth(), timeout=30)
    assert resp.status_code == status, resp.text
    line = one_line(stack, resp.headers["X-Request-Id"])
    assert line["status_code"] == status
    assert line["outcome"] == (outcome or resp.json()["error"]["code"])
    assert line["output_tokens"] == 0 and line["input_tokens"] is None


def test_a_client_that_leaves_mid_stream_is_one_line(stack: AccountsStack) -> None:
    with httpx.stream(
        "POST",
        stack.url + "/v1/chat/completions",
        json=chat("a long answer", stream=True, max_tokens=2000),
        headers=auth(),
        timeout=30,
    ) as resp:
        request_id = resp.headers["X-Request-Id"]
        next(iter(sse_events(resp.iter_lines())))
    line = one_line(stack, request_id)
    assert (line["status_code"], line["outcome"]) == (200, "disconnected")
    assert line["output_tokens"] < 2000
    # A job that did not complete has the worker's line at INFO too.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ended = [
            r
            for r in records(proc(stack, "worker"))
            if r.get("request_id") == request_id and r["msg"].startswith("job ")
        ]
        if ended:
            break
        time.sleep(0.1)
    assert len(ended) == 1 and ended[0]["level"] == "INFO", ended
    assert ended[0]["outcome"] == "cancelled" and ended[0]["msg"].startswith("job cancelled in"), ended


def test_one_request_is_followed_through_every_process(stack: AccountsStack) -> None:
    dora = create_account(stack.url, "dora")
    headers = login(stack.url, dora.username, dora.password)
    with httpx.stream(
        "POST", stack.url + "/api/chat", json={"message": "hi", "max_tokens": 5}, headers=headers, timeout=30
    ) as resp:
        assert resp.status_code == 200
        request_id = resp.headers["X-Request-Id"]
        resp.read()
    line = one_line(stack, request_id)
    assert line["user_id"] == dora.id
    assert (line["endpoint"], line["outcome"], line["output_tokens"]) == ("/api/chat", "completed", 5)
    # The worker's and persistence's lines carry the id they got in the message headers.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        shown = logs_cli(stack, "--request", request_id, "--json")
        found = [json.loads(text) for text in shown.stdout.splitlines()]
        if {"api", "worker", "persistence"} <= {r["service"] for r in found}:
            break
        time.sleep(0.2)
    assert {"api", "worker", "persistence"} <= {r["service"] for r in found}, shown.stdout
    assert all(request_id in (r.get("request_id"), None) or request_id in r["msg"] for r in found)
    assert [r["ts"] for r in found] == sorted(r["ts"] for r in found)
    worker = [r for r in found if r["service"] == "worker"]
    assert all(r["user_id"] == dora.id and r["model"] == MODEL for r in worker), worker
    # The worker's line when the job ended (DEBUG when it completed), persistence's at INFO
    # when the request's end is stored.
    ended = [r for r in worker if r["msg"].startswith("job completed in")]
    assert len(ended) == 1 and (ended[0]["level"], ended[0]["outcome"]) == ("DEBUG", "completed"), worker
    assert 0 < ended[0]["ttft_ms"] <= ended[0]["latency_ms"], ended
    stored = [r for r in found if r["service"] == "persistence" and r["level"] == "INFO"]
    assert [r["msg"] for r in stored] == [f"wrote the completed event of {request_id}"], stored
    # For people: one line each, local time, service, level, logger and message.
    pretty = logs_cli(stack, "--request", request_id).stdout.splitlines()
    assert len(pretty) == len(found)
    assert any(" api INFO chatq.api: /api/chat 200 completed " in text for text in pretty), pretty
    assert logs_cli(stack, "--request", "chatcmpl-nothing-like-it").returncode == 1


def test_prompts_are_logged_masked_with_log_prompts(stack: AccountsStack) -> None:
    prompt = " and ".join(text for text, _ in SECRETS.values())
    resp = httpx.post(stack.url + "/v1/chat/completions", json=chat(prompt), headers=auth(), timeout=30)
    assert resp.status_code == 200, resp.text
    line = one_line(stack, resp.headers["X-Request-Id"])
    for kind in ("email", "phone", "key", "jwt"):
        assert f"[{kind}]" in line["prompt"], line["prompt"]
    assert "Bearer [token]" in line["prompt"] and '"password": "[masked]"' in line["prompt"]
    # Every process is done with the request: the worker's job line (DEBUG once it
    # completed) and persistence's line for its stored end are written.
    request_id = resp.headers["X-Request-Id"]
    wait_until(
        "the worker's line for the completed job",
        lambda: [
            r
            for r in records(proc(stack, "worker"))
            if r.get("request_id") == request_id and r["msg"].startswith("job completed in")
        ],
        10,
    )
    wait_log(proc(stack, "persistence"), f"wrote the completed event of {request_id}")
    for p in stack.procs:
        text = p.log.read_text(errors="replace")
        for kind, (_, secret) in SECRETS.items():
            assert secret not in text, f"{kind} in {p.name}'s log"


def test_prompts_are_not_logged_without_log_prompts(stack: AccountsStack, tmp_path: Path) -> None:
    api, url = start_api({**stack.env, "LOG_PROMPTS": "false"}, tmp_path, name="quiet-api")
    try:
        resp = httpx.post(url + "/v1/chat/completions", json=chat("secret plans"), headers=auth(), timeout=30)
        assert resp.status_code == 200, resp.text
        lines = request_lines(api, url, resp.headers["X-Request-Id"])
    finally:
        api.stop()
    assert len(lines) == 1 and "prompt" not in lines[0], lines
    assert "secret plans" not in api.log.read_text()
