"""Coalescing: first output at once, then at most one chunk per max_delay or max_tokens."""

from __future__ import annotations

import asyncio

import schemas
from workers.inference.chunker import ChunkStream


class Sink:
    def __init__(self, delay: float = 0.0) -> None:
        self.chunks: list[schemas.Chunk] = []
        self.delay = delay

    async def publish(self, message: schemas.StreamMsg) -> None:
        assert isinstance(message, schemas.Chunk)
        if self.delay:
            await asyncio.sleep(self.delay)  # a slow connection: publishes overlap
        self.chunks.append(message)


def make(sink: Sink, *, max_tokens: int = 16, max_delay: float = 0.05) -> ChunkStream:
    return ChunkStream(sink.publish, worker_id="w", max_tokens=max_tokens, max_delay=max_delay)


async def test_first_output_goes_out_at_once_then_output_is_coalesced() -> None:
    sink = Sink()
    stream = make(sink)
    stream.add("Hello", 1)
    await asyncio.sleep(0)  # the end of this event-loop step
    await asyncio.sleep(0)
    assert [c.data.decode() for c in sink.chunks] == ["Hello"]
    for word in [",", " wor", "ld"]:
        stream.add(word, 1)
    await asyncio.sleep(0.01)
    assert len(sink.chunks) == 1  # held back: less than max_delay since the last chunk
    await asyncio.sleep(0.08)
    assert [c.data.decode() for c in sink.chunks] == ["Hello", ", world"]
    assert sink.chunks[1].tokens == 3


async def test_events_of_one_engine_step_travel_together() -> None:
    sink = Sink()
    stream = make(sink)
    stream.add("role", 0)
    stream.add("first token", 1)  # written in the same step: no wait for the timer
    await asyncio.sleep(0.001)
    assert [c.data.decode() for c in sink.chunks] == ["rolefirst token"]


async def test_max_tokens_sends_without_waiting_for_the_timer() -> None:
    sink = Sink()
    stream = make(sink, max_tokens=4, max_delay=10.0)
    for i in range(9):
        stream.add(str(i), 1)
        await asyncio.sleep(0.001)
    assert [c.data.decode() for c in sink.chunks] == ["0", "1234", "5678"]


async def test_finish_carries_the_rest_usage_and_ordered_seqs_over_a_slow_connection() -> None:
    sink = Sink(delay=0.003)
    stream = make(sink, max_tokens=3, max_delay=0.002)
    words = [f"w{i} " for i in range(20)]
    for word in words:
        stream.add(word, 1)
        await asyncio.sleep(0.001)
    usage = schemas.Usage(prompt_tokens=3, completion_tokens=20)
    await stream.finish("stop", usage, "[DONE]")
    assert [c.seq for c in sink.chunks] == list(range(len(sink.chunks)))
    assert b"".join(c.data for c in sink.chunks).decode() == "".join(words) + "[DONE]"
    last = sink.chunks[-1]
    assert last.finish_reason == "stop" and last.usage == usage
    assert sum(c.tokens for c in sink.chunks) == 20


async def test_nothing_follows_the_final_chunk_and_no_chunk_is_empty() -> None:
    sink = Sink()
    stream = make(sink, max_delay=0.02)
    stream.add("a", 1)
    await asyncio.sleep(0.001)
    stream.add("b", 1)  # arms the timer
    await stream.finish("stop", schemas.Usage(1, 2))  # takes "b" before the timer fires
    stream.add("late", 1)
    await asyncio.sleep(0.05)  # the timer's time has passed
    assert [c.data.decode() for c in sink.chunks] == ["a", "b"]
    assert sink.chunks[-1].finish_reason == "stop"
    assert all(c.data for c in sink.chunks)


async def test_fast_engine_sends_far_fewer_messages_than_tokens() -> None:
    sink = Sink()
    stream = make(sink, max_tokens=16, max_delay=0.015)
    for _ in range(400):  # 400 tokens at about 2,000 tokens/s
        stream.add("t", 1)
        await asyncio.sleep(0.0005)
    await stream.finish("length", schemas.Usage(1, 400))
    assert b"".join(c.data for c in sink.chunks).decode() == "t" * 400
    assert len(sink.chunks) < 400 / 4
