"""Hostile input, family by family, against the whole service (NATS, PostgreSQL, Redis,
persistence, a synthetic worker): each is refused with a clear 4xx in the standard error
body (or, where it is only unusual, answered), none reaches the job queue, the API's memory
does not grow with them, and the service answers the next ordinary request as before."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

import httpx
import psutil
import pytest

from tests.helpers import AccountsStack, accounts_stack, jobs_published, logged_in, no_rate_limits

MODEL = "hostile-model"
ROUNDS = 20  # each family this many times, for the memory bound
RSS_GROWTH_LIMIT = 40 << 20


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AccountsStack]:
    with accounts_stack(
        tmp_path_factory.mktemp("hostile"),
        MODEL,
        SYNTH_TOKENS_PER_S="2000",
        SYNTH_TTFT_MS="1",
        **no_rate_limits("user"),
    ) as s:
        yield s


@pytest.fixture(scope="module")
def session(stack: AccountsStack) -> dict[str, str]:
    return logged_in(stack.url, "hostile-user")


@dataclass(frozen=True)
class Family:
    name: str
    path: str
    body: Callable[[], bytes]
    status: int
    code: str | None  # the error code expected; None: answered (2xx)


def _chat(**fields: object) -> bytes:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}
    return json.dumps(body).encode()


def _nested(depth: int) -> bytes:
    return b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "x": %s%s}' % (
        MODEL.encode(),
        b"[" * depth,
        b"]" * depth,
    )


FAMILIES = [
    Family(
        "invalid JSON",
        "/v1/chat/completions",
        lambda: b'{"model": "m", "messages": [',
        400,
        "invalid_request",
    ),
    Family("not an object", "/v1/chat/completions", lambda: b"[1, 2, 3]", 400, "invalid_request"),
    Family(
        "wrong types",
        "/v1/chat/completions",
        lambda: _chat(messages="hi", max_tokens="many"),
        400,
        "invalid_request",
    ),
    Family(
        "wrong types, /api/chat",
        "/api/chat",
        lambda: json.dumps({"message": 5}).encode(),
        400,
        "invalid_request",
    ),
    Family(
        "a huge string",
        "/v1/chat/completions",
        lambda: _chat(messages=[{"role": "user", "content": "x" * (3 << 20)}]),
        413,
        "request_too_large",
    ),
    Family("deeply nested JSON", "/v1/chat/completions", lambda: _nested(100_000), 400, "invalid_request"),
    Family(
        "nesting in a message",
        "/v1/chat/completions",
        lambda: _chat(messages=[{"role": "user", "content": [[[[["x"]]]]]}]),
        400,
        "invalid_request",
    ),
    Family(
        "5000 short messages (within the limits: answered)",
        "/v1/chat/completions",
        lambda: _chat(messages=[{"role": "user", "content": "hello"}] * 5000),
        200,
        None,
    ),
    Family(
        "invalid UTF-8",
        "/v1/chat/completions",
        lambda: _chat().replace(b'"hi"', b'"\xff\xfe\xfd"'),
        400,
        "invalid_request",
    ),
    Family(
        "a raw NUL byte",
        "/v1/chat/completions",
        lambda: _chat().replace(b'"hi"', b'"h\x00i"'),
        400,
        "invalid_request",
    ),
    Family(
        "an escaped NUL (valid JSON: answered)",
        "/v1/chat/completions",
        lambda: _chat(messages=[{"role": "user", "content": "h\u0000i"}]),
        200,
        None,
    ),
    Family("enormous max_tokens", "/v1/chat/completions", lambda: _chat(max_tokens=10**15), 400, None),
    Family(
        "negative max_tokens", "/v1/chat/completions", lambda: _chat(max_tokens=-1), 400, "invalid_request"
    ),
    Family(
        "a number too big for a float",
        "/v1/chat/completions",
        lambda: _chat().replace(b'"max_tokens": 2', b'"max_tokens": 1e400'),
        400,
        "invalid_request",
    ),
    Family(
        "an unknown role, /v1 (passed to the engine, which takes any role, as vLLM's server does)",
        "/v1/chat/completions",
        lambda: _chat(messages=[{"role": "wizard", "content": "hi"}]),
        200,
        None,
    ),
    Family(
        "an unknown role, /api/chat",
        "/api/chat",
        lambda: json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(),
        400,
        "invalid_request",
    ),
]


def _send(stack: AccountsStack, session: dict[str, str], family: Family) -> httpx.Response:
    headers = {**session, "Content-Type": "application/json"}
    return httpx.post(stack.url + family.path, content=family.body(), headers=headers, timeout=60)


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_each_family_is_refused_clearly_and_queues_nothing(
    stack: AccountsStack, session: dict[str, str], family: Family
) -> None:
    before = jobs_published(stack.nats_url)
    response = _send(stack, session, family)
    assert response.status_code == family.status, response.text[:500]
    if family.status >= 400:
        error = response.json()["error"]
        assert set(error) >= {"type", "code", "message", "request_id"}, error
        assert error["message"], error
        if family.code is not None:
            assert error["code"] == family.code, error
        assert jobs_published(stack.nats_url) == before, "a refused request reached the job queue"
    else:
        assert response.json()["choices"][0]["message"]["content"]


def test_an_oversized_header_is_refused_before_the_app(stack: AccountsStack) -> None:
    """A 100 KB header: refused with 431 in the standard error body before any handler, and
    the connection closed (the parser does not buffer an endless header)."""
    url = urlparse(stack.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):  # until the server closes
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431"), answer[:300]
    assert json.loads(body)["error"]["code"] == "request_header_too_large"


def test_the_api_memory_does_not_grow_with_hostile_bodies(
    stack: AccountsStack, session: dict[str, str]
) -> None:
    api = psutil.Process(next(p for p in stack.procs if p.name.startswith("api")).pid)
    for family in FAMILIES:  # warm up: first use of each path allocates its caches
        _send(stack, session, family)
    start = api.memory_info().rss
    for _ in range(ROUNDS):
        for family in FAMILIES:
            _send(stack, session, family)
    grown = api.memory_info().rss - start
    assert grown < RSS_GROWTH_LIMIT, f"the API grew by {grown >> 20} MiB over {ROUNDS} rounds"
    ordinary = httpx.post(stack.url + "/v1/chat/completions", content=_chat(), headers=session, timeout=60)
    assert ordinary.status_code == 200, ordinary.text
