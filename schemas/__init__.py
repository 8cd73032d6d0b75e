"""Every message that crosses NATS, as msgspec Structs: one tagged union per subject family.

Versioning: new fields are appended with defaults, never renamed or removed, so an
old reader ignores them and a new reader fills them in.
"""

from schemas.messages import (
    ANSWER_POSITION,
    Accepted,
    Cancel,
    Cancelled,
    ChatMessage,
    Chunk,
    Completed,
    Event,
    Failed,
    Heartbeat,
    Job,
    RequestMeta,
    Sampling,
    Started,
    StreamError,
    StreamMsg,
    Usage,
    WorkerStatus,
    decode_cancel,
    decode_event,
    decode_job,
    decode_stream,
    decode_worker_status,
    encode,
)

__all__ = [
    "ANSWER_POSITION",
    "Accepted",
    "Cancel",
    "Cancelled",
    "ChatMessage",
    "Chunk",
    "Completed",
    "Event",
    "Failed",
    "Heartbeat",
    "Job",
    "RequestMeta",
    "Sampling",
    "Started",
    "StreamError",
    "StreamMsg",
    "Usage",
    "WorkerStatus",
    "decode_cancel",
    "decode_event",
    "decode_job",
    "decode_stream",
    "decode_worker_status",
    "encode",
]
