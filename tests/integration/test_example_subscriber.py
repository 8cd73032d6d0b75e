"""examples/tokens_per_user.py against a real nats-server: the totals an integrator would print,
from events published the way chatq publishes them, without touching chatq's own consumers."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator

import pytest
from nats.js.api import AckPolicy, ConsumerConfig

import schemas
from broker import names, topology
from broker.bus import Bus
from broker.connect import connect
from examples.tokens_per_user import Row, Tally, read_events, start_at
from stack.servers import NatsServer
from tests.helpers import ROOT
from workers.persistence.app import DURABLE

# 2026-11-24 10:00 UTC and the hour after it.
HOUR = 1_795_514_400.0
NEXT_HOUR = HOUR + 3600


def meta(user_id: int | None) -> schemas.RequestMeta:
    return schemas.RequestMeta(user_id=user_id)


def completed(
    at: float, prompt: int, completion: int, *, user_id: int | None = None, user: str | None = None
) -> schemas.Completed:
    return schemas.Completed(
        request_id=uuid.uuid4().hex,
        model="m",
        time=at,
        worker_id="w1",
        text="…",
        finish_reason="stop",
        usage=schemas.Usage(prompt_tokens=prompt, completion_tokens=completion),
        user=user,
        meta=meta(user_id),
    )


def cancelled(at: float, prompt: int, completion: int, *, user_id: int) -> schemas.Cancelled:
    return schemas.Cancelled(
        request_id=uuid.uuid4().hex,
        model="m",
        time=at,
        worker_id="w1",
        reason="client_disconnected",
        text="Par",
        usage=schemas.Usage(prompt_tokens=prompt, completion_tokens=completion),
        meta=meta(user_id),
    )


@pytest.fixture
async def bus(fresh_nats: NatsServer) -> AsyncIterator[Bus]:
    bus = Bus(await connect(fresh_nats.url, "test-example"))
    await topology.ensure_streams(bus.js, jobs_max_msgs=100)
    try:
        yield bus
    finally:
        await bus.close()


async def publish_history(bus: Bus) -> None:
    """A user's day as chatq's events record it, with one event stored twice."""
    first = completed(HOUR + 60, 10, 20, user_id=1)
    events: list[schemas.Event] = [
        schemas.Accepted(request_id=first.request_id, model="m", time=HOUR, meta=meta(1)),
        first,
        cancelled(HOUR + 120, 5, 3, user_id=1),  # cut short: its partial tokens count
        completed(NEXT_HOUR + 5, 7, 1, user_id=1),
        completed(HOUR + 300, 4, 4, user="alice"),  # no account: the client's `user` field
        completed(HOUR + 400, 2, 2),  # a service key: no user at all
        schemas.Failed(request_id="f1", model="m", time=HOUR + 500, code="engine_error", message="x"),
    ]
    for event in events:
        await bus.publish_event(event)
    # Published again within the duplicate window: JetStream keeps one copy.
    await bus.publish_event(first)
    # Published again later (a replay outside the window): stored twice, counted once.
    await bus.js.publish(
        names.event_subject("completed"),
        schemas.encode(first),
        stream=names.EVENTS_STREAM,
        headers={"Nats-Msg-Id": "replayed-later"},
    )


EXPECTED = {
    (int(HOUR), "id:1"): Row(requests=2, cancelled=1, prompt_tokens=15, completion_tokens=23),
    (int(NEXT_HOUR), "id:1"): Row(requests=1, cancelled=0, prompt_tokens=7, completion_tokens=1),
    (int(HOUR), "alice"): Row(requests=1, cancelled=0, prompt_tokens=4, completion_tokens=4),
    (int(HOUR), "-"): Row(requests=1, cancelled=0, prompt_tokens=2, completion_tokens=2),
}


async def test_tokens_per_user_per_hour_from_the_whole_history(bus: Bus) -> None:
    await publish_history(bus)
    assert (await bus.js.stream_info(names.EVENTS_STREAM)).state.messages == 8
    tally = Tally()
    await read_events(bus.js, tally, since="all", until_caught_up=True)
    assert tally.rows == EXPECTED
    table = tally.table().splitlines()
    assert table[0].split() == [
        "hour",
        "(UTC)",
        "user",
        "requests",
        "cancelled",
        "prompt",
        "completion",
        "total",
    ]
    assert table[1].split() == ["2026-11-24", "10:00", "-", "1", "0", "2", "2", "4"]
    assert "2026-11-24 11:00  id:1" in table[-1] and table[-1].split()[-1] == "8"


async def test_since_a_time_replays_only_what_came_after_it(bus: Bus) -> None:
    await publish_history(bus)
    tally = Tally()
    await read_events(bus.js, tally, since="1m", until_caught_up=True)  # everything is newer
    assert tally.rows == EXPECTED
    # A second ago: the events are older, and the program waits for new ones.
    await asyncio.sleep(1.1)
    later = Tally()
    await read_events(bus.js, later, since="1s", until_caught_up=True)
    assert later.rows == {}
    with pytest.raises(ValueError, match="in the future"):
        start_at("2999-01-01T00:00:00Z")
    with pytest.raises(ValueError, match="give 'all'"):
        start_at("yesterday")


async def read_until(proc: asyncio.subprocess.Process, needle: str, timeout: float) -> str:
    """What the process printed up to and including the first line holding `needle`."""
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(timeout):
            while line := (await proc.stdout.readline()).decode():
                seen.append(line)
                if needle in line:
                    return "".join(seen)
    except TimeoutError:
        pass
    raise AssertionError(f"{needle!r} not printed within {timeout} s:\n{''.join(seen)}")


async def test_the_program_follows_new_events_prints_on_exit_and_leaves_chatqs_consumer_alone(
    bus: Bus, fresh_nats: NatsServer
) -> None:
    await publish_history(bus)
    # chatq's persistence worker's durable consumer, with nothing read yet.
    await bus.js.add_consumer(
        names.EVENTS_STREAM, ConsumerConfig(durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT)
    )
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "examples.tokens_per_user", "--nats-url", fresh_nats.url),
        *("--since", "all", "--every", "0.3"),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        await read_until(proc, "alice", timeout=30)
        await bus.publish_event(completed(NEXT_HOUR + 60, 100, 11, user_id=3))
        await read_until(proc, "id:3", timeout=30)
        consumers = await bus.js.consumers_info(names.EVENTS_STREAM)
        ours = [c for c in consumers if c.name != DURABLE]
        assert len(ours) == 1 and ours[0].config.durable_name is None
        persistence = await bus.js.consumer_info(names.EVENTS_STREAM, DURABLE)
        assert (persistence.num_pending, persistence.delivered.stream_seq) == (9, 0)
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            out = (await proc.communicate())[0].decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, out
    final = out.strip().split("\n\n")[-1].splitlines()
    assert [line.split()[2:] for line in final[1:]] == [
        ["-", "1", "0", "2", "2", "4"],
        ["alice", "1", "0", "4", "4", "8"],
        ["id:1", "2", "1", "15", "23", "38"],
        ["id:1", "1", "0", "7", "1", "8"],
        ["id:3", "1", "0", "100", "11", "111"],
    ]
