"""The persistence worker writes each event once, in whatever order the events come."""

from __future__ import annotations

import asyncio
import re
import time

import nats

import schemas
from tests.persistence import (
    BILLED,
    Env,
    accepted,
    completed,
    publish,
    refused_output,
    rows,
    wait_rows,
    wait_settled,
)


async def test_events_are_written_once_even_when_delivered_twice(
    env: Env, js: nats.js.JetStreamContext
) -> None:
    await publish(js, accepted("r1"))
    await publish(js, completed("r1"))
    await publish(js, completed("r1"))  # a second delivery (no dedup id): written once
    await asyncio.to_thread(wait_rows, env.dsn, BILLED, "r1")
    # Every delivery acked: the second Completed has been applied too, and changed nothing.
    await wait_settled(js)
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


async def test_an_answer_refused_by_an_output_policy_is_not_kept_in_either_order(
    env: Env, js: nats.js.JetStreamContext
) -> None:
    """The worker's Completed (with the text) and the API's Failed content_policy come from two
    processes: whichever is written first, the request ends failed and its answer is not stored."""
    await publish(js, accepted("r-refused-late"))
    await publish(js, completed("r-refused-late"))
    await asyncio.to_thread(wait_rows, env.dsn, BILLED, "r-refused-late")
    await publish(js, refused_output("r-refused-late"))
    await publish(js, accepted("r-refused-early"))
    await publish(js, refused_output("r-refused-early"))
    await publish(js, completed("r-refused-early"))
    await wait_settled(js)
    for rid in ("r-refused-late", "r-refused-early"):
        assert rows(env.dsn, "SELECT status, error_code FROM requests WHERE request_id = %s", rid) == [
            ("failed", "content_policy")
        ], rid
        assert rows(env.dsn, "SELECT role FROM messages WHERE request_id = %s ORDER BY position", rid) == [
            ("system",),
            ("user",),
        ], rid
