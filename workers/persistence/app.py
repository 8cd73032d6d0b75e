"""Wires the persistence worker: a durable JetStream consumer on EVENTS → Store."""

from __future__ import annotations

import logging

import msgspec
import psycopg
from faststream import AckPolicy, FastStream
from faststream.nats import JStream, NatsBroker, NatsMessage, PullSub

import schemas
from broker import names
from workers.persistence.store import Store

log = logging.getLogger("chatq.persistence")

RETRY_DELAY_S = 2.0
DURABLE = "persistence"


def build_app(nats_url: str, store: Store) -> tuple[FastStream, NatsBroker]:
    """The persistence worker as a FastStream app; tests pass their own Store."""
    broker = NatsBroker(nats_url, max_reconnect_attempts=-1, name="chatq-persistence")
    app = FastStream(broker)

    @broker.subscriber(
        names.EVENTS_ALL,
        stream=JStream(names.EVENTS_STREAM, declare=False),
        durable=DURABLE,
        pull_sub=PullSub(batch_size=64, timeout=1.0),
        ack_policy=AckPolicy.MANUAL,
    )
    async def on_event(msg: NatsMessage) -> None:
        try:
            event = schemas.decode_event(msg.body)
        except msgspec.MsgspecError:
            log.error("dropping a malformed event on %s", msg.raw_message.subject)
            await msg.reject()
            return
        try:
            await store.apply(event)
        except (psycopg.OperationalError, OSError) as exc:
            # PostgreSQL is down: the event waits in JetStream and comes back later.
            log.warning("database unavailable (%s); retrying %s later", exc, event.request_id)
            await msg.nack(delay=RETRY_DELAY_S)
            return
        except psycopg.Error:
            log.exception("could not write %s; retrying later", event.request_id)
            await msg.nack(delay=RETRY_DELAY_S * 10)
            return
        await msg.ack()

    @app.on_startup
    async def migrate() -> None:
        await store.migrate()

    @app.on_shutdown
    async def close() -> None:
        await store.close()

    return app, broker
