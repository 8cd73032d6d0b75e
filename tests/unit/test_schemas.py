"""Wire messages: round trips, union dispatch, schema evolution, malformed input."""

from __future__ import annotations

import msgspec
import pytest

import schemas
from broker import names


def test_every_stream_message_round_trips_through_the_union() -> None:
    messages: list[schemas.StreamMsg] = [
        schemas.Started(worker_id="w"),
        schemas.Chunk(seq=0, text="hé ✓", tokens=2, worker_id="w"),
        schemas.Chunk(
            seq=3, text="", tokens=0, worker_id="w", finish_reason="stop", usage=schemas.Usage(5, 7)
        ),
        schemas.Heartbeat(worker_id="w", next_seq=4),
        schemas.StreamError(worker_id="w", code="engine_error", message="boom"),
    ]
    for message in messages:
        assert schemas.decode_stream(schemas.encode(message)) == message


def test_events_round_trip_and_keep_their_kind() -> None:
    event = schemas.Completed(
        request_id="r",
        model="m",
        time=1.0,
        worker_id="w",
        text="hi",
        finish_reason="length",
        usage=schemas.Usage(1, 2),
    )
    decoded = schemas.decode_event(schemas.encode(event))
    assert isinstance(decoded, schemas.Completed) and decoded == event


def test_every_event_of_a_job_carries_the_jobs_identity() -> None:
    meta = schemas.RequestMeta(user_id=7, conversation_id="c", position=2, answer_position=3)
    job = schemas.Job(
        request_id="r",
        model="m",
        messages=[schemas.ChatMessage("user", "hi")],
        sampling=schemas.Sampling(),
        created=100.0,
        deadline=200.0,
        user="u",
        stream=False,
        meta=meta,
    )
    usage = schemas.Usage(1, 2)
    events: list[schemas.Event] = [
        schemas.Accepted.for_job(job, job.messages),
        schemas.Completed.for_job(
            job, worker_id="w", text="t", finish_reason="stop", usage=usage, ttft_s=0.1, duration_s=1.0
        ),
        schemas.Cancelled.for_job(job, worker_id="api", reason="deadline"),
        schemas.Failed.for_job(job, code="engine_error", message="x", worker_id=None),
    ]
    for event in events:
        assert (event.request_id, event.model, event.user, event.meta) == ("r", "m", "u", meta)
        assert schemas.decode_event(schemas.encode(event)) == event
    accepted, completed, cancelled, _ = events
    assert isinstance(accepted, schemas.Accepted) and accepted.time == 100.0 and not accepted.stream
    assert isinstance(completed, schemas.Completed) and completed.time > job.created
    assert isinstance(cancelled, schemas.Cancelled) and cancelled.usage == schemas.Usage(0, 0)


def test_a_newer_job_with_extra_fields_still_decodes() -> None:
    job = schemas.Job(
        request_id="r",
        model="m",
        messages=[schemas.ChatMessage("user", "hi")],
        sampling=schemas.Sampling(temperature=0),
        created=1.0,
        deadline=2.0,
    )
    newer = msgspec.to_builtins(job) | {"t": "job", "tenant": "acme", "priority_boost": 3}
    assert schemas.decode_job(msgspec.msgpack.encode(newer)) == job


@pytest.mark.parametrize("payload", [b"", b"\xc1", msgspec.msgpack.encode({"t": "nope"}), b"{}"])
def test_malformed_payloads_raise_a_msgspec_error(payload: bytes) -> None:
    with pytest.raises(msgspec.MsgspecError):
        schemas.decode_job(payload)
    with pytest.raises(msgspec.MsgspecError):
        schemas.decode_stream(payload)


def test_model_names_become_safe_distinct_subject_tokens() -> None:
    a = names.model_key("HuggingFaceTB/SmolLM2-135M-Instruct")
    b = names.model_key("HuggingFaceTB/SmolLM2-135M.Instruct")
    assert a != b
    for key in (a, b):
        assert "." not in key and "/" not in key
    assert names.model_key("plain-name_1") == "plain-name_1"
    assert names.job_subject("org/m.v1").count(".") == 3
