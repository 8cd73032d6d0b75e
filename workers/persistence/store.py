"""PostgreSQL storage of chat requests, messages and usage; every write is idempotent."""

from __future__ import annotations

import asyncio
import datetime as dt

import psycopg
from psycopg.conninfo import conninfo_to_dict

import schemas

SCHEMA = """
CREATE TABLE IF NOT EXISTS chat_requests (
    request_id     text PRIMARY KEY,
    model          text NOT NULL,
    user_id        text,
    status         text NOT NULL,
    accepted_at    timestamptz,
    finished_at    timestamptz,
    worker_id      text,
    finish_reason  text,
    error_code     text,
    error_message  text,
    ttft_ms        double precision,
    duration_ms    double precision
);
CREATE TABLE IF NOT EXISTS chat_messages (
    request_id  text NOT NULL,
    position    integer NOT NULL,
    role        text NOT NULL,
    content     text NOT NULL,
    PRIMARY KEY (request_id, position)
);
CREATE TABLE IF NOT EXISTS usage (
    request_id         text PRIMARY KEY,
    model              text NOT NULL,
    user_id            text,
    prompt_tokens      integer NOT NULL,
    completion_tokens  integer NOT NULL,
    recorded_at        timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_recorded_at ON usage (recorded_at);
"""

# A terminal status is never replaced by 'accepted', whatever order events arrive in.
_UPSERT = """
INSERT INTO chat_requests (request_id, model, user_id, status, accepted_at, finished_at, worker_id,
                           finish_reason, error_code, error_message, ttft_ms, duration_ms)
VALUES (%(request_id)s, %(model)s, %(user_id)s, %(status)s, %(accepted_at)s, %(finished_at)s,
        %(worker_id)s, %(finish_reason)s, %(error_code)s, %(error_message)s, %(ttft_ms)s,
        %(duration_ms)s)
ON CONFLICT (request_id) DO UPDATE SET
    user_id       = COALESCE(chat_requests.user_id, EXCLUDED.user_id),
    accepted_at   = COALESCE(chat_requests.accepted_at, EXCLUDED.accepted_at),
    status        = CASE WHEN EXCLUDED.status = 'accepted' THEN chat_requests.status
                         ELSE EXCLUDED.status END,
    finished_at   = COALESCE(EXCLUDED.finished_at, chat_requests.finished_at),
    worker_id     = COALESCE(EXCLUDED.worker_id, chat_requests.worker_id),
    finish_reason = COALESCE(EXCLUDED.finish_reason, chat_requests.finish_reason),
    error_code    = COALESCE(EXCLUDED.error_code, chat_requests.error_code),
    error_message = COALESCE(EXCLUDED.error_message, chat_requests.error_message),
    ttft_ms       = COALESCE(EXCLUDED.ttft_ms, chat_requests.ttft_ms),
    duration_ms   = COALESCE(EXCLUDED.duration_ms, chat_requests.duration_ms)
"""
_MESSAGE = """
INSERT INTO chat_messages (request_id, position, role, content) VALUES (%s, %s, %s, %s)
ON CONFLICT (request_id, position) DO NOTHING
"""
_USAGE = """
INSERT INTO usage (request_id, model, user_id, prompt_tokens, completion_tokens, recorded_at)
VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (request_id) DO NOTHING
"""
# The answer goes after the prompt; positions past it are free for later turns.
ANSWER_POSITION = 1_000_000


def _text(value: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL: store U+FFFD instead of failing forever."""
    return value.replace("\x00", "\ufffd") if value else value


def _ts(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, tz=dt.UTC)


def _row(event: schemas.Event) -> dict[str, object]:
    row: dict[str, object] = {
        "request_id": event.request_id,
        "model": event.model,
        "user_id": _text(event.user),
        "accepted_at": None,
        "finished_at": None,
        "worker_id": None,
        "finish_reason": None,
        "error_code": None,
        "error_message": None,
        "ttft_ms": None,
        "duration_ms": None,
    }
    match event:
        case schemas.Accepted():
            row.update(status="accepted", accepted_at=_ts(event.time))
        case schemas.Completed():
            row.update(
                status="completed",
                finished_at=_ts(event.time),
                worker_id=event.worker_id,
                finish_reason=event.finish_reason,
                ttft_ms=None if event.ttft_s is None else event.ttft_s * 1000,
                duration_ms=event.duration_s * 1000,
            )
        case schemas.Cancelled():
            row.update(
                status="cancelled",
                finished_at=_ts(event.time),
                worker_id=event.worker_id,
                finish_reason="cancelled",
                error_message=event.reason,
            )
        case schemas.Failed():
            row.update(
                status="failed",
                finished_at=_ts(event.time),
                worker_id=event.worker_id,
                error_code=event.code,
                error_message=event.message,
            )
    return row


def is_transient(exc: BaseException) -> bool:
    """Whether trying the same write again later may succeed.

    Transient: PostgreSQL unreachable, restarting or out of resources, a lost connection, a
    connect or statement timeout (QueryCanceled), a deadlock or serialization failure: all
    psycopg OperationalErrors, plus the socket's own errors. Everything else (a data,
    constraint, encoding or programming error, an event the code cannot turn into a row)
    fails the same way every time.
    """
    return isinstance(exc, psycopg.OperationalError | OSError | TimeoutError)


class Store:
    """One connection; apply() writes one event in one transaction.

    One connection, reopened after a failure, rather than a psycopg_pool pool: the worker
    is a single consumer that writes one event at a time (the lock below), so a pool would
    only add a dependency and idle connections. A connect timeout bounds the wait for an
    unreachable server and a statement timeout bounds each statement (a lock held by
    someone else, a stuck server): either way the write fails as transient and is retried.
    """

    def __init__(self, dsn: str, *, connect_timeout_s: int = 5, statement_timeout_ms: int = 10_000) -> None:
        self._dsn = dsn
        self._connect_timeout_s = connect_timeout_s
        self._statement_timeout_ms = statement_timeout_ms
        self._conn: psycopg.AsyncConnection[object] | None = None
        # One connection carries one transaction at a time; events arrive concurrently.
        self._lock = asyncio.Lock()

    async def _connection(self) -> psycopg.AsyncConnection[object]:
        if self._conn is None or self._conn.closed:
            conn = await psycopg.AsyncConnection.connect(
                self._dsn, autocommit=False, connect_timeout=self._connect_timeout_s
            )
            try:
                # A session setting rather than a startup `options`, which poolers such as
                # PgBouncer refuse; 0 means no limit, as in PostgreSQL.
                async with conn.transaction():
                    await conn.execute(
                        "SELECT set_config('statement_timeout', %s, false)",
                        (f"{self._statement_timeout_ms}ms",),
                    )
            except BaseException:
                await conn.close()
                raise
            self._conn = conn
        return self._conn

    def describe(self) -> str:
        """Where and how this store connects, for the log (never the password)."""
        try:
            params = conninfo_to_dict(self._dsn)
        except psycopg.Error:
            params = {}
        where = f"{params.get('dbname', '?')} on {params.get('host', 'localhost')}"
        if params.get("port"):
            where += f":{params['port']}"
        return (
            f"{where} (connect timeout {self._connect_timeout_s} s, "
            f"statement timeout {self._statement_timeout_ms} ms)"
        )

    async def migrate(self) -> None:
        conn = await self._connection()
        async with conn.transaction():
            await conn.execute(SCHEMA)

    async def apply(self, event: schemas.Event) -> None:
        """Write an event; applying the same event twice changes nothing."""
        async with self._lock:
            await self._apply(event)

    async def _apply(self, event: schemas.Event) -> None:
        conn = await self._connection()
        try:
            async with conn.transaction():
                await conn.execute(_UPSERT, _row(event))
                if isinstance(event, schemas.Accepted):
                    for position, message in enumerate(event.messages):
                        await conn.execute(
                            _MESSAGE, (event.request_id, position, message.role, _text(message.content))
                        )
                elif isinstance(event, schemas.Completed | schemas.Cancelled):
                    if event.text:
                        await conn.execute(
                            _MESSAGE, (event.request_id, ANSWER_POSITION, "assistant", _text(event.text))
                        )
                    # Partial output of a cancelled stream is billed too.
                    await conn.execute(
                        _USAGE,
                        (
                            event.request_id,
                            event.model,
                            _text(event.user),
                            event.usage.prompt_tokens,
                            event.usage.completion_tokens,
                            _ts(event.time),
                        ),
                    )
        except psycopg.OperationalError:
            # The server went away: drop the connection so the next try reconnects.
            await self.close()
            raise

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                await conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass
