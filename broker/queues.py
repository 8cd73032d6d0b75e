"""The job queues and event consumers as JetStream has them: depth, oldest wait, lag."""

from __future__ import annotations

import time
from collections.abc import Iterable

from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo

from broker import names
from schemas.messages import Priority
from schemas.status import ConsumerLag, QueueStatus


def _queue_of(info: ConsumerInfo, models: dict[str, str]) -> tuple[str, Priority, str] | None:
    """(model, priority, filter subject) of a job consumer, from its filter subject."""
    subject = info.config.filter_subject or ""
    queue = names.job_queue_of(subject)
    if queue is None:
        return None
    key, priority = queue
    return models.get(key, key), priority, subject


async def _oldest_age(js: JetStreamContext, info: ConsumerInfo, subject: str, now: float) -> float | None:
    """Age of the first job after the last one the consumer delivered (None: none waits)."""
    if not info.num_pending:
        return None
    after = info.delivered.stream_seq if info.delivered is not None else 0
    msg = await js.get_msg(names.JOBS_STREAM, seq=after + 1, subject=subject, next=True)
    if msg.time is None:
        return None
    return round(max(0.0, now - msg.time.timestamp()), 3)


async def queues_of_streams(
    js: JetStreamContext, models: Iterable[str]
) -> tuple[list[QueueStatus], list[ConsumerLag], list[str]]:
    """Every job queue with its depth and oldest age, and every EVENTS consumer's lag."""
    keys = {names.model_key(m): m for m in models}
    queues: list[QueueStatus] = []
    notes: list[str] = []
    now = time.time()
    for info in await js.consumers_info(names.JOBS_STREAM):
        queue = _queue_of(info, keys)
        if queue is None:
            continue
        model, priority, subject = queue
        try:
            oldest = await _oldest_age(js, info, subject, now)
        except Exception as exc:  # noqa: BLE001 - taken by a worker meanwhile: no age this round
            oldest = None
            if info.num_pending:
                notes.append(f"oldest job of {info.name} unknown: {exc!r}")
        queues.append(
            QueueStatus(
                model=model,
                priority=priority,
                consumer=info.name,
                depth=info.num_pending or 0,
                in_flight=info.num_ack_pending or 0,
                redelivered=info.num_redelivered or 0,
                oldest_age_s=oldest,
            )
        )
    queues.sort(key=lambda q: (q.model, names.PRIORITIES.index(q.priority)))
    lags = [
        ConsumerLag(consumer=info.name, pending=info.num_pending or 0)
        for info in await js.consumers_info(names.EVENTS_STREAM)
    ]
    return queues, lags, notes
