"""The message plane as chatq uses it: jobs, token streams, cancels, events, queue depth."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
from faststream import BaseMiddleware
from faststream.message import StreamMessage
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

import schemas
from broker import names
from chatq.logs import bound
from schemas.messages import CancelReason, Priority

log = logging.getLogger(__name__)

# Every message about one request (job, event, cancel) names it in this header, so a
# consumer tags its log lines with the request before decoding anything. Token chunks
# do not: their subject names the request and they are the hot path.
REQUEST_ID_HEADER = "Chatq-Request-Id"
# Headers of a dead-lettered event (its body is the event's bytes as they were published).
ERROR_HEADER = "Chatq-Error"
SUBJECT_HEADER = "Chatq-Subject"
DELIVERIES_HEADER = "Chatq-Deliveries"

# How long an event is retried before it counts as lost: longer than a NATS cluster takes
# to elect a stream's new leader after losing a server (5 to 8 s measured in
# tests/integration/test_nats_cluster.py), during which every publish fails at once.
EVENT_PUBLISH_WITHIN_S = 15.0
EVENT_RETRY_MAX_S = 1.0

# Unread token stream kept per request before its reader counts as too slow (4 MiB).
DEFAULT_STREAM_BUFFER_BYTES = 4 << 20


class JobRefused(Exception):
    """JetStream refused the job: the queue is at its hard bound."""


# What a job's headers (message id, request id) take of the server's max_payload, and more.
JOB_HEADROOM_BYTES = 1024


class JobTooLarge(Exception):
    """The encoded job is more than one NATS message carries (the server's max_payload)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"job of {size} bytes, at most {limit}")
        self.size = size
        self.limit = limit


@dataclass(frozen=True, slots=True)
class Queued:
    """A job in the JOBS stream: its sequence, and whether it was there already (same id)."""

    seq: int
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class ConsumerDepth:
    """A job consumer's backlog: jobs waiting, in flight, and started (acked) so far.

    `arrived` counts the jobs that have reached the consumer so far (delivered, with
    redeliveries, plus still pending): between two readings it grows by the jobs stored
    in between, which is how admission recognises its own jobs once they have landed.
    """

    pending: int
    in_flight: int
    started: int
    at: float
    arrived: int = 0
    # The stream sequence of the last job handed to a worker: a job queued at a higher
    # sequence still waits (see api/queue_position.py).
    delivered_seq: int = 0


class StreamOverflow(Exception):
    """The reader fell further behind its token stream than the subscription's bound allows."""


class StreamSubscription:
    """The per-request token stream, subscribed before the job is published.

    Messages wait in a queue until the reader takes them, bounded by `max_msgs` and
    `max_bytes` (of message payload): a reader that falls further behind than that
    (a client that stops reading its SSE stream) does not make the process grow. The
    message that would cross the bound overflows the subscription: everything buffered
    is dropped, so is every later message, the subject is unsubscribed, `on_overflow`
    is called (at once, from the NATS callback, so the job can be cancelled even while
    the reader is blocked writing to its client), and `next()` raises StreamOverflow.
    One message alone is always accepted, whatever its size (a non-streaming answer
    arrives in one message).
    """

    __slots__ = (
        "_bytes",
        "_closing",
        "_max_bytes",
        "_max_msgs",
        "_on_overflow",
        "_queue",
        "_sub",
        "overflowed",
    )

    def __init__(
        self,
        *,
        max_bytes: int = DEFAULT_STREAM_BUFFER_BYTES,
        max_msgs: int | None = None,
        on_overflow: Callable[[], None] | None = None,
    ) -> None:
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._sub: Subscription | None = None
        self._bytes = 0
        self._max_bytes = max_bytes
        # Small messages (heartbeats, single tokens) cost more than their payload.
        self._max_msgs = max_msgs if max_msgs is not None else max(16, max_bytes // 64)
        self._on_overflow = on_overflow
        self._closing: asyncio.Task[None] | None = None
        self.overflowed = False

    async def _on_msg(self, msg: Msg) -> None:
        self.put(msg.data)

    def put(self, data: bytes) -> None:
        """Buffer one message for the reader, or overflow (see the class)."""
        if self.overflowed:
            return
        queue = self._queue
        waiting = queue.qsize()
        if waiting and (waiting >= self._max_msgs or self._bytes + len(data) > self._max_bytes):
            self._overflow(len(data))
            return
        self._bytes += len(data)
        queue.put_nowait(data)

    def _overflow(self, size: int) -> None:
        log.info(
            "%s: the reader is too slow, %d messages (%d bytes) unread and %d more bytes "
            "arrived; the stream is dropped",
            self._sub.subject if self._sub is not None else "stream",
            self._queue.qsize(),
            self._bytes,
            size,
        )
        self.overflowed = True
        while not self._queue.empty():
            self._queue.get_nowait()
        self._bytes = 0
        # Wakes a reader that is waiting in next() (it raises there).
        self._queue.put_nowait(b"")
        if self._sub is not None:
            # Not from here: unsubscribing stops the task that runs this callback.
            self._closing = asyncio.get_running_loop().create_task(self.close())
        if self._on_overflow is not None:
            try:
                self._on_overflow()
            except Exception:
                log.exception("stream overflow handler failed")

    async def next(self, timeout: float) -> schemas.StreamMsg | None:
        """The next message, or None when nothing arrived within timeout seconds.

        Raises StreamOverflow once the reader has fallen too far behind.
        """
        if self.overflowed:
            raise StreamOverflow
        if self._queue.empty():
            try:
                async with asyncio.timeout(timeout):
                    data = await self._queue.get()
            except TimeoutError:
                return None
        else:
            # Under load the message is often here already: no timer, no suspension.
            data = self._queue.get_nowait()
        if self.overflowed:
            raise StreamOverflow
        self._bytes -= len(data)
        message: schemas.StreamMsg = schemas.decode_stream(data)
        return message

    def waiting(self) -> int:
        return 0 if self.overflowed else self._queue.qsize()

    def buffered_bytes(self) -> int:
        return self._bytes

    async def close(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - unsubscribing from a connection that is gone
                pass


class Bus:
    """Typed publish and subscribe over one NATS connection."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=5.0)

    async def publish_job(self, job: schemas.Job) -> Queued:
        """Queue a job durably, once per request id. Raises JobRefused when full,
        JobTooLarge when one message cannot carry it."""
        data = schemas.encode(job)
        limit = self.nc.max_payload - JOB_HEADROOM_BYTES
        if len(data) > limit:
            raise JobTooLarge(len(data), limit)
        try:
            ack = await self.js.publish(
                names.job_subject(job.model, job.priority),
                data,
                stream=names.JOBS_STREAM,
                headers={"Nats-Msg-Id": job.request_id, REQUEST_ID_HEADER: job.request_id},
            )
        except APIError as exc:
            # 10077: maximum messages exceeded (discard=new, per subject or in total)
            if exc.err_code == 10077 or "maximum messages" in (exc.description or ""):
                raise JobRefused(str(exc.description)) from exc
            raise
        return Queued(seq=int(ack.seq), duplicate=bool(ack.duplicate))

    async def withdraw_job(self, seq: int) -> bool:
        """Remove a job that no worker has taken yet; False when it is already gone."""
        try:
            return await self.js.delete_msg(names.JOBS_STREAM, seq)
        except (NotFoundError, APIError):
            return False
        except nats.errors.TimeoutError:
            # The job stays queued: a worker that takes it finds it cancelled, or its
            # deadline passed, and drops it.
            log.warning("withdrawing job %d from %s timed out", seq, names.JOBS_STREAM)
            return False

    async def publish_event(self, event: schemas.Event, *, within_s: float = EVENT_PUBLISH_WITHIN_S) -> None:
        """Store an event in the EVENTS stream, de-duplicated by request id and kind;
        retried for `within_s` seconds, then raised."""
        kind = type(event).__struct_config__.tag
        deadline = time.monotonic() + within_s
        for attempt in itertools.count():
            try:
                await self.js.publish(
                    names.event_subject(str(kind)),
                    schemas.encode(event),
                    stream=names.EVENTS_STREAM,
                    headers={
                        "Nats-Msg-Id": f"{event.request_id}:{kind}",
                        REQUEST_ID_HEADER: event.request_id,
                    },
                )
                return
            except Exception:
                pause = min(EVENT_RETRY_MAX_S, 0.2 * 2**attempt)
                if time.monotonic() + pause > deadline:
                    log.exception("event %s for %s lost", kind, event.request_id)
                    raise
                await asyncio.sleep(pause)

    async def dead_letter_event(
        self, data: bytes, *, request_id: str, subject: str, stream_seq: int, deliveries: int, reason: str
    ) -> None:
        """Keep an event that cannot be stored in the DEADLETTER stream, with why, once."""
        await self.js.publish(
            names.DEADLETTER_EVENTS,
            data,
            stream=names.DEADLETTER_STREAM,
            headers={
                ERROR_HEADER: reason,
                REQUEST_ID_HEADER: request_id,
                SUBJECT_HEADER: subject,
                DELIVERIES_HEADER: str(deliveries),
                # Dead-lettered twice (the first ack lost), it is stored once.
                "Nats-Msg-Id": f"{names.EVENTS_STREAM}-{stream_seq}",
            },
        )

    async def publish_cancel(self, request_id: str, reason: CancelReason) -> None:
        cancel = schemas.Cancel(request_id=request_id, reason=reason)
        await self.nc.publish(
            names.cancel_subject(request_id), schemas.encode(cancel), headers={REQUEST_ID_HEADER: request_id}
        )

    async def publish_stream(self, request_id: str, message: schemas.StreamMsg) -> None:
        await self.nc.publish(names.stream_subject(request_id), schemas.encode(message))

    async def subscribe_stream(
        self,
        request_id: str,
        *,
        max_bytes: int = DEFAULT_STREAM_BUFFER_BYTES,
        max_msgs: int | None = None,
        on_overflow: Callable[[], None] | None = None,
    ) -> StreamSubscription:
        """Subscribe to a request's token stream, buffered up to the bounds (StreamSubscription)."""
        stream = StreamSubscription(max_bytes=max_bytes, max_msgs=max_msgs, on_overflow=on_overflow)
        stream._sub = await self.nc.subscribe(names.stream_subject(request_id), cb=stream._on_msg)
        return stream

    async def consumer_depth(self, model: str, priority: Priority = "interactive") -> ConsumerDepth:
        info = await self.js.consumer_info(names.JOBS_STREAM, names.jobs_consumer(model, priority))
        pending = int(info.num_pending or 0)
        in_flight = int(info.num_ack_pending or 0)
        delivered = int(info.delivered.consumer_seq or 0) if info.delivered else 0
        return ConsumerDepth(
            pending=pending,
            in_flight=in_flight,
            # Workers ack at the first token, so deliveries no longer awaiting their ack
            # are jobs started. (Not the ack floor: one slow prefill would hold it still
            # while the jobs after it start.)
            started=max(0, delivered - in_flight),
            at=time.monotonic(),
            arrived=pending + delivered,
            delivered_seq=int(info.delivered.stream_seq or 0) if info.delivered else 0,
        )

    async def pulls_waiting(self, stream: str, durable: str) -> int:
        """Pull requests a durable consumer's subscribers hold open: 0 when none is alive."""
        info = await self.js.consumer_info(stream, durable)
        return int(info.num_waiting or 0)

    async def jobs_in_stream(self) -> int:
        info = await self.js.stream_info(names.JOBS_STREAM)
        return int(info.state.messages)

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.drain()


class RequestContext(BaseMiddleware):
    """FastStream middleware: what a handler logs names the request its message is about."""

    async def consume_scope(
        self, call_next: Callable[[StreamMessage[Any]], Awaitable[Any]], msg: StreamMessage[Any]
    ) -> Any:
        request_id = msg.headers.get(REQUEST_ID_HEADER) if msg.headers else None
        if not request_id:
            return await call_next(msg)
        with bound(str(request_id)):
            return await call_next(msg)
