"""Every subject, stream, consumer and KV bucket name in chatq; nothing else spells one."""

from __future__ import annotations

import hashlib
import re

from schemas.messages import Priority

JOBS_STREAM = "JOBS"
EVENTS_STREAM = "EVENTS"
DEADLETTER_STREAM = "DEADLETTER"
WORKERS_BUCKET = "workers"
# The persistence worker's durable consumer of EVENTS: no other reader may take from it.
EVENTS_DURABLE = "persistence"

JOBS_ALL = "chat.jobs.>"
EVENTS_ALL = "chat.events.>"
CANCEL_ALL = "chat.cancel.*"
DEADLETTER_ALL = "chat.deadletter.>"
STREAM_ALL = "chat.stream.*"
CONTROL_ALL = "control.workers.*.model"
# Events the persistence worker gave up on (the raw event, with a header naming the error).
DEADLETTER_EVENTS = "chat.deadletter.events"
PRIORITIES: tuple[Priority, ...] = ("interactive", "background")

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def model_key(model: str) -> str:
    """A subject-token and consumer-name safe key for a model name (HF ids hold '/' and '.')."""
    safe = _UNSAFE.sub("_", model)
    if safe == model:
        return safe
    # Two names that differ only in unsafe characters must not share a queue.
    return f"{safe}-{hashlib.sha1(model.encode()).hexdigest()[:8]}"


def job_subject(model: str, priority: Priority = "interactive") -> str:
    return f"chat.jobs.{model_key(model)}.{priority}"


def job_queue_of(subject: str) -> tuple[str, Priority] | None:
    """(model key, priority) of a subject job_subject() built; None for any other subject."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[:2] != ["chat", "jobs"]:
        return None
    for priority in PRIORITIES:
        if parts[3] == priority:
            return parts[2], priority
    return None


def jobs_of_priority(priority: Priority) -> str:
    """Every model's job subject of one priority (a wildcard)."""
    return f"chat.jobs.*.{priority}"


def jobs_consumer(model: str, priority: Priority = "interactive") -> str:
    """Durable pull consumer shared by every worker serving this model and priority."""
    return f"jobs-{model_key(model)}-{priority}"


def stream_subject(request_id: str) -> str:
    return f"chat.stream.{request_id}"


def cancel_subject(request_id: str) -> str:
    return f"chat.cancel.{request_id}"


def request_id_of_cancel(subject: str) -> str:
    return subject.rsplit(".", 1)[-1]


def event_subject(kind: str) -> str:
    return f"chat.events.{kind}"


def worker_key(worker_id: str) -> str:
    return _UNSAFE.sub("_", worker_id)


def worker_control_subject(worker_id: str) -> str:
    """Request/reply: an admin's model switch for one worker (core NATS, no stream)."""
    return f"control.workers.{worker_key(worker_id)}.model"
