"""One generation request through the queue, whichever endpoint it came by.

Its log line (`RequestLine`), its limits, job, relay and answer (`ChatCall`), and the
clean-up that runs however it ends: a client gone, a refusal, a finished stream. The
endpoints are api/openai_relay.py (/v1) and api/chat_turn.py (/api/chat).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Coroutine
from typing import Any, TypeVar

import msgspec
from litestar import Request
from litestar.exceptions import HTTPException

import schemas
from api import metrics
from api.auth import Principal
from api.body import decode_body
from api.models import resolve_model
from api.ratelimit import RateLimited, Ticket, estimate_prompt_tokens
from api.relay import Relay
from api.services import Services
from chatq import logs
from chatq.errors import (
    ApiError,
    ContentRefused,
    DeadlineExceeded,
    InvalidRequest,
    StreamFailed,
    error_body,
)
from schemas.messages import CancelReason, Endpoint, Priority

log = logging.getLogger("chatq.api")
_json = msgspec.json.Encoder()
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
BodyT = TypeVar("BodyT", bound=msgspec.Struct)
T = TypeVar("T")
CloseReason = CancelReason | None


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def new_request_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class RequestLine:
    """The one log line of a generation request, written once, when it ends.

    Creating it tags everything the request's task logs with its id and user (and with
    its model once known); its fields are in docs/logging.md.
    """

    # A prompt logged with LOG_PROMPTS is cut to this many characters.
    PROMPT_CHARS = 2000

    def __init__(self, request_id: str, endpoint: str, user_id: int | None = None) -> None:
        self.request_id = request_id
        self.endpoint = endpoint
        self.user_id = user_id
        self._model: str | None = None
        self.ctx_len: int | None = None
        self.prompt: str | None = None
        self.started = time.monotonic()
        self.written = False
        logs.bind(request_id, user_id=user_id)

    @property
    def model(self) -> str | None:
        return self._model

    @model.setter
    def model(self, model: str | None) -> None:
        self._model = model
        if model:
            logs.bind(model=model)

    def queued(self, job: schemas.Job, *, log_prompts: bool) -> None:
        """What the line tells of the job: its messages, and with LOG_PROMPTS the last one."""
        self.ctx_len = len(job.messages)
        if log_prompts and job.messages:
            self.prompt = job.messages[-1].content[: self.PROMPT_CHARS]

    def end(self, status: int, outcome: str, usage: schemas.Usage | None = None, tokens: int = 0) -> None:
        """Log the request's end (a no-op after the first call)."""
        if self.written:
            return
        self.written = True
        fields: dict[str, object] = {
            "request_id": self.request_id,
            "user_id": self.user_id,
            "model": self._model,
            "endpoint": self.endpoint,
            "status_code": status,
            "outcome": outcome,
            "ctx_len": self.ctx_len,
            "input_tokens": None if usage is None else usage.prompt_tokens,
            "output_tokens": tokens if usage is None else usage.completion_tokens,
            "latency_ms": round((time.monotonic() - self.started) * 1000, 1),
        }
        if self.prompt is not None:
            fields["prompt"] = self.prompt  # masked, as every string, by chatq.logs
        log.info("%s %d %s", self.endpoint, status, outcome, extra=fields)


def _ended_by(exc: BaseException) -> tuple[int, str]:
    """The status and outcome of a request that ended with this exception."""
    if isinstance(exc, ApiError):
        return exc.status, exc.code
    if isinstance(exc, HTTPException):
        return exc.status_code, "http_error"
    if isinstance(exc, asyncio.CancelledError):
        return 499, "disconnected"
    return 500, "internal_error"


def sse_error(exc: ApiError, request_id: str) -> bytes:
    return b"event: error\ndata: " + _json.encode(error_body(exc, request_id)) + b"\n\n"


class ChatCall:
    """One generation request through the queue: limits, admission, job, relay, response."""

    def __init__(self, services: Services, line: RequestLine, principal: Principal) -> None:
        self.services = services
        self.line = line
        self.request_id = line.request_id
        self.principal = principal
        self._ticket: Ticket | None = None
        self.queued = False
        # Sent before the engine's own events (an /api/chat turn names its conversation).
        self.prelude = b""

    def finish(self, usage: schemas.Usage | None, tokens: int, *, refused: bool = False) -> None:
        """The request ended: charge its real tokens and free its concurrency slot (once).

        A request `refused` before it ran (too large to queue, the engine's 4xx) gives its
        prompt estimate back: only what ran counts against tokens per minute.
        """
        release = self._release(usage, tokens, refused=refused)
        if release is not None:
            self.services.spawn(release)

    async def settle(self, usage: schemas.Usage | None, tokens: int) -> None:
        """finish(), waited for: before a whole answer's last bytes go out, so a client that
        sends its next request the moment it has read this one finds its slot free."""
        release = self._release(usage, tokens, refused=False)
        if release is not None:
            await release

    def _release(
        self, usage: schemas.Usage | None, tokens: int, *, refused: bool
    ) -> Coroutine[Any, Any, None] | None:
        ticket, self._ticket = self._ticket, None
        if ticket is None:
            return None
        prompt_tokens = 0 if refused else None if usage is None else usage.prompt_tokens
        return self.services.limiter.release(
            ticket,
            prompt_tokens=prompt_tokens,
            completion_tokens=tokens if usage is None else usage.completion_tokens,
        )

    def model(self, model: str | None) -> str:
        self.line.model = model
        if not model:
            raise InvalidRequest("`model` is required: name one of GET /v1/models", param="model")
        # An alias becomes its profile's id here, before queueing: one queue per model.
        return resolve_model(self.services, model)

    def job(
        self,
        *,
        model: str,
        endpoint: Endpoint,
        body: bytes,
        stream: bool,
        messages: list[schemas.ChatMessage],
        max_tokens: int | None,
        user: str | None,
        priority: Priority = "interactive",
        meta: schemas.RequestMeta | None = None,
    ) -> schemas.Job:
        settings = self.services.settings
        if max_tokens is not None and max_tokens > settings.max_tokens_limit:
            raise InvalidRequest(
                f"max_tokens may be at most {settings.max_tokens_limit} on this server", param="max_tokens"
            )
        now = time.time()
        return schemas.Job(
            request_id=self.request_id,
            model=model,
            messages=messages,
            sampling=schemas.Sampling(max_tokens=max_tokens or settings.default_max_tokens),
            created=now,
            deadline=now + settings.request_timeout_s,
            priority=priority,
            user=user,
            endpoint=endpoint,
            body=body,
            stream=stream,
            meta=meta
            or schemas.RequestMeta(
                user_id=self.principal.user_id, key_id=self.principal.key_id, priority=priority
            ),
            output_text=bool(self.services.policies.output),
        )

    async def open(self, job: schemas.Job) -> Relay:
        """Admit (queue depth, then the caller's rate limits) and queue the job."""
        services = self.services
        settings = services.settings
        self.line.queued(job, log_prompts=settings.log_prompts)
        # A place among this process's streams first: refused, nothing else was asked.
        services.streams.take(job.model)
        admitted = False
        try:
            await services.monitor.admit(job.model, job.priority)
            admitted = True
            try:
                self._ticket = await services.limiter.acquire(
                    self.principal.scopes(),
                    settings.rate_limits[self.principal.role],
                    prompt_tokens=estimate_prompt_tokens(job.body),
                    request_id=job.request_id,
                    hold_s=settings.request_timeout_s + settings.watchdog_s,
                )
            except RateLimited as exc:
                metrics.REJECTED.labels(model=job.model, reason=exc.code).inc()
                raise
        except BaseException:
            services.streams.give_back()
            if admitted:  # refused by a rate limit (or cancelled): no job will land
                services.monitor.not_queued(job.model, job.priority)
            raise
        relay = Relay(
            services.bus,
            job,
            watchdog_s=services.settings.watchdog_s,
            spawn=services.spawn,
            buffer_bytes=services.settings.stream_buffer_bytes,
            output=services.policies.output,
            on_close=services.streams.give_back,
        )
        try:
            await relay.open(services.monitor)
        except BaseException as exc:
            self.finish(None, 0, refused=isinstance(exc, ApiError))
            await relay.close(None)  # unsubscribed, and its place among the streams given back
            raise
        self.queued = True
        return relay

    async def sse(self, relay: Relay) -> AsyncIterator[bytes]:
        """The engine's SSE events as it wrote them; a failure becomes an `error` event."""
        reason: CloseReason = "client_disconnected"
        outcome = "disconnected"
        tokens, usage = 0, None
        metrics.ACTIVE_STREAMS.inc()
        # Chunks that are already waiting go out in one write: under load the API
        # catches up with fewer sends instead of falling further behind.
        parts: list[bytes] = [self.prelude] if self.prelude else []
        try:
            async for chunk in relay.chunks():
                if chunk.finish_reason == "cancelled":
                    # The worker stopped it (deadline, shutdown) while the client listened.
                    raise DeadlineExceeded("the request was stopped before it finished")
                tokens, usage = tokens + chunk.tokens, chunk.usage or usage
                parts.append(chunk.data)
                if chunk.finish_reason is not None:
                    await self.settle(usage, tokens)  # before the last chunk and [DONE]
                if not relay.waiting():
                    yield b"".join(parts)
                    parts.clear()
            if parts:
                yield b"".join(parts)
            reason, outcome = None, "completed"
        except ApiError as exc:
            outcome = exc.code
            reason = close_reason(exc)
            parts.append(sse_error(exc, self.request_id))
            yield b"".join(parts)
        finally:
            metrics.ACTIVE_STREAMS.dec()
            metrics.REQUESTS.labels(model=relay.job.model, outcome=outcome).inc()
            # The status went out with the first byte; the outcome says how it ended.
            self.line.end(200, outcome, usage, tokens)
            self.finish(usage, tokens)
            await relay.close(reason)

    async def complete(self, relay: Relay) -> bytes:
        """The whole JSON answer of a non-streaming request."""
        parts: list[bytes] = []
        reason: CloseReason = "client_disconnected"
        outcome, status = "disconnected", 499
        tokens, usage = 0, None
        try:
            async for chunk in relay.chunks():
                if chunk.finish_reason == "cancelled":
                    raise DeadlineExceeded("the request was stopped before it finished")
                tokens, usage = tokens + chunk.tokens, chunk.usage or usage
                parts.append(chunk.data)
            await self.settle(usage, tokens)  # before the answer goes out
            reason, outcome, status = None, "completed", 200
        except ApiError as exc:
            reason, outcome, status = close_reason(exc), exc.code, exc.status
            raise
        finally:
            metrics.REQUESTS.labels(model=relay.job.model, outcome=outcome).inc()
            self.line.end(status, outcome, usage, tokens)
            self.finish(usage, tokens)
            await relay.close(reason)
        return b"".join(parts)


def close_reason(exc: ApiError) -> CloseReason:
    # An output policy's refusal stops the job as a broken stream does (a Failed event).
    if isinstance(exc, StreamFailed | ContentRefused):
        return "stream_failed"
    if isinstance(exc, DeadlineExceeded):
        return "deadline"
    return None


async def _until_disconnect(request: Request) -> None:  # type: ignore[type-arg]
    """Return when the client closes the connection (the body was already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_gone(request: Request, work: Awaitable[T]) -> T:  # type: ignore[type-arg]
    """Await work; a client that goes away first cancels it (its clean-up cancels the job)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_until_disconnect(request))
    stopped = False
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Client gone or handler cancelled: the work stops too, and its clean-up ends
        # before this returns; the handler's own cancellation still propagates.
        gone.cancel()
        if not task.done():
            stopped = True
            task.cancel()
            await asyncio.wait({task})
            if not task.cancelled():
                task.exception()  # retrieved: nobody wants the answer any more
    if stopped:
        raise ClientGone
    return task.result()


async def begin(request: Request, kind: type[BodyT]) -> tuple[RequestLine, bytes, BodyT]:  # type: ignore[type-arg]
    """A new request (its id kept for error bodies), the raw body and what the API reads of it."""
    principal: Principal | None = getattr(request.state, "principal", None)
    line = RequestLine(new_request_id(), request.url.path, None if principal is None else principal.user_id)
    request.state.request_id = line.request_id
    request.state.chat_line = line
    raw = await request.body()
    return line, raw, decode_body(raw, kind)


async def logged(request: Request, work: Awaitable[T]) -> T:  # type: ignore[type-arg]
    """Run a generation handler; a request refused before its answer began is logged here."""
    try:
        return await work
    except BaseException as exc:
        line: RequestLine | None = getattr(request.state, "chat_line", None)
        if line is not None:
            line.end(*_ended_by(exc))
        raise


async def abandon(call: ChatCall, relay: Relay) -> None:
    """After a stream response: log the request if its stream never ran, free its slot, close the relay."""
    call.line.end(499, "disconnected")
    call.finish(None, 0)
    await relay.close("client_disconnected")
