"""Token coalescing: first token at once, then at most one chunk per max_delay or max_tokens."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import schemas
from workers.inference.chunker import ChunkStream


class Sink:
    def __init__(self) -> None:
        self.chunks: list[schemas.Chunk] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def publish(self, message: schemas.StreamMsg) -> None:
        assert isinstance(message, schemas.Chunk)
        self.chunks.append(message)

    def spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)


def make(sink: Sink, *, max_tokens: int = 16, max_delay: float = 0.05) -> ChunkStream:
    return ChunkStream(sink.publish, sink.spawn, worker_id="w", max_tokens=max_tokens, max_delay=max_delay)


async def test_first_token_goes_out_at_once_then_tokens_are_coalesced() -> None:
    sink = Sink()
    stream = make(sink)
    await stream.add("Hello", 1)
    assert [c.text for c in sink.chunks] == ["Hello"]
    for word in [",", " wor", "ld"]:
        await stream.add(word, 1)
    assert len(sink.chunks) == 1  # held back: less than max_delay since the last chunk
    await asyncio.sleep(0.08)
    assert [c.text for c in sink.chunks] == ["Hello", ", world"]
    assert sink.chunks[1].tokens == 3


async def test_max_tokens_sends_without_waiting() -> None:
    sink = Sink()
    stream = make(sink, max_tokens=4, max_delay=10.0)
    for i in range(9):
        await stream.add(str(i), 1)
    assert [c.text for c in sink.chunks] == ["0", "1234", "5678"]


async def test_finish_carries_the_rest_usage_and_ordered_seqs() -> None:
    sink = Sink()
    stream = make(sink, max_delay=10.0)
    words = [f"w{i} " for i in range(10)]
    for word in words[:-1]:
        await stream.add(word, 1)
    await stream.add(words[-1], 1, last=True)
    usage = schemas.Usage(prompt_tokens=3, completion_tokens=10)
    await stream.finish("stop", usage)
    assert [c.seq for c in sink.chunks] == list(range(len(sink.chunks)))
    assert "".join(c.text for c in sink.chunks) == "".join(words) == stream.text
    last = sink.chunks[-1]
    assert last.finish_reason == "stop" and last.usage == usage
    assert sum(c.tokens for c in sink.chunks) == 10


async def test_fast_engine_sends_far_fewer_messages_than_tokens() -> None:
    sink = Sink()
    stream = make(sink, max_tokens=16, max_delay=0.015)
    for _ in range(400):  # 400 tokens at about 2,000 tokens/s
        await stream.add("t", 1)
        await asyncio.sleep(0.0005)
    await stream.finish("length", schemas.Usage(1, 400))
    assert "".join(c.text for c in sink.chunks) == "t" * 400
    assert len(sink.chunks) < 400 / 4
