"""chatq.tasks.TaskSet: references kept until a task ends, failures logged."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from chatq.tasks import TaskSet


async def test_a_failing_task_is_logged_with_its_exception(caplog: pytest.LogCaptureFixture) -> None:
    tasks = TaskSet("test task")

    async def fail() -> None:
        raise ValueError("boom")

    with caplog.at_level(logging.ERROR, logger="chatq.tasks"):
        task = tasks(fail())
        await asyncio.wait([task], timeout=5)
        await asyncio.sleep(0)  # done-callbacks run on the next loop turn
    (record,) = [r for r in caplog.records if r.name == "chatq.tasks"]
    assert "test task" in record.getMessage() and "boom" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[1] is task.exception()
    assert len(tasks) == 0


async def test_a_cancelled_or_successful_task_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    tasks = TaskSet()
    forever = asyncio.Event()
    with caplog.at_level(logging.DEBUG, logger="chatq.tasks"):
        ok = tasks(asyncio.sleep(0))
        stuck = tasks(wait_for(forever))
        stuck.cancel()
        await asyncio.wait([ok, stuck], timeout=5)
        await asyncio.sleep(0)
    assert not [r for r in caplog.records if r.name == "chatq.tasks"]
    assert len(tasks) == 0


async def wait_for(event: asyncio.Event) -> None:
    await event.wait()


async def test_a_task_is_kept_until_it_ends_though_nobody_else_holds_it() -> None:
    tasks = TaskSet()
    release = asyncio.Event()
    finished: list[str] = []

    async def work() -> None:
        await release.wait()
        finished.append("done")

    tasks(work())  # the returned task is dropped on purpose
    gc.collect()
    assert len(tasks) == 1
    release.set()
    await tasks.wait(timeout=5)
    await asyncio.sleep(0)
    assert finished == ["done"] and len(tasks) == 0
