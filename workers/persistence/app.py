"""Wires the persistence worker: a durable JetStream consumer on EVENTS → Store.

An event whose write fails for a transient reason (PostgreSQL down or restarting, a lost
connection, a connect or statement timeout) waits in JetStream and is retried until it is
written, however long that takes. One that fails for any other reason (it cannot be
decoded, PostgreSQL refuses its data) is tried `max_deliver` times in all, then published
as it came to the dead-letter subject with headers naming the error, and terminated: it
never blocks the events behind it.

Once a conversation's first question and answer are both stored and it has no title, the
worker queues a background title job for it (workers/persistence/titles.py), with its
Accepted event; the job's Completed event, written here too, sets the title.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter

import msgspec
import psycopg
from faststream import AckPolicy, FastStream
from faststream.nats import JStream, NatsBroker, NatsMessage, PullSub

import schemas
from broker import names, topology
from broker.bus import Bus, RequestContext
from broker.connect import NO_LOGIN, NatsLogin, server_urls
from chatq.logs import url_for_log
from workers.persistence.store import Store, is_transient
from workers.persistence.titles import TitleSource, title_job

log = logging.getLogger("chatq.persistence")

RETRY_DELAY_S = 2.0
MAX_DELIVER = 5
SUMMARY_INTERVAL_S = 60.0
DURABLE = names.EVENTS_DURABLE
_MAX_REASON = 500


def _reason(exc: BaseException) -> str:
    """The error as one short line, fit for a NATS header and a log line."""
    text = " ".join(str(exc).split())
    reason = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return reason[:_MAX_REASON]


def _request_id_of(body: bytes) -> str:
    """The request id of an event that does not decode as an Event, if it has one."""
    try:
        raw = msgspec.msgpack.decode(body)
    except msgspec.MsgspecError:
        return "?"
    rid = raw.get("request_id") if isinstance(raw, dict) else None
    return rid if isinstance(rid, str) else "?"


class Tally:
    """What the worker did since the last summary line."""

    def __init__(self) -> None:
        self.written: Counter[str] = Counter()
        self.retried = 0
        self.dead = 0
        self.titles = 0

    def summary(self) -> str | None:
        total = sum(self.written.values())
        if not (total or self.retried or self.dead):
            return None
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(self.written.items()))
        line = f"wrote {total} events ({kinds or 'none'}), {self.retried} retries, {self.dead} dead-lettered"
        if self.titles:
            line += f", {self.titles} title jobs queued"
        self.written.clear()
        self.retried = self.dead = self.titles = 0
        return line


def build_app(
    nats_url: str,
    store: Store,
    *,
    max_deliver: int = MAX_DELIVER,
    retry_delay_s: float = RETRY_DELAY_S,
    summary_interval_s: float = SUMMARY_INTERVAL_S,
    title_jobs: bool = True,
    login: NatsLogin = NO_LOGIN,
    stream_replicas: int = 1,
) -> tuple[FastStream, NatsBroker]:
    """The persistence worker as a FastStream app; tests pass their own Store.

    `title_jobs` (TITLE_JOBS): queue a title job for each new conversation;
    `stream_replicas` (NATS_STREAM_REPLICAS): the DEADLETTER stream's.
    """
    # FastStream's own lines go through our logging (one format, no colours); its two
    # lines per message ("Received", "Processed") at DEBUG, and its other chatter below
    # WARNING only with LOG_LEVEL=DEBUG: at INFO the log shows what this worker says.
    faststream_log = logging.getLogger("chatq.persistence.faststream")
    if not faststream_log.isEnabledFor(logging.DEBUG):
        faststream_log.setLevel(logging.WARNING)
    broker = NatsBroker(
        server_urls(nats_url),
        max_reconnect_attempts=-1,
        name="chatq-persistence",
        logger=faststream_log,
        log_level=logging.DEBUG,
        # Each event's Chatq-Request-Id header tags what is logged while handling it.
        middlewares=[RequestContext],
        **login.broker_options(nats_url),
    )
    app = FastStream(broker, logger=log)
    tally = Tally()
    tasks: list[asyncio.Task[None]] = []

    async def give_up_or_retry(msg: NatsMessage, request_id: str, kind: str, exc: BaseException) -> None:
        """A non-transient failure: retry a bounded number of times, then dead-letter."""
        reason = _reason(exc)
        meta = msg.raw_message.metadata
        tries = meta.num_delivered
        if tries < max_deliver:
            log.warning(
                "could not write the %s event of %s (try %d of %d): %s; trying again in %g s",
                kind,
                request_id,
                tries,
                max_deliver,
                reason,
                retry_delay_s,
            )
            tally.retried += 1
            await msg.nack(delay=retry_delay_s)
            return
        try:
            await Bus(broker.connection).dead_letter_event(
                msg.body,
                request_id=request_id,
                subject=msg.raw_message.subject,
                stream_seq=meta.sequence.stream,
                deliveries=tries,
                reason=reason,
            )
        except Exception as pub_exc:  # noqa: BLE001 - NATS trouble: keep the event, try later
            log.warning(
                "could not dead-letter the %s event of %s (%r); trying later", kind, request_id, pub_exc
            )
            await msg.nack(delay=retry_delay_s)
            return
        await msg.reject()
        tally.dead += 1
        # A traceback only where it can help: an error of our code, not refused data.
        log.error(
            "dead-lettered the %s event of %s to %s after %d tries: %s",
            kind,
            request_id,
            names.DEADLETTER_EVENTS,
            tries,
            reason,
            exc_info=None if isinstance(exc, psycopg.Error | msgspec.MsgspecError) else exc,
        )

    async def queue_title(source: TitleSource) -> None:
        """Queue the conversation's title job and its Accepted event; a failure only logs.

        The event that made the title due is stored whatever happens here (its ack
        follows): a missing title is cosmetic, and the conversation gets none rather than
        holding up the events behind it. The job's id is `title-<conversation id>`, so a
        redelivered event queues it once (JetStream de-duplication), and once its Accepted
        event is written the conversation is no longer due a title at all.
        """
        job = title_job(source)
        bus = Bus(broker.connection)
        try:
            queued = await bus.publish_job(job)
        except Exception as exc:  # noqa: BLE001 - NATS trouble or a full queue: no title
            log.warning(
                "could not queue the title job of conversation %s: %s", source.conversation_id, _reason(exc)
            )
            return
        if queued.duplicate:
            return  # queued already by an earlier delivery of the same event
        tally.titles += 1
        log.debug("queued the title job of conversation %s", source.conversation_id)
        try:
            await bus.publish_event(schemas.Accepted.for_job(job, []), within_s=1.0)
        except Exception as exc:  # noqa: BLE001 - its Completed event still writes the row
            log.warning("could not record the title job %s: %s", job.request_id, _reason(exc))

    @broker.subscriber(
        names.EVENTS_ALL,
        stream=JStream(names.EVENTS_STREAM, declare=False),
        durable=DURABLE,
        pull_sub=PullSub(batch_size=64, timeout=1.0),
        ack_policy=AckPolicy.MANUAL,
        inbox_prefix=login.pull_inbox_prefix(nats_url),
    )
    async def on_event(msg: NatsMessage) -> None:
        kind = msg.raw_message.subject.rsplit(".", 1)[-1]
        try:
            event = schemas.decode_event(msg.body)
        except msgspec.MsgspecError as exc:
            await give_up_or_retry(msg, _request_id_of(msg.body), kind, exc)
            return
        try:
            due = await store.apply(event, titles=title_jobs)
        except Exception as exc:  # noqa: BLE001 - sorted into transient or not below
            if not is_transient(exc):
                await give_up_or_retry(msg, event.request_id, kind, exc)
                return
            # PostgreSQL is down or slow: the event waits in JetStream and comes back later.
            log.warning(
                "could not write for now (%s); retrying the %s event of %s in %g s",
                _reason(exc),
                kind,
                event.request_id,
                retry_delay_s,
            )
            tally.retried += 1
            await msg.nack(delay=retry_delay_s)
            return
        if due is not None:
            # Never raises: a title job that cannot be queued is logged and the event is
            # acked all the same (it is stored; only the title is missing).
            await queue_title(due)
        await msg.ack()
        tally.written[kind] += 1
        # The request's end at INFO (so `./logs --request ID` shows it was stored), the rest at DEBUG.
        level = logging.DEBUG if isinstance(event, schemas.Accepted) else logging.INFO
        log.log(level, "wrote the %s event of %s", kind, event.request_id)

    async def summaries() -> None:
        while True:
            await asyncio.sleep(summary_interval_s)
            if line := tally.summary():
                log.info("last %g s: %s", summary_interval_s, line)

    @app.on_startup
    async def migrate() -> None:
        if applied := await store.migrate():
            log.info("applied the database migrations %s", ", ".join(applied))

    @app.after_startup
    async def started() -> None:
        await topology.ensure_deadletter(broker.connection.jetstream(), replicas=stream_replicas)
        tasks.append(asyncio.create_task(summaries()))
        log.info(
            "persistence worker started: NATS %s, PostgreSQL %s; events that fail %d times for "
            "a non-transient reason go to %s; title jobs %s",
            url_for_log(nats_url),
            store.describe(),
            max_deliver,
            names.DEADLETTER_EVENTS,
            "on" if title_jobs else "off",
        )

    @app.on_shutdown
    async def close() -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if line := tally.summary():
            log.info("at shutdown: %s", line)
        await store.close()

    return app, broker
