"""An engine that dies (vLLM's EngineDeadError): the worker's side, with fakes at the NATS boundary.

The engine is the synthetic one, made to raise vLLM's own `EngineDeadError` class after a
few tokens and to report itself dead, as vLLM's AsyncLLM does once its engine core is
gone. What this proves is chatq's handling; that vLLM really behaves so when its engine
core process is killed is tests/e2e/test_engine_dead.py's part.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

import schemas
from tests.helpers import eventually
from tests.unit.test_worker_cancel import FakeMsg, job, make, settle
from workers.inference.engine import Answer, OpenAIRequest, Progress
from workers.inference.synthetic import SyntheticEngine

exceptions = pytest.importorskip("vllm.v1.engine.exceptions")


class DyingEngine(SyntheticEngine):
    """Streams `tokens` tokens, then its engine core 'dies': EngineDeadError, and dead from then on.

    `served`: as vLLM's OpenAI serving layer answers it (VllmEngine's observer records the
    error, the layer yields an error data event and [DONE]); else raised from the stream.
    """

    def __init__(self, tokens: int, *, served: bool = False) -> None:
        super().__init__(model="m", tokens_per_s=200, ttft_s=0.01, slots=2)
        self.tokens = tokens
        self.served = served
        self.dead = False

    async def serve(self, request: OpenAIRequest, progress: Progress) -> Answer:
        if self.tokens == 0:  # dead before this request's first token
            self.dead = True
            raise exceptions.EngineDeadError()
        answer = await super().serve(request, progress)
        assert not isinstance(answer, str)
        return self._die(answer, progress)

    async def _die(self, answer: AsyncIterator[str], progress: Progress) -> AsyncIterator[str]:
        async for data in answer:
            if progress.completion_tokens >= self.tokens:
                break
            yield data
        self.dead = True
        error = exceptions.EngineDeadError()
        if not self.served:
            raise error
        progress.error = repr(error)
        yield 'data: {"error": {"message": "EngineCore encountered an issue.", "code": 500}}\n\n'
        yield "data: [DONE]\n\n"


class FakeKV:
    def __init__(self) -> None:
        self.puts: list[schemas.WorkerStatus] = []

    async def put(self, key: str, value: bytes) -> None:
        import msgspec

        self.puts.append(msgspec.msgpack.decode(value, type=schemas.WorkerStatus))


@pytest.mark.parametrize("served", [False, True], ids=["raised", "as-vllm-serves-it"])
async def test_a_stream_the_engine_drops_ends_with_engine_error_and_its_partial_usage(served: bool) -> None:
    worker, bus, _ = make(engine=DyingEngine(tokens=5, served=served))
    msg: Any = FakeMsg(job("r1", max_tokens=100))
    worker.jobs.start(msg)
    await settle(worker)
    assert msg.calls.count("ack") == 1 and "nak" not in msg.calls
    last = bus.stream[-1]
    assert isinstance(last, schemas.StreamError) and last.code == "engine_error", bus.stream[-3:]
    # vLLM's own error object never reaches the client as if it were part of the answer.
    assert not [m for m in bus.stream if isinstance(m, schemas.Chunk) and b'"error"' in m.data]
    cancelled, failed = bus.events
    assert isinstance(cancelled, schemas.Cancelled) and cancelled.reason == "engine_error"
    assert 0 < cancelled.usage.completion_tokens <= 6 and cancelled.text
    assert isinstance(failed, schemas.Failed) and failed.code == "engine_error"


async def test_a_job_the_engine_drops_before_its_first_token_goes_back_to_the_queue() -> None:
    worker, bus, _ = make(engine=DyingEngine(tokens=0))
    msg: Any = FakeMsg(job("r2"))
    msg.metadata = None  # not a JetStream message: its first delivery
    worker.jobs.start(msg)
    await settle(worker)
    assert msg.calls == ["nak"]
    assert bus.events == []


async def test_a_dead_engine_takes_the_worker_out_of_the_queue() -> None:
    engine = DyingEngine(tokens=3)
    worker, _, _ = make(engine=engine)
    kv = FakeKV()
    worker._kv = kv  # type: ignore[assignment]
    watch = asyncio.create_task(worker._watch_engine())
    try:
        worker.jobs.start(FakeMsg(job("r3")))  # type: ignore[arg-type]
        await eventually("the worker sees its engine dead", lambda: worker._stopping.is_set(), 5)
        status = kv.puts[-1]
        assert status.state == "draining" and status.free_slots == 0
        assert status.progress == "failed: the engine died"
        assert worker.state != "ready"
        await settle(worker)
    finally:
        watch.cancel()
