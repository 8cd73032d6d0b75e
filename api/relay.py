"""Relays one request's token stream from NATS to the client, in order, or fails clearly."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import anyio

import schemas
from api import metrics
from api.admission import QueueMonitor
from api.content_policy import OutputWatch, Policy
from broker.bus import (
    DEFAULT_STREAM_BUFFER_BYTES,
    Bus,
    JobRefused,
    JobTooLarge,
    StreamOverflow,
    StreamSubscription,
)
from chatq.errors import (
    ApiError,
    ContentRefused,
    DeadlineExceeded,
    InvalidRequest,
    ModelNotFound,
    RequestTooLarge,
    StreamFailed,
    UpstreamUnavailable,
)
from chatq.tasks import TaskSet
from schemas.messages import CancelReason

log = logging.getLogger(__name__)


def _no_answer() -> DeadlineExceeded:
    return DeadlineExceeded("no worker answered before the request's deadline")


def client_too_slow() -> StreamFailed:
    return StreamFailed(
        "the client did not read its stream fast enough: more of the answer waited unread "
        "than this server buffers per stream, so the request was stopped",
        code="client_too_slow",
    )


def worker_error(error: schemas.StreamError) -> ApiError:
    """The client-facing error for a worker's StreamError."""
    if error.status == 404:
        return ModelNotFound(error.message, code=error.code, param=error.param)
    if error.status == 413:
        return RequestTooLarge(error.message, code=error.code, param=error.param)
    if 400 <= error.status < 500:
        return InvalidRequest(error.message, code=error.code, param=error.param)
    if error.code == "deadline_exceeded":
        return DeadlineExceeded(error.message)
    return StreamFailed(error.message, code=error.code)


class Relay:
    """One accepted request: subscribed, queued, then read chunk by chunk.

    The subscription exists before the job is published, so no chunk can be missed.
    Before the first chunk the job is durable in JetStream (a lost worker means a
    redelivery), so the relay waits up to the deadline; after it, silence longer than
    the watchdog means the worker is gone and the client gets an error, never a hang.

    What arrives and is not read yet is bounded (`buffer_bytes`, STREAM_BUFFER_BYTES by
    default): a client too slow for its stream overflows it, which cancels the job at
    once (even while the response is blocked writing to that client) and ends the
    stream with a `client_too_slow` error.
    """

    def __init__(
        self,
        bus: Bus,
        job: schemas.Job,
        *,
        watchdog_s: float,
        spawn: TaskSet,
        buffer_bytes: int = DEFAULT_STREAM_BUFFER_BYTES,
        output: tuple[Policy, ...] = (),
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.bus = bus
        # Called once when the relay closes (the process's stream count, StreamCap).
        self._on_close = on_close
        self.job = job
        self.watchdog_s = watchdog_s
        self.buffer_bytes = buffer_bytes
        self._spawn = spawn
        self._sub: StreamSubscription | None = None
        self._monitor: QueueMonitor | None = None
        self._held: schemas.StreamMsg | None = None
        self._seq: int | None = None
        self.worker_id: str | None = None
        self.next_seq = 0
        self.finished = False
        self._closed = False
        # Why the stream failed, for the Failed event (a StreamFailed, or an output policy's).
        self.failure: StreamFailed | ContentRefused | None = None
        self._watch = OutputWatch(output) if output and job.output_text else None
        self.started_at = time.monotonic()
        self.first_token_at: float | None = None
        # Labelled children resolved once, not per chunk.
        self._ttft = metrics.TTFT.labels(model=job.model)
        self._itl = metrics.ITL.labels(model=job.model)
        self._e2e = metrics.E2E.labels(model=job.model)

    async def open(self, monitor: QueueMonitor) -> None:
        """Subscribe, then queue the job; a full queue raises Overloaded with nothing queued."""
        self._monitor = monitor
        try:
            self._sub = await self.bus.subscribe_stream(
                self.job.request_id, max_bytes=self.buffer_bytes, on_overflow=self._overflowed
            )
        except BaseException:
            monitor.not_queued(self.job.model, self.job.priority)  # nothing was published
            raise
        try:
            self._seq = (await self.bus.publish_job(self.job)).seq
        except JobRefused:
            await self._sub.close()
            raise monitor.refused(self.job.model, self.job.priority) from None
        except JobTooLarge as exc:
            await self._sub.close()
            monitor.not_queued(self.job.model, self.job.priority)
            raise RequestTooLarge(
                f"the request is too large to queue: a job may be at most {exc.limit} bytes once "
                f"encoded (the message bus's max_payload less headers), this one is {exc.size}"
            ) from None
        except Exception as exc:
            await self._sub.close()
            monitor.not_queued(self.job.model, self.job.priority)
            raise UpstreamUnavailable(f"the job queue is unreachable: {type(exc).__name__}") from exc
        except BaseException:
            # Cancelled (the client went away) while publishing: the job may yet land, and
            # then the next reading counts it; the caller unsubscribes.
            monitor.not_queued(self.job.model, self.job.priority)
            raise
        self._spawn(self.bus.publish_event(schemas.Accepted.for_job(self.job, _stored_messages(self.job))))

    async def accepted(self) -> None:
        """Wait until a worker's engine has accepted the job; its refusal raises (a 4xx)."""
        assert self._sub is not None
        while True:
            msg = await self._next(self._until_deadline())
            if msg is None:
                raise _no_answer()
            if isinstance(msg, schemas.StreamError):
                self.finished = True
                raise worker_error(msg)
            if isinstance(msg, schemas.Started):
                return
            if isinstance(msg, schemas.Chunk):
                self._held = msg  # relayed by chunks()
                return

    async def chunks(self) -> AsyncIterator[schemas.Chunk]:
        """The request's chunks in order; the last has a finish reason. Raises ApiError."""
        assert self._sub is not None
        last_at = 0.0
        while True:
            if self._held is not None:
                msg: schemas.StreamMsg | None = self._held
                self._held = None
            else:
                if self.next_seq == 0 and self.worker_id is None:
                    # Queued, or waiting for its first token: the job is durable until then.
                    timeout = self._until_deadline()
                else:
                    timeout = self.watchdog_s
                msg = await self._next(timeout)
            if msg is None:
                if self.next_seq == 0 and self.worker_id is None:
                    raise _no_answer()
                raise self._failed(
                    StreamFailed(
                        f"the worker went silent for {self.watchdog_s:g} s mid-stream", code="worker_lost"
                    )
                )
            if isinstance(msg, schemas.Chunk):
                if self.worker_id is None:
                    self.worker_id = msg.worker_id
                elif msg.worker_id != self.worker_id:
                    continue  # a slow duplicate of a redelivered job: ignore it
                if msg.seq < self.next_seq:
                    continue
                if msg.seq > self.next_seq:
                    log.warning(
                        "%s: expected chunk %d, got %d from %s",
                        self.job.request_id,
                        self.next_seq,
                        msg.seq,
                        msg.worker_id,
                    )
                    raise self._failed(
                        StreamFailed(f"chunk {self.next_seq} of the stream was lost", code="stream_gap")
                    )
                self.next_seq += 1
                now = time.monotonic()
                if self.first_token_at is None:
                    self.first_token_at = now
                    self._ttft.observe(now - self.started_at)
                elif msg.tokens:
                    self._itl.observe((now - last_at) / msg.tokens)
                last_at = now
                if self._watch is not None:
                    try:
                        self._watch.check(msg.text, last=msg.finish_reason is not None)
                    except ContentRefused as exc:
                        raise self._failed(exc) from None
                if msg.finish_reason is not None:
                    self._ended()
                    self._e2e.observe(now - self.started_at)
                yield msg
                if self.finished:
                    return
            elif isinstance(msg, schemas.Heartbeat):
                if self.worker_id is None:
                    # A worker past its first token (acked: no redelivery from here on)
                    # whose output is not here yet (a non-streaming answer): watch it.
                    self.worker_id = msg.worker_id
                if msg.worker_id == self.worker_id and msg.next_seq > self.next_seq:
                    raise self._failed(
                        StreamFailed(f"chunk {self.next_seq} of the stream was lost", code="stream_gap")
                    )
            elif isinstance(msg, schemas.StreamError):
                if self.worker_id is None or msg.worker_id == self.worker_id:
                    self._ended()
                    raise self._failed(worker_error(msg))
            # Started: a worker took the job; nothing to relay yet.

    def _ended(self) -> None:
        """The worker has ended the job: its slot is free (admission counts it at once)."""
        self.finished = True
        if self._monitor is not None:
            self._monitor.ended(self.job.model)

    def _until_deadline(self) -> float:
        """Seconds left until the request's deadline; raises once it has passed."""
        left = self.job.deadline - time.time()
        if left <= 0:
            raise _no_answer()
        return left

    async def _next(self, timeout: float) -> schemas.StreamMsg | None:
        assert self._sub is not None
        try:
            return await self._sub.next(timeout)
        except StreamOverflow:
            raise self._failed(client_too_slow()) from None

    def _failed(self, exc: ApiError) -> ApiError:
        """Remember why the stream failed (for the Failed event), then raise it."""
        if isinstance(exc, StreamFailed | ContentRefused) and self.failure is None:
            self.failure = exc
        return exc

    def _overflowed(self) -> None:
        """The client fell too far behind: stop the job now, not when its write unblocks."""
        self._failed(client_too_slow())
        log.warning(
            "%s: client too slow after %d chunks (bound %d bytes); cancelling the job",
            self.job.request_id,
            self.next_seq,
            self.buffer_bytes,
        )
        self._spawn(self.close("stream_failed"))

    def waiting(self) -> int:
        """Stream messages already received and not yet read."""
        return self._sub.waiting() if self._sub is not None else 0

    async def close(self, reason: CancelReason | None) -> None:
        """Unsubscribe; if the stream did not finish, cancel it where it is (queue or worker)."""
        if self._closed:
            return
        self._closed = True
        if self._on_close is not None:
            self._on_close()
        # Runs from a cancelled scope when the client has gone: shield the clean-up.
        with anyio.CancelScope(shield=True):
            if self._sub is not None:
                await self._sub.close()
            if self.finished or reason is None:
                return
            metrics.CANCELLED.labels(model=self.job.model, reason=reason).inc()
            rid = self.job.request_id
            with contextlib.suppress(Exception):
                await self.bus.publish_cancel(rid, reason)
            if self.next_seq == 0 and self._seq is not None:
                # Still queued? Then take it out, so no worker spends time on it.
                withdrawn = await self.bus.withdraw_job(self._seq)
                if withdrawn:
                    self._spawn(
                        self.bus.publish_event(
                            schemas.Cancelled.for_job(self.job, worker_id="api", reason=reason)
                        )
                    )
            elif reason == "stream_failed":
                self._spawn(
                    self.bus.publish_event(
                        schemas.Failed.for_job(
                            self.job,
                            code=self.failure.code if self.failure else "worker_lost",
                            message=self.failure.message if self.failure else "the stream broke mid-way",
                            worker_id=self.worker_id,
                        )
                    )
                )


def _stored_messages(job: schemas.Job) -> list[schemas.ChatMessage]:
    """What a request adds to the record: its whole prompt, or a conversation turn's new messages."""
    meta = job.meta
    if meta.conversation_id is None:
        return job.messages
    return job.messages[len(job.messages) - (meta.answer_position - meta.position) :]
