"""A deterministic engine at a set token rate, for measuring and testing the pipeline.

It is never the default and never stands in for vLLM on its own: only
INFERENCE_ENGINE=synthetic selects it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncGenerator

from workers.inference.engine import Delta, GenerationRequest, RequestRejected

_WORDS = (
    "the quick brown fox jumps over the lazy dog while a queue of patient requests "
    "streams tokens through the broker to every waiting reader and back again"
).split()


def synthetic_token(request_id_seed: int, index: int) -> str:
    """The index-th token of a synthetic answer: a word and a space, fixed by the seed."""
    return _WORDS[(request_id_seed + index * 7) % len(_WORDS)] + " "


def prompt_seed(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big")


class SyntheticEngine:
    """Emits max_tokens deterministic words: the first after ttft_s, then one per 1/rate s."""

    name = "synthetic"

    def __init__(self, *, model: str, tokens_per_s: float, ttft_s: float, slots: int) -> None:
        self.model = model
        self._interval = 1.0 / tokens_per_s
        self._ttft_s = ttft_s
        self._slots = slots
        self.running: set[str] = set()
        self.aborted: list[str] = []

    @property
    def slots(self) -> int:
        return self._slots

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        prompt = "\n".join(m.content for m in request.messages)
        prompt_tokens = len(prompt.split())
        max_tokens = request.sampling.max_tokens
        if max_tokens < 1:
            raise RequestRejected("invalid_request", "max_tokens must be at least 1")
        seed = (
            prompt_seed(prompt)
            if request.sampling.temperature == 0
            else (
                request.sampling.seed
                if request.sampling.seed is not None
                else prompt_seed(request.request_id)
            )
        )
        loop = asyncio.get_running_loop()
        self.running.add(request.request_id)
        finished = False
        try:
            # Sleeping to absolute times keeps the rate exact however late a wake-up is.
            start = loop.time()
            for index in range(max_tokens):
                due = start + self._ttft_s + index * self._interval
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                last = index == max_tokens - 1
                yield Delta(
                    text=synthetic_token(seed, index),
                    tokens=1,
                    prompt_tokens=prompt_tokens,
                    finish_reason="length" if last else None,
                )
            finished = True
        finally:
            self.running.discard(request.request_id)
            if not finished:
                self.aborted.append(request.request_id)
