"""Conversation turns stored at their positions, and the one title job a new conversation gets."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
import uuid

import nats
import pytest

import schemas
from broker import names
from broker.bus import REQUEST_ID_HEADER
from tests.helpers import wait_log
from tests.persistence import (
    BILLED,
    Env,
    dead_letters,
    make_conversation,
    make_user,
    publish,
    rows,
    title_completed,
    title_jobs,
    turn,
    wait_rows,
    wait_settled,
    wait_title_jobs,
)


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
