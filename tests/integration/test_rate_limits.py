"""Rate limits end to end: two API processes sharing one real Redis admit nothing over a
user's limits (requests per minute, tokens per minute, concurrent streams), 429s name the
limit with an exact Retry-After, and a Redis outage follows RATE_LIMIT_FAILURE."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.helpers import AccountsStack, accounts_stack, auth, logged_in, login, start_api
from tests.metrics import metric_value

MODEL = "limits-model"
RPM, TPM, CONCURRENCY = 6, 500, 2
LOGIN_FAILURES, LOGIN_FAILURES_PER_CLIENT = 3, 20


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AccountsStack]:
    with accounts_stack(
        tmp_path_factory.mktemp("limits"),
        MODEL,
        apis=2,
        SYNTH_TOKENS_PER_S="400",
        SYNTH_TTFT_MS="5",
        # Limits are per role: the admin role tests requests per minute alone, the user role
        # tokens per minute and concurrent streams.
        RATE_LIMIT_ADMIN_RPM=str(RPM),
        RATE_LIMIT_ADMIN_TPM="0",
        RATE_LIMIT_ADMIN_CONCURRENCY="0",
        RATE_LIMIT_USER_RPM="0",
        RATE_LIMIT_USER_TPM=str(TPM),
        RATE_LIMIT_USER_CONCURRENCY=str(CONCURRENCY),
        RATE_LIMIT_FAILURE="open",
        LOGIN_MAX_FAILURES=str(LOGIN_FAILURES),
        LOGIN_MAX_FAILURES_PER_CLIENT=str(LOGIN_FAILURES_PER_CLIENT),
        LOGIN_WINDOW_S="60",
    ) as s:
        yield s


def user(stack: AccountsStack, name: str, role: str = "user") -> dict[str, str]:
    return logged_in(stack.url, name, role)


def ask(url: str, headers: dict[str, str], max_tokens: int = 2) -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens},
        headers=headers,
        timeout=60,
    )


def test_requests_per_minute_across_two_api_processes(stack: AccountsStack) -> None:
    headers = user(stack, "rpm-user", role="admin")
    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: ask(stack.urls[i % 2], headers), range(16)))
    assert time.monotonic() - started < 10, "the burst must fit inside one refill interval (60/RPM s)"
    statuses = Counter(r.status_code for r in answers)
    assert statuses == {200: RPM, 429: 16 - RPM}, statuses
    refused = [r for r in answers if r.status_code == 429]
    for r in refused:
        error = r.json()["error"]
        assert error["code"] == "rate_limit_rpm" and error["type"] == "rate_limit_error"
        assert f"{RPM} requests per minute" in error["message"]
        assert 1 <= int(r.headers["Retry-After"]) <= 60 // RPM
    refusals = sum(_metric(url, "chatq_rejected_total", reason="rate_limit_rpm") for url in stack.urls)
    assert refusals == 16 - RPM
    # Another user has buckets of their own.
    assert ask(stack.urls[1], user(stack, "rpm-other", role="admin")).status_code == 200


def test_concurrent_streams_across_two_api_processes(stack: AccountsStack) -> None:
    headers = user(stack, "conc-user")
    opened = threading.Barrier(CONCURRENCY + 1)
    release = threading.Event()

    def hold(url: str) -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 4000,
            "stream": True,
        }
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)
            opened.wait(timeout=30)
            release.wait(timeout=30)

    threads = [threading.Thread(target=hold, args=(stack.urls[i % 2],)) for i in range(CONCURRENCY)]
    for t in threads:
        t.start()
    opened.wait(timeout=30)
    try:
        for url in stack.urls:
            r = ask(url, headers)
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "rate_limit_concurrency"
            assert int(r.headers["Retry-After"]) >= 1
    finally:
        release.set()
        for t in threads:
            t.join(timeout=30)
    # The slots come back when the streams end.
    deadline = time.monotonic() + 10
    while (status := ask(stack.url, headers).status_code) == 429 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status == 200


def test_tokens_per_minute_count_the_output_when_the_stream_ends(stack: AccountsStack) -> None:
    headers = user(stack, "tpm-user")
    # Prompt tokens are charged at admission (an estimate), output tokens at the end.
    assert ask(stack.url, headers, max_tokens=400).status_code == 200
    assert ask(stack.urls[1], headers, max_tokens=400).status_code == 200
    r = ask(stack.url, headers)
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["code"] == "rate_limit_tpm" and f"{TPM} tokens per minute" in error["message"]
    # About 800 output tokens over a 500-a-minute bucket: the wait is the deficit's refill time.
    retry = int(r.headers["Retry-After"])
    assert 30 <= retry <= 60, retry


def _metric(url: str, name: str, **labels: str) -> float:
    try:
        return metric_value(httpx.get(url + "/metrics").text, name, **labels)
    except KeyError:
        return 0.0


def try_login(url: str, username: str, password: str) -> httpx.Response:
    return httpx.post(url + "/api/auth/login", json={"username": username, "password": password}, timeout=30)


def test_failed_logins_are_throttled_per_username_across_api_processes(stack: AccountsStack) -> None:
    user(stack, "login-user")
    for i in range(LOGIN_FAILURES):
        wrong = try_login(stack.urls[i % 2], "login-user", "not-the-password")
        assert wrong.status_code == 401, wrong.text
    # Now even the right password waits, on either process, and says for how long.
    for url in stack.urls:
        refused = try_login(url, "login-user", "pw-login-user-12345")
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        assert error["code"] == "too_many_login_attempts" and error["type"] == "rate_limit_error"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert f"try again in {refused.headers['Retry-After']} s" in error["message"]
    # Others from the same address are not locked out by it.
    user(stack, "login-other")
    # An unknown username is throttled the same way (nothing tells the two apart).
    answers = [try_login(stack.url, "nobody-here", "guess").status_code for _ in range(LOGIN_FAILURES + 1)]
    assert answers == [401] * LOGIN_FAILURES + [429], answers
    # Guesses sent at once cannot pass the limit together: each is counted before its check.
    user(stack, "burst-user")
    with ThreadPoolExecutor(10) as pool:
        burst = list(pool.map(lambda i: try_login(stack.urls[i % 2], "burst-user", "wrong"), range(10)))
    statuses = Counter(r.status_code for r in burst)
    assert statuses == {401: LOGIN_FAILURES, 429: 10 - LOGIN_FAILURES}, statuses
    # A right password forgets the failures before it.
    user(stack, "login-again")
    for _ in range(2):
        assert try_login(stack.url, "login-again", "wrong").status_code == 401
    assert try_login(stack.url, "login-again", "pw-login-again-12345").status_code == 200
    for _ in range(2):
        assert try_login(stack.url, "login-again", "wrong").status_code == 401
    assert try_login(stack.url, "login-again", "pw-login-again-12345").status_code == 200


def test_redis_down_open_serves_closed_refuses_and_limits_return_with_redis(stack: AccountsStack) -> None:
    closed_api, closed_url = start_api(
        {**stack.env, "RATE_LIMIT_FAILURE": "closed"}, stack.logdir, name="api-closed"
    )
    try:
        headers = user(stack, "outage-user")
        assert ask(closed_url, headers).status_code == 200
        stack.redis.stop()
        try:
            bypassed = _metric(stack.url, "chatq_rate_limit_bypassed_total")
            started = time.monotonic()
            opened = ask(stack.url, headers)
            assert opened.status_code == 200, opened.text  # open: served, and counted
            assert _metric(stack.url, "chatq_rate_limit_bypassed_total") > bypassed
            refused = ask(closed_url, headers)
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "rate_limiter_unavailable"
            assert time.monotonic() - started < 5, "a dead Redis must not stall requests"
            # Logins go on, unthrottled, while Redis is away.
            login(stack.url, "outage-user", "pw-outage-user-12345")
        finally:
            stack.redis.start(stack.logdir / "redis.log")
        # Back: the breaker asks Redis again within seconds and limits apply again: a few
        # 400-token answers use up the 500-a-minute token budget.
        deadline = time.monotonic() + 15
        statuses: list[Any] = []
        while time.monotonic() < deadline:
            statuses.append(ask(closed_url, headers, max_tokens=400).status_code)
            if statuses[-1] == 429:
                break
            time.sleep(0.2)
        assert statuses[-1] == 429, statuses
        assert statuses.count(200) <= 2, statuses
    finally:
        closed_api.stop()


def test_logins_are_keyed_on_the_forwarded_address_only_from_a_trusted_proxy(
    stack: AccountsStack,
) -> None:
    """uvicorn's FORWARDED_ALLOW_IPS: the stack's APIs trust loopback (the default), where
    this test runs, so X-Forwarded-For names the client; an API that trusts another
    proxy ignores the header and counts the peer's address."""

    def attempt(url: str, username: str, password: str, forwarded: str | None) -> int:
        headers = {"X-Forwarded-For": forwarded} if forwarded else {}
        body = {"username": username, "password": password}
        return httpx.post(url + "/api/auth/login", json=body, headers=headers, timeout=30).status_code

    user(stack, "proxied-user")
    right = "pw-proxied-user-12345"
    statuses = [attempt(stack.url, "proxied-user", "wrong", "203.0.113.1") for _ in range(LOGIN_FAILURES)]
    assert statuses == [401] * LOGIN_FAILURES
    assert attempt(stack.url, "proxied-user", right, "203.0.113.1") == 429
    # Other forwarded addresses, and the proxy itself, are other clients.
    assert attempt(stack.url, "proxied-user", right, "203.0.113.2") == 200
    assert attempt(stack.url, "proxied-user", right, None) == 200

    untrusting, url = start_api(
        {**stack.env, "FORWARDED_ALLOW_IPS": "10.9.9.9"}, stack.logdir, name="api-proxy"
    )
    try:
        user(stack, "direct-user")
        statuses = [
            attempt(url, "direct-user", "wrong", f"203.0.113.{10 + i}") for i in range(LOGIN_FAILURES)
        ]
        assert statuses == [401] * LOGIN_FAILURES
        # Every attempt was counted for the peer (127.0.0.1), whatever the header said.
        assert attempt(url, "direct-user", "pw-direct-user-12345", "198.51.100.9") == 429
        assert attempt(stack.url, "direct-user", "pw-direct-user-12345", None) == 429
    finally:
        untrusting.stop()


def test_failed_logins_are_throttled_per_client_address(stack: AccountsStack) -> None:
    # Last in the module: it locks this address out of logging in for the window.
    user(stack, "spray-target")
    answers = []
    for i in range(LOGIN_FAILURES_PER_CLIENT + 1):
        answers.append(try_login(stack.urls[i % 2], f"spray-{i}", "guess").status_code)
        if answers[-1] == 429:
            break
    assert answers[-1] == 429 and set(answers[:-1]) == {401}, answers
    refused = try_login(stack.url, "spray-target", "pw-spray-target-12345")
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "too_many_login_attempts"
    # API keys are not logins: they keep working.
    assert httpx.get(stack.url + "/api/auth/verify", headers=auth(), timeout=10).status_code == 200
