"""Requests the API refuses before any byte of an answer: bad input, no key, unserved endpoints,
each with a clear status and the standard error body."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers import (
    Stack,
    auth,
)
from tests.pipeline import MODEL, chat_body


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
