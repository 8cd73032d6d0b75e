"""GET /asyncapi.json and /asyncapi from a real API process: the document an integrator reads
describes the subjects chatq uses and the messages exactly as schemas/ encodes them."""

from __future__ import annotations

import fnmatch
import inspect
import time
import typing
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import msgspec
import pytest
from faststream.specification.asyncapi.v3_0_0.schema import ApplicationSchema

import schemas
from broker import asyncapi, bus, names, topology
from schemas import messages, status
from stack.servers import NatsServer
from tests.helpers import Proc, base_env, start_api
from workers.persistence import app as persistence

REF = "#/components/schemas/{name}"
# Every module of schemas/ that holds wire messages.
MODULES = (messages, status)


@pytest.fixture(scope="module")
def api(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("asyncapi")
    proc: Proc
    proc, url = start_api(base_env(nats_server.url, home), home / "logs")
    try:
        yield url
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def doc(api: str) -> dict[str, Any]:
    response = httpx.get(api + "/asyncapi.json", timeout=10)  # no Authorization: public
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    served: dict[str, Any] = response.json()
    return served


def struct_named(name: str) -> type[msgspec.Struct]:
    """The Struct of that name in schemas/."""
    for module in MODULES:
        found = getattr(module, name, None)
        if isinstance(found, type) and issubclass(found, msgspec.Struct):
            return found
    raise AssertionError(f"no Struct {name} in schemas/")


def tagged_structs() -> list[type[msgspec.Struct]]:
    return [
        obj
        for module in MODULES
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, msgspec.Struct)
        and obj is not msgspec.Struct
        and obj.__struct_config__.tag is not None
    ]


def to_wildcard(address: str) -> str:
    """A channel address with {params} as a shell pattern matching one NATS token."""
    parts = ["*" if p.startswith("{") else p for p in address.split(".")]
    return ".".join(parts)


def test_the_served_document_is_asyncapi_3_and_says_msgpack_and_the_tag_field(doc: dict[str, Any]) -> None:
    assert doc["asyncapi"] == "3.0.0"
    # FastStream's own AsyncAPI 3.0 model reads it and writes back the same document.
    assert ApplicationSchema.model_validate(doc).to_jsonable() == doc
    assert doc["defaultContentType"] == "application/msgpack"
    assert all(m["contentType"] == "application/msgpack" for m in doc["components"]["messages"].values())
    assert "field `t`" in doc["info"]["description"]
    event = doc["components"]["schemas"]["Event"]
    assert event["discriminator"]["propertyName"] == "t"
    # Every message points at a schema the document has, and every channel at a message.
    for message in doc["components"]["messages"].values():
        assert message["payload"]["$ref"].rsplit("/", 1)[-1] in doc["components"]["schemas"]
    for channel in doc["channels"].values():
        for ref in channel["messages"].values():
            assert ref["$ref"].rsplit("/", 1)[-1] in doc["components"]["messages"]


def test_message_schemas_are_msgspecs_schemas_of_the_structs_in_schemas(doc: dict[str, Any]) -> None:
    structs = [struct_named(name) for name in doc["components"]["messages"]]
    top, expected = msgspec.json.schema_components([*structs, schemas.Event], ref_template=REF)
    expected["Event"] = top[-1]
    assert doc["components"]["schemas"] == expected
    # A real event, as chatq publishes it, decodes to data its schema accepts.
    event = schemas.Cancelled(
        request_id="r1",
        model="m",
        time=time.time(),
        worker_id="w1",
        reason="client_disconnected",
        text="Par",
        usage=schemas.Usage(prompt_tokens=9, completion_tokens=1),
        meta=schemas.RequestMeta(user_id=3),
    )
    data = msgspec.msgpack.decode(schemas.encode(event))
    root = {"components": doc["components"]}
    for ref in ("#/components/schemas/Cancelled", "#/components/schemas/Event"):
        jsonschema.validate(data, {**root, "$ref": ref}, cls=jsonschema.Draft202012Validator)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            {**data, "t": "completed"},
            {**root, "$ref": "#/components/schemas/Completed"},
            cls=jsonschema.Draft202012Validator,
        )


def test_every_event_kind_has_its_subject_and_the_stream_is_described(doc: dict[str, Any]) -> None:
    by_address = {c.get("address"): c for c in doc["channels"].values()}
    for struct in typing.get_args(schemas.Event):
        tag = struct.__struct_config__.tag
        channel = by_address[names.event_subject(tag)]
        assert list(channel["messages"]) == [struct.__name__]
        assert "EVENTS" in channel["description"]
        assert "7 days" in channel["description"]
        assert f"`{persistence.DURABLE}`" in channel["description"]  # the consumer name not to take
        headers = doc["components"]["messages"][struct.__name__]["headers"]["properties"]
        assert set(headers) == {"Nats-Msg-Id", bus.REQUEST_ID_HEADER}
    assert topology.events_stream_config().max_age == 7 * 24 * 3600.0
    workers = by_address[f"$KV.{names.WORKERS_BUCKET}.{{worker}}"]
    assert list(workers["messages"]) == ["WorkerStatus"]
    deadletter = by_address[names.DEADLETTER_EVENTS]
    assert set(deadletter["messages"]) == {s.__name__ for s in typing.get_args(schemas.Event)}
    for header in (
        bus.ERROR_HEADER,
        bus.REQUEST_ID_HEADER,
        bus.SUBJECT_HEADER,
        bus.DELIVERIES_HEADER,
    ):
        assert f"`{header}`" in deadletter["description"]


def test_every_tagged_struct_and_every_subject_is_documented_or_declared_internal(
    doc: dict[str, Any],
) -> None:
    """A Struct or a names.py subject added without a decision fails here."""
    documented = set(doc["components"]["messages"])
    internal = {s.__name__ for s in asyncapi.INTERNAL}
    for struct in tagged_structs():
        assert struct.__name__ in documented | internal, f"{struct.__name__}: document it or list it INTERNAL"
    patterns = [to_wildcard(c["address"]) for c in doc["channels"].values() if "address" in c]
    # Every kind of event has its channel (the test above); event_subject("x") is no kind.
    patterns += [p.replace(">", "*") for p in (*asyncapi.INTERNAL_SUBJECTS, names.EVENTS_ALL)]
    for name, func in inspect.getmembers(names, inspect.isfunction):
        if not name.endswith("_subject") or func.__module__ != names.__name__:
            continue
        subject = func("x")
        assert any(fnmatch.fnmatchcase(subject, p) for p in patterns), f"names.{name}: {subject}"


def test_control_requests_name_their_reply(doc: dict[str, Any]) -> None:
    operation = doc["operations"]["control-worker-model"]
    assert operation["action"] == "receive"
    channel = doc["channels"]["control-worker-model"]
    assert fnmatch.fnmatchcase(names.worker_control_subject("gpu-box.1"), to_wildcard(channel["address"]))
    assert list(channel["parameters"]) == ["worker"]
    reply = doc["channels"][operation["reply"]["channel"]["$ref"].rsplit("/", 1)[-1]]
    assert list(reply["messages"]) == ["SwitchReply"]


def test_the_server_is_named_without_credentials() -> None:
    served = asyncapi.document(version="1", nats_url="nats://alice:s3cret@nats.internal:4222")
    assert served["servers"] == {
        "nats": {
            "host": "nats.internal:4222",
            "pathname": "",
            "protocol": "nats",
            "description": "The NATS server chatq uses (JetStream enabled).",
        }
    }
    assert "s3cret" not in msgspec.json.encode(served).decode()


def test_the_html_page_lists_every_subject_without_scripts(api: str, doc: dict[str, Any]) -> None:
    response = httpx.get(api + "/asyncapi", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "<script" not in page.lower()
    for channel in doc["channels"].values():
        if "address" in channel:
            assert channel["address"] in page
    assert 'href="/asyncapi.json"' in page
