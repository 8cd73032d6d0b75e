"""The worker's cancel handling, with fakes at the NATS boundary and the synthetic engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import pytest

import schemas
from tests.helpers import eventually
from workers.inference import heartbeat
from workers.inference.engine import Answer, OpenAIRequest, Progress
from workers.inference.pacing import Pacing
from workers.inference.synthetic import SyntheticEngine
from workers.inference.worker import InferenceWorker, WorkerConfig


class FakeBus:
    def __init__(self) -> None:
        self.stream: list[schemas.StreamMsg] = []
        self.events: list[schemas.Event] = []
        self.chunked = asyncio.Event()  # set at the first Chunk

    async def publish_stream(self, request_id: str, message: schemas.StreamMsg) -> None:
        self.stream.append(message)
        if isinstance(message, schemas.Chunk):
            self.chunked.set()

    async def publish_event(self, event: schemas.Event) -> None:
        self.events.append(event)


class FakeMsg:
    def __init__(self, job: schemas.Job) -> None:
        self.data = schemas.encode(job)
        self.calls: list[str] = []

    async def ack(self) -> None:
        self.calls.append("ack")

    async def nak(self, delay: float | None = None) -> None:
        self.calls.append("nak")

    async def in_progress(self) -> None:
        self.calls.append("in_progress")

    async def term(self) -> None:
        self.calls.append("term")


class StuckEngine(SyntheticEngine):
    """An engine whose request ignores cancellation until released (or STUCK_S have passed,
    so that a test failing before it releases leaves no task in the session's loop)."""

    STUCK_S = 30.0

    def __init__(self) -> None:
        super().__init__(model="m", tokens_per_s=50, ttft_s=0.01, slots=2)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def serve(self, request: OpenAIRequest, progress: Progress) -> Answer:
        self.entered.set()
        deadline = time.monotonic() + self.STUCK_S
        while not self.release.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.01)
        raise asyncio.CancelledError


class SlowStartEngine(SyntheticEngine):
    """The synthetic engine, but a request whose id starts with "slow" gets no first token
    until released (a CPU engine's own queue, given more jobs than it starts promptly)."""

    def __init__(self) -> None:
        super().__init__(model="m", tokens_per_s=200, ttft_s=0.01, slots=4)
        self.release = asyncio.Event()

    async def serve(self, request: OpenAIRequest, progress: Progress) -> Answer:
        if request.request_id.startswith("slow"):
            await asyncio.wait_for(self.release.wait(), 30)
        return await super().serve(request, progress)


def make(
    slots: int = 2, engine: SyntheticEngine | None = None, ttft_s: float = 0.01, ttft_hold: float = 0.0
) -> tuple[InferenceWorker, FakeBus, SyntheticEngine]:
    engine = engine or SyntheticEngine(model="m", tokens_per_s=50, ttft_s=ttft_s, slots=slots)
    bus = FakeBus()
    config = WorkerConfig(
        worker_id="w",
        ack_wait_s=30,
        heartbeat_s=1,
        chunk_max_tokens=16,
        chunk_max_delay_s=0.015,
        cancel_wait_s=0.2,
        ttft_hold=ttft_hold,
    )
    return InferenceWorker(bus, engine, config), bus, engine  # type: ignore[arg-type]


def job(rid: str, max_tokens: int = 100) -> schemas.Job:
    now = time.time()
    return schemas.Job(
        request_id=rid,
        model="m",
        messages=[schemas.ChatMessage("user", "hi")],
        sampling=schemas.Sampling(max_tokens=max_tokens),
        created=now,
        deadline=now + 60,
        body=json.dumps(
            {
                "model": "m",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": max_tokens,
                "stream": True,
            }
        ).encode(),
    )


async def settle(worker: InferenceWorker, timeout: float = 5.0) -> None:
    assert await worker.jobs.wait_idle(timeout), f"still running after {timeout} s: {list(worker.active)}"


async def test_a_cancel_that_arrives_with_the_job_frees_the_slot_and_acks() -> None:
    worker, bus, engine = make()
    msg: Any = FakeMsg(job("r1"))
    worker.jobs.start(msg)
    assert worker.cancel("r1", "client_disconnected")  # before the job's task ever ran
    await settle(worker)
    assert worker.active == {}
    assert worker.free_slots == 2
    assert msg.calls.count("ack") == 1 and "nak" not in msg.calls
    (event,) = bus.events
    assert isinstance(event, schemas.Cancelled) and event.usage.completion_tokens == 0
    assert engine.running == set() and engine.aborted == []  # never reached the engine


async def test_a_cancel_mid_stream_aborts_the_engine_and_reports_partial_usage() -> None:
    worker, bus, engine = make()
    msg: Any = FakeMsg(job("r2", max_tokens=1000))
    worker.jobs.start(msg)
    await asyncio.wait_for(bus.chunked.wait(), 5)
    assert worker.cancel("r2", "client_disconnected")
    await settle(worker)
    assert worker.active == {} and engine.aborted == ["r2"]
    (event,) = bus.events
    assert isinstance(event, schemas.Cancelled)
    assert 0 < event.usage.completion_tokens < 1000
    last = bus.stream[-1]
    assert isinstance(last, schemas.Chunk) and last.finish_reason == "cancelled"


async def test_a_cancel_after_the_engine_finished_changes_nothing() -> None:
    worker, bus, _ = make()
    msg: Any = FakeMsg(job("r3", max_tokens=2))
    worker.jobs.start(msg)
    await settle(worker)
    assert not worker.cancel("r3", "deadline")
    (event,) = bus.events
    assert isinstance(event, schemas.Completed) and event.usage.completion_tokens == 2
    assert event.text and event.finish_reason == "length"


async def test_the_slot_time_of_completed_jobs_is_measured_and_a_cancelled_one_left_out() -> None:
    """WorkerStatus.job_s, admission's capacity estimate before any backlog (slots / job_s)."""
    worker, _, _ = make()
    assert worker.jobs.pacing.job_s == 0.0  # nothing done yet: no estimate
    worker.jobs.start(FakeMsg(job("t1", max_tokens=5)))  # type: ignore[arg-type]
    await settle(worker)
    # 10 ms to the first token, then 4 more at 50 tokens/s: at least 90 ms on the slot.
    measured = worker.jobs.pacing.job_s
    assert 0.09 <= measured < 1.0
    worker.jobs.start(FakeMsg(job("t2", max_tokens=1000)))  # type: ignore[arg-type]
    await eventually("t2 running", lambda: "t2" in worker.active and worker.active["t2"].in_engine, 5, 0.01)
    worker.cancel("t2", "client_disconnected")
    await settle(worker)
    assert worker.jobs.pacing.job_s == measured


async def test_a_job_slow_to_its_first_token_holds_the_free_slots_until_it_starts() -> None:
    """WORKER_TTFT_HOLD: while a job has waited for its first token longer than twice the
    quickest recent one, the worker takes (and announces) no free slot."""
    engine = SlowStartEngine()
    worker, _, _ = make(engine=engine, ttft_hold=2.0)
    worker.jobs.start(FakeMsg(job("quick", max_tokens=2)))  # type: ignore[arg-type]
    await settle(worker)
    assert worker.free_slots == 4  # nothing waits for a first token: no hold
    worker.jobs.start(FakeMsg(job("slow", max_tokens=2)))  # type: ignore[arg-type]
    await eventually("the hold", lambda: worker.free_slots == 0, 5, 0.01)
    assert len(worker.active) == 1  # 3 slots empty, yet none offered
    worker.jobs.slot_freed.clear()
    engine.release.set()
    await asyncio.wait_for(worker.jobs.slot_freed.wait(), 5)  # the first token wakes the pull loop
    await settle(worker)
    # The hold is over; the late start taught it to run 1 job at a time (0.7 x the 1 running).
    assert worker.jobs.slots == 1 and worker.free_slots == 1


async def test_late_first_tokens_cut_the_slots_and_prompt_ones_win_them_back() -> None:
    """WORKER_TTFT_HOLD's limit: a burst that starts late teaches the worker to run fewer
    jobs at once; first tokens on time add slots back, never past the engine's."""
    engine = SlowStartEngine()
    worker, _, _ = make(engine=engine, ttft_hold=2.0)
    worker.jobs.start(FakeMsg(job("quick", max_tokens=2)))  # type: ignore[arg-type]
    await settle(worker)
    assert worker.jobs.slots == 4
    for rid in ("slow-1", "slow-2", "slow-3"):
        worker.jobs.start(FakeMsg(job(rid, max_tokens=2)))  # type: ignore[arg-type]
    await asyncio.sleep(0.1)  # far past twice the 10 ms first token
    engine.release.set()
    await settle(worker)
    assert worker.jobs.slots == 2  # 0.7 x the 3 that ran, once for the whole burst
    for i in range(20):
        worker.jobs.start(FakeMsg(job(f"q{i}", max_tokens=2)))  # type: ignore[arg-type]
        await settle(worker)
    assert worker.jobs.slots == 4


class LateSlotsEngine(SyntheticEngine):
    """Knows its slots only once started, as vLLM does (max_num_seqs from its config)."""

    def __init__(self) -> None:
        super().__init__(model="m", tokens_per_s=200, ttft_s=0.01, slots=4)
        self.known = 0

    @property
    def slots(self) -> int:
        return self.known


@pytest.mark.parametrize("ttft_hold", [0.0, 2.0])
async def test_the_slots_an_engine_learns_at_its_start_are_the_ones_offered(ttft_hold: float) -> None:
    """The worker is made (and after a switch given its engine) before the engine starts."""
    engine = LateSlotsEngine()
    worker, _, _ = make(engine=engine, ttft_hold=ttft_hold)
    assert worker.free_slots == 0
    engine.known = 4  # started
    assert worker.free_slots == 4 and worker.jobs.slots == 4


async def test_without_a_ttft_hold_a_slow_start_leaves_the_slots_free() -> None:
    engine = SlowStartEngine()
    worker, _, _ = make(engine=engine)
    worker.jobs.start(FakeMsg(job("quick", max_tokens=2)))  # type: ignore[arg-type]
    await settle(worker)
    worker.jobs.start(FakeMsg(job("slow", max_tokens=2)))  # type: ignore[arg-type]
    await asyncio.sleep(0.2)
    assert worker.free_slots == 3
    engine.release.set()
    await settle(worker)


async def test_the_worker_says_when_its_running_jobs_free_their_slots() -> None:
    """WorkerStatus.releases: a streaming job's end from its own token rate and max_tokens;
    before its tokens, its fetch plus the average slot time; unknown before any job ended."""
    engine = SlowStartEngine()
    worker, _, _ = make(engine=engine)
    fetched = time.time()
    worker.jobs.start(FakeMsg(job("slow", max_tokens=400)))  # type: ignore[arg-type]
    await eventually("in the engine", lambda: worker.active["slow"].in_engine, 5, 0.01)
    assert worker.jobs.releases() == []  # no token yet and no job done: nothing known
    engine.release.set()
    await eventually("streaming", lambda: worker.active["slow"].tokens >= 40, 5, 0.01)
    (release,) = worker.jobs.releases()
    # 400 tokens at the engine's 200 a second: about 2 s after the fetch.
    assert fetched + 1.5 < release < fetched + 4.0
    worker.cancel("slow", "client_disconnected")
    await settle(worker)
    worker.jobs.start(FakeMsg(job("quick", max_tokens=20)))  # type: ignore[arg-type]
    await settle(worker)
    engine.release.clear()
    fetched = time.time()
    worker.jobs.start(FakeMsg(job("slow-2", max_tokens=400)))  # type: ignore[arg-type]
    await eventually("in the engine", lambda: worker.active["slow-2"].in_engine, 5, 0.01)
    (release,) = worker.jobs.releases()
    assert release == pytest.approx(fetched + worker.jobs.pacing.job_s, abs=0.1)
    engine.release.set()
    await settle(worker)


async def test_a_job_that_ends_is_announced_at_the_next_tick() -> None:
    """Admission learns of a freed slot within a housekeeping tick, not a status interval."""
    worker, _, _ = make()
    announced: list[float] = []

    async def announce() -> None:
        announced.append(time.monotonic())

    keeping = asyncio.create_task(heartbeat.housekeeping(worker.jobs, worker.config, announce))
    try:
        await eventually("the first status", lambda: announced, 5, 0.01)
        worker.jobs.start(FakeMsg(job("t", max_tokens=2)))  # type: ignore[arg-type]
        await settle(worker)
        ended = time.monotonic()
        await eventually("a status after the end", lambda: announced[-1] > ended, 1.0, 0.01)
    finally:
        keeping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeping


async def test_an_engine_refusal_is_a_stream_error_with_its_status_and_nothing_else() -> None:
    worker, bus, _ = make()
    bad = job("r4")
    msg: Any = FakeMsg(msgspec_replace(bad, body=b'{"messages": "not a list"}'))
    worker.jobs.start(msg)
    await settle(worker)
    (error,) = bus.stream
    assert isinstance(error, schemas.StreamError) and error.status == 400
    assert msg.calls.count("ack") == 1
    (event,) = bus.events
    assert isinstance(event, schemas.Failed)


async def test_ending_the_active_requests_requeues_one_with_no_token_yet() -> None:
    worker, bus, _ = make(ttft_s=60)
    msg: Any = FakeMsg(job("r5"))
    worker.jobs.start(msg)
    await eventually(
        "r5 in the engine", lambda: "r5" in worker.active and worker.active["r5"].in_engine, 5, 0.01
    )
    await asyncio.wait_for(worker.jobs.end_active(0.1, "worker_shutdown"), 5)
    assert worker.active == {} and msg.calls == ["nak"]  # back to its queue, not acked
    assert bus.events == [] and not any(isinstance(m, schemas.Chunk) for m in bus.stream)


async def test_a_request_that_ignores_its_cancel_is_abandoned_at_the_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = StuckEngine()
    worker, _, _ = make(engine=engine)
    msg: Any = FakeMsg(job("r6"))
    worker.jobs.start(msg)
    await asyncio.wait_for(engine.entered.wait(), 5)
    started = time.monotonic()
    with caplog.at_level(logging.ERROR):
        # grace 0.1 s, then the cancel, then cancel_wait_s (0.2 s): never unbounded.
        await asyncio.wait_for(worker.jobs.end_active(0.1, "worker_shutdown"), 5)
    assert time.monotonic() - started < 2
    assert worker.active == {} and worker.free_slots == 2
    assert any("r6 still runs" in r.getMessage() for r in caplog.records)
    engine.release.set()  # the abandoned task ends; it must not disturb the worker
    await worker.spawn.wait(5)
    assert worker.active == {} and msg.calls == ["nak"]


def msgspec_replace(job: schemas.Job, **changes: Any) -> schemas.Job:
    import msgspec

    return msgspec.structs.replace(job, **changes)


def test_a_running_job_is_never_announced_as_due_already() -> None:
    """Admission counts a past release as a free slot: a job in a long prefill, or one
    streaming past the max_tokens its engine does not enforce, must say "later"."""

    @dataclass
    class Job:
        fetched_at: float
        first_token_at: float | None
        tokens: int
        max_tokens: int

    engine = SyntheticEngine(model="m", tokens_per_s=10, ttft_s=0.1, slots=4)
    assert Pacing(engine, 0.0).release_at(Job(99.5, None, 0, 100), 100.0) is None  # no job done yet
    pacing = Pacing(engine, ttft_hold=0.0)
    pacing.completed(2.0)  # a job holds a slot 2 s on average
    now = 100.0
    assert pacing.release_at(Job(99.5, None, 0, 100), now) == pytest.approx(101.5)  # fetch + 2 s
    assert pacing.release_at(Job(90.0, None, 0, 100), now) == pytest.approx(101.0)  # long prefill
    # Streaming at 10 tokens/s (50 more in the 5 s since the first): 49 to go.
    assert pacing.release_at(Job(94.0, 95.0, 51, 100), now) == pytest.approx(104.9)
    # Past max_tokens: as many again at its rate, not "now".
    assert pacing.release_at(Job(80.0, 90.0, 101, 100), now) == pytest.approx(110.1)
    assert (
        Pacing(SyntheticEngine(model="m", tokens_per_s=10, ttft_s=0.1, slots=4), 0.0).release_at(
            Job(99.5, None, 0, 100), now
        )
        is None
    )
