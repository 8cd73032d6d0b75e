"""The pull loop: fetch jobs only while the engine has free slots, interactive ones first."""

from __future__ import annotations

import asyncio
import logging

from nats.errors import ConnectionClosedError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.errors import ServiceUnavailableError

from broker import names
from schemas.messages import Priority
from workers.inference.jobs import JobRunner

log = logging.getLogger(__name__)

# How long an idle worker's pull request waits on the interactive queue before it looks
# at the background queue; the background look is short, so interactive jobs barely wait.
INTERACTIVE_POLL_S = 1.0
BACKGROUND_POLL_S = 0.02


async def pull_loop(
    subs: dict[Priority, JetStreamContext.PullSubscription], jobs: JobRunner, stopping: asyncio.Event
) -> None:
    """Fetch as many jobs as there are free slots and start them, until `stopping` is set."""
    while not stopping.is_set():
        free = jobs.free_slots
        if free == 0:
            jobs.slot_freed.clear()
            await jobs.slot_freed.wait()
            continue
        got = 0
        for priority in names.PRIORITIES:
            timeout = INTERACTIVE_POLL_S if priority == "interactive" else BACKGROUND_POLL_S
            try:
                msgs = await subs[priority].fetch(batch=free, timeout=timeout)
            except (TimeoutError, NatsTimeout):
                continue
            except (ConnectionClosedError, ServiceUnavailableError) as exc:
                log.warning("fetch failed (%r); retrying", exc)
                await asyncio.sleep(0.5)
                break
            for msg in msgs:
                jobs.start(msg)
            got += len(msgs)
            if got:
                break  # interactive first, every time a slot frees up
        if stopping.is_set():
            break
