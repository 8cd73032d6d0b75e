"""Coalesces one request's tokens into chunks, by token count and by time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from schemas.messages import Chunk, FinishReason, StreamMsg, Usage

Publish = Callable[[StreamMsg], Awaitable[None]]


class ChunkStream:
    """Sends a chunk when max_tokens are waiting, or max_delay after the previous chunk.

    The first token always goes out at once (time to first token is what users feel);
    after that a stream sends at most one chunk per max_delay, so a fast engine's
    message rate stays far below one message per token.
    """

    __slots__ = (
        "_loop",
        "_max_delay",
        "_max_tokens",
        "_parts",
        "_pending",
        "_publish",
        "_spawn",
        "_timer",
        "completion_tokens",
        "last_sent",
        "seq",
        "text_parts",
        "worker_id",
    )

    def __init__(
        self,
        publish: Publish,
        spawn: Callable[[Awaitable[None]], None],
        *,
        worker_id: str,
        max_tokens: int,
        max_delay: float,
    ) -> None:
        self._publish = publish
        self._spawn = spawn
        self._loop = asyncio.get_running_loop()
        self._max_tokens = max_tokens
        self._max_delay = max_delay
        self._parts: list[str] = []
        self._pending = 0
        self._timer: asyncio.TimerHandle | None = None
        self.worker_id = worker_id
        self.seq = 0
        self.last_sent = float("-inf")
        self.text_parts: list[str] = []
        self.completion_tokens = 0

    @property
    def started(self) -> bool:
        """True once the first chunk is out."""
        return self.seq > 0

    async def add(self, text: str, tokens: int, *, last: bool = False) -> None:
        """Take new output; send it now or arm the timer that will (the last waits for finish)."""
        if text:
            self._parts.append(text)
            self.text_parts.append(text)
        self._pending += tokens
        self.completion_tokens += tokens
        if not self._pending or last:
            return
        if self._pending >= self._max_tokens or self._loop.time() - self.last_sent >= self._max_delay:
            await self._send()
        elif self._timer is None:
            self._timer = self._loop.call_at(self.last_sent + self._max_delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._pending:
            self._spawn(self._send())

    def _take(self, finish_reason: FinishReason | None, usage: Usage | None) -> Chunk:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        chunk = Chunk(
            seq=self.seq,
            text="".join(self._parts),
            tokens=self._pending,
            worker_id=self.worker_id,
            finish_reason=finish_reason,
            usage=usage,
        )
        self.seq += 1
        self._parts.clear()
        self._pending = 0
        self.last_sent = self._loop.time()
        return chunk

    async def _send(self) -> None:
        await self._publish(self._take(None, None))

    async def finish(self, finish_reason: FinishReason, usage: Usage) -> None:
        """Send what is left with the finish reason and usage: the stream's last chunk."""
        await self._publish(self._take(finish_reason, usage))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)
