"""A worker's running jobs: each job's task from fetch to its last event, cancels, and ending them all."""

from __future__ import annotations

import asyncio
import functools
import logging
import time

from nats.aio.msg import Msg

import schemas
from broker import topology
from broker.bus import REQUEST_ID_HEADER, Bus
from chatq import logs
from chatq.errors import EngineError
from chatq.tasks import TaskSet
from schemas.messages import FinishReason
from workers.inference import metrics
from workers.inference.active import ActiveRequest
from workers.inference.chunker import ChunkStream
from workers.inference.config import WorkerConfig
from workers.inference.engine import Answer, Engine, OpenAIRequest, Progress, RequestRejected
from workers.inference.pacing import Pacing

log = logging.getLogger(__name__)

# An engine's last SSE event; it travels with the finish chunk, once usage is known.
_DONE = "data: [DONE]"


def _deliveries(msg: Msg) -> int:
    try:
        return int(msg.metadata.num_delivered)
    except Exception:  # noqa: BLE001 - not a JetStream message: treat as the first try
        return 1


def _consumer_seq(msg: Msg) -> tuple[str, int] | None:
    """The consumer a job came from and its delivery's sequence there."""
    try:
        meta = msg.metadata
        return str(meta.consumer), int(meta.sequence.consumer)
    except Exception:  # noqa: BLE001 - not a JetStream message
        return None


class JobRunner:
    """The jobs one engine runs: at most its slots, each acked at its first token.

    The worker hands it the engine to use (`use`, on a live switch) and each fetched
    message (`start`); `active` is what runs now.
    """

    def __init__(self, bus: Bus, engine: Engine, config: WorkerConfig, spawn: TaskSet) -> None:
        self.bus = bus
        self.config = config
        self.spawn = spawn
        self.active: dict[str, ActiveRequest] = {}
        self.slot_freed = asyncio.Event()
        self.ended = 0  # jobs ended so far: housekeeping announces the freed slot
        self._idle = asyncio.Event()  # set while no request runs
        self._idle.set()
        self.use(engine)

    def use(self, engine: Engine) -> None:
        """Run the next jobs on this engine (the running ones must have ended)."""
        self.engine = engine
        self.labels = {"model": engine.model}
        self.pacing = Pacing(engine, self.config.ttft_hold)
        # Per consumer, the sequence of the last job taken (WorkerStatus.taken).
        self.taken: dict[str, int] = {}

    @property
    def slots(self) -> int:
        """The jobs this worker runs at once (workers/inference/pacing.py)."""
        return self.pacing.slots

    @property
    def free_slots(self) -> int:
        """Jobs the engine can take now: its free slots, or none while it is slow to start
        the jobs it has (WORKER_TTFT_HOLD; a first token or a job's end wakes the pull loop)."""
        free = max(0, self.pacing.slots - len(self.active))
        return 0 if free and self.pacing.held(self.active.values()) else free

    def releases(self) -> list[float]:
        """Unix times at which the running jobs are expected to free a slot, soonest first
        (WorkerStatus.releases)."""
        now, wall = time.monotonic(), time.time()
        return [round(wall + at - now, 3) for at in self.pacing.releases(self.active.values(), now)]

    async def end_active(self, grace_s: float, reason: str) -> None:
        """Let running requests finish for grace_s, then end the rest.

        A request with no token yet goes back to its queue (another worker, or this one
        later, answers it); one that is streaming ends with the standard error, `reason`.
        A request still running cancel_wait_s after that is abandoned: logged, its task
        cancelled, its slot forgotten, so a stuck engine cannot hold up a switch or a
        shutdown (an unacked job is redelivered by JetStream after its ack wait).
        """
        if await self.wait_idle(grace_s):
            return
        for active in list(self.active.values()):
            started = active.acked or active.first_token_at is not None
            self.cancel(active.job.request_id, reason if started else "requeue")
        if await self.wait_idle(self.config.cancel_wait_s):
            return
        for rid, active in list(self.active.items()):
            log.error(
                "job %s still runs %g s after its cancel (%s); abandoning it",
                rid,
                self.config.cancel_wait_s,
                reason,
                extra={"request_id": rid},
            )
            if active.task is not None:
                active.task.cancel()
            self._forget(active)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request runs: True, or False if some still run after timeout seconds."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def start(self, msg: Msg) -> None:
        """Run a fetched job in its own task; a malformed one is terminated, a redelivery kept alive."""
        seq = _consumer_seq(msg)
        if seq is not None:  # taken, even a malformed one: admission counts the delivery
            self.taken[seq[0]] = max(self.taken.get(seq[0], 0), seq[1])
        try:
            job = schemas.decode_job(msg.data)
        except Exception as exc:  # noqa: BLE001 - any malformed payload is dropped
            rid = (msg.headers or {}).get(REQUEST_ID_HEADER)
            log.error("dropping malformed job (%r)", exc, extra={"request_id": rid} if rid else None)
            self.spawn(msg.term())
            return
        now = time.time()
        metrics.QUEUE_WAIT.labels(**self.labels).observe(max(0.0, now - job.created))
        if job.request_id in self.active:
            # A redelivery of a job this worker already runs (it was slow to ack).
            self.spawn(msg.in_progress())
            return
        chunks = ChunkStream(
            functools.partial(self.bus.publish_stream, job.request_id),
            worker_id=self.config.worker_id,
            max_tokens=self.config.chunk_max_tokens,
            max_delay=self.config.chunk_max_delay_s,
        )
        active = ActiveRequest(job=job, msg=msg, chunks=chunks, fetched_at=time.monotonic())
        self.active[job.request_id] = active
        self._idle.clear()
        metrics.ACTIVE.labels(**self.labels).set(len(self.active))
        active.task = self.spawn(self._run_job(active))

    async def _ack(self, active: ActiveRequest) -> None:
        if not active.acked:
            active.acked = True
            try:
                await active.msg.ack()
            except Exception as exc:  # noqa: BLE001 - logged: the job may run a second time
                log.error(
                    "ack of %s failed (%r): JetStream may hand it to another worker after the ack wait",
                    active.job.request_id,
                    exc,
                )

    async def _run_job(self, active: ActiveRequest) -> None:
        job = active.job
        rid = job.request_id
        # This task's log lines (and those of the tasks it starts) name the request.
        logs.bind(rid, user_id=job.meta.user_id if job.meta else None, model=job.model)
        outcome = "completed"
        try:
            if job.deadline < time.time():
                await self._ack(active)
                await self._fail(active, "deadline_exceeded", "the request passed its deadline in the queue")
                outcome = "expired"
                return
            deadline_timer = asyncio.get_running_loop().call_later(
                max(0.0, job.deadline - time.time()), self.cancel, rid, "deadline"
            )
            try:
                outcome = await self._generate(active)
            finally:
                deadline_timer.cancel()
        except RequestRejected as exc:
            outcome = "rejected"
            await self._ack(active)
            await self._fail(active, exc.code, exc.message, status=exc.status, param=exc.param)
        except Exception:
            outcome = "failed"
            log.exception("job %s failed", rid)
            if not active.acked and _deliveries(active.msg) < topology.MAX_DELIVER:
                # Before the first token nothing reached the client: another worker may
                # succeed, so hand the job back.
                try:
                    await active.msg.nak(delay=1.0)
                except Exception as exc:  # noqa: BLE001 - JetStream redelivers after the ack wait
                    log.warning("nak of %s failed: %r", rid, exc)
                active.acked = True
            else:
                # Past its last try, or mid-stream: the client must hear it now.
                await self._ack(active)
                await self._fail(active, "engine_error", "the engine failed on this request")
        finally:
            # One line per job, so `./logs --request ID` follows a request through the worker:
            # at INFO when it did not complete; a completed one at DEBUG (at INFO it cost
            # ~1.5 % of a core at 100 req/s in the load test, and the API's line has it).
            ended = time.monotonic()
            ttft = active.first_token_at
            log.log(
                logging.DEBUG if outcome == "completed" else logging.INFO,
                "job %s in %.0f ms",
                outcome,
                (ended - active.fetched_at) * 1000,
                extra={
                    "outcome": outcome,
                    "worker_id": self.config.worker_id,
                    "ttft_ms": None if ttft is None else round((ttft - active.fetched_at) * 1000, 1),
                    "latency_ms": round((ended - active.fetched_at) * 1000, 1),
                },
            )
            active.chunks.close()
            metrics.JOBS.labels(outcome=outcome, **self.labels).inc()
            if outcome == "completed":
                self.pacing.completed(ended - active.fetched_at)
            self._forget(active)

    def _forget(self, active: ActiveRequest) -> None:
        """Free a request's slot: it ended (or was abandoned)."""
        # An abandoned task that ends later must not remove a redelivery of its job.
        if self.active.get(active.job.request_id) is active:
            del self.active[active.job.request_id]
        metrics.ACTIVE.labels(**self.labels).set(len(self.active))
        if not self.active:
            self._idle.set()
        self.ended += 1
        self.slot_freed.set()

    def _first_token(self, active: ActiveRequest) -> None:
        active.first_token_at = time.monotonic()
        ttft = active.first_token_at - active.fetched_at
        metrics.TTFT.labels(**self.labels).observe(ttft)
        if self.pacing.first_token(ttft, active.first_token_at, len(self.active)):
            self.slot_freed.set()  # may end a hold
        # Acked only now: a worker that dies before its first token leaves the job to
        # JetStream, which hands it to another worker.
        self.spawn(self._ack(active))

    async def _generate(self, active: ActiveRequest) -> str:
        job = active.job
        rid = job.request_id
        chunks = active.chunks
        progress = Progress(on_first_token=functools.partial(self._first_token, active))
        request = OpenAIRequest(request_id=rid, endpoint=job.endpoint, body=job.body, stream=job.stream)
        answer: Answer | None = None
        last = ""
        told = 0  # the progress's text parts already given to chunks (Job.output_text)
        try:
            if active.cancel_reason is None:  # cancelled before it ever reached the engine
                active.in_engine = True
                answer = await self.engine.serve(request, progress)
                # Accepted by the engine: the API may now start its response.
                await self.bus.publish_stream(rid, schemas.Started(worker_id=self.config.worker_id))
            if isinstance(answer, str):
                last = answer
            elif answer is not None:
                sent = 0
                try:
                    async for data in answer:
                        if progress.error is not None:
                            continue  # the engine's own error event: the client gets chatq's
                        if data.startswith(_DONE):
                            last = data
                            continue
                        text = ""
                        if job.output_text:
                            text, told = "".join(progress.text_parts[told:]), len(progress.text_parts)
                        chunks.add(data, progress.completion_tokens - sent, text)
                        sent = progress.completion_tokens
                except Exception as exc:  # an engine that breaks off mid-stream
                    log.exception("the engine failed on %s mid-stream", rid)
                    progress.error = repr(exc)
        except asyncio.CancelledError:
            if active.cancel_reason is None:
                raise
            # Our own cancel (client gone, deadline): finish the stream normally.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        finally:
            active.generated = True
            # Closing the iterator aborts the engine request if it is still running.
            if answer is not None and not isinstance(answer, str):
                aclose = getattr(answer, "aclose", None)
                if aclose is not None:
                    await aclose()
        if active.cancel_reason == "requeue" and not active.acked:
            # A switch ended it before its first token: nothing reached the client, so the
            # job goes back to its model's queue for another worker (or this one, later).
            active.acked = True
            try:
                await active.msg.nak()
            except Exception as exc:  # noqa: BLE001 - JetStream redelivers after the ack wait
                log.warning("nak of %s failed: %r", rid, exc)
            return "requeued"
        usage = schemas.Usage(
            prompt_tokens=progress.prompt_tokens, completion_tokens=progress.completion_tokens
        )
        if progress.error is not None and active.cancel_reason is None:
            if not active.acked and active.first_token_at is None:
                # No token reached the client: the job goes back to JetStream (_run_job).
                raise EngineError(f"the engine failed before the first token: {progress.error}")
            metrics.TOKENS.labels(**self.labels).inc(progress.completion_tokens)
            metrics.PROMPT_TOKENS.labels(**self.labels).inc(progress.prompt_tokens)
            # The tokens generated so far are billed and the partial text stored (the
            # Cancelled event), and the request ends as failed with the standard error.
            await self.bus.publish_event(
                schemas.Cancelled.for_job(
                    job,
                    worker_id=self.config.worker_id,
                    reason="engine_error",
                    text=progress.text,
                    usage=usage,
                )
            )
            await self._fail(active, "engine_error", "the engine failed on this request")
            return "failed"
        metrics.TOKENS.labels(**self.labels).inc(progress.completion_tokens)
        metrics.PROMPT_TOKENS.labels(**self.labels).inc(progress.prompt_tokens)
        await self._ack(active)
        ttft = None if active.first_token_at is None else active.first_token_at - active.fetched_at
        if active.cancel_reason is not None:
            metrics.ABORTS.labels(reason=active.cancel_reason, **self.labels).inc()
            await chunks.finish("cancelled", usage)
            metrics.CHUNKS.labels(**self.labels).inc(chunks.seq)
            await self.bus.publish_event(
                schemas.Cancelled.for_job(
                    job,
                    worker_id=self.config.worker_id,
                    reason=active.cancel_reason,
                    text=progress.text,
                    usage=usage,
                )
            )
            return "cancelled"
        if progress.finish_reason == "cancelled":
            # The engine aborted it on its own (not a cancel of ours): say so, not "stop".
            await self._fail(active, "engine_error", "the engine aborted this request")
            return "failed"
        reason: FinishReason = "length" if progress.finish_reason == "length" else "stop"
        rest = "".join(progress.text_parts[told:]) if job.output_text else ""
        await chunks.finish(reason, usage, last, rest)
        metrics.CHUNKS.labels(**self.labels).inc(chunks.seq)
        await self.bus.publish_event(
            schemas.Completed.for_job(
                job,
                worker_id=self.config.worker_id,
                text=progress.text,
                finish_reason=reason,
                usage=usage,
                ttft_s=ttft,
                duration_s=time.monotonic() - active.fetched_at,
            )
        )
        return "completed"

    async def _fail(
        self, active: ActiveRequest, code: str, message: str, *, status: int = 0, param: str | None = None
    ) -> None:
        job = active.job
        await active.chunks.flushed()  # the error follows whatever output went before it
        await self.bus.publish_stream(
            job.request_id,
            schemas.StreamError(
                worker_id=self.config.worker_id, code=code, message=message, status=status, param=param
            ),
        )
        await self.bus.publish_event(
            schemas.Failed.for_job(job, code=code, message=message, worker_id=self.config.worker_id)
        )

    def cancel(self, request_id: str, reason: str) -> bool:
        """Abort a running request; the engine frees its slot on its next step."""
        active = self.active.get(request_id)
        if active is None or active.cancel_reason is not None or active.task is None or active.generated:
            return False
        active.cancel_reason = reason
        # Interrupt only a request in the engine: a task cancelled before it first runs
        # would never run its clean-up (slot, ack); before the engine, the flag suffices.
        if active.in_engine:
            active.task.cancel()
        return True

    async def on_cancel(self, data: bytes) -> None:
        """Handle a chat.cancel.<id> message; malformed ones are ignored."""
        try:
            cancel = schemas.decode_cancel(data)
        except Exception:  # noqa: BLE001 - nothing a client sends may crash a worker
            log.warning("ignoring a malformed cancel message")
            return
        if self.cancel(cancel.request_id, cancel.reason):
            log.info(
                "cancelled %s (%s)", cancel.request_id, cancel.reason, extra={"request_id": cancel.request_id}
            )
