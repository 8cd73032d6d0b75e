"""The small interface every inference engine implements, and the choice between them."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from schemas.messages import ChatMessage, Sampling

if TYPE_CHECKING:
    from chatq.settings import Settings


class RequestRejected(Exception):
    """The engine refuses this request as sent (prompt too long, bad parameter): a 4xx."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    request_id: str
    messages: list[ChatMessage]
    sampling: Sampling


@dataclass(frozen=True, slots=True)
class Delta:
    """New output since the last Delta; finish_reason is set on the last one."""

    text: str
    tokens: int
    prompt_tokens: int
    finish_reason: str | None = None


class Engine(Protocol):
    name: str
    model: str

    @property
    def slots(self) -> int:
        """How many requests the engine runs at once; the worker fetches no more jobs."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        """Stream the output; closing or cancelling the iterator aborts the engine request."""
        ...


def make_engine(settings: Settings) -> Engine:
    """The engine INFERENCE_ENGINE names; vLLM unless the synthetic engine is asked for."""
    if settings.engine == "synthetic":
        from workers.inference.synthetic import SyntheticEngine

        return SyntheticEngine(
            model=settings.model_name,
            tokens_per_s=settings.synth_tokens_per_s,
            ttft_s=settings.synth_ttft_s,
            slots=settings.worker_slots or 256,
        )
    from workers.inference.vllm_engine import VllmEngine

    return VllmEngine(settings)
