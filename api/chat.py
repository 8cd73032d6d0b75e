"""Chat endpoints: POST /v1/chat/completions (OpenAI) and POST /api/chat (SSE)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Literal, TypeVar

import msgspec
from litestar import Request, post
from litestar.background_tasks import BackgroundTask
from litestar.di import NamedDependency
from litestar.response import Response, Stream

import schemas
from api import metrics
from api.openai_types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    InMessage,
    OutMessage,
    SimpleChatRequest,
    UsageOut,
)
from api.relay import Relay
from api.services import Services
from chatq.errors import (
    ApiError,
    DeadlineExceeded,
    InvalidRequest,
    ModelNotFound,
    StreamFailed,
    error_body,
)
from schemas.messages import Priority

_json = msgspec.json.Encoder()
_FIELD = re.compile(r"at `\$\.?([^`\[]*)")
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"
BodyT = TypeVar("BodyT", bound=msgspec.Struct)
_TAIL = b'},"finish_reason":null}]}\n\n'


def new_request_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def decode_body(body: bytes, kind: type[BodyT]) -> BodyT:
    """Decode and validate a JSON body; a 400 names the offending field."""
    if not body:
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        match = _FIELD.search(str(exc))
        raise InvalidRequest(f"invalid request: {exc}", param=match.group(1) if match else None) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None


def sse_error(exc: ApiError, request_id: str) -> bytes:
    return b"event: error\ndata: " + _json.encode(error_body(exc, request_id)) + b"\n\n"


def _usage(usage: schemas.Usage) -> UsageOut:
    return UsageOut(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)


class ChatCall:
    """One chat request through the queue: admission, job, relay, response."""

    def __init__(self, services: Services, request_id: str) -> None:
        self.services = services
        self.request_id = request_id

    def job(
        self,
        *,
        model: str | None,
        messages: list[InMessage],
        temperature: float | None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        user: str | None = None,
        priority: Priority = "interactive",
    ) -> schemas.Job:
        settings = self.services.settings
        known = self.services.known_models()
        model = model or known[0]
        if model not in known:
            raise ModelNotFound(
                f"the model {model!r} does not exist; served models: {', '.join(known)}",
                param="model",
            )
        if max_tokens is not None and max_tokens > settings.max_tokens_limit:
            raise InvalidRequest(f"max_tokens may be at most {settings.max_tokens_limit}", param="max_tokens")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4:
            raise InvalidRequest("at most 4 stop sequences", param="stop")
        if any(not s for s in stops):
            raise InvalidRequest("a stop sequence cannot be empty", param="stop")
        now = time.time()
        return schemas.Job(
            request_id=self.request_id,
            model=model,
            messages=[m.to_chat() for m in messages],
            sampling=schemas.Sampling(
                temperature=1.0 if temperature is None else temperature,
                top_p=1.0 if top_p is None else top_p,
                max_tokens=max_tokens or settings.default_max_tokens,
                stop=stops,
                seed=seed,
            ),
            created=now,
            deadline=now + settings.request_timeout_s,
            priority=priority,
            user=user,
        )

    async def open(self, job: schemas.Job) -> Relay:
        services = self.services
        await services.monitor.admit(job.model, job.priority)
        relay = Relay(services.bus, job, watchdog_s=services.settings.watchdog_s, spawn=services.spawn)
        await relay.open(services.monitor)
        return relay

    async def sse(self, relay: Relay, *, include_usage: bool) -> AsyncIterator[bytes]:
        """OpenAI-style SSE: one `data:` event per chunk, then `data: [DONE]`."""
        model = relay.job.model
        created = int(relay.job.created)

        def event(choices: list[ChunkChoice], usage: UsageOut | None = None) -> bytes:
            chunk = ChatCompletionChunk(
                id=self.request_id, created=created, model=model, choices=choices, usage=usage
            )
            return b"data: " + _json.encode(chunk) + b"\n\n"

        # Everything of a plain content event up to its text, encoded once per request.
        empty = event([ChunkChoice(index=0, delta=Delta(content=""), finish_reason=None)])
        head = empty.split(b'"content":""', 1)[0] + b'"content":'
        reason: Literal["client_disconnected", "deadline", "stream_failed"] | None = "client_disconnected"
        outcome = "disconnected"
        metrics.ACTIVE_STREAMS.inc()
        # Chunks that are already waiting go out in one write: under load the API
        # catches up with fewer sends instead of falling further behind.
        parts: list[bytes] = []
        try:
            async for chunk in relay.chunks():
                finish = chunk.finish_reason
                if finish == "cancelled":
                    # The worker stopped it (deadline, shutdown) while the client listened.
                    raise DeadlineExceeded("the request was stopped before it finished")
                if chunk.seq == 0 or finish is not None:
                    delta = Delta(role="assistant" if chunk.seq == 0 else None, content=chunk.text)
                    parts.append(event([ChunkChoice(index=0, delta=delta, finish_reason=finish)]))
                else:
                    # The hot path: only the text changes from chunk to chunk.
                    parts.append(head + _json.encode(chunk.text) + _TAIL)
                if finish is not None:
                    if include_usage and chunk.usage is not None:
                        parts.append(event([], _usage(chunk.usage)))
                    parts.append(DONE)
                if not relay.waiting():
                    yield b"".join(parts)
                    parts.clear()
            if parts:
                yield b"".join(parts)
            reason, outcome = None, "completed"
        except ApiError as exc:
            outcome = exc.code
            if isinstance(exc, StreamFailed):
                reason = "stream_failed"
            elif isinstance(exc, DeadlineExceeded):
                reason = "deadline"
            else:
                reason = None
            parts.append(sse_error(exc, self.request_id))
            yield b"".join(parts)
        finally:
            metrics.ACTIVE_STREAMS.dec()
            metrics.REQUESTS.labels(model=model, outcome=outcome).inc()
            await relay.close(reason)

    async def complete(self, relay: Relay) -> ChatCompletion:
        """Collect the whole answer for a non-streaming request."""
        parts: list[str] = []
        usage = schemas.Usage(0, 0)
        finish = "stop"
        reason: Literal["client_disconnected", "deadline", "stream_failed"] | None = "client_disconnected"
        outcome = "disconnected"
        try:
            async for chunk in relay.chunks():
                parts.append(chunk.text)
                if chunk.finish_reason is not None:
                    if chunk.finish_reason == "cancelled":
                        raise DeadlineExceeded("the request was stopped before it finished")
                    finish = chunk.finish_reason
                    usage = chunk.usage or usage
            reason, outcome = None, "completed"
        except StreamFailed as exc:
            reason, outcome = "stream_failed", exc.code
            raise
        except DeadlineExceeded as exc:
            reason, outcome = "deadline", exc.code
            raise
        except ApiError as exc:
            reason, outcome = None, exc.code
            raise
        finally:
            metrics.REQUESTS.labels(model=relay.job.model, outcome=outcome).inc()
            await relay.close(reason)
        return ChatCompletion(
            id=self.request_id,
            created=int(relay.job.created),
            model=relay.job.model,
            choices=[Choice(0, OutMessage("assistant", "".join(parts)), finish)],
            usage=_usage(usage),
        )


def _stream(content: AsyncIterator[bytes], relay: Relay, request_id: str) -> Stream:
    return Stream(
        content,
        media_type="text/event-stream",
        headers={**_SSE_HEADERS, "X-Request-Id": request_id},
        # A client gone before the first byte never starts the generator, so its
        # clean-up never runs: this does it (a no-op once the stream closed itself).
        background=BackgroundTask(relay.close, "client_disconnected"),
    )


async def _until_disconnect(request: Request) -> None:  # type: ignore[type-arg]
    """Return when the client closes the connection (the body was already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _begin(request: Request, kind: type[BodyT]) -> tuple[str, BodyT]:  # type: ignore[type-arg]
    """A new request id (kept for error bodies) and the validated body."""
    request_id = new_request_id()
    request.state.request_id = request_id
    return request_id, decode_body(await request.body(), kind)


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request, services: NamedDependency[Services]) -> Response[bytes] | Stream:  # type: ignore[type-arg]
    """OpenAI-compatible chat completions, streaming or not."""
    request_id, body = await _begin(request, ChatCompletionRequest)
    call = ChatCall(services, request_id)
    job = call.job(
        model=body.model,
        messages=body.messages,
        temperature=body.temperature,
        top_p=body.top_p,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        stop=body.stop,
        seed=body.seed,
        user=body.user,
        priority=body.priority,
    )
    relay = await call.open(job)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _stream(call.sse(relay, include_usage=include_usage), relay, request_id)
    # A client that gives up on a non-streaming answer must stop the engine too.
    answer = asyncio.ensure_future(call.complete(relay))
    gone = asyncio.ensure_future(_until_disconnect(request))
    await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not answer.done():
        answer.cancel()  # its clean-up cancels the request in the queue or the worker
        with contextlib.suppress(asyncio.CancelledError):
            await answer
        return Response(b"", status_code=499)
    completion = answer.result()
    return Response(
        _json.encode(completion),
        media_type="application/json",
        headers={"X-Request-Id": request_id},
    )


@post("/api/chat", status_code=200)
async def simple_chat(request: Request, services: NamedDependency[Services]) -> Stream:  # type: ignore[type-arg]
    """The original plan's endpoint: {messages, model, temperature, max_tokens} → SSE."""
    request_id, body = await _begin(request, SimpleChatRequest)
    call = ChatCall(services, request_id)
    job = call.job(
        model=body.model,
        messages=body.messages,
        temperature=body.temperature,
        max_tokens=body.max_tokens,
    )
    relay = await call.open(job)
    return _stream(call.sse(relay, include_usage=True), relay, request_id)
