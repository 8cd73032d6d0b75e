"""vLLM behind the Engine interface, served by vLLM's own OpenAI layer.

The worker builds the same objects vLLM's OpenAI server builds (`init_app_state`),
from the same command-line arguments, parsed by vLLM's own parser: every parameter,
tool call, structured output, logprob and validation error is vLLM's, so the same
request to chatq and to vLLM's server gives the same answer. Only the HTTP part is
chatq's. The engine client handed to that layer is wrapped so the worker sees the
tokens as they are generated (acks at the first token, usage, the stored text).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import shlex
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatq.errors import EngineError
from workers.inference.engine import Answer, OpenAIRequest, Progress, RequestRejected

if TYPE_CHECKING:
    from chatq.settings import Settings

log = logging.getLogger(__name__)

CPU_DEFAULT_SLOTS = 16
_FINISH = {"stop": "stop", "length": "length", "abort": "cancelled"}
# The Progress of the request being served: set by serve(), read when vLLM's serving
# layer calls the engine client's generate() for it (synchronously, inside serve()).
_progress: contextvars.ContextVar[Progress | None] = contextvars.ContextVar("chatq_progress", default=None)


def engine_cli_args(settings: Settings, model_path: str | Path, *, on_cpu: bool) -> list[str]:
    """The vLLM command-line arguments chatq runs a model with (vLLM's server takes the same)."""
    s = settings
    # bfloat16 gives garbage for SmolLM2 on the CPU build; float32 answers correctly.
    dtype = "float32" if (s.vllm_dtype == "auto" and on_cpu) else s.vllm_dtype
    # On the CPU build this is the share of host memory vLLM reserves for KV cache.
    memory = s.vllm_gpu_memory_utilization or (0.25 if on_cpu else 0.90)
    slots = s.worker_slots or (CPU_DEFAULT_SLOTS if on_cpu else 0)
    args = [
        "--model",
        str(model_path),
        "--served-model-name",
        s.model_name,
        "--dtype",
        dtype,
        "--gpu-memory-utilization",
        f"{memory:g}",
        "--max-model-len",
        str(s.vllm_max_model_len),
    ]
    if slots:
        args += ["--max-num-seqs", str(slots)]
    if s.vllm_enforce_eager:
        args.append("--enforce-eager")
    if s.vllm_tool_call_parser:
        args += ["--enable-auto-tool-choice", "--tool-call-parser", s.vllm_tool_call_parser]
    return args + shlex.split(s.vllm_extra_args)


def _error_code(message: str, status: int) -> str:
    if "maximum context length" in message:
        return "context_length_exceeded"
    if status == 404:
        return "model_not_found"
    if status == 501:
        return "not_supported"
    return "invalid_request"


class _ObservedEngineClient:
    """vLLM's engine client, with every generate() stream reported to its request's Progress."""

    def __init__(self, llm: Any) -> None:
        self._llm = llm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def generate(self, *args: Any, **kwargs: Any) -> AsyncGenerator[Any, None]:
        from vllm.sampling_params import RequestOutputKind

        progress = _progress.get()
        stream = self._llm.generate(*args, **kwargs)
        if progress is None:
            return stream  # type: ignore[no-any-return]
        params = kwargs.get("sampling_params", args[1] if len(args) > 1 else None)
        # DELTA outputs carry the new tokens; the other kinds carry them all so far.
        delta = getattr(params, "output_kind", None) == RequestOutputKind.DELTA
        return self._observe(stream, progress, delta=delta)

    @staticmethod
    async def _observe(
        stream: AsyncGenerator[Any, None], progress: Progress, *, delta: bool
    ) -> AsyncGenerator[Any, None]:
        seen: dict[int, int] = {}
        try:
            async for out in stream:
                progress.prompt_tokens = len(out.prompt_token_ids or ())
                tokens = 0
                text = ""
                for o in out.outputs:
                    n = len(o.token_ids)
                    if not delta:
                        n, seen[o.index] = n - seen.get(o.index, 0), n
                    tokens += max(0, n)
                    if o.index == 0:
                        text = o.text if delta else o.text[len(progress.text) :]
                        if out.finished:
                            progress.finish_reason = _FINISH.get(o.finish_reason or "", "stop")
                progress.add(text, tokens)
                yield out
        finally:
            await stream.aclose()


class VllmEngine:
    """One AsyncLLM engine (its engine core runs in a child process) and vLLM's OpenAI layer."""

    name = "vllm"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.model = settings.model_name
        self._llm: Any = None
        self._state: Any = None
        self._slots = settings.worker_slots
        self.start_seconds: float | None = None
        self.version = ""

    @property
    def slots(self) -> int:
        return self._slots

    async def start(self) -> None:
        """Load the model and start the engine; raises EngineError, never falls back."""
        started = time.monotonic()
        try:
            import vllm
            from starlette.datastructures import State
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.entrypoints.launchers.api_server.app_state import init_app_state
            from vllm.entrypoints.launchers.cli_args import make_arg_parser
            from vllm.platforms import current_platform
            from vllm.usage.usage_lib import UsageContext
            from vllm.utils.argparse_utils import FlexibleArgumentParser
            from vllm.v1.engine.async_llm import AsyncLLM
        except Exception as exc:
            raise EngineError(
                f"vLLM cannot be imported ({exc!r}); install chatq with the 'cpu' or 'gpu' "
                "extra (./start does this), or run INFERENCE_ENGINE=synthetic for pipeline tests"
            ) from exc
        from chatq.model_prep import resolve_model

        s = self._settings
        self.version = str(getattr(vllm, "__version__", ""))
        # Preparing the default model the first time takes ~25 s: keep the loop responsive.
        model = await asyncio.to_thread(resolve_model, s.model_id, s.models_dir, progress=True)
        argv = engine_cli_args(s, model, on_cpu=current_platform.is_cpu())
        try:
            parser = FlexibleArgumentParser()  # type: ignore[no-untyped-call]
            args = make_arg_parser(parser).parse_args(argv)
        except SystemExit as exc:
            raise EngineError(f"vLLM refused its arguments {argv} (see the log above)") from exc
        log.info("starting vLLM %s: %s", self.version, shlex.join(argv))
        try:
            engine_args = AsyncEngineArgs.from_cli_args(args)
            vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
            self._llm = AsyncLLM.from_vllm_config(
                vllm_config=vllm_config,
                usage_context=UsageContext.OPENAI_API_SERVER,
                enable_log_requests=engine_args.enable_log_requests,
                disable_log_stats=engine_args.disable_log_stats,
            )
            client = _ObservedEngineClient(self._llm)
            tasks = await self._llm.get_supported_tasks()
            self._state = State()
            await init_app_state(client, self._state, args, tasks)  # type: ignore[arg-type]
        except Exception as exc:
            await self.stop()
            raise EngineError(f"vLLM failed to start for model {model}: {exc!r}") from exc
        self._slots = int(self._llm.vllm_config.scheduler_config.max_num_seqs)
        self.start_seconds = time.monotonic() - started
        log.info("vLLM ready in %.1f s, %d slots", self.start_seconds, self._slots)

    async def stop(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            llm.shutdown()

    async def serve(self, request: OpenAIRequest, progress: Progress) -> Answer:
        import pydantic
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

        if self._llm is None or self._state is None:
            raise EngineError("the vLLM engine is not running")
        # vLLM names the answer "chatcmpl-<request_id>" / "cmpl-<request_id>".
        base_id = request.request_id.removeprefix("chatcmpl-")
        token = _progress.set(progress)
        try:
            if request.endpoint == "chat":
                parsed: Any = ChatCompletionRequest.model_validate_json(request.body)
                create = self._state.openai_serving_chat.create_chat_completion
            else:
                parsed = CompletionRequest.model_validate_json(request.body)
                create = self._state.openai_serving_completion.create_completion
            # vLLM ignores fields it does not know (with a log line only); chatq refuses
            # them, so that no client believes a parameter took effect when it did not.
            unknown = sorted(parsed.model_extra or ())
            if unknown:
                raise RequestRejected(
                    "unsupported_parameter",
                    f"this server does not support the parameter(s) {', '.join(map(repr, unknown))}",
                    param=unknown[0],
                )
            parsed.request_id = base_id
            result = await create(parsed, None)
        except pydantic.ValidationError as exc:
            errors = exc.errors()
            param = ".".join(str(p) for p in errors[0]["loc"]) if errors else None
            raise RequestRejected("invalid_request", _pydantic_message(exc), param=param) from None
        except RequestRejected:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status as vLLM's server maps it
            result = create_error_response(exc)
        finally:
            _progress.reset(token)
        if isinstance(result, ErrorResponse):
            err = result.error
            status = int(err.code)
            if status >= 500:
                raise EngineError(err.message)
            message = err.message
            if "--tool-call-parser" in message:
                message += " (in chatq: set VLLM_TOOL_CALL_PARSER on the worker)"
            raise RequestRejected(_error_code(message, status), message, status=status, param=err.param)
        if isinstance(result, AsyncIterator):
            return result
        body: str = result.model_dump_json()
        return body


def _pydantic_message(exc: Any) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or str(exc)
