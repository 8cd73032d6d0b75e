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
import json
import logging
import shlex
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catalog.profiles import CHATML_TEMPLATE, Profile
from chatq.errors import EngineError
from workers.inference.engine import Answer, OpenAIRequest, Progress, RequestRejected

if TYPE_CHECKING:
    from chatq.settings import Settings

log = logging.getLogger(__name__)

CPU_DEFAULT_SLOTS = 16
LOAD_ESTIMATE_S = 20.0
_FINISH = {"stop": "stop", "length": "length", "abort": "cancelled"}
# The Progress of the request being served: set by serve(), read when vLLM's serving
# layer calls the engine client's generate() for it (synchronously, inside serve()).
_progress: contextvars.ContextVar[Progress | None] = contextvars.ContextVar("chatq_progress", default=None)


def has_chat_template(model_path: str | Path) -> bool | None:
    """Whether a local model directory brings a chat template; None for a hub id (unknown)."""
    path = Path(model_path)
    if not path.is_dir():
        return None
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    try:
        config = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(isinstance(config, dict) and config.get("chat_template"))


def chat_template_for(profile: Profile | None, model_path: str | Path) -> str | None:
    """The --chat-template to pass: the profile's, else ChatML for a model without one."""
    if profile is not None and profile.chat_template:
        return profile.chat_template
    if has_chat_template(model_path) is False:
        return CHATML_TEMPLATE
    return None


def engine_cli_args(
    settings: Settings,
    model_path: str | Path,
    *,
    on_cpu: bool,
    profile: Profile | None = None,
    swap_space: bool = False,
) -> list[str]:
    """The vLLM command-line arguments chatq runs a model with (vLLM's server takes the same).

    With a profile its engine arguments, names and sampling defaults win over the VLLM_*
    settings; `swap_space`: this vLLM still takes --swap-space (it was removed in 0.11).
    """
    s = settings
    e = profile.engine if profile is not None else None
    wanted = e.dtype if e is not None else s.vllm_dtype
    # bfloat16 gives garbage for SmolLM2 on the CPU build; float32 answers correctly.
    dtype = "float32" if (wanted == "auto" and on_cpu) else wanted
    # On the CPU build this is the share of host memory vLLM reserves for KV cache.
    memory = (
        (e.gpu_memory_utilization if e else None)
        or s.vllm_gpu_memory_utilization
        or (0.25 if on_cpu else 0.90)
    )
    slots = s.worker_slots or (CPU_DEFAULT_SLOTS if on_cpu else 0)
    names = profile.names if profile is not None else [s.model_name]
    args = [
        "--model",
        str(model_path),
        "--served-model-name",
        *names,
        "--dtype",
        dtype,
        "--gpu-memory-utilization",
        f"{memory:g}",
        "--max-model-len",
        str(e.max_model_len if e else s.vllm_max_model_len),
    ]
    if slots:
        args += ["--max-num-seqs", str(slots)]
    if e is not None and e.tensor_parallel_size > 1:
        args += ["--tensor-parallel-size", str(e.tensor_parallel_size)]
    if e is not None and e.quantization:
        args += ["--quantization", e.quantization]
    if e is not None and e.swap_space_gib and swap_space:
        args += ["--swap-space", f"{e.swap_space_gib:g}"]
    if e.enforce_eager if e else s.vllm_enforce_eager:
        args.append("--enforce-eager")
    parser = e.tool_call_parser if e is not None else s.vllm_tool_call_parser
    if parser:
        args += ["--enable-auto-tool-choice", "--tool-call-parser", parser]
    if profile is not None and profile.sampling.as_dict():
        args += ["--override-generation-config", json.dumps(profile.sampling.as_dict())]
    extra = shlex.split(s.vllm_extra_args)
    template = chat_template_for(profile, model_path)
    if template is not None and "--chat-template" not in extra:
        args += ["--chat-template", template]
    return args + extra


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
        except Exception as exc:
            # vLLM's serving layer turns this into an error data event and a [DONE]; the
            # worker must end the stream as failed (EngineDeadError: the engine core died).
            progress.error = repr(exc)
            raise
        finally:
            await stream.aclose()


class VllmEngine:
    """One AsyncLLM engine (its engine core runs in a child process) and vLLM's OpenAI layer."""

    name = "vllm"

    def __init__(self, settings: Settings, profile: Profile | None = None) -> None:
        self._settings = settings
        self._profile = profile
        self.model = profile.id if profile is not None else settings.model_name
        self._phase = 0.0
        self._phase_started = time.monotonic()
        self._llm: Any = None
        self._state: Any = None
        self._slots = settings.worker_slots
        self.start_seconds: float | None = None
        self.version = ""

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def dead(self) -> bool:
        """The engine core died (or its output loop ended): AsyncLLM serves nothing more."""
        return self._llm is not None and bool(self._llm.errored)

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
        from catalog.model_prep import resolve_model

        s = self._settings
        self.version = str(getattr(vllm, "__version__", ""))
        self._set_phase(0.0)
        source = self._profile.model if self._profile is not None else s.model_id
        # Preparing the default model the first time takes ~25 s: keep the loop responsive.
        model = await asyncio.to_thread(resolve_model, source or None, s.models_dir, progress=True)
        self._set_phase(0.1)
        parser = make_arg_parser(FlexibleArgumentParser())  # type: ignore[no-untyped-call]
        known = set(getattr(parser, "_option_string_actions", {}))
        argv = engine_cli_args(
            s,
            model,
            on_cpu=current_platform.is_cpu(),
            profile=self._profile,
            swap_space="--swap-space" in known,
        )
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:
            raise EngineError(f"vLLM refused its arguments {argv} (see the log above)") from exc
        log.info("starting vLLM %s: %s", self.version, shlex.join(argv))
        try:
            engine_args = AsyncEngineArgs.from_cli_args(args)
            vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
            self._set_phase(0.2)
            # Starting the engine core blocks for as long as the model takes to load: in a
            # thread, so the worker keeps announcing its progress meanwhile.
            self._llm = await asyncio.to_thread(
                AsyncLLM.from_vllm_config,
                vllm_config=vllm_config,
                usage_context=UsageContext.OPENAI_API_SERVER,
                enable_log_requests=engine_args.enable_log_requests,
                disable_log_stats=engine_args.disable_log_stats,
            )
            self._set_phase(0.9)
            client = _ObservedEngineClient(self._llm)
            tasks = await self._llm.get_supported_tasks()
            self._state = State()
            await init_app_state(client, self._state, args, tasks)  # type: ignore[arg-type]
        except Exception as exc:
            await self.stop()
            raise EngineError(f"vLLM failed to start for model {model}: {exc!r}") from exc
        self._slots = int(self._llm.vllm_config.scheduler_config.max_num_seqs)
        self.start_seconds = time.monotonic() - started
        self._set_phase(1.0)
        log.info("vLLM ready in %.1f s, %d slots", self.start_seconds, self._slots)

    def _set_phase(self, fraction: float) -> None:
        self._phase, self._phase_started = fraction, time.monotonic()

    def load_fraction(self) -> float:
        """An estimate of how far start() has come: its steps, and time within the long one."""
        if self._phase == 0.2:
            # The engine core loads weights and profiles memory; ~30 s on CPU for a small
            # model. Creep towards 0.9 so the figure moves without claiming to be exact.
            elapsed = time.monotonic() - self._phase_started
            return 0.2 + 0.7 * elapsed / (elapsed + LOAD_ESTIMATE_S)
        return self._phase

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
