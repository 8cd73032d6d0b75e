"""The vLLM engine (AsyncLLM, streaming deltas) behind the Engine interface."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

from chatq.errors import EngineError
from workers.inference.engine import Delta, GenerationRequest, RequestRejected

if TYPE_CHECKING:
    from chatq.settings import Settings

log = logging.getLogger(__name__)

CPU_DEFAULT_SLOTS = 16
_FINISH = {"stop": "stop", "length": "length", "abort": "cancelled"}


class VllmEngine:
    """One AsyncLLM engine; its engine core runs in a child process vLLM spawns."""

    name = "vllm"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.model = settings.model_name
        self._llm: Any = None
        self._tokenizer: Any = None
        self._max_model_len = settings.vllm_max_model_len
        self._slots = settings.worker_slots
        self.start_seconds: float | None = None

    @property
    def slots(self) -> int:
        return self._slots

    async def start(self) -> None:
        """Load the model and start the engine; raises EngineError, never falls back."""
        started = time.monotonic()
        try:
            from vllm import AsyncEngineArgs
            from vllm.platforms import current_platform
            from vllm.v1.engine.async_llm import AsyncLLM
        except Exception as exc:
            raise EngineError(
                f"vLLM cannot be imported ({exc!r}); install chatq with the 'cpu' or 'gpu' "
                "extra (./start does this), or run INFERENCE_ENGINE=synthetic for pipeline tests"
            ) from exc

        from chatq.model_prep import resolve_model

        s = self._settings
        on_cpu = current_platform.is_cpu()
        # Preparing the default model the first time takes ~25 s: keep the loop responsive.
        model = await asyncio.to_thread(resolve_model, s.model_id, s.models_dir, progress=True)
        # bfloat16 gives garbage for SmolLM2 on the CPU build; float32 answers correctly.
        dtype = "float32" if (s.vllm_dtype == "auto" and on_cpu) else s.vllm_dtype
        # On the CPU build this is the share of host memory vLLM reserves for KV cache.
        memory = s.vllm_gpu_memory_utilization or (0.25 if on_cpu else 0.90)
        if not self._slots and on_cpu:
            self._slots = CPU_DEFAULT_SLOTS
        args = AsyncEngineArgs(
            model=str(model),
            served_model_name=[s.model_name],
            dtype=dtype,  # type: ignore[arg-type]  # checked by vLLM itself
            gpu_memory_utilization=memory,
            enforce_eager=s.vllm_enforce_eager,
            max_model_len=s.vllm_max_model_len,
            max_num_seqs=self._slots or None,
            disable_log_stats=False,
        )
        log.info("starting vLLM: model=%s dtype=%s memory=%.2f", model, dtype, memory)
        try:
            self._llm = AsyncLLM.from_engine_args(args)
        except Exception as exc:
            raise EngineError(f"vLLM failed to start for model {model}: {exc!r}") from exc
        self._tokenizer = self._llm.get_tokenizer()
        self._slots = int(self._llm.vllm_config.scheduler_config.max_num_seqs)
        self._max_model_len = int(self._llm.vllm_config.model_config.max_model_len)
        self.start_seconds = time.monotonic() - started
        log.info("vLLM ready in %.1f s, %d slots", self.start_seconds, self._slots)

    async def stop(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            llm.shutdown()

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        try:
            rendered = self._tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True
            )
        except Exception as exc:
            raise RequestRejected("invalid_messages", f"cannot render the chat: {exc}") from exc
        if isinstance(rendered, dict) or hasattr(rendered, "input_ids"):
            rendered = rendered["input_ids"]
        return list(rendered)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        from vllm import SamplingParams, TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if self._llm is None:
            raise EngineError("the vLLM engine is not running")
        prompt_ids = self._prompt_ids(request)
        room = self._max_model_len - len(prompt_ids)
        if room < 1:
            raise RequestRejected(
                "context_length_exceeded",
                f"the prompt has {len(prompt_ids)} tokens; this model's context is "
                f"{self._max_model_len} tokens",
            )
        s = request.sampling
        try:
            params = SamplingParams(
                temperature=s.temperature,
                top_p=s.top_p,
                max_tokens=min(s.max_tokens, room),
                stop=s.stop or None,
                seed=s.seed,
                output_kind=RequestOutputKind.DELTA,
            )
        except ValueError as exc:  # vLLM's validation: the request's fault, not the engine's
            raise RequestRejected("invalid_request", str(exc)) from exc
        prompt_tokens = len(prompt_ids)
        # Cancelling this generator cancels AsyncLLM.generate, which aborts the request
        # in the engine core: its KV cache and batch slot are free on the next step.
        async for out in self._llm.generate(
            TokensPrompt(prompt_token_ids=prompt_ids), params, request.request_id
        ):
            completion = out.outputs[0]
            finish = _FINISH.get(completion.finish_reason or "", "stop") if out.finished else None
            yield Delta(
                text=completion.text,
                tokens=len(completion.token_ids),
                prompt_tokens=prompt_tokens,
                finish_reason=finish,
            )
