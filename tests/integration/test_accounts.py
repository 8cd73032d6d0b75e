"""Accounts end to end: real NATS, PostgreSQL, Redis, two API processes, persistence and a
synthetic worker. Login and tokens, keys and their revocation across processes, roles and
other users' things (404), conversations continued from the stored history, titles, usage."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import openai
import pytest

from tests.helpers import (
    JWT_SECRET,
    AccountsStack,
    accounts_stack,
    auth,
    create_account,
    find_event,
    login,
    no_rate_limits,
    run_python,
    sse_events,
)

MODEL = "acct-model"
CACHE_S = 1.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AccountsStack]:
    with accounts_stack(
        tmp_path_factory.mktemp("accounts"),
        MODEL,
        apis=2,
        API_KEY_CACHE_S=str(CACHE_S),
        SYNTH_TOKENS_PER_S="400",
        SYNTH_TTFT_MS="5",
        **no_rate_limits("user"),
    ) as s:
        yield s


@dataclass
class User:
    name: str
    id: int
    headers: dict[str, str]


def _user(stack: AccountsStack, name: str, role: str = "user") -> User:
    account = create_account(stack.url, name, role)
    return User(name, account.id, login(stack.url, name, account.password))


@pytest.fixture(scope="module")
def alice(stack: AccountsStack) -> User:
    return _user(stack, "alice")


@pytest.fixture(scope="module")
def bob(stack: AccountsStack) -> User:
    return _user(stack, "bob")


@dataclass
class Turn:
    conversation_id: str
    request_id: str
    text: str
    usage: dict[str, int]


def chat(
    url: str, headers: dict[str, str], message: str, conversation_id: str | None = None, **extra: Any
) -> Turn:
    body: dict[str, Any] = {"message": message, **extra}
    if conversation_id:
        body["conversation_id"] = conversation_id
    with httpx.stream("POST", url + "/api/chat", json=body, headers=headers, timeout=60) as response:
        assert response.status_code == 200, response.read().decode()
        events = list(sse_events(response.iter_lines()))
    assert events[0].event == "conversation", events[0]
    head = events[0].json()
    text, usage = "", {}
    for event in events[1:]:
        if event.data == "[DONE]":
            break
        chunk = event.json()
        for choice in chunk.get("choices", []):
            text += choice["delta"].get("content") or ""
        usage = chunk.get("usage") or usage
    return Turn(head["conversation_id"], head["request_id"], text, usage)


def words(*texts: str) -> int:
    return sum(len(t.split()) for t in texts)


# --- login and tokens -------------------------------------------------------------------


def test_login_gives_a_token_that_verify_reads(stack: AccountsStack, alice: User) -> None:
    response = httpx.get(stack.url + "/api/auth/verify", headers=alice.headers)
    assert response.status_code == 200
    body = response.json()
    assert body["username"] == "alice" and body["role"] == "user"
    assert 29 * 60 < body["exp"] - time.time() <= 30 * 60
    # A token from one API process is good on the other.
    assert httpx.get(stack.urls[1] + "/api/auth/verify", headers=alice.headers).json()["username"] == "alice"


def test_wrong_password_and_unknown_user_get_the_same_401(stack: AccountsStack, alice: User) -> None:
    def attempt(username: str) -> tuple[dict[str, Any], float]:
        started = time.perf_counter()
        r = httpx.post(
            stack.url + "/api/auth/login", json={"username": username, "password": "wrong-password"}
        )
        elapsed = time.perf_counter() - started
        assert r.status_code == 401
        error = r.json()["error"]
        error.pop("request_id")
        return error, elapsed

    known = [attempt("alice") for _ in range(5)]
    unknown = [attempt("nobody-at-all") for _ in range(5)]
    assert (
        known[0][0]
        == unknown[0][0]
        == {
            "type": "authentication_error",
            "code": "invalid_credentials",
            "message": "wrong username or password",
        }
    )
    # Both verify an argon2id hash (a dummy one for the unknown user): no timing tell.
    t_known = sorted(t for _, t in known)[2]
    t_unknown = sorted(t for _, t in unknown)[2]
    assert 1 / 3 < t_known / t_unknown < 3, (t_known, t_unknown)


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_expired_tampered_unsigned_and_foreign_tokens_are_refused(stack: AccountsStack, alice: User) -> None:
    now = int(time.time())
    claims = {"sub": str(alice.id), "iat": now, "exp": now + 600, "iss": "chatq", "aud": "chatq"}
    good = jwt.encode(claims, JWT_SECRET, algorithm="HS256")
    header, payload, signature = good.split(".")
    cases = {
        "expired": jwt.encode(
            {**claims, "iat": now - 7200, "exp": now - 3600}, JWT_SECRET, algorithm="HS256"
        ),
        "tampered": f"{header}.{_b64({**claims, 'sub': '1'})}.{signature}",
        "alg none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{payload}.",
        "wrong key": jwt.encode(claims, "another-secret-of-enough-length-0123456789", algorithm="HS256"),
        "wrong audience": jwt.encode({**claims, "aud": "someone-else"}, JWT_SECRET, algorithm="HS256"),
        "no exp": jwt.encode({k: v for k, v in claims.items() if k != "exp"}, JWT_SECRET, algorithm="HS256"),
        "HS512": jwt.encode(claims, JWT_SECRET, algorithm="HS512"),
    }
    assert (
        httpx.get(stack.url + "/api/auth/verify", headers={"Authorization": f"Bearer {good}"}).status_code
        == 200
    )
    for name, token in cases.items():
        r = httpx.get(stack.url + "/api/conversations", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401, name
        assert r.json()["error"]["type"] == "authentication_error", name
    expired = httpx.get(
        stack.url + "/api/auth/verify", headers={"Authorization": f"Bearer {cases['expired']}"}
    )
    assert expired.json()["error"]["code"] == "token_expired"


def test_no_credentials_is_401_outside_development_mode(stack: AccountsStack) -> None:
    for path in ("/api/conversations", "/v1/models", "/api/usage", "/api/keys"):
        r = httpx.get(stack.url + path)
        assert r.status_code == 401, path
        assert r.json()["error"]["request_id"]
    assert httpx.get(stack.url + "/health").status_code == 200


# --- API keys ---------------------------------------------------------------------------------


def test_a_key_works_with_the_openai_sdk_and_revoking_it_stops_it_on_every_api_process(
    stack: AccountsStack, alice: User
) -> None:
    created = httpx.post(stack.url + "/api/keys", json={"name": "laptop"}, headers=alice.headers)
    assert created.status_code == 201
    key = created.json()["key"]
    listed = httpx.get(stack.url + "/api/keys", headers=alice.headers).json()["keys"]
    assert [k["name"] for k in listed] == ["laptop"]
    assert key not in json.dumps(listed)  # shown once, never again
    assert listed[0]["prefix"] == key[:11]

    for url in stack.urls:  # both processes accept it (and cache it)
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        answer = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello there"}], max_tokens=5
        )
        assert answer.choices[0].message.content
    revoked = httpx.delete(f"{stack.url}/api/keys/{created.json()['id']}", headers=alice.headers)
    assert revoked.status_code == 204
    # The other process learns of it within its cache time.
    started = time.monotonic()
    while True:
        status = httpx.get(
            stack.urls[1] + "/v1/models", headers={"Authorization": f"Bearer {key}"}
        ).status_code
        if status == 401:
            break
        assert status == 200
        assert time.monotonic() - started < CACHE_S + 3, "revoked key still works on the second API process"
        time.sleep(0.1)
    assert httpx.get(stack.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401


def test_roles_users_cannot_manage_users(stack: AccountsStack, alice: User) -> None:
    assert httpx.get(stack.url + "/api/users", headers=alice.headers).status_code == 403
    r = httpx.post(
        stack.url + "/api/users", json={"username": "mallory", "password": "x" * 12}, headers=alice.headers
    )
    assert r.status_code == 403
    admin = _user(stack, "root", role="admin")
    names = [
        u["username"] for u in httpx.get(stack.url + "/api/users", headers=admin.headers).json()["users"]
    ]
    assert {"alice", "root"} <= set(names)


def test_a_disabled_user_is_refused_within_the_cache_time(stack: AccountsStack) -> None:
    carol = _user(stack, "carol")
    assert httpx.get(stack.url + "/api/conversations", headers=carol.headers).status_code == 200
    r = httpx.patch(f"{stack.url}/api/users/{carol.id}", json={"disabled": True}, headers=auth())
    assert r.status_code == 200 and r.json()["disabled"] is True
    time.sleep(CACHE_S + 0.2)
    for url in stack.urls:
        assert httpx.get(url + "/api/conversations", headers=carol.headers).status_code == 401
    assert (
        httpx.post(
            stack.url + "/api/auth/login", json={"username": "carol", "password": "pw-carol-12345"}
        ).status_code
        == 401
    )


def _refused(url: str, headers: dict[str, str]) -> bool:
    r = httpx.get(url + "/api/auth/verify", headers=headers, timeout=10)
    if r.status_code == 200:
        return False
    assert r.status_code == 401 and r.json()["error"]["code"] == "token_revoked", r.text
    return True


def _refused_everywhere(stack: AccountsStack, headers: dict[str, str]) -> None:
    """Refused at once where the change was made; elsewhere once its cached answer ends."""
    assert _refused(stack.url, headers)
    deadline = time.monotonic() + CACHE_S + 10
    for url in stack.urls[1:]:
        while not _refused(url, headers):
            assert time.monotonic() < deadline, f"{url} still takes the ended token"
            time.sleep(0.05)


def test_a_password_reset_by_an_admin_ends_earlier_tokens(stack: AccountsStack) -> None:
    ivy = _user(stack, "ivy")
    r = httpx.patch(f"{stack.url}/api/users/{ivy.id}", json={"password": "reset-by-admin-1"}, headers=auth())
    assert r.status_code == 200, r.text
    _refused_everywhere(stack, ivy.headers)
    fresh = login(stack.url, "ivy", "reset-by-admin-1")
    for url in stack.urls:
        assert httpx.get(url + "/api/auth/verify", headers=fresh).status_code == 200


def test_a_password_changed_from_the_command_line_ends_earlier_tokens(stack: AccountsStack) -> None:
    import os

    fay = _user(stack, "fay")
    done = run_python(
        *("-m", "stack.cli", "users", "passwd", "fay", "--password", "changed-by-cli-1"),
        env={**os.environ, **stack.env},
    )
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + CACHE_S + 10
    for url in stack.urls:  # no API process made this change: each notices within the cache time
        while not _refused(url, fay.headers):
            assert time.monotonic() < deadline, f"{url} still takes the ended token"
            time.sleep(0.05)
    assert (
        httpx.get(
            stack.url + "/api/auth/verify", headers=login(stack.url, "fay", "changed-by-cli-1")
        ).status_code
        == 200
    )


def test_logout_ends_the_token_and_a_new_login_works(stack: AccountsStack) -> None:
    hal = _user(stack, "hal")
    assert httpx.post(stack.url + "/api/auth/logout", headers=hal.headers).status_code == 204
    _refused_everywhere(stack, hal.headers)
    assert httpx.post(stack.url + "/api/auth/logout", headers=hal.headers).status_code == 401
    fresh = login(stack.url, "hal", "pw-hal-12345")
    for url in stack.urls:
        assert httpx.get(url + "/api/conversations", headers=fresh).status_code == 200
    # A key is not a login token: it is revoked, not logged out, and keeps working.
    key = httpx.post(stack.url + "/api/keys", json={"name": "k"}, headers=fresh).json()["key"]
    r = httpx.post(stack.url + "/api/auth/logout", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "not_a_token", r.text
    assert httpx.get(stack.url + "/api/auth/verify", headers=fresh).status_code == 200


def test_a_user_change_that_fails_midway_leaves_the_user_as_it_was(stack: AccountsStack) -> None:
    """PATCH /api/users/{id} is one transaction: a later statement that fails (here the
    e-mail, refused by a constraint) undoes the password and role changed before it."""
    import psycopg

    dora = _user(stack, "dora")
    refused = "refused@example.com"
    with psycopg.connect(stack.dsn, autocommit=True) as conn:
        conn.execute(
            f"ALTER TABLE users ADD CONSTRAINT test_refused_email CHECK (email <> '{refused}') NOT VALID"
        )
    try:
        r = httpx.patch(
            f"{stack.url}/api/users/{dora.id}",
            json={"password": "a-new-password-1", "role": "admin", "email": refused},
            headers=auth(),
            timeout=30,
        )
    finally:
        with psycopg.connect(stack.dsn, autocommit=True) as conn:
            conn.execute("ALTER TABLE users DROP CONSTRAINT test_refused_email")
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error", r.text
    login(stack.url, "dora", "pw-dora-12345")  # the old password still works
    r = httpx.post(stack.url + "/api/auth/login", json={"username": "dora", "password": "a-new-password-1"})
    assert r.status_code == 401
    users = httpx.get(stack.url + "/api/users", headers=auth()).json()["users"]
    assert next(u for u in users if u["id"] == dora.id)["role"] == "user"


# --- conversations ----------------------------------------------------------------------------


def test_back_to_back_turns_each_see_the_whole_history(stack: AccountsStack, alice: User) -> None:
    """Each turn is sent the moment the previous answer ended, alternating API processes;
    the engine's prompt token count (words, for the synthetic engine) shows exactly which
    history it was given."""
    questions = ["tell me about queues", "and brokers", "why streams", "what about workers", "thanks a lot"]
    seen: list[str] = []
    conversation_id = None
    for i, question in enumerate(questions):
        turn = chat(stack.urls[i % 2], alice.headers, question, conversation_id, max_tokens=6)
        conversation_id = conversation_id or turn.conversation_id
        assert turn.conversation_id == conversation_id
        assert turn.usage["prompt_tokens"] == words(*seen, question), (
            f"turn {i} was not given the whole history"
        )
        assert turn.usage["completion_tokens"] == 6
        seen += [question, turn.text]
    stored = httpx.get(f"{stack.url}/api/conversations/{conversation_id}", headers=alice.headers).json()
    assert [m["content"] for m in stored["messages"]] == seen
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"] * len(questions)
    answer = stored["messages"][1]
    assert answer["token_out"] == 6 and answer["token_in"] == words(questions[0])


def test_regenerate_and_edit_replace_the_last_turn(stack: AccountsStack, alice: User) -> None:
    first = chat(stack.url, alice.headers, "one question", max_tokens=4)
    cid = first.conversation_id
    second = chat(stack.url, alice.headers, "second question", cid, max_tokens=4)
    # Regenerate: the same question again, without the old answer in the prompt.
    again = chat(stack.url, alice.headers, "second question", cid, max_tokens=5, replace_last=True)
    assert again.usage["prompt_tokens"] == words("one question", first.text, "second question")
    # Edit and resend: another question in its place.
    edited = chat(stack.url, alice.headers, "an edited question", cid, max_tokens=4, replace_last=True)
    assert edited.usage["prompt_tokens"] == words("one question", first.text, "an edited question")
    stored = httpx.get(f"{stack.url}/api/conversations/{cid}", headers=alice.headers).json()["messages"]
    assert [m["content"] for m in stored] == ["one question", first.text, "an edited question", edited.text]
    assert [m["position"] for m in stored] == [0, 1, 2, 3]
    assert second.text not in [m["content"] for m in stored] or second.text == edited.text
    r = httpx.post(
        stack.url + "/api/chat", json={"message": "x", "replace_last": True}, headers=alice.headers
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "replace_last"


def test_the_system_prompt_from_settings_is_used_and_kept(stack: AccountsStack, bob: User) -> None:
    system = "you are a terse assistant"
    r = httpx.put(
        stack.url + "/api/me/settings",
        json={"system_prompt": system, "params": {"max_tokens": 4}},
        headers=bob.headers,
    )
    assert r.status_code == 200, r.text
    assert httpx.get(stack.url + "/api/me/settings", headers=bob.headers).json()["system_prompt"] == system
    first = chat(stack.url, bob.headers, "hello")
    assert first.usage == {**first.usage, "prompt_tokens": words(system, "hello"), "completion_tokens": 4}
    second = chat(stack.url, bob.headers, "again", first.conversation_id)
    assert second.usage["prompt_tokens"] == words(system, "hello", first.text, "again")
    httpx.put(stack.url + "/api/me/settings", json={}, headers=bob.headers)


def test_the_title_appears_after_the_first_answer(stack: AccountsStack, alice: User) -> None:
    turn = chat(stack.url, alice.headers, "how do message queues work", max_tokens=5)
    deadline = time.monotonic() + 20
    title = None
    while time.monotonic() < deadline and not title:
        title = httpx.get(
            f"{stack.url}/api/conversations/{turn.conversation_id}", headers=alice.headers
        ).json()["title"]
        time.sleep(0.2)
    assert title, "no title within 20 s"
    listed = httpx.get(stack.url + "/api/conversations", headers=alice.headers).json()["conversations"]
    assert any(c["id"] == turn.conversation_id and c["title"] == title for c in listed)


def test_conversation_crud_and_pages(stack: AccountsStack) -> None:
    dave = _user(stack, "dave")
    ids = []
    for i in range(5):
        r = httpx.post(stack.url + "/api/conversations", json={"title": f"topic {i}"}, headers=dave.headers)
        assert r.status_code == 201
        ids.append(r.json()["id"])
    page = httpx.get(stack.url + "/api/conversations?limit=2", headers=dave.headers).json()
    seen = [c["id"] for c in page["conversations"]]
    while page["next"]:
        page = httpx.get(
            stack.url + "/api/conversations",
            params={"limit": 2, "before": page["next"]},
            headers=dave.headers,
        ).json()
        seen += [c["id"] for c in page["conversations"]]
    assert seen == list(reversed(ids))  # newest first, each once
    r = httpx.patch(
        f"{stack.url}/api/conversations/{ids[0]}", json={"title": "renamed"}, headers=dave.headers
    )
    assert r.json()["title"] == "renamed"
    found = httpx.get(stack.url + "/api/conversations?q=renam", headers=dave.headers).json()["conversations"]
    assert [c["id"] for c in found] == [ids[0]]
    assert httpx.delete(f"{stack.url}/api/conversations/{ids[0]}", headers=dave.headers).status_code == 204
    assert httpx.get(f"{stack.url}/api/conversations/{ids[0]}", headers=dave.headers).status_code == 404


def test_another_users_things_answer_404(stack: AccountsStack, alice: User, bob: User) -> None:
    turn = chat(stack.url, alice.headers, "a private question", max_tokens=3)
    key = httpx.post(stack.url + "/api/keys", json={"name": "alice's"}, headers=alice.headers).json()
    cid = turn.conversation_id
    attempts = {
        "read conversation": ("GET", f"/api/conversations/{cid}", None),
        "rename conversation": ("PATCH", f"/api/conversations/{cid}", {"title": "mine now"}),
        "delete conversation": ("DELETE", f"/api/conversations/{cid}", None),
        "continue conversation": ("POST", "/api/chat", {"message": "hi", "conversation_id": cid}),
        "revoke key": ("DELETE", f"/api/keys/{key['id']}", None),
        "read usage": ("GET", "/api/usage?user=alice", None),
        "not a conversation id": ("GET", "/api/conversations/not-a-uuid", None),
    }
    for name, (method, path, body) in attempts.items():
        r = httpx.request(method, stack.url + path, json=body, headers=bob.headers, timeout=30)
        assert r.status_code == 404, f"{name}: {r.status_code} {r.text}"
        assert "private" not in r.text
    # And nothing changed for alice.
    mine = httpx.get(f"{stack.url}/api/conversations/{cid}", headers=alice.headers).json()
    assert mine["title"] != "mine now" and mine["messages"][0]["content"] == "a private question"
    assert (
        httpx.get(stack.url + "/v1/models", headers={"Authorization": f"Bearer {key['key']}"}).status_code
        == 200
    )


def test_usage_rows_equal_what_the_engine_reported_cancelled_included(stack: AccountsStack) -> None:
    erin = _user(stack, "erin")
    done = chat(stack.url, erin.headers, "count these four", max_tokens=7)
    # A stream the client drops half way: its partial tokens are billed.
    with httpx.stream(
        "POST",
        stack.url + "/api/chat",
        json={"message": "a long one please", "max_tokens": 4000},
        headers=erin.headers,
        timeout=60,
    ) as response:
        events = sse_events(response.iter_lines())
        dropped = next(events).json()["request_id"]
        for n, _ in enumerate(events):
            if n > 40:
                break
    cancelled_event = asyncio.run(find_event(stack.nats_url, dropped, "cancelled", timeout=20))
    assert 0 < cancelled_event.usage.completion_tokens < 4000
    deadline = time.monotonic() + 20
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = httpx.get(stack.url + "/api/usage", headers=erin.headers).json()["rows"]
        statuses = {r["request_id"]: r["status"] for r in rows}
        if statuses.get(done.request_id) == "completed" and statuses.get(dropped) == "cancelled":
            break
        time.sleep(0.3)
    by_id = {r["request_id"]: r for r in rows}
    assert by_id[done.request_id]["completion_tokens"] == done.usage["completion_tokens"] == 7
    assert by_id[done.request_id]["prompt_tokens"] == done.usage["prompt_tokens"]
    assert by_id[dropped]["status"] == "cancelled"
    assert by_id[dropped]["completion_tokens"] == cancelled_event.usage.completion_tokens
    assert by_id[dropped]["prompt_tokens"] == cancelled_event.usage.prompt_tokens
    totals = httpx.get(stack.url + "/api/usage", headers=erin.headers).json()["totals"]
    assert totals["completion_tokens"] == sum(r["completion_tokens"] or 0 for r in rows)


def test_a_first_turn_refused_before_it_started_leaves_no_conversation(stack: AccountsStack) -> None:
    frank = _user(stack, "frank")
    too_many = {"message": "hi", "max_tokens": 100_000}
    r = httpx.post(stack.url + "/api/chat", json=too_many, headers=frank.headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert httpx.get(stack.url + "/api/conversations", headers=frank.headers).json()["conversations"] == []


def test_service_keys_have_no_conversations(stack: AccountsStack) -> None:
    r = httpx.post(stack.url + "/api/chat", json={"message": "hi", "conversation_id": "x"}, headers=auth())
    assert r.status_code == 403 and r.json()["error"]["code"] == "account_required"


def test_a_model_alias_is_stored_as_its_profile_id(stack: AccountsStack, alice: User) -> None:
    # What /api/chat accepts, the defaults accept too; they keep the id, not the alias.
    r = httpx.put(stack.url + "/api/me/settings", json={"model": "qwen-0.5b"}, headers=alice.headers)
    assert r.status_code == 200, r.text
    got = httpx.get(stack.url + "/api/me/settings", headers=alice.headers).json()
    assert got["model"] == "Qwen2.5-0.5B-Instruct"
    httpx.put(stack.url + "/api/me/settings", json={}, headers=alice.headers)
    r = httpx.post(stack.url + "/api/conversations", json={"model": "qwen2.5-0.5b"}, headers=alice.headers)
    assert r.status_code == 201 and r.json()["model"] == "Qwen2.5-0.5B-Instruct", r.text
    r = httpx.patch(
        f"{stack.url}/api/conversations/{r.json()['id']}", json={"model": "qwen-0.5b"}, headers=alice.headers
    )
    assert r.status_code == 200 and r.json()["model"] == "Qwen2.5-0.5B-Instruct", r.text
    r = httpx.put(stack.url + "/api/me/settings", json={"model": "no-such-model"}, headers=alice.headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_unknown_fields_and_bad_bodies_are_400(stack: AccountsStack, alice: User) -> None:
    r = httpx.post(
        stack.url + "/api/chat", json={"message": "hi", "conversation": "x"}, headers=alice.headers
    )
    assert r.status_code == 400
    r = httpx.put(stack.url + "/api/me/settings", json={"params": {"temperature": 9}}, headers=alice.headers)
    assert r.status_code == 400 and "temperature" in (r.json()["error"]["param"] or "")
    r = httpx.post(stack.url + "/api/auth/login", content=b"not json")
    assert r.status_code == 400


def test_postgres_down_then_back_known_keys_keep_working_and_nothing_is_lost(stack: AccountsStack) -> None:
    """Runs last in this module: PostgreSQL goes away under a stream of requests. A key
    already known keeps working (nobody can revoke it meanwhile), what needs the database
    says 503, and once it is back every request's usage row is there exactly once."""
    gina = _user(stack, "gina")
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
