"""Accounts end to end (one stack for the package, tests/integration/accounts/conftest.py):
login and tokens, keys and their revocation across API processes, roles, password changes
and logout. Runs first in the package (the files run in name order)."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import httpx
import jwt
import openai

from tests.accounts import CACHE_S, MODEL, User, make_user
from tests.helpers import (
    JWT_SECRET,
    AccountsStack,
    auth,
    login,
    run_python,
    wait_until,
)

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
    admin = make_user(stack, "root", role="admin")
    names = [
        u["username"] for u in httpx.get(stack.url + "/api/users", headers=admin.headers).json()["users"]
    ]
    assert {"alice", "root"} <= set(names)


def test_a_disabled_user_is_refused_within_the_cache_time(stack: AccountsStack) -> None:
    carol = make_user(stack, "carol")
    assert httpx.get(stack.url + "/api/conversations", headers=carol.headers).status_code == 200
    r = httpx.patch(f"{stack.url}/api/users/{carol.id}", json={"disabled": True}, headers=auth())
    assert r.status_code == 200 and r.json()["disabled"] is True
    # Each API process has the account cached for up to CACHE_S: waited for, not slept.
    for url in stack.urls:
        wait_until(
            f"{url} refuses carol",
            lambda url=url: httpx.get(url + "/api/conversations", headers=carol.headers).status_code == 401,
            CACHE_S + 5,
            0.05,
        )
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
    ivy = make_user(stack, "ivy")
    r = httpx.patch(f"{stack.url}/api/users/{ivy.id}", json={"password": "reset-by-admin-1"}, headers=auth())
    assert r.status_code == 200, r.text
    _refused_everywhere(stack, ivy.headers)
    fresh = login(stack.url, "ivy", "reset-by-admin-1")
    for url in stack.urls:
        assert httpx.get(url + "/api/auth/verify", headers=fresh).status_code == 200


def test_a_password_changed_from_the_command_line_ends_earlier_tokens(stack: AccountsStack) -> None:
    import os

    fay = make_user(stack, "fay")
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
    hal = make_user(stack, "hal")
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

    dora = make_user(stack, "dora")
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
