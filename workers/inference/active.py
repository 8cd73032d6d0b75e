"""One job a worker runs, from its fetch to its last event (JobRunner.active)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from nats.aio.msg import Msg

import schemas
from workers.inference.chunker import ChunkStream


@dataclass(eq=False)
class ActiveRequest:
    job: schemas.Job
    msg: Msg
    chunks: ChunkStream
    fetched_at: float
    acked: bool = False
    cancel_reason: str | None = None
    task: asyncio.Task[None] | None = None
    last_progress: float = field(default_factory=time.monotonic)
    last_beat: float = float("-inf")
    # Set when the request enters the engine, and once the engine is done: a cancel
    # interrupts only in between (before, the flag is enough; after, the finish runs).
    in_engine: bool = False
    generated: bool = False
    first_token_at: float | None = None

    @property
    def tokens(self) -> int:
        """Tokens generated so far."""
        return self.chunks.tokens

    @property
    def max_tokens(self) -> int:
        """The most it may generate (the job's max_tokens)."""
        return self.job.sampling.max_tokens
