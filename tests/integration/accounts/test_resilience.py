"""Accounts end to end, last of the package (the files run in name order): PostgreSQL goes
away under a stream of requests."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai

from tests.accounts import CACHE_S, MODEL, make_user
from tests.helpers import (
    AccountsStack,
)

# --- login and tokens -------------------------------------------------------------------


def test_postgres_down_then_back_known_keys_keep_working_and_nothing_is_lost(stack: AccountsStack) -> None:
    """PostgreSQL goes away under a stream of requests. A key already known keeps working
    (nobody can revoke it meanwhile), what needs the database says 503, and once it is
    back every request's usage row is there exactly once."""
    gina = make_user(stack, "gina")
    key = httpx.post(stack.url + "/api/keys", json={"name": "outage"}, headers=gina.headers).json()["key"]
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key=key, max_retries=0)

    def ask() -> str:
        answer = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "still there?"}], max_tokens=3
        )
        return answer.id

    sent = [ask()]
    stack.pg.stop()
    try:
        time.sleep(CACHE_S + 0.5)  # past the cache time: the key is served from the last answer
        sent += [ask() for _ in range(10)]
        r = httpx.post(stack.url + "/api/auth/login", json={"username": "gina", "password": "pw-gina-12345"})
        assert r.status_code == 503, r.text
        unknown = httpx.get(
            stack.url + "/v1/models", headers={"Authorization": "Bearer cq-unknown-key-0123456789"}
        )
        assert unknown.status_code == 503 and unknown.json()["error"]["code"] == "accounts_unavailable"
    finally:
        stack.pg.start()
    sent.append(ask())
    deadline = time.monotonic() + 60
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        r = httpx.get(stack.url + "/api/usage", headers=gina.headers)
        rows = r.json()["rows"] if r.status_code == 200 else []
        if len([row for row in rows if row["status"] == "completed"]) >= len(sent):
            break
        time.sleep(0.5)
    ids = [row["request_id"] for row in rows]
    assert sorted(ids) == sorted(sent), "every request recorded exactly once"
    assert all(row["completion_tokens"] == 3 for row in rows)
