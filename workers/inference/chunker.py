"""Coalesces one request's output into chunks, by token count and by time."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable

from schemas.messages import Chunk, FinishReason, StreamMsg, Usage

Publish = Callable[[StreamMsg], Awaitable[None]]
log = logging.getLogger(__name__)


class ChunkStream:
    """Sends a chunk when max_tokens are waiting, or max_delay after the previous chunk.

    The first output goes out at once (time to first token is what users feel); after
    that a stream sends at most one chunk per max_delay, so a fast engine's message
    rate stays far below one message per token. A send waits for the end of the
    current event-loop step, so the events an engine writes for one step (a role and
    the first token, say) travel together. Chunks are published in order by one task,
    and nothing follows the final chunk.
    """

    __slots__ = (
        "_drainer",
        "_finished",
        "_loop",
        "_max_delay",
        "_max_tokens",
        "_outbox",
        "_parts",
        "_pending",
        "_publish",
        "_scheduled",
        "_text",
        "_timer",
        "last_sent",
        "seq",
        "tokens",
        "worker_id",
    )

    def __init__(self, publish: Publish, *, worker_id: str, max_tokens: int, max_delay: float) -> None:
        self._publish = publish
        self._loop = asyncio.get_running_loop()
        self._max_tokens = max_tokens
        self._max_delay = max_delay
        self._parts: list[str] = []
        self._text: list[str] = []  # plain text, for a job that asks for it (Job.output_text)
        self._pending = 0
        self._timer: asyncio.TimerHandle | None = None
        self._scheduled = False
        self._finished = False
        self._outbox: collections.deque[Chunk] = collections.deque()
        self._drainer: asyncio.Task[None] | None = None
        self.worker_id = worker_id
        self.seq = 0
        self.tokens = 0  # tokens added so far (admission's release estimate, WorkerStatus.releases)
        self.last_sent = float("-inf")

    @property
    def started(self) -> bool:
        """True once the first chunk is out."""
        return self.seq > 0

    def add(self, data: str, tokens: int, text: str = "") -> None:
        """Take new output (wire text, the tokens it holds and, when the job asks, its plain
        text); send it soon or arm the timer."""
        if self._finished or not data:
            return
        self._parts.append(data)
        self.tokens += tokens
        if text:
            self._text.append(text)
        self._pending += tokens
        if self._scheduled:
            return
        if self._pending >= self._max_tokens or self._loop.time() - self.last_sent >= self._max_delay:
            self._scheduled = True
            self._loop.call_soon(self._flush)
        elif self._timer is None:
            self._timer = self._loop.call_at(self.last_sent + self._max_delay, self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        self._timer = None
        if self._finished or not self._parts:
            return
        self._queue(self._take(None, None))

    def _take(self, finish_reason: FinishReason | None, usage: Usage | None) -> Chunk:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        chunk = Chunk(
            seq=self.seq,
            text="".join(self._text),
            data="".join(self._parts).encode(),
            tokens=self._pending,
            worker_id=self.worker_id,
            finish_reason=finish_reason,
            usage=usage,
        )
        self.seq += 1
        self._parts.clear()
        self._text.clear()
        self._pending = 0
        self.last_sent = self._loop.time()
        return chunk

    def _queue(self, chunk: Chunk) -> None:
        self._outbox.append(chunk)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        while self._outbox:
            chunk = self._outbox.popleft()
            try:
                await self._publish(chunk)
            except Exception as exc:  # noqa: BLE001 - the relay sees the gap and says so
                log.warning("chunk %d of %s not published: %r", chunk.seq, self.worker_id, exc)

    async def finish(self, finish_reason: FinishReason, usage: Usage, data: str = "", text: str = "") -> None:
        """Send what is left with the finish reason and usage: the stream's last chunk."""
        if self._finished:
            return
        if data:
            self._parts.append(data)
        if text:
            self._text.append(text)
        self._finished = True
        self._queue(self._take(finish_reason, usage))
        await self.flushed()

    async def flushed(self) -> None:
        """Wait until every chunk taken so far is published."""
        if self._drainer is not None:
            await asyncio.shield(self._drainer)

    def close(self) -> None:
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
