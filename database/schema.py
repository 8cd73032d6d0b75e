"""PostgreSQL schema migrations: numbered SQL files in database/migrations, applied once each.

Why numbered SQL files and not a migration tool: the schema is small, psycopg is already
here, and plain SQL is what an operator reads and reviews; a migration tool (Alembic,
yoyo) would bring an ORM or a second way to connect for no gain. All pending files run in
one transaction, each with its row in `schema_migrations`, under an advisory lock: two
processes migrating at once apply each file exactly once, and a failure leaves the
database as it was before any of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Any constant works; it only has to be the same in every chatq process.
_LOCK_ID = 0x63686174  # "chat"
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migration files in version order; a badly named file is an error, not skipped."""
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise ValueError(f"{path}: a migration file is named NNNN_words.sql")
        found.append(Migration(int(match.group(1)), path.stem, path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"{directory}: two migrations share a number")
    return found


_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


async def migrate(conn: psycopg.AsyncConnection[object], directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply the migrations not applied yet; returns their names (empty: nothing to do)."""
    applied: list[str] = []
    await conn.commit()  # start from no open transaction (autocommit or not)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        await conn.execute(_TABLE)
        cur = await conn.execute("SELECT version FROM schema_migrations")
        done = {int(row[0]) for row in await cur.fetchall()}  # type: ignore[index]
        for migration in migrations(directory):
            if migration.version in done:
                continue
            async with conn.transaction():  # a savepoint: the file and its row, or neither
                await conn.execute(migration.sql.encode())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
            applied.append(migration.name)
    return applied


async def migrate_url(dsn: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Connect, migrate, close."""
    async with await psycopg.AsyncConnection.connect(dsn, connect_timeout=10) as conn:
        return await migrate(conn, directory)
