"""Where the telemetry worker's snapshot lives: one key in its own KV bucket."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

STATUS_BUCKET = "status"
SNAPSHOT_KEY = "snapshot"


async def status_kv(js: JetStreamContext, *, replicas: int = 1) -> KeyValue:
    """The status bucket (created when missing, on `replicas` servers of a cluster); only
    the newest snapshot is kept."""
    try:
        return await js.key_value(STATUS_BUCKET)
    except (BucketNotFoundError, NotFoundError):
        # Memory storage: a snapshot is rewritten every few seconds and worthless after a
        # restart; no TTL, so a stopped telemetry worker shows as an old snapshot, not none.
        return await js.create_key_value(
            KeyValueConfig(bucket=STATUS_BUCKET, history=1, storage=StorageType.MEMORY, replicas=replicas)
        )
