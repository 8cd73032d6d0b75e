"""Users and API keys in PostgreSQL: argon2id passwords, keys stored as SHA-256 digests.

Shared by the API (login, key management) and the `chatq users` / `chatq keys` commands.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
from typing import Any

import msgspec
import psycopg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from psycopg.rows import dict_row

from chatq.settings import ROLES

KEY_PREFIX = "cq-"
# The part of a key shown in lists: "cq-" and 8 characters, too little to guess the rest.
SHOWN_PREFIX_LENGTH = 11
USERNAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_PASSWORD_LENGTH = 8
# argon2-cffi's defaults: argon2id, RFC 9106's low-memory profile (64 MiB, t=3, p=4).
_hasher = PasswordHasher()
# Verified against when the user does not exist, so that answer takes as long as a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


class AccountError(ValueError):
    """A user or key operation cannot be done as asked (the message says why)."""


class User(msgspec.Struct, frozen=True):
    id: int
    username: str
    role: str
    email: str | None
    disabled: bool
    system_prompt: str | None
    default_model: str | None
    default_params: dict[str, Any]
    created_at: dt.datetime
    last_login_at: dt.datetime | None


class ApiKey(msgspec.Struct, frozen=True):
    id: int
    user_id: int
    name: str
    prefix: str
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Whether the password matches; with no hash (no such user) it costs the same and fails."""
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def new_key() -> tuple[str, bytes, str]:
    """A fresh API key, its digest and its shown prefix; only the digest is stored."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, key_digest(key), key[:SHOWN_PREFIX_LENGTH]


def check_username(username: str) -> str:
    if not USERNAME.match(username):
        raise AccountError("a username is 1 to 64 letters, digits or . _ @ -")
    return username


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"a password has at least {MIN_PASSWORD_LENGTH} characters")
    return password


def check_role(role: str) -> str:
    if role not in ROLES:
        raise AccountError(f"a role is one of {', '.join(ROLES)}, not {role!r}")
    return role


Conn = psycopg.AsyncConnection[Any]
_USER_COLUMNS = (
    "id, username, role, email, disabled, system_prompt, default_model, default_params, "
    "created_at, last_login_at"
)
_KEY_COLUMNS = "id, user_id, name, prefix, created_at, last_used_at, revoked_at"


async def create_user(
    conn: Conn,
    username: str,
    password: str,
    *,
    role: str = "user",
    email: str | None = None,
    check: bool = True,
) -> User:
    """A new user; AccountError when the name is taken or a value is not allowed.

    check=False skips the password length rule (development mode's seeded test/test).
    """
    check_username(username)
    check_role(role)
    if check:
        check_password(password)
    try:
        async with conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                f"INSERT INTO users (username, password_hash, role, email) VALUES (%s, %s, %s, %s) "
                f"RETURNING {_USER_COLUMNS}",
                (username, hash_password(password), role, email),
            )
            row = await cur.fetchone()
    except psycopg.errors.UniqueViolation:
        raise AccountError(f"the username {username!r} is taken") from None
    assert row is not None
    return msgspec.convert(row, User)


async def find_user(conn: Conn, username: str) -> tuple[User, str] | None:
    """A user and their password hash, by name."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(f"SELECT {_USER_COLUMNS}, password_hash FROM users WHERE username = %s", (username,))
    row = await cur.fetchone()
    if row is None:
        return None
    password_hash = row.pop("password_hash")
    return msgspec.convert(row, User), password_hash


async def get_user(conn: Conn, user_id: int) -> User | None:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE id = %s", (user_id,))
    row = await cur.fetchone()
    return None if row is None else msgspec.convert(row, User)


async def list_users(conn: Conn) -> list[User]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(f"SELECT {_USER_COLUMNS} FROM users ORDER BY id")
    return [msgspec.convert(row, User) for row in await cur.fetchall()]


async def set_password(conn: Conn, username: str, password: str) -> None:
    """A new password; it ends every login token issued before (token_version + 1)."""
    check_password(password)
    cur = await conn.execute(
        "UPDATE users SET password_hash = %s, token_version = token_version + 1 WHERE username = %s",
        (hash_password(password), username),
    )
    if cur.rowcount == 0:
        raise AccountError(f"no user {username!r}")


async def end_tokens(conn: Conn, user_id: int) -> None:
    """End every login token the user holds (logout): token_version + 1."""
    await conn.execute("UPDATE users SET token_version = token_version + 1 WHERE id = %s", (user_id,))


async def set_disabled(conn: Conn, user_id: int, disabled: bool) -> None:
    cur = await conn.execute("UPDATE users SET disabled = %s WHERE id = %s", (disabled, user_id))
    if cur.rowcount == 0:
        raise AccountError(f"no user with id {user_id}")


async def user_id_of(conn: Conn, username: str) -> int:
    cur = await conn.execute("SELECT id FROM users WHERE username = %s", (username,))
    row = await cur.fetchone()
    if row is None:
        raise AccountError(f"no user {username!r}")
    return int(row[0])


async def create_key(conn: Conn, user_id: int, name: str) -> tuple[ApiKey, str]:
    """A new key for the user: its record and the key itself (shown once, never stored)."""
    name = name.strip()
    if not name or len(name) > 100:
        raise AccountError("a key's name is 1 to 100 characters")
    key, digest, prefix = new_key()
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        f"INSERT INTO api_keys (user_id, name, key_sha256, prefix) VALUES (%s, %s, %s, %s) "
        f"RETURNING {_KEY_COLUMNS}",
        (user_id, name, digest, prefix),
    )
    row = await cur.fetchone()
    assert row is not None
    return msgspec.convert(row, ApiKey), key


async def list_keys(conn: Conn, user_id: int | None = None) -> list[ApiKey]:
    """A user's keys (every key for None), newest first."""
    cur = conn.cursor(row_factory=dict_row)
    if user_id is None:
        await cur.execute(f"SELECT {_KEY_COLUMNS} FROM api_keys ORDER BY id DESC")
    else:
        await cur.execute(
            f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE user_id = %s ORDER BY id DESC", (user_id,)
        )
    return [msgspec.convert(row, ApiKey) for row in await cur.fetchall()]


async def revoke_key(conn: Conn, key_id: int, *, user_id: int | None = None) -> bool:
    """Revoke a key (only the user's own when user_id is given); False when there is none."""
    if user_id is None:
        cur = await conn.execute(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE id = %s", (key_id,)
        )
    else:
        cur = await conn.execute(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE id = %s AND user_id = %s",
            (key_id, user_id),
        )
    return cur.rowcount > 0


async def seed_development_accounts(conn: Conn) -> list[str]:
    """Development mode's test accounts admin/admin123 and test/test, where missing."""
    made = []
    for username, password, role in (("admin", "admin123", "admin"), ("test", "test", "user")):
        if await find_user(conn, username) is None:
            try:
                await create_user(conn, username, password, role=role, check=False)
                made.append(username)
            except AccountError:
                pass  # another process made it first
    return made
