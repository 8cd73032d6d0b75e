"""The AsyncAPI 3.0 document of every subject an integration may use, built from the code.

Channels come from `SUBJECTS` below, whose addresses are spelled by broker/names.py and
whose stream settings are read from broker/topology.py; message schemas are msgspec's own
JSON Schema of the Structs in schemas/ (`msgspec.json.schema_components`), never a copy.
A new subject is one more `Subject` in `SUBJECTS`; a new member of a union already listed
(an Event kind) is picked up by itself.

Why not FastStream's AsyncAPI generator: it describes a broker's FastStream subscribers and
publishers and builds every payload schema through pydantic, which cannot describe a
msgspec Struct (PydanticInvalidForJsonSchema), and it stamps every message
`application/json`. chatq's events are published with nats.py and are msgpack, and the
worker-side subjects have no FastStream subscriber to read. So the document is assembled
here as plain JSON; tests/integration/test_asyncapi.py checks it against FastStream's
AsyncAPI 3.0 model (its pydantic `ApplicationSchema`) and against msgspec's schemas.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import UnionType
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec

from broker import bus, names, status, topology
from schemas import messages
from schemas import status as status_schemas

ASYNCAPI_VERSION = "3.0.0"
CONTENT_TYPE = "application/msgpack"
TAG_FIELD = "t"
SCHEMA_REF = "#/components/schemas/{name}"

# Dead-lettered events keep their body and gain these headers (Bus.dead_letter_event).
DEADLETTER_HEADERS = {
    bus.ERROR_HEADER: "why the event was given up on, one line",
    bus.REQUEST_ID_HEADER: "the event's request id ('?' when the body does not decode)",
    bus.SUBJECT_HEADER: "the subject the event was published on",
    bus.DELIVERIES_HEADER: "how many times it was tried",
}

# What each event kind means to an integrator; a kind missing here is described by its
# Struct's docstring.
EVENT_TEXT = {
    "accepted": "The API accepted a request and queued it (before any worker took it); carries the "
    "prompt's new messages.",
    "completed": "A request finished: the answer's text, finish_reason and usage (prompt and "
    "completion tokens).",
    "cancelled": "A request was cancelled (client gone, deadline, stream failure) after tokens were "
    "generated: the partial text and the tokens used, which are billed.",
    "failed": "A request failed or was refused (engine error, bad parameter, lost worker).",
}

# Tagged Structs left out of the document, and why: they are chatq's own plumbing between
# the API and the workers, and an outside publisher would bypass authentication, admission
# and rate limits. The test fails on a tagged Struct that is in neither list.
INTERNAL: tuple[type[msgspec.Struct], ...] = (
    messages.Job,  # chat.jobs.<model>.<priority>: published by the API after admission
    messages.Started,  # chat.stream.<request id>: the token stream of one request
    messages.Chunk,
    messages.Heartbeat,
    messages.StreamError,
    messages.Cancel,  # chat.cancel.<request id>: the API's own cancels
)
# Their subjects, as NATS wildcards; the test fails on a names.py subject in neither list.
INTERNAL_SUBJECTS = (names.JOBS_ALL, names.stream_subject("*"), names.CANCEL_ALL)


@dataclass(frozen=True, slots=True)
class Subject:
    """One channel of the document: its NATS address, its messages and who sends them."""

    key: str  # the channel's id in the document
    # The NATS subject; `{name}` marks a token described in `parameters`. None: a reply inbox.
    address: str | None
    messages: tuple[type[msgspec.Struct], ...]
    description: str
    # What chatq does on it: "send" (chatq publishes, integrators read) or "receive".
    action: Literal["send", "receive"]
    parameters: Mapping[str, str] = field(default_factory=dict)
    # Request/reply: the messages chatq answers with on the request's reply subject.
    replies: tuple[type[msgspec.Struct], ...] = ()
    summary: str = ""
    # NATS headers its messages carry: name → meaning (the first subject of a message says).
    headers: Mapping[str, str] = field(default_factory=dict)


def members(union: Any) -> tuple[type[msgspec.Struct], ...]:
    """The Structs of a union type (or the one Struct given)."""
    if isinstance(union, UnionType) or typing.get_origin(union) is typing.Union:
        return tuple(typing.get_args(union))
    return (union,)


def tag_of(struct: type[msgspec.Struct]) -> str | None:
    """The value of a tagged Struct's `t` field, None for an untagged one."""
    tag = struct.__struct_config__.tag
    return None if tag is None else str(tag)


def _param(name: str) -> str:
    # A token names.py keeps as it is (letters, digits, _), swapped for {name} afterwards.
    return f"__{name}__"


def _with_params(subject: str, *params: str) -> str:
    for name in params:
        subject = subject.replace(_param(name), "{" + name + "}")
    return subject


def _days(seconds: float | None) -> str:
    return "forever" if not seconds else f"{seconds / 86400:g} days"


def _events_text() -> str:
    config = topology.events_stream_config()
    return (
        f"Stored in the JetStream stream {config.name} (subjects {names.EVENTS_ALL}, "
        f"{getattr(config.retention, 'value', config.retention)} retention, kept "
        f"{_days(config.max_age)} whether or not anyone has read them); a publish repeated with "
        f"the same Nats-Msg-Id (`<request id>:<kind>`) within {config.duplicate_window:g} s is "
        "stored once. Read them with a consumer of your own (an ordered/ephemeral one, or a durable "
        f"with another name than chatq's `persistence`): consumers of the {config.name} stream never "
        "take events from each other."
    )


# The headers bus.publish_event sets on every event.
EVENT_HEADERS = {
    "Nats-Msg-Id": "`<request id>:<kind>`: JetStream's de-duplication key",
    bus.REQUEST_ID_HEADER: "the event's request id, readable without decoding the body",
}


def _event_subjects() -> list[Subject]:
    shared = _events_text()
    subjects = []
    for struct in members(messages.Event):
        tag = tag_of(struct)
        assert tag is not None, f"{struct.__name__} is an Event without a tag"
        subjects.append(
            Subject(
                key=f"events-{tag}",
                address=names.event_subject(tag),
                messages=(struct,),
                summary=EVENT_TEXT.get(tag) or (struct.__doc__ or "").strip(),
                description=shared,
                action="send",
                headers=EVENT_HEADERS,
            )
        )
    return subjects


def _deadletter_subject() -> Subject:
    config = topology.deadletter_stream_config()
    headers = "; ".join(f"`{k}`: {v}" for k, v in DEADLETTER_HEADERS.items())
    return Subject(
        key="deadletter-events",
        address=names.DEADLETTER_EVENTS,
        messages=members(messages.Event),
        summary="Events the persistence worker gave up on, as they were published.",
        description=(
            f"Stored in the JetStream stream {config.name} (kept {_days(config.max_age)}, at most "
            f"{config.max_msgs} messages, the oldest dropped first); nothing in chatq consumes it. "
            f"Headers: {headers}."
        ),
        action="send",
    )


def _workers_subject() -> Subject:
    bucket = names.WORKERS_BUCKET
    return Subject(
        key="workers-kv",
        address=_with_params(f"$KV.{bucket}.{names.worker_key(_param('worker'))}", "worker"),
        messages=(messages.WorkerStatus,),
        parameters={"worker": "the worker's id, with characters other than A-Z a-z 0-9 _ - as _"},
        summary="Each inference worker's state, in the JetStream key-value bucket "
        f"`{bucket}` (one key per worker).",
        description=(
            f"Read with a KV watch (nats.py `js.key_value('{bucket}').watchall()`). A worker "
            f"rewrites its key every couple of seconds; the key vanishes {topology.WORKER_TTL_S:g} s "
            "after its last write (the bucket's TTL), so a key whose `updated` is more than a few "
            "seconds old belongs to a worker that is gone."
        ),
        action="send",
    )


def _status_subject() -> Subject:
    bucket = status.STATUS_BUCKET
    return Subject(
        key="status-kv",
        address=f"$KV.{bucket}.{status.SNAPSHOT_KEY}",
        messages=(status_schemas.Snapshot,),
        summary=f"The telemetry worker's last snapshot (queues, EVENTS consumers' lag, GPUs), in the "
        f"JetStream key-value bucket `{bucket}` under the key `{status.SNAPSHOT_KEY}`.",
        description=(
            f"Read with nats.py `(await js.key_value('{bucket}')).get('{status.SNAPSHOT_KEY}')` or a "
            "watch. Rewritten every `interval_s` seconds; only the newest is kept, in memory (gone "
            "after a NATS restart until the next one). An old `time` means the telemetry worker "
            "stopped."
        ),
        action="send",
    )


def _control_subjects() -> list[Subject]:
    return [
        Subject(
            key="control-worker-model",
            address=_with_params(names.worker_control_subject(_param("worker")), "worker"),
            messages=(messages.SwitchModel,),
            replies=(messages.SwitchReply,),
            parameters={"worker": "the worker's id, as in the workers bucket's key"},
            summary="Ask one worker to switch to another model profile (request/reply).",
            description=(
                "Core NATS, not stored: send a request and wait for the reply on its reply subject. "
                "This is what the admin API does; only an admin's tooling should publish here, "
                "since a switch drains the worker's running requests first."
            ),
            action="receive",
        ),
    ]


def subjects() -> list[Subject]:
    """Every subject of the document, in the order it lists them."""
    return [
        *_event_subjects(),
        _deadletter_subject(),
        _workers_subject(),
        _status_subject(),
        *_control_subjects(),
    ]


# Unions whose schema (with its discriminator on `t`) the document names, for code generators.
UNIONS: Mapping[str, Any] = {"Event": messages.Event}


def structs(listed: Iterable[Subject]) -> list[type[msgspec.Struct]]:
    """Every Struct the subjects carry, requests and replies, once each, in order."""
    found: dict[type[msgspec.Struct], None] = {}
    for subject in listed:
        found.update(dict.fromkeys((*subject.messages, *subject.replies)))
    return list(found)


def schemas_of(listed: Iterable[Subject]) -> dict[str, Any]:
    """msgspec's JSON Schema of every Struct and union the subjects carry, by name."""
    types = structs(listed)
    unions = list(UNIONS.items())
    top, components = msgspec.json.schema_components(
        [*types, *(union for _, union in unions)], ref_template=SCHEMA_REF
    )
    for (name, _), schema in zip(unions, top[len(types) :], strict=True):
        components[name] = schema
    return components


def _ref(*path: str) -> dict[str, str]:
    return {"$ref": "#/" + "/".join(path)}


def _headers(headers: Mapping[str, str]) -> dict[str, Any]:
    properties = {name: {"type": "string", "description": text} for name, text in headers.items()}
    return {"type": "object", "properties": properties}


def _message(struct: type[msgspec.Struct], headers: Mapping[str, str]) -> dict[str, Any]:
    name = struct.__name__
    tag = tag_of(struct)
    message: dict[str, Any] = {
        "name": name,
        "title": name,
        "contentType": CONTENT_TYPE,
        "payload": _ref("components", "schemas", name),
    }
    if headers:
        message["headers"] = _headers(headers)
    if tag is not None:
        message["summary"] = f"{TAG_FIELD} = {tag!r}"
    doc = (struct.__doc__ or "").strip()
    if doc and not doc.startswith(f"{name}("):  # msgspec's generated signature is no description
        message["description"] = doc
    return message


def _servers(nats_url: str | None) -> dict[str, Any]:
    servers: dict[str, Any] = {}
    for i, url in enumerate(u.strip() for u in (nats_url or "").split(",") if u.strip()):
        parts = urlsplit(url if "://" in url else f"nats://{url}")
        # Only host and port: credentials in NATS_URL are never served.
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        servers["nats" if i == 0 else f"nats-{i + 1}"] = {
            "host": host,
            "pathname": "",
            "protocol": "nats",
            "description": "The NATS server chatq uses (JetStream enabled).",
        }
    return servers


def document(*, version: str, nats_url: str | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0 document, as JSON-ready data; `nats_url` names the server (no credentials)."""
    listed = subjects()
    headers: dict[type[msgspec.Struct], Mapping[str, str]] = {}
    for subject in listed:
        for struct in subject.messages:
            headers.setdefault(struct, subject.headers)
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for subject in listed:
        channel: dict[str, Any] = {
            **({"address": subject.address} if subject.address is not None else {}),
            "messages": {s.__name__: _ref("components", "messages", s.__name__) for s in subject.messages},
            "description": subject.description,
        }
        if subject.summary:
            channel["summary"] = subject.summary
        if subject.parameters:
            channel["parameters"] = {k: {"description": v} for k, v in subject.parameters.items()}
        channels[subject.key] = channel
        operation: dict[str, Any] = {
            "action": subject.action,
            "channel": _ref("channels", subject.key),
            "messages": [_ref("channels", subject.key, "messages", s.__name__) for s in subject.messages],
        }
        if subject.summary:
            operation["summary"] = subject.summary
        if subject.replies:
            reply_key = f"{subject.key}-reply"
            # No address: AsyncAPI's way of saying it is dynamic (the requester's inbox).
            channels[reply_key] = {
                "messages": {s.__name__: _ref("components", "messages", s.__name__) for s in subject.replies},
                "description": "The request's own reply subject (a NATS inbox).",
            }
            operation["reply"] = {
                "channel": _ref("channels", reply_key),
                "messages": [_ref("channels", reply_key, "messages", s.__name__) for s in subject.replies],
            }
        operations[subject.key] = operation

    doc: dict[str, Any] = {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "chatq message plane",
            "version": version,
            "description": (
                f"Every message is msgpack (`{CONTENT_TYPE}`). A message of a union (the events) "
                f"carries its type in the field `{TAG_FIELD}`: decode on it (msgspec: "
                "`msgspec.msgpack.Decoder(schemas.Event)`, or `schemas.decode_event`). The schemas "
                "are msgspec's JSON Schema of the Structs in chatq's schemas/; a `bytes` field, "
                "shown as a base64 string here, is msgpack bin on the wire. Fields are only ever "
                "appended, with defaults: ignore fields you do not know. Operations are from "
                "chatq's side: `send` means chatq publishes and you may read."
            ),
        },
        "defaultContentType": CONTENT_TYPE,
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": {s.__name__: _message(s, headers.get(s, {})) for s in structs(listed)},
            "schemas": schemas_of(listed),
        },
    }
    servers = _servers(nats_url)
    if servers:
        doc["servers"] = servers
    return doc
