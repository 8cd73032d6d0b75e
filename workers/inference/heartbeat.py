"""Housekeeping while jobs run: stream heartbeats, in_progress for long prefills, the KV status."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import schemas
from workers.inference.config import WorkerConfig
from workers.inference.jobs import JobRunner

log = logging.getLogger(__name__)

# Publishes the worker's status to the workers KV bucket.
Announce = Callable[[], Coroutine[Any, Any, None]]


async def housekeeping(jobs: JobRunner, config: WorkerConfig, announce: Announce) -> None:
    """Every tick: heartbeats and in_progress for the running jobs; the status when due, and
    at the tick after a job ended (admission counts the freed slot, WorkerStatus.releases)."""
    tick = min(config.heartbeat_s, config.ack_wait_s / 3, 0.5) / 2
    progress_every = config.ack_wait_s / 3
    loop = asyncio.get_running_loop()
    next_status = 0.0
    ended = jobs.ended
    while True:
        await asyncio.sleep(tick)
        try:
            _beat(jobs, config, loop, progress_every)
            now = time.monotonic()
            if now >= next_status or jobs.ended != ended:
                next_status, ended = now + config.status_interval_s, jobs.ended
                jobs.spawn(announce())
        except Exception:
            log.exception("housekeeping failed")
            raise


def _beat(
    jobs: JobRunner, config: WorkerConfig, loop: asyncio.AbstractEventLoop, progress_every: float
) -> None:
    now = time.monotonic()
    loop_now = loop.time()
    for active in list(jobs.active.values()):
        if not active.acked and now - active.last_progress >= progress_every:
            # A long prefill must not look like a dead worker to JetStream.
            active.last_progress = now
            jobs.spawn(active.msg.in_progress())
        chunks = active.chunks
        quiet_since = max(chunks.last_sent, active.last_beat)
        # From the first token on, silence means a lost worker to the API.
        if active.first_token_at is not None and loop_now - quiet_since >= config.heartbeat_s:
            active.last_beat = loop_now
            jobs.spawn(
                jobs.bus.publish_stream(
                    active.job.request_id,
                    schemas.Heartbeat(worker_id=config.worker_id, next_seq=chunks.seq),
                )
            )
