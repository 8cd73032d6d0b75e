"""Background tasks with a reference kept until each ends, and a log line when one fails.

asyncio holds only a weak reference to a running task: one nobody keeps may be collected
mid-way, and its exception is then never seen. Every process spawns through a TaskSet.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class TaskSet:
    """Runs coroutines in the background, keeps each until it ends, logs the ones that fail."""

    def __init__(self, what: str = "background task") -> None:
        self._what = what
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Start `work` now; the returned task may be awaited or cancelled, never needs keeping."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("%s %s failed: %r", self._what, task.get_name(), exc, exc_info=exc)

    async def wait(self, timeout: float = 5.0) -> None:
        """Wait up to `timeout` seconds for the tasks running now."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
