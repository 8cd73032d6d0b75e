"""The persistence worker against real NATS JetStream and a real (embedded) PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import psycopg
import pytest

import schemas
from broker import names, topology
from chatq.servers import EmbeddedPostgres, NatsServer
from tests.helpers import Proc, spawn


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
        "persistence", "workers.persistence", {"NATS_URL": server.url, "DATABASE_URL": dsn}, root / "logs"
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


async def test_garbage_event_is_dropped_and_the_worker_goes_on(
    env: Env, js: nats.js.JetStreamContext
) -> None:
    await js.publish(names.event_subject("completed"), b"\xc1 garbage")
    await publish(js, completed("r4"))
    await asyncio.to_thread(wait_rows, env.dsn, "SELECT 1 FROM usage WHERE request_id = %s", "r4")
    assert env.worker.proc.poll() is None


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
