"""A conversation's title, end to end: the persistence worker queues the title job, an
inference worker (the synthetic engine) runs it, and its answer becomes the title.

Real nats-server, embedded PostgreSQL, and both workers as processes; the events of the
conversation's first turn are published as the API and the inference worker would.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import nats
import pytest

import schemas
from tests.helpers import Proc, base_env, nats_with_streams, spawn, start_worker
from tests.persistence import (
    make_conversation,
    make_user,
    private_postgres,
    publish,
    rows,
    turn,
    wait_rows,
)
from workers.inference.synthetic import prompt_seed, synthetic_token
from workers.persistence.titles import TITLE_MAX_TOKENS, clean_title

MODEL = "synthetic-titles"


@dataclass
class Stack:
    nats_url: str
    dsn: str
    persistence: Proc
    worker: Proc


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("titles")
    server = nats_with_streams(root)
    pg = private_postgres()
    dsn = pg.start()
    env = base_env(
        server.url,
        root / "home",
        DATABASE_URL=dsn,
        INFERENCE_ENGINE="synthetic",
        MODEL_NAME=MODEL,
        SYNTH_TOKENS_PER_S="500",
        SYNTH_TTFT_MS="5",
    )
    procs: list[Proc] = []
    try:
        persistence = spawn("persistence", "workers.persistence", env, root / "logs")
        procs.append(persistence)
        worker, _ = start_worker(env, root / "logs")
        procs.append(worker)
        wait_rows(dsn, "SELECT 1 FROM schema_migrations WHERE version = 2", timeout=60)
        yield Stack(server.url, dsn, persistence, worker)
    finally:
        for proc in reversed(procs):
            proc.stop()
        pg.stop()
        shutil.rmtree(pg.data_dir.parent, ignore_errors=True)
        server.stop()


async def test_a_new_conversation_gets_its_title_from_the_model(stack: Stack) -> None:
    user_id, key_id = make_user(stack.dsn, "titled-e2e")
    conversation = make_conversation(stack.dsn, user_id)
    meta = schemas.RequestMeta(
        user_id=user_id, key_id=key_id, conversation_id=conversation, answer_position=1
    )
    first, first_done = turn(
        "e2e-1", meta, "How do I sort a list in Python?", "Use sorted(xs) or xs.sort().", model=MODEL
    )
    nc = await nats.connect(stack.nats_url)
    try:
        js = nc.jetstream()
        await publish(js, first)
        await publish(js, first_done)
    finally:
        await nc.close()

    title_id = f"title-{conversation}"
    found = await asyncio.to_thread(
        wait_rows,
        stack.dsn,
        "SELECT title FROM conversations WHERE id = %s AND title IS NOT NULL",
        conversation,
        timeout=60,
    )
    # The synthetic engine's answer is fixed by the job's id (temperature is not 0).
    answer = "".join(synthetic_token(prompt_seed(title_id), i) for i in range(TITLE_MAX_TOKENS))
    expected = clean_title(answer)
    assert expected is not None and len(expected) <= 80
    assert found == [(expected,)]
    # The title job is the user's request: billed to them, at background priority.
    billed = await asyncio.to_thread(
        wait_rows,
        stack.dsn,
        "SELECT status, purpose, priority, user_id, key_id, model, completion_tokens, created_at IS NOT NULL"
        " FROM requests WHERE request_id = %s AND status = 'completed' AND created_at IS NOT NULL",
        title_id,
    )
    assert billed == [("completed", "title", "background", user_id, key_id, MODEL, TITLE_MAX_TOKENS, True)]
    # Its question and answer are not part of the conversation.
    assert rows(
        stack.dsn,
        "SELECT request_id, position FROM messages WHERE conversation_id = %s ORDER BY position",
        conversation,
    ) == [
        ("e2e-1", 0),
        ("e2e-1", 1),
    ]
    assert rows(stack.dsn, "SELECT 1 FROM messages WHERE request_id = %s", title_id) == []
