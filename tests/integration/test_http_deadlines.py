"""Slow clients against the real API process: a head or a body that never finishes is
answered 408 and closed within its bound (HTTP_HEADER_TIMEOUT_S, HTTP_BODY_TIMEOUT_S);
a client inside the bounds is served as before."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from stack.servers import NatsServer
from tests.helpers import API_KEY, base_env, start_api

HEAD_S = 1.0
BODY_S = 1.5
# What the bound may be late by on a busy test machine.
SLACK_S = 3.0


@pytest.fixture(scope="module")
def api_url(tmp_path_factory: pytest.TempPathFactory, nats_server: NatsServer) -> Iterator[str]:
    root = tmp_path_factory.mktemp("deadlines")
    env = base_env(
        nats_server.url,
        root / "home",
        HTTP_HEADER_TIMEOUT_S=str(HEAD_S),
        HTTP_BODY_TIMEOUT_S=str(BODY_S),
    )
    proc, url = start_api(env, root / "logs")
    try:
        yield url
    finally:
        proc.stop()


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=HEAD_S + BODY_S + SLACK_S + 5)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends, until it closes the connection (recv blocks until then)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def _error(response: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]


def test_headers_trickled_a_byte_at_a_time_are_closed_within_the_bound(api_url: str) -> None:
    """40 sockets, each sending one more byte of a header that never ends every 0.1 s."""
    socks = [_connect(api_url) for _ in range(40)]
    stop = threading.Event()

    def trickle() -> None:
        for sock in socks:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        while not stop.wait(0.1):
            for sock in socks:
                try:
                    sock.send(b"a")
                except OSError:
                    pass  # this one was closed: the others go on

    sender = threading.Thread(target=trickle, daemon=True)
    started = time.monotonic()
    sender.start()
    try:
        responses = [_read_until_closed(sock) for sock in socks]
    finally:
        stop.set()
        sender.join()
        for sock in socks:
            sock.close()
    took = time.monotonic() - started
    assert HEAD_S - 0.2 <= took < HEAD_S + SLACK_S, took
    for response in responses:
        status, error = _error(response)
        assert status == 408 and error["code"] == "request_timeout", response


def test_a_connection_that_sends_nothing_is_closed_within_the_bound(api_url: str) -> None:
    sock = _connect(api_url)
    started = time.monotonic()
    with sock:
        response = _read_until_closed(sock)
    assert time.monotonic() - started < HEAD_S + SLACK_S
    assert _error(response)[0] == 408


def test_a_body_that_stalls_gets_408_and_the_connection_closes(api_url: str) -> None:
    sock = _connect(api_url)
    started = time.monotonic()
    with sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {API_KEY}\r\n".encode()
            + b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
            + b'{"model":'
        )
        response = _read_until_closed(sock)
    took = time.monotonic() - started
    assert BODY_S - 0.2 <= took < BODY_S + SLACK_S, took
    status, error = _error(response)
    assert status == 408 and error["code"] == "request_timeout", response
    assert error["request_id"], error  # the standard body, from the app's error handler
    assert b"connection: close" in response.lower()


def test_requests_within_the_bounds_are_unaffected(api_url: str) -> None:
    # One kept-alive connection: requests after the first get a fresh head bound each, and
    # one that idles past it between requests is not cut in the middle of the next.
    with httpx.Client(base_url=api_url, timeout=10) as client:
        for _ in range(3):
            assert client.get("/health").status_code == 200
        time.sleep(HEAD_S + 0.5)  # longer than a head may take: the connection is idle, not slow
        assert client.get("/health").status_code == 200
    # A body sent in two parts, the second after a pause shorter than the body bound.
    sock = _connect(api_url)
    with sock:
        body = json.dumps(
            {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}
        ).encode()
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body[:10]
        )
        time.sleep(BODY_S / 3)
        sock.sendall(body[10:])
        response = _read_until_closed(sock)
    status, error = _error(response)
    assert status == 404 and error["code"] == "model_not_found", response


def test_the_settings_name_their_range(tmp_path: Path) -> None:
    from chatq.errors import ConfigError
    from chatq.settings import load

    with pytest.raises(ConfigError, match=r"HTTP_HEADER_TIMEOUT_S must be a number from 0\.1 to 3600"):
        load({"CHATQ_HOME": str(tmp_path), "HTTP_HEADER_TIMEOUT_S": "0"})
