"""database.schema.migrate against a real (embedded) PostgreSQL: data kept, idempotent, one at a time."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from database import schema
from tests.persistence import private_postgres

ALL = [m.name for m in schema.migrations()]

T0 = dt.datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    pg = private_postgres()
    dsn = pg.start()
    try:
        yield dsn
    finally:
        pg.stop()
        shutil.rmtree(pg.data_dir.parent, ignore_errors=True)


@pytest.fixture
async def dsn(server: str) -> AsyncIterator[str]:
    """A database of the test's own on the shared server, dropped afterwards."""
    name = f"m_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(server, autocommit=True) as admin:
        await admin.execute(f"CREATE DATABASE {name}")
    yield make_conninfo(server, dbname=name)
    async with await psycopg.AsyncConnection.connect(server, autocommit=True) as admin:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


def only_first(tmp_path: Path) -> Path:
    """A migrations directory holding 0001 alone: the schema before accounts."""
    directory = tmp_path / "migrations"
    directory.mkdir()
    shutil.copy(schema.MIGRATIONS_DIR / "0001_initial.sql", directory)
    return directory


async def fetch(dsn: str, sql: str) -> list[tuple[object, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(sql)
        return await cur.fetchall()


async def snapshot(dsn: str) -> dict[str, list[tuple[object, ...]]]:
    """Every row of the tables a migration touches, and the migrations applied."""
    return {
        "schema_migrations": await fetch(dsn, "SELECT * FROM schema_migrations ORDER BY version"),
        "requests": await fetch(dsn, "SELECT * FROM requests ORDER BY request_id"),
        "messages": await fetch(dsn, "SELECT * FROM messages ORDER BY request_id, position"),
        "tables": await fetch(
            dsn,
            "SELECT table_name, column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = 'public' ORDER BY table_name, column_name",
        ),
        "indexes": await fetch(
            dsn, "SELECT indexname FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1"
        ),
    }


OLD_REQUESTS = [
    # request_id, model, user_id, status, accepted_at, finished_at, worker_id, finish_reason,
    # error_code, error_message, ttft_ms, duration_ms
    (
        "done",
        "m1",
        "alice",
        "completed",
        T0,
        T0 + dt.timedelta(seconds=2),
        "w1",
        "stop",
        None,
        None,
        120.5,
        2000.0,
    ),
    (
        "cut",
        "m1",
        None,
        "cancelled",
        T0,
        T0 + dt.timedelta(seconds=1),
        "w2",
        "cancelled",
        None,
        "gone",
        None,
        900.0,
    ),
    (
        "bad",
        "m2",
        "bob",
        "failed",
        T0,
        T0 + dt.timedelta(seconds=3),
        None,
        None,
        "engine_error",
        "boom",
        None,
        None,
    ),
    ("waiting", "m2", "carol", "accepted", T0, None, None, None, None, None, None, None),
]
OLD_MESSAGES = [
    ("done", 0, "system", "be brief"),
    ("done", 1, "user", "hi"),
    ("done", 1_000_000, "assistant", "hello there"),
    ("cut", 0, "user", "tell me a story"),
    ("cut", 1_000_000, "assistant", "once upon"),
    ("bad", 0, "user", "ünïcode ✓"),
    ("waiting", 0, "user", "anyone?"),
]
OLD_USAGE = [
    # request_id, model, user_id, prompt_tokens, completion_tokens, recorded_at
    ("done", "m1", "alice", 12, 34, T0 + dt.timedelta(seconds=2)),
    ("cut", "m1", None, 5, 3, T0 + dt.timedelta(seconds=1)),
    # Usage of a request whose row is missing (written by an older worker, or deleted).
    ("orphan", "m3", "dave", 7, 8, T0 + dt.timedelta(seconds=9)),
]


async def old_database(dsn: str, tmp_path: Path, *, legacy: bool) -> None:
    """A database as chatq left it before accounts, holding requests, messages and usage.

    legacy: made by the persistence worker's old CREATE TABLE IF NOT EXISTS, with no
    schema_migrations table; else by migrate() when 0001 was the only migration.
    """
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        if legacy:
            await conn.execute((schema.MIGRATIONS_DIR / "0001_initial.sql").read_bytes())
            await conn.commit()
        else:
            assert await schema.migrate(conn, only_first(tmp_path)) == ["0001_initial"]
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO chat_requests VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                OLD_REQUESTS,
            )
            await cur.executemany("INSERT INTO chat_messages VALUES (%s, %s, %s, %s)", OLD_MESSAGES)
            await cur.executemany("INSERT INTO usage VALUES (%s, %s, %s, %s, %s, %s)", OLD_USAGE)
        await conn.commit()


@pytest.mark.parametrize("legacy", [False, True], ids=["migrated-0001", "pre-migrations"])
async def test_migrating_an_old_database_keeps_every_row_and_figure(
    dsn: str, tmp_path: Path, legacy: bool
) -> None:
    await old_database(dsn, tmp_path, legacy=legacy)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        applied = await schema.migrate(conn)
    assert applied == (ALL if legacy else ALL[1:])
    assert [
        row[:2] for row in await fetch(dsn, "SELECT version, name FROM schema_migrations ORDER BY 1")
    ] == [(m.version, m.name) for m in schema.migrations()]

    # Each request keeps its figures; usage is folded in; the orphan usage row becomes a request.
    found = await fetch(
        dsn,
        "SELECT request_id, model, client_user, status, created_at, finished_at, worker_id, finish_reason,"
        " error_code, error_message, ttft_ms, duration_ms, prompt_tokens, completion_tokens,"
        " user_id, key_id, conversation_id, priority, purpose FROM requests ORDER BY request_id",
    )
    usage = {u[0]: (u[3], u[4]) for u in OLD_USAGE}
    expected = [
        (*r, *usage.get(str(r[0]), (None, None)), None, None, None, None, "chat") for r in OLD_REQUESTS
    ]
    # No start, worker or outcome is known for it: NULL, not made up.
    unknown = (None, None, None, None, None, None)
    orphan = ("orphan", "m3", "dave", "completed", None, T0 + dt.timedelta(seconds=9), *unknown, 7, 8)
    expected.append((*orphan, None, None, None, None, "chat"))
    assert found == sorted(expected, key=lambda row: str(row[0]))
    # Billing totals are what they were.
    assert await fetch(dsn, "SELECT sum(prompt_tokens), sum(completion_tokens) FROM requests") == [(24, 45)]

    # Every message text, at its position, with the new columns empty.
    assert await fetch(
        dsn,
        "SELECT request_id, position, role, content, conversation_id, token_in, token_out FROM messages"
        " ORDER BY request_id, position",
    ) == sorted((*m, None, None, None) for m in OLD_MESSAGES)
    assert await fetch(dsn, "SELECT count(*) FROM messages WHERE created_at IS NULL") == [(0,)]

    # The old tables are gone.
    assert await fetch(
        dsn,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
    ) == [
        ("api_keys",),
        ("conversations",),
        ("messages",),
        ("requests",),
        ("schema_migrations",),
        ("users",),
    ]

    # Migrating again changes nothing: same migration rows (same applied_at), same data.
    before = await snapshot(dsn)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        assert await schema.migrate(conn) == []
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        assert await schema.migrate(conn) == []  # the same from an autocommit connection
    assert await snapshot(dsn) == before


async def test_two_concurrent_migrations_apply_each_file_once(dsn: str, tmp_path: Path) -> None:
    await old_database(dsn, tmp_path, legacy=False)
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as holder,
        await psycopg.AsyncConnection.connect(dsn) as first,
        await psycopg.AsyncConnection.connect(dsn) as second,
    ):
        # Hold the migration lock so that both migrations are surely waiting at once.
        await holder.execute("SELECT pg_advisory_lock(%s)", (schema._LOCK_ID,))
        runs = [asyncio.create_task(schema.migrate(conn)) for conn in (first, second)]
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            cur = await holder.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            )
            row = await cur.fetchone()
            if row is not None and row[0] == 2:
                break
            assert asyncio.get_running_loop().time() < deadline, (
                "the two migrations never waited for the lock"
            )
            await asyncio.sleep(0.05)
        await holder.execute("SELECT pg_advisory_unlock(%s)", (schema._LOCK_ID,))
        results = await asyncio.gather(*runs)
    # One of them applied the rest, the other found nothing left to do.
    assert sorted(results) == [[], ALL[1:]]
    assert [
        row[:2] for row in await fetch(dsn, "SELECT version, name FROM schema_migrations ORDER BY 1")
    ] == [(m.version, m.name) for m in schema.migrations()]
    assert await fetch(dsn, "SELECT count(*), sum(completion_tokens) FROM requests") == [(5, 45)]
    assert await fetch(dsn, "SELECT count(*) FROM messages") == [(len(OLD_MESSAGES),)]


async def test_two_concurrent_migrations_of_an_empty_database(dsn: str) -> None:
    """Neither has made schema_migrations yet: still each file once, and one schema."""
    async with (
        await psycopg.AsyncConnection.connect(dsn) as first,
        await psycopg.AsyncConnection.connect(dsn) as second,
    ):
        results = await asyncio.gather(schema.migrate(first), schema.migrate(second))
    assert sorted(results) == [[], ALL]
    assert await fetch(dsn, "SELECT version FROM schema_migrations ORDER BY 1") == [
        (m.version,) for m in schema.migrations()
    ]


async def test_a_snapshot_of_services_db_sees_one_set_of_rows_and_writes_nothing(dsn: str) -> None:
    """api.services.Services.db(snapshot=True), what the usage endpoint reads its rows and
    totals in: a row committed meanwhile by another connection is not seen by any of its
    statements, and it cannot write (issue #17, defect 6: rows and totals apart)."""
    from psycopg_pool import AsyncConnectionPool

    from api.services import Services

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as setup:
        await setup.execute("CREATE TABLE t (n int)")
        await setup.execute("INSERT INTO t VALUES (1)")
    pool = AsyncConnectionPool(dsn, kwargs={"autocommit": True}, open=False)
    await pool.open()
    services = object.__new__(Services)  # db() reads only the pool
    services.pool = pool
    try:
        async with services.db(snapshot=True) as conn:
            first = (await (await conn.execute("SELECT count(*) FROM t")).fetchone())[0]  # type: ignore[index]
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as other:
                await other.execute("INSERT INTO t VALUES (2)")
            rows = await (await conn.execute("SELECT n FROM t ORDER BY n")).fetchall()
            assert (first, rows) == (1, [(1,)])
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                await conn.execute("INSERT INTO t VALUES (3)")
        async with services.db() as conn:
            assert (await (await conn.execute("SELECT count(*) FROM t")).fetchone())[0] == 2  # type: ignore[index]
    finally:
        await pool.close()
