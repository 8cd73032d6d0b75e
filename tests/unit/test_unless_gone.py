"""api.generation.unless_gone: a request's work ends with the handler, whichever goes first."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from api.generation import ClientGone, unless_gone


class FakeRequest:
    """The ASGI receive side of a request whose body was read: waits, or disconnects on cue."""

    def __init__(self) -> None:
        self.disconnect = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.disconnect.wait()
        return {"type": "http.disconnect"}


class Work:
    """A request's work that runs until cancelled and records its clean-up."""

    def __init__(self, cleanup_s: float = 0.0) -> None:
        self.started = asyncio.Event()
        self.cleaned_up = asyncio.Event()
        self.cleanup_s = cleanup_s

    async def __call__(self) -> str:
        self.started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.shield(asyncio.sleep(self.cleanup_s))
            self.cleaned_up.set()
        return "done"


async def test_a_cancelled_handler_cancels_its_work_and_stays_cancelled() -> None:
    request, work = FakeRequest(), Work()
    handler = asyncio.ensure_future(unless_gone(request, work()))  # type: ignore[arg-type]
    await work.started.wait()
    handler.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handler
    assert handler.cancelled()
    # The work was stopped, and its clean-up (closing the relay) ran before the handler ended.
    assert work.cleaned_up.is_set()


async def test_a_client_gone_stops_the_work_and_raises_client_gone() -> None:
    request, work = FakeRequest(), Work()
    handler = asyncio.ensure_future(unless_gone(request, work()))  # type: ignore[arg-type]
    await work.started.wait()
    request.disconnect.set()
    with pytest.raises(ClientGone):
        await handler
    assert work.cleaned_up.is_set()


async def test_a_handler_cancelled_while_its_work_cleans_up_is_not_swallowed() -> None:
    request, work = FakeRequest(), Work(cleanup_s=0.2)
    handler = asyncio.ensure_future(unless_gone(request, work()))  # type: ignore[arg-type]
    await work.started.wait()
    request.disconnect.set()
    await asyncio.sleep(0.05)  # the client is gone; the work is cleaning up
    handler.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handler
    assert handler.cancelled()


async def test_work_that_finishes_first_is_the_answer() -> None:
    async def answer() -> str:
        return "answer"

    assert await unless_gone(FakeRequest(), answer()) == "answer"  # type: ignore[arg-type]
