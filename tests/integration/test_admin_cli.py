"""`chatq migrate | users | keys` as a process, against a real (embedded) PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from database import accounts
from database import schema as migrations_db
from stack.servers import EmbeddedPostgres
from tests.helpers import ROOT


@dataclass
class Db:
    pg: EmbeddedPostgres
    dsn: str
    home: Path


@pytest.fixture
def own_tmp() -> Iterator[Path]:
    """A folder outside pytest's basetemp: a concurrent pytest run may remove or chmod that one
    while PostgreSQL (its own system user when run as root) still works in it."""
    path = Path(tempfile.mkdtemp(prefix="chatq-admin-cli-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def db() -> Iterator[Db]:
    root = Path(tempfile.mkdtemp(prefix="chatq-admin-cli-"))
    pg = EmbeddedPostgres(root / "pg")
    try:
        dsn = pg.start()
        yield Db(pg, dsn, root / "home")
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


def chatq(
    *args: str, dsn: str | None, home: Path, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CHATQ_API_KEYS")}
    env["CHATQ_HOME"] = str(home)
    if dsn is not None:
        env["DATABASE_URL"] = dsn
    return subprocess.run(
        [sys.executable, "-m", "stack.cli", *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


def ok(db: Db, *args: str, stdin: str | None = None) -> str:
    done = chatq(*args, dsn=db.dsn, home=db.home, stdin=stdin)
    assert done.returncode == 0, f"chatq {' '.join(args)}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def fails(db: Db, *args: str, message: str, stdin: str | None = None) -> None:
    """Exit code 1 and the message as the one line on stderr."""
    done = chatq(*args, dsn=db.dsn, home=db.home, stdin=stdin)
    assert done.returncode == 1, f"chatq {' '.join(args)}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert done.stderr.strip().splitlines() == [f"chatq: {message}"], done.stderr


def query(dsn: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def execute(dsn: str, sql: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql)


def test_migrate_applies_then_is_up_to_date(db: Db) -> None:
    execute(db.dsn, "CREATE DATABASE migrate_twice")
    fresh = Db(db.pg, make_conninfo(db.dsn, dbname="migrate_twice"), db.home)
    assert ok(fresh, "migrate").strip() == "applied " + ", ".join(m.name for m in migrations_db.migrations())
    assert ok(fresh, "migrate").strip() == "the database is up to date"
    assert query(fresh.dsn, "SELECT version FROM schema_migrations ORDER BY version") == [
        (m.version,) for m in migrations_db.migrations()
    ]


def test_users(db: Db) -> None:
    assert ok(
        db, "users", "add", "alice", "--password", "alice-secret", "--email", "a@example.org"
    ).startswith("created user alice")
    assert ok(db, "users", "add", "root", "--password", "root-secret", "--role", "admin").startswith(
        "created admin root"
    )
    # No --password: the first line of stdin (a terminal would be asked twice with getpass).
    ok(db, "users", "add", "carol", stdin="carol-from-stdin\n")
    rows = query(db.dsn, "SELECT username, role, email, disabled FROM users ORDER BY id")
    assert rows == [
        ("alice", "user", "a@example.org", False),
        ("root", "admin", None, False),
        ("carol", "user", None, False),
    ]
    (carol_hash,) = query(db.dsn, "SELECT password_hash FROM users WHERE username = 'carol'")[0]
    assert accounts.verify_password(carol_hash, "carol-from-stdin")

    lines = ok(db, "users", "list").splitlines()
    assert lines[0].split() == [
        "ID",
        "USERNAME",
        "ROLE",
        "DISABLED",
        "CREATED",
        "(UTC)",
        "LAST",
        "LOGIN",
        "(UTC)",
    ]
    table = {line.split()[1]: line.split() for line in lines[1:]}
    assert set(table) == {"alice", "root", "carol"}
    assert table["root"][2:4] == ["admin", "no"]
    assert table["alice"][-1] == "-"  # never logged in

    ok(db, "users", "passwd", "alice", "--password", "a-new-password")
    (alice_hash,) = query(db.dsn, "SELECT password_hash FROM users WHERE username = 'alice'")[0]
    assert accounts.verify_password(alice_hash, "a-new-password")
    assert not accounts.verify_password(alice_hash, "alice-secret")

    ok(db, "users", "disable", "carol")
    assert query(db.dsn, "SELECT disabled FROM users WHERE username = 'carol'") == [(True,)]
    carol = next(line.split() for line in ok(db, "users", "list").splitlines() if " carol " in line)
    assert carol[2:4] == ["user", "yes"]
    ok(db, "users", "enable", "carol")
    assert query(db.dsn, "SELECT disabled FROM users WHERE username = 'carol'") == [(False,)]


def test_user_errors(db: Db) -> None:
    ok(db, "users", "add", "dave", "--password", "dave-secret")
    fails(db, "users", "add", "dave", "--password", "another-one", message="the username 'dave' is taken")
    fails(db, "users", "add", "erin", "--password", "short", message="a password has at least 8 characters")
    fails(db, "users", "add", "no spaces", "--password", "long-enough",
          message="a username is 1 to 64 letters, digits or . _ @ -")  # fmt: skip
    fails(db, "users", "passwd", "nobody", "--password", "long-enough", message="no user 'nobody'")
    fails(
        db, "users", "passwd", "dave", "--password", "short", message="a password has at least 8 characters"
    )
    fails(db, "users", "disable", "nobody", message="no user 'nobody'")
    fails(db, "users", "enable", "nobody", message="no user 'nobody'")
    fails(db, "users", "add", "frank", message="no password: give --password, or one line on stdin")
    assert query(db.dsn, "SELECT count(*) FROM users WHERE username IN ('erin', 'frank')") == [(0,)]


def test_keys(db: Db) -> None:
    ok(db, "users", "add", "kim", "--password", "kim-secret")
    done = chatq("keys", "create", "kim", "--name", "laptop", dsn=db.dsn, home=db.home)
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()  # the key alone on stdout; what it is on stderr
    assert key.startswith("cq-") and len(key) > 40
    assert "shown only this once" in done.stderr
    rows = query(
        db.dsn,
        "SELECT k.id, k.name, k.revoked_at, u.username FROM api_keys k JOIN users u ON u.id = k.user_id "
        "WHERE k.key_sha256 = %s",
        accounts.key_digest(key),
    )
    assert len(rows) == 1
    key_id, name, revoked_at, username = rows[0]
    assert (name, revoked_at, username) == ("laptop", None, "kim")

    listed = ok(db, "keys", "list", "kim")
    assert key[: accounts.SHOWN_PREFIX_LENGTH] in listed
    assert key not in listed  # never the key itself
    assert str(key_id) in ok(db, "keys", "list").split()

    assert ok(db, "keys", "revoke", str(key_id)).startswith(f"revoked API key {key_id}")
    assert query(db.dsn, "SELECT revoked_at IS NOT NULL FROM api_keys WHERE id = %s", key_id) == [(True,)]

    fails(db, "keys", "revoke", "999999", message="no API key 999999")
    fails(db, "keys", "create", "nobody", message="no user 'nobody'")
    fails(db, "keys", "list", "nobody", message="no user 'nobody'")


def test_unreachable_database_is_one_line(db: Db, own_tmp: Path) -> None:
    dsn = make_conninfo(db.dsn, dbname="no_such_database")
    done = chatq("users", "list", dsn=dsn, home=own_tmp)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chatq: the database is unreachable:"), done.stderr


def _running(pgdata: Path) -> bool:
    return (pgdata / "postmaster.pid").exists()


def test_embedded_postgres_without_database_url(own_tmp: Path) -> None:
    """No DATABASE_URL: the state folder's PostgreSQL, stopped again only if the CLI started it."""
    home = own_tmp / "home"
    home.mkdir()
    pgdata = home / "postgres"

    done = chatq("users", "add", "solo", "--password", "solo-secret", dsn=None, home=home)
    assert done.returncode == 0, done.stderr
    assert not _running(pgdata), "the CLI started PostgreSQL, so it stops it again"

    # A running chatq holds the server: the CLI uses it and leaves it running.
    server = EmbeddedPostgres(pgdata)
    dsn = server.start()
    try:
        done = chatq("users", "list", dsn=None, home=home)
        assert done.returncode == 0, done.stderr
        assert "solo" in done.stdout
        assert _running(pgdata)
        assert query(dsn, "SELECT username FROM users") == [("solo",)]
    finally:
        server.stop()
    assert not _running(pgdata)


def test_accounts_made_by_the_cli_sign_in(db: Db) -> None:
    """What the CLI stored is what the API checks (same hash and digest functions)."""
    ok(db, "users", "add", "lee", "--password", "lee-secret")

    async def check() -> None:
        async with await psycopg.AsyncConnection.connect(db.dsn, autocommit=True) as conn:
            found = await accounts.find_user(conn, "lee")
            assert found is not None
            user, password_hash = found
            assert user.role == "user" and not user.disabled
            assert accounts.verify_password(password_hash, "lee-secret")

    asyncio.run(check())
