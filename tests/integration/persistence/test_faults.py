"""What the persistence worker does when an event or PostgreSQL fails it: garbage and refused
data are dead-lettered after bounded tries, an outage or a blocked write only delays."""

from __future__ import annotations

import asyncio

import nats
import psycopg
import pytest

import schemas
from broker import names
from broker.bus import DELIVERIES_HEADER, ERROR_HEADER, REQUEST_ID_HEADER, SUBJECT_HEADER
from tests.helpers import log_lines, wait_log
from tests.persistence import (
    BILLED,
    BILLED_TOKENS,
    MAX_DELIVER,
    Env,
    accepted,
    completed,
    dead_letters,
    dead_letters_of,
    publish,
    rows,
    wait_dead_letter,
    wait_rows,
    wait_settled,
)
from workers.persistence.store import Store


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

    billed = (
        "SELECT request_id FROM requests WHERE request_id LIKE 'load-%%' AND completion_tokens IS NOT NULL"
        " AND created_at IS NOT NULL"
    )
    failed = r"could not write for now.*retrying the \w+ event of load-"
    task = asyncio.create_task(load())
    try:
        await asyncio.to_thread(wait_rows, env.dsn, billed, count=5)  # some are written before
        failures = len(log_lines(env.worker, failed))
        await asyncio.to_thread(env.pg.stop)
        try:
            # The worker tries, fails, and leaves the events in JetStream to retry them.
            await asyncio.to_thread(wait_log, env.worker, failed, 30, failures + 1)
            assert env.worker.proc.poll() is None
        finally:
            env.dsn = await asyncio.to_thread(env.pg.start)
    finally:
        await task
    await asyncio.to_thread(wait_rows, env.dsn, billed, count=count, timeout=60)
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
        timed_out = r'"level":"WARNING".*QueryCanceled.*statement timeout.*completed event of r8'
        line = await asyncio.to_thread(wait_log, env.worker, timed_out)
        assert "retrying" in line
        # More tries than a refused event gets before it is dead-lettered, and still retried.
        await asyncio.to_thread(wait_log, env.worker, timed_out, 30, MAX_DELIVER + 1)
        assert rows(env.dsn, "SELECT status FROM requests WHERE request_id = 'r8'") == [("accepted",)]
        assert await dead_letters_of(js, "r8") == []
        await locker.rollback()
    found = await asyncio.to_thread(wait_rows, env.dsn, BILLED_TOKENS, "r8", timeout=20)
    assert found == [(9,)]
    assert rows(env.dsn, "SELECT status FROM requests WHERE request_id = 'r8'") == [("completed",)]
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
