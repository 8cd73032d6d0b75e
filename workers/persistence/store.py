"""PostgreSQL storage of requests (usage included) and messages; every write is idempotent.

The schema is chatq's (database/migrations, applied by database.schema.migrate). One event makes one
transaction: its `requests` row (upserted so that events may arrive in any order and more
than once), its messages, and for a conversation turn the conversation's `updated_at`; a
title job's Completed event sets the conversation's title instead of storing messages.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import cast

import psycopg
from psycopg.conninfo import conninfo_to_dict

import database.schema
import schemas
from chatq.errors import ContentRefused
from schemas import ANSWER_POSITION
from workers.persistence.titles import TitleSource, clean_title, title_request_id

# A terminal status is never replaced by 'accepted', whatever order events arrive in, nor an
# answer an output policy refused (the API's Failed) by the worker's Completed or Cancelled. The
# account, key and conversation are looked up, not trusted: one deleted since the request
# was made leaves NULL (the request and its cost are kept) instead of a foreign-key error
# that no retry could fix.
_UPSERT = """
INSERT INTO requests (request_id, model, client_user, status, created_at, finished_at, worker_id,
                      finish_reason, error_code, error_message, ttft_ms, duration_ms, user_id,
                      key_id, conversation_id, priority, purpose, prompt_tokens, completion_tokens)
VALUES (%(request_id)s, %(model)s, %(client_user)s, %(status)s, %(created_at)s, %(finished_at)s,
        %(worker_id)s, %(finish_reason)s, %(error_code)s, %(error_message)s, %(ttft_ms)s,
        %(duration_ms)s,
        (SELECT id FROM users WHERE id = %(user_id)s::bigint),
        (SELECT id FROM api_keys WHERE id = %(key_id)s::bigint),
        (SELECT id FROM conversations WHERE id = %(conversation_id)s::uuid),
        %(priority)s, %(purpose)s, %(prompt_tokens)s, %(completion_tokens)s)
ON CONFLICT (request_id) DO UPDATE SET
    client_user       = COALESCE(requests.client_user, EXCLUDED.client_user),
    created_at        = COALESCE(requests.created_at, EXCLUDED.created_at),
    status            = CASE WHEN EXCLUDED.status = 'accepted'
                               OR requests.error_code = %(refused_code)s THEN requests.status
                             ELSE EXCLUDED.status END,
    finished_at       = COALESCE(EXCLUDED.finished_at, requests.finished_at),
    worker_id         = COALESCE(EXCLUDED.worker_id, requests.worker_id),
    finish_reason     = COALESCE(EXCLUDED.finish_reason, requests.finish_reason),
    error_code        = COALESCE(EXCLUDED.error_code, requests.error_code),
    error_message     = COALESCE(EXCLUDED.error_message, requests.error_message),
    ttft_ms           = COALESCE(EXCLUDED.ttft_ms, requests.ttft_ms),
    duration_ms       = COALESCE(EXCLUDED.duration_ms, requests.duration_ms),
    user_id           = COALESCE(requests.user_id, EXCLUDED.user_id),
    key_id            = COALESCE(requests.key_id, EXCLUDED.key_id),
    conversation_id   = COALESCE(requests.conversation_id, EXCLUDED.conversation_id),
    priority          = COALESCE(requests.priority, EXCLUDED.priority),
    purpose           = EXCLUDED.purpose,
    prompt_tokens     = COALESCE(EXCLUDED.prompt_tokens, requests.prompt_tokens),
    completion_tokens = COALESCE(EXCLUDED.completion_tokens, requests.completion_tokens)
"""
_MESSAGE = """
INSERT INTO messages (request_id, position, role, content, conversation_id, token_in, token_out,
                      created_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (request_id, position) DO NOTHING
"""
# The answer of a request, unless an output policy refused it (its Failed came first)...
_ANSWER = """
INSERT INTO messages (request_id, position, role, content, conversation_id, token_in, token_out,
                      created_at)
SELECT %s, %s::integer, 'assistant', %s, %s::uuid, %s::integer, %s::integer, %s::timestamptz
 WHERE NOT EXISTS (SELECT 1 FROM requests WHERE request_id = %s AND error_code = %s)
ON CONFLICT (request_id, position) DO NOTHING
"""
# ... or removed when its refusal comes after it: the refused text is not kept to be shown.
_REFUSED_ANSWER = "DELETE FROM messages WHERE request_id = %s AND role = 'assistant'"
_REPLACED = "DELETE FROM messages WHERE request_id = %s AND conversation_id = %s::uuid"
# Whether the conversation is still there (a deleted one took its messages with it).
# The event's own time, not now(): the same event applied twice leaves the same value.
# It matches (rowcount 1) whenever the conversation exists, so it is the existence check too.
_TOUCH = "UPDATE conversations SET updated_at = GREATEST(updated_at, %s) WHERE id = %s::uuid"
_SET_TITLE = "UPDATE conversations SET title = %s WHERE id = %s::uuid AND title IS NULL"
# A conversation due a title: none yet, not deleted, no title job recorded yet (a title
# job's own events write its `requests` row), its first question stored and this turn's
# answer stored and completed (the Accepted and Completed events may come in either order;
# a cancelled answer is no basis for a title).
_TITLE_DUE = """
SELECT (SELECT content FROM messages
         WHERE conversation_id = c.id AND role = 'user' ORDER BY position LIMIT 1),
       (SELECT content FROM messages
         WHERE request_id = %(request_id)s AND position = %(answer_position)s)
  FROM conversations c
 WHERE c.id = %(conversation_id)s::uuid AND c.title IS NULL AND c.deleted_at IS NULL
   AND EXISTS (SELECT 1 FROM requests WHERE request_id = %(request_id)s AND status = 'completed')
   AND NOT EXISTS (SELECT 1 FROM requests WHERE request_id = %(title_request_id)s)
"""


# The code of the Failed event the API publishes for an answer an output policy refused.
REFUSED_OUTPUT = ContentRefused.default_code


def _text(value: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL: store U+FFFD instead of failing forever."""
    return value.replace("\x00", "\ufffd") if value else value


def _ts(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, tz=dt.UTC)


def _row(event: schemas.Event) -> dict[str, object]:
    meta = event.meta
    row: dict[str, object] = {
        "request_id": event.request_id,
        "model": event.model,
        "client_user": _text(event.user),
        "created_at": None,
        "finished_at": None,
        "worker_id": None,
        "finish_reason": None,
        "error_code": None,
        "error_message": None,
        "ttft_ms": None,
        "duration_ms": None,
        "user_id": meta.user_id,
        "key_id": meta.key_id,
        "conversation_id": meta.conversation_id,
        "priority": meta.priority,
        "purpose": meta.purpose,
        "prompt_tokens": None,
        "completion_tokens": None,
        "refused_code": REFUSED_OUTPUT,
    }
    match event:
        case schemas.Accepted():
            row.update(status="accepted", created_at=_ts(event.time))
        case schemas.Completed():
            row.update(
                status="completed",
                finished_at=_ts(event.time),
                worker_id=event.worker_id,
                finish_reason=event.finish_reason,
                ttft_ms=None if event.ttft_s is None else event.ttft_s * 1000,
                duration_ms=event.duration_s * 1000,
                prompt_tokens=event.usage.prompt_tokens,
                completion_tokens=event.usage.completion_tokens,
            )
        case schemas.Cancelled():
            # Partial output of a cancelled stream is billed too.
            row.update(
                status="cancelled",
                finished_at=_ts(event.time),
                worker_id=event.worker_id,
                finish_reason="cancelled",
                error_message=_text(event.reason),
                prompt_tokens=event.usage.prompt_tokens,
                completion_tokens=event.usage.completion_tokens,
            )
        case schemas.Failed():
            row.update(
                status="failed",
                finished_at=_ts(event.time),
                worker_id=event.worker_id,
                error_code=_text(event.code),
                error_message=_text(event.message),
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

    async def migrate(self) -> list[str]:
        """Bring the schema up to date (database.schema.migrate); returns the migrations applied.

        On a connection of its own, without the statement timeout: a migration may
        rewrite a large table, or wait for another process that is migrating.
        """
        async with await psycopg.AsyncConnection.connect(
            self._dsn, connect_timeout=self._connect_timeout_s
        ) as conn:
            return await database.schema.migrate(conn)

    async def apply(self, event: schemas.Event, *, titles: bool = False) -> TitleSource | None:
        """Write an event; applying the same event twice changes nothing.

        With `titles`, returns the conversation this event made due a title job (its
        first question and answer are now both stored, it has no title and no title job
        yet), or None.
        """
        async with self._lock:
            return await self._apply(event, titles)

    async def _apply(self, event: schemas.Event, titles: bool) -> TitleSource | None:
        conn = await self._connection()
        try:
            async with conn.transaction():
                await conn.execute(_UPSERT, _row(event))
                if event.meta.purpose == "title":
                    await self._title(conn, event)
                    return None
                if not await self._messages(conn, event):
                    return None
                if titles:
                    return await self._title_due(conn, event)
                return None
        except psycopg.OperationalError:
            # The server went away: drop the connection so the next try reconnects.
            await self.close()
            raise

    @staticmethod
    async def _title(conn: psycopg.AsyncConnection[object], event: schemas.Event) -> None:
        """A title job's event: its answer, cleaned, becomes the title if none is set."""
        conversation = event.meta.conversation_id
        if not isinstance(event, schemas.Completed) or conversation is None:
            return
        title = clean_title(_text(event.text) or "")
        if title is not None:
            await conn.execute(_SET_TITLE, (title, conversation))

    @staticmethod
    async def _messages(conn: psycopg.AsyncConnection[object], event: schemas.Event) -> bool:
        """Store the event's messages; False when its conversation no longer exists."""
        meta = event.meta
        conversation = meta.conversation_id
        if conversation is not None:
            touched = await conn.execute(_TOUCH, (_ts(event.time), conversation))
            if touched.rowcount == 0:
                return False
            if meta.replaces is not None:
                # This turn replaces an earlier one (regenerate, edit): its messages go.
                await conn.execute(_REPLACED, (meta.replaces, conversation))
        if isinstance(event, schemas.Accepted):
            # A conversation turn's new message(s) from meta.position on; else the whole prompt.
            first = meta.position if conversation is not None else 0
            for offset, message in enumerate(event.messages):
                await conn.execute(
                    _MESSAGE,
                    (
                        event.request_id,
                        first + offset,
                        message.role,
                        _text(message.content),
                        conversation,
                        None,
                        None,
                        _ts(event.time),
                    ),
                )
        elif isinstance(event, schemas.Completed | schemas.Cancelled) and event.text:
            await conn.execute(
                _ANSWER,
                (
                    event.request_id,
                    meta.answer_position if conversation is not None else ANSWER_POSITION,
                    _text(event.text),
                    conversation,
                    event.usage.prompt_tokens,
                    event.usage.completion_tokens,
                    _ts(event.time),
                    event.request_id,
                    REFUSED_OUTPUT,
                ),
            )
        elif isinstance(event, schemas.Failed) and event.code == REFUSED_OUTPUT:
            await conn.execute(_REFUSED_ANSWER, (event.request_id,))
        return True

    @staticmethod
    async def _title_due(conn: psycopg.AsyncConnection[object], event: schemas.Event) -> TitleSource | None:
        meta = event.meta
        conversation = meta.conversation_id
        # Any completed answer of a conversation still without a title (and no title job
        # yet): usually the first, or the next one when the first failed or was cancelled.
        if conversation is None or not isinstance(event, schemas.Accepted | schemas.Completed):
            return None
        cur = await conn.execute(
            _TITLE_DUE,
            {
                "request_id": event.request_id,
                "answer_position": meta.answer_position,
                "conversation_id": conversation,
                "title_request_id": title_request_id(conversation),
            },
        )
        row = await cur.fetchone()
        if row is None:
            return None
        question, answer = cast("tuple[object, object]", row)
        if not isinstance(question, str) or not isinstance(answer, str):
            return None  # the other event of the turn is not stored yet
        if not question.strip() or not answer.strip():
            return None
        return TitleSource(
            conversation_id=conversation,
            model=event.model,
            user_id=meta.user_id,
            key_id=meta.key_id,
            question=question,
            answer=answer,
        )

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                await conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass
