"""The persistence worker against real NATS JetStream and a real (embedded) PostgreSQL."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import psycopg
import pytest
from nats.js.api import RawStreamMsg

import schemas
from broker import names, topology
from chatq.servers import EmbeddedPostgres, NatsServer
from tests.helpers import Proc, spawn
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


@dataclass
class Env:
    nats: NatsServer
    pg: EmbeddedPostgres
    dsn: str
    worker: Proc


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("persist")
    server = NatsServer(root / "nats").start(root / "nats.log")

    async def topo() -> None:
        nc = await nats.connect(server.url)
        await topology.ensure_streams(nc.jetstream(), jobs_max_msgs=100)
        await nc.close()

    asyncio.run(topo())
    pg = EmbeddedPostgres(root / "pg")
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
        yield Env(server, pg, dsn, worker)
    finally:
        worker.stop()
        pg.stop()
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
    await asyncio.to_thread(wait_rows, env.dsn, "SELECT 1 FROM usage WHERE request_id = %s", "r1")
    await asyncio.sleep(0.5)
    assert rows(
        env.dsn, "SELECT status, user_id, finish_reason FROM chat_requests WHERE request_id = 'r1'"
    ) == [("completed", "alice", "stop")]
    assert rows(env.dsn, "SELECT prompt_tokens, completion_tokens FROM usage WHERE request_id = 'r1'") == [
        (4, 7)
    ]
    messages = await asyncio.to_thread(
        wait_rows,
        env.dsn,
        "SELECT role, content FROM chat_messages WHERE request_id = %s ORDER BY position",
        "r1",
        count=3,
    )
    assert messages == [("system", "be brief"), ("user", "hi"), ("assistant", "hello there")]


async def test_out_of_order_events_keep_the_final_status(env: Env, js: nats.js.JetStreamContext) -> None:
    await publish(js, completed("r2"))
    await publish(js, accepted("r2"))
    await asyncio.to_thread(
        wait_rows,
        env.dsn,
        "SELECT 1 FROM chat_requests WHERE request_id = %s AND accepted_at IS NOT NULL",
        "r2",
    )
    assert rows(env.dsn, "SELECT status FROM chat_requests WHERE request_id = 'r2'") == [("completed",)]


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
        wait_rows, env.dsn, "SELECT completion_tokens FROM usage WHERE request_id = %s", "r3"
    )
    assert found == [(3,)]


async def test_garbage_event_is_dead_lettered_and_the_worker_goes_on(
    env: Env, js: nats.js.JetStreamContext
) -> None:
    garbage = b"\xc1 garbage"
    await js.publish(names.event_subject("completed"), garbage)
    await publish(js, completed("r4"))
    await asyncio.to_thread(wait_rows, env.dsn, "SELECT 1 FROM usage WHERE request_id = %s", "r4")
    assert env.worker.proc.poll() is None
    # An event that cannot be decoded has no request id to name.
    letter = await wait_dead_letter(js, "?")
    assert letter.data == garbage
    assert letter.headers is not None
    assert letter.headers[SUBJECT_HEADER] == names.event_subject("completed")
    assert letter.headers[ERROR_HEADER].startswith("DecodeError")


async def test_postgres_down_loses_nothing(env: Env, js: nats.js.JetStreamContext, tmp_path: Path) -> None:
    env.pg.stop()
    try:
        await publish(js, accepted("r5"))
        await publish(js, completed("r5", tokens=11))
        await asyncio.sleep(2.5)  # the worker tries, fails, and leaves the events in JetStream
        assert env.worker.proc.poll() is None
    finally:
        env.dsn = await asyncio.to_thread(env.pg.start)
    found = await asyncio.to_thread(
        wait_rows, env.dsn, "SELECT completion_tokens FROM usage WHERE request_id = %s", "r5", timeout=30
    )
    assert found == [(11,)]
    assert rows(env.dsn, "SELECT status FROM chat_requests WHERE request_id = 'r5'") == [("completed",)]


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
        wait_rows, env.dsn, "SELECT completion_tokens FROM usage WHERE request_id = %s", "r7", timeout=10
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
    line = await asyncio.to_thread(wait_log, env.worker, r"ERROR .*dead-lettered the completed event of r6")
    assert "out of range" in line and f"after {MAX_DELIVER} tries" in line
    # Terminated, not redelivered: nothing is left pending or in flight.
    await wait_settled(js)
    assert rows(env.dsn, "SELECT status FROM chat_requests WHERE request_id = 'r6'") == [("accepted",)]
    assert rows(env.dsn, "SELECT 1 FROM usage WHERE request_id = 'r6'") == []
    # Exactly one dead letter for it, and the worker is still up.
    assert len([m for m in await dead_letters(js) if (m.headers or {}).get(REQUEST_ID_HEADER) == "r6"]) == 1
    assert env.worker.proc.poll() is None


async def test_statement_timeout_turns_a_blocked_write_into_a_retry(
    env: Env, js: nats.js.JetStreamContext
) -> None:
    await publish(js, accepted("r8"))
    await asyncio.to_thread(wait_rows, env.dsn, "SELECT 1 FROM chat_requests WHERE request_id = %s", "r8")
    # Another session holds the row: the worker's upsert waits for the lock until its
    # statement timeout cancels it, and the event is retried, never dead-lettered.
    async with await psycopg.AsyncConnection.connect(env.dsn) as locker:
        await locker.execute("SELECT 1 FROM chat_requests WHERE request_id = 'r8' FOR UPDATE")
        await publish(js, completed("r8", tokens=9))
        line = await asyncio.to_thread(
            wait_log, env.worker, r"WARNING .*QueryCanceled.*statement timeout.*completed event of r8"
        )
        assert "retrying" in line
        await asyncio.sleep(STATEMENT_TIMEOUT_MS / 1000 * MAX_DELIVER + 1)  # longer than bounded tries
        assert rows(env.dsn, "SELECT status FROM chat_requests WHERE request_id = 'r8'") == [("accepted",)]
        await locker.rollback()
    found = await asyncio.to_thread(
        wait_rows, env.dsn, "SELECT completion_tokens FROM usage WHERE request_id = %s", "r8", timeout=20
    )
    assert found == [(9,)]
    assert rows(env.dsn, "SELECT status FROM chat_requests WHERE request_id = 'r8'") == [("completed",)]
    assert not [m for m in await dead_letters(js) if (m.headers or {}).get(REQUEST_ID_HEADER) == "r8"]


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
    assert re.search(r"INFO persistence chatq\.persistence: persistence worker started", text), text
    # FastStream's two lines per message are not shown at INFO.
    assert "Received" not in text and "Processed" not in text
