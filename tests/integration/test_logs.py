"""What `./logs` shows: real API and worker processes (synthetic engine) and their log files.

The API logs a start line and exactly one line per generation request when it ends, with
its request id, whatever the ending (answered, refused, client gone); no process writes
colour codes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers import Proc, Stack, auth, sse_events, synthetic_stack

MODEL = "synthetic-model"
# timestamp, level, service, logger: message
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+) (\S+): ")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with synthetic_stack(
        tmp_path_factory.mktemp("logs"),
        MODEL,
        CHATQ_MODELS=MODEL,
        SYNTH_TOKENS_PER_S="50",
        SYNTH_TTFT_MS="20",
    ) as stack:
        yield stack


def request_lines(proc: Proc, request_id: str, timeout: float = 10) -> list[str]:
    """The log lines naming a request, once there is at least one (then a moment more)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [line for line in proc.log.read_text(errors="replace").splitlines() if request_id in line]
        if found:
            time.sleep(0.3)  # a second line, if there were one, would be here by now
            return [line for line in proc.log.read_text(errors="replace").splitlines() if request_id in line]
        time.sleep(0.05)
    raise TimeoutError(f"no log line for {request_id}:\n{proc.tail()}")


def one_line(proc: Proc, request_id: str) -> str:
    lines = request_lines(proc, request_id)
    assert len(lines) == 1, lines
    line = lines[0]
    match = LINE.match(line)
    assert match, line
    assert match.group(1, 2, 3) == ("INFO", "api", "chatq.api")
    return line


def chat(content: str, **extra: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 10, **extra}


def test_the_api_logs_a_start_line(stack: Stack) -> None:
    text = stack.api.log.read_text()
    port = stack.url.rsplit(":", 1)[1]
    start = [line for line in text.splitlines() if "listening on" in line]
    assert len(start) == 1, text
    assert LINE.match(start[0]), start[0]
    assert re.search(rf"chatq api \S+ listening on 127\.0\.0\.1:{port}; models: {MODEL}$", start[0]), start[0]


def test_a_streamed_request_is_one_line(stack: Stack) -> None:
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
    line = one_line(stack.api, request_id)
    assert re.search(
        rf"{request_id} /v1/chat/completions model={MODEL} status=200 outcome=completed "
        r"tokens=\d+\+10 duration=\d+\.\d{3}s$",
        line,
    ), line


def test_a_whole_answer_is_one_line(stack: Stack) -> None:
    resp = httpx.post(
        stack.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 5}, headers=auth()
    )
    assert resp.status_code == 200, resp.text
    line = one_line(stack.api, resp.headers["X-Request-Id"])
    assert " /v1/completions " in line and " status=200 outcome=completed " in line
    assert re.search(r" tokens=\d+\+5 ", line), line


def test_the_simple_endpoint_is_one_line(stack: Stack) -> None:
    with httpx.stream(
        "POST",
        stack.url + "/api/chat",
        json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 5},
        headers=auth(),
    ) as resp:
        assert resp.status_code == 200
        request_id = resp.headers["X-Request-Id"]
        resp.read()
    line = one_line(stack.api, request_id)
    assert f" /api/chat model={MODEL} status=200 outcome=completed " in line


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
    stack: Stack, body: dict[str, object], status: int, outcome: str | None
) -> None:
    resp = httpx.post(stack.url + "/v1/chat/completions", json=body, headers=auth(), timeout=30)
    assert resp.status_code == status, resp.text
    line = one_line(stack.api, resp.headers["X-Request-Id"])
    assert f" status={status} outcome={outcome or resp.json()['error']['code']} " in line, line


def test_a_client_that_leaves_mid_stream_is_one_line(stack: Stack) -> None:
    with httpx.stream(
        "POST",
        stack.url + "/v1/chat/completions",
        json=chat("a long answer", stream=True, max_tokens=2000),
        headers=auth(),
        timeout=30,
    ) as resp:
        request_id = resp.headers["X-Request-Id"]
        next(iter(sse_events(resp.iter_lines())))
    line = one_line(stack.api, request_id)
    assert " status=200 outcome=disconnected " in line, line
    assert re.search(r" tokens=\d+ ", line), line


def test_no_process_writes_colours(stack: Stack) -> None:
    for proc in (stack.api, stack.worker):
        text = proc.log.read_text(errors="replace")
        assert "\x1b[" not in text, f"{proc.name}: {text}"
        # Every line chatq wrote has the one format (tracebacks aside).
        ours = [line for line in text.splitlines() if LINE.match(line)]
        assert ours, text
        services = {LINE.match(line).group(2) for line in ours}  # type: ignore[union-attr]
        assert services == {proc.name}, services
