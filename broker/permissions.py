"""What each chatq service may publish and subscribe to on NATS: one user per service.

The embedded nats-server gets these as its users (stack/nats_auth.py writes its config);
for an outside NATS server docs/deploy.md shows the same table as server configuration.
A service sees only the subjects its work needs:

- api: publishes jobs, cancels and the events it ends a stream with, reads the token
  stream of the requests it relays, watches the worker heartbeats, asks a worker to switch
  model, and declares the streams and job consumers (the API is where the topology lives in
  compose and Kubernetes, where no launcher runs first). It cannot pull a job or read the
  events stream's consumer.
- inference: pulls and acks jobs, publishes token chunks and events, writes its heartbeat,
  answers a switch request. It cannot subscribe to any token stream or event, so one
  worker cannot read what another user was answered.
- persistence: consumes the events stream, queues title jobs, dead-letters; reads no token
  stream and no job.
- telemetry: reads stream and consumer information and the heartbeats; publishes nothing.
- integration: what docs/integrations.md gives a subscriber: the events, read-only.
- admin: everything (the launcher declaring streams, an operator with the nats CLI).

Every reply chatq waits for arrives on the user's own inbox prefix (inbox_prefix()), so
no service can read another's replies (a worker's pulled jobs among them).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from broker import names
from broker.status import STATUS_BUCKET

SERVICES = ("admin", "api", "inference", "persistence", "telemetry", "integration")

_JS = "$JS.API"
_STREAMS = (names.JOBS_STREAM, names.EVENTS_STREAM, names.DEADLETTER_STREAM)


def user_name(service: str) -> str:
    """The NATS user a service connects as."""
    return f"chatq-{service}"


def inbox_prefix(user: str) -> str:
    """The inbox prefix a user's replies arrive on (nats-py's `inbox_prefix`)."""
    return f"_INBOX_{names.worker_key(user)}"


def _stream_info(*streams: str) -> list[str]:
    return [f"{_JS}.STREAM.INFO.{s}" for s in streams]


def _declare(*streams: str) -> list[str]:
    return [f"{_JS}.STREAM.{verb}.{s}" for s in streams for verb in ("CREATE", "UPDATE", "INFO")]


def _create_consumer(stream: str) -> list[str]:
    """Create a consumer: unnamed (an ordered consumer), named, or named with its filter."""
    return [f"{_JS}.CONSUMER.CREATE.{stream}", f"{_JS}.CONSUMER.CREATE.{stream}.>"]


def _consume(stream: str) -> list[str]:
    """Create, read and pull from a stream's consumers, and ack what they deliver."""
    return [
        *_create_consumer(stream),
        f"{_JS}.CONSUMER.DURABLE.CREATE.{stream}.>",
        f"{_JS}.CONSUMER.INFO.{stream}.>",
        f"{_JS}.CONSUMER.MSG.NEXT.{stream}.>",
        f"$JS.ACK.{stream}.>",
    ]


def _kv_read(bucket: str) -> list[str]:
    """Get and watch a KV bucket's keys (a watch is an ordered consumer, deleted after),
    creating the bucket where it is missing (each reader does: none may start first)."""
    stream = f"KV_{bucket}"
    return [
        *_stream_info(stream),
        f"{_JS}.STREAM.CREATE.{stream}",
        f"{_JS}.DIRECT.GET.{stream}.>",
        f"{_JS}.STREAM.MSG.GET.{stream}",
        *_create_consumer(stream),
        f"{_JS}.CONSUMER.INFO.{stream}.>",
        f"{_JS}.CONSUMER.DELETE.{stream}.>",
        f"$JS.FC.{stream}.>",
    ]


def _kv_write(bucket: str) -> list[str]:
    """Put and delete a KV bucket's keys, and create the bucket where it is missing."""
    return [f"$KV.{bucket}.>", f"{_JS}.STREAM.CREATE.KV_{bucket}", *_stream_info(f"KV_{bucket}")]


def _publish(service: str) -> list[str]:
    jobs = names.JOBS_STREAM
    if service == "api":
        return [
            names.JOBS_ALL,
            names.CANCEL_ALL,
            names.EVENTS_ALL,
            names.CONTROL_ALL,
            *_declare(*_STREAMS),
            *_create_consumer(jobs),
            f"{_JS}.CONSUMER.INFO.{jobs}.>",
            # Withdrawing a job that timed out before any worker took it.
            f"{_JS}.STREAM.MSG.DELETE.{jobs}",
            *_kv_read(names.WORKERS_BUCKET),
            *_kv_read(STATUS_BUCKET),
        ]
    if service == "inference":
        return [
            names.STREAM_ALL,
            names.EVENTS_ALL,
            *_stream_info(jobs),
            *_consume(jobs),
            *_kv_write(names.WORKERS_BUCKET),
        ]
    if service == "persistence":
        return [
            # Title jobs, and the Accepted event that records each.
            names.jobs_of_priority("background"),
            names.event_subject("accepted"),
            names.DEADLETTER_ALL,
            *_declare(names.DEADLETTER_STREAM),
            *_stream_info(names.EVENTS_STREAM, jobs),
            *_consume(names.EVENTS_STREAM),
        ]
    if service == "telemetry":
        return [
            *_stream_info(*_STREAMS),
            *(f"{_JS}.CONSUMER.{v}.{s}" for s in (jobs, names.EVENTS_STREAM) for v in ("LIST", "NAMES")),
            f"{_JS}.CONSUMER.INFO.{jobs}.>",
            # The oldest waiting job's age.
            f"{_JS}.STREAM.MSG.GET.{jobs}",
            f"{_JS}.DIRECT.GET.{jobs}.>",
            f"{_JS}.DIRECT.GET.{jobs}",
            *_kv_read(names.WORKERS_BUCKET),
            *_kv_write(STATUS_BUCKET),
        ]
    if service == "integration":
        events = names.EVENTS_STREAM
        return [
            *_stream_info(events),
            *_create_consumer(events),
            f"{_JS}.CONSUMER.INFO.{events}.>",
            f"{_JS}.CONSUMER.DELETE.{events}.>",
            f"{_JS}.CONSUMER.MSG.NEXT.{events}.>",
            f"$JS.ACK.{events}.>",
        ]
    raise ValueError(f"no NATS permissions for {service!r}")


def _subscribe(service: str) -> list[str]:
    if service == "api":
        return [names.STREAM_ALL]
    if service == "inference":
        return [names.CANCEL_ALL, names.CONTROL_ALL]
    if service == "integration":
        return [names.EVENTS_ALL]  # as they are published, or from the stream (on its inbox)
    return []


def permissions(service: str) -> dict[str, Any]:
    """The nats-server `permissions` block of a service's user."""
    if service == "admin":
        return {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}
    inbox = f"{inbox_prefix(user_name(service))}.>"
    block: dict[str, Any] = {
        "publish": {"allow": [f"{_JS}.INFO", *_publish(service)]},
        "subscribe": {"allow": [inbox, *_subscribe(service)]},
    }
    if service == "integration":
        # A reader of its own consumers: persistence's durable is not one to take from,
        # change or delete (what it took, the database would never get).
        events, durable = names.EVENTS_STREAM, names.EVENTS_DURABLE
        block["publish"]["deny"] = [
            *(f"{_JS}.CONSUMER.{verb}.{events}.{durable}" for verb in ("CREATE", "DELETE", "MSG.NEXT")),
            f"{_JS}.CONSUMER.CREATE.{events}.{durable}.>",
            f"{_JS}.CONSUMER.DURABLE.CREATE.{events}.{durable}",
            f"$JS.ACK.{events}.{durable}.>",
        ]
    if service == "inference":
        # A switch request is answered on the asker's inbox, and only that once.
        block["allow_responses"] = {"max": 1}
    return block


def server_users(password: Callable[[str], str]) -> list[dict[str, Any]]:
    """nats-server's `authorization.users`: each service's user, `password(service)` and
    its permissions (the embedded server, compose's config, the Helm chart's values)."""
    return [
        {"user": user_name(service), "password": password(service), "permissions": permissions(service)}
        for service in SERVICES
    ]


def password_variable(service: str) -> str:
    """The environment variable a NATS server reads a service's password from (compose,
    Kubernetes): `CHATQ_API_PASSWORD`."""
    return f"CHATQ_{service.upper()}_PASSWORD"


def server_config(users: list[dict[str, Any]]) -> str:
    """The `authorization` block of a nats-server config for `users` (its format reads JSON)."""
    return "authorization: " + json.dumps({"users": users}, indent=2) + "\n"


def environment_config() -> str:
    """deploy/nats/nats.conf: every service's user, each password read from the server's
    environment (password_variable(); an unquoted `$NAME` is a variable in nats-server's
    format, a quoted one text)."""
    text = server_config(server_users(lambda service: f"${password_variable(service)}"))
    for service in SERVICES:
        variable = f"${password_variable(service)}"
        text = text.replace(json.dumps(variable), variable)
    header = "# python -m broker.permissions > deploy/nats/nats.conf (tests/unit/test_nats_conf.py)\n"
    return header + text


if __name__ == "__main__":
    sys.stdout.write(environment_config())
