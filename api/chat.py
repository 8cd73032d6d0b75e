"""Generation endpoints: POST /v1/chat/completions, /v1/completions (OpenAI) and /api/chat.

The API reads only what it acts on (model, stream, limits, messages), queues the
client's body as it came, and relays the engine's own OpenAI output byte for byte.
Nothing is sent before the engine has accepted the request, so everything the engine
refuses (a prompt longer than the context, a bad parameter) is a 4xx, never a 200
followed by an error event. /api/chat excepted: its stream starts once the job is
queued, with its place in the queue (`_stream_turn`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Literal, TypeVar

import msgspec
from litestar import Request, post
from litestar.background_tasks import BackgroundTask
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException
from litestar.response import Response, Stream

import schemas
from api import conversations, metrics, queue_position
from api.accounts import UserSettings, load_settings
from api.auth import Principal, principal_of
from api.body import decode_body
from api.models import resolve_model
from api.openai_types import ChatRequestHead, CompletionRequestHead, InMessage, SimpleChatRequest
from api.ratelimit import RateLimited, Ticket, estimate_prompt_tokens
from api.relay import Relay
from api.services import Services
from chatq import logs
from chatq.errors import (
    ApiError,
    DeadlineExceeded,
    Forbidden,
    InvalidRequest,
    StreamFailed,
    error_body,
)
from schemas.messages import Endpoint, Priority

log = logging.getLogger("chatq.api")
_json = msgspec.json.Encoder()
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
BodyT = TypeVar("BodyT", bound=msgspec.Struct)
T = TypeVar("T")
CloseReason = Literal["client_disconnected", "deadline", "stream_failed"] | None


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


def _without_priority(body: bytes) -> bytes:
    """The body less chatq's own `priority` (vLLM's field of that name is an integer)."""
    raw = msgspec.json.decode(body)
    raw.pop("priority", None)
    return _json.encode(raw)


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

    def finish(self, usage: schemas.Usage | None, tokens: int) -> None:
        """The request ended: charge its real tokens and free its concurrency slot (once)."""
        ticket, self._ticket = self._ticket, None
        if ticket is None:
            return
        self.services.spawn(
            self.services.limiter.release(
                ticket,
                prompt_tokens=None if usage is None else usage.prompt_tokens,
                completion_tokens=tokens if usage is None else usage.completion_tokens,
            )
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
        )

    async def open(self, job: schemas.Job) -> Relay:
        """Admit (queue depth, then the caller's rate limits) and queue the job."""
        services = self.services
        settings = services.settings
        self.line.queued(job, log_prompts=settings.log_prompts)
        await services.monitor.admit(job.model, job.priority)
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
        relay = Relay(
            services.bus,
            job,
            watchdog_s=services.settings.watchdog_s,
            spawn=services.spawn,
            buffer_bytes=services.settings.stream_buffer_bytes,
        )
        try:
            await relay.open(services.monitor)
        except BaseException:
            self.finish(None, 0)
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
                if not relay.waiting():
                    yield b"".join(parts)
                    parts.clear()
            if parts:
                yield b"".join(parts)
            reason, outcome = None, "completed"
        except ApiError as exc:
            outcome = exc.code
            reason = _close_reason(exc)
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
            reason, outcome, status = None, "completed", 200
        except ApiError as exc:
            reason, outcome, status = _close_reason(exc), exc.code, exc.status
            raise
        finally:
            metrics.REQUESTS.labels(model=relay.job.model, outcome=outcome).inc()
            self.line.end(status, outcome, usage, tokens)
            self.finish(usage, tokens)
            await relay.close(reason)
        return b"".join(parts)


def _close_reason(exc: ApiError) -> CloseReason:
    if isinstance(exc, StreamFailed):
        return "stream_failed"
    if isinstance(exc, DeadlineExceeded):
        return "deadline"
    return None


async def _until_disconnect(request: Request) -> None:  # type: ignore[type-arg]
    """Return when the client closes the connection (the body was already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(request: Request, work: Awaitable[T]) -> T:  # type: ignore[type-arg]
    """Await work; a client that goes away first cancels it (its clean-up cancels the job)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ApiError):
            await task
        raise ClientGone
    return task.result()


async def _begin(request: Request, kind: type[BodyT]) -> tuple[RequestLine, bytes, BodyT]:  # type: ignore[type-arg]
    """A new request (its id kept for error bodies), the raw body and what the API reads of it."""
    principal: Principal | None = getattr(request.state, "principal", None)
    line = RequestLine(new_request_id(), request.url.path, None if principal is None else principal.user_id)
    request.state.request_id = line.request_id
    request.state.chat_line = line
    raw = await request.body()
    return line, raw, decode_body(raw, kind)


async def _logged(request: Request, work: Awaitable[T]) -> T:  # type: ignore[type-arg]
    """Run a generation handler; a request refused before its answer began is logged here."""
    try:
        return await work
    except BaseException as exc:
        line: RequestLine | None = getattr(request.state, "chat_line", None)
        if line is not None:
            line.end(*_ended_by(exc))
        raise


async def _answer(request: Request, call: ChatCall, job: schemas.Job) -> Response[bytes] | Stream:  # type: ignore[type-arg]
    """Queue the job and answer once the engine accepted it (or refused it: a 4xx)."""
    relay = await call.open(job)
    try:
        await _unless_gone(request, relay.accepted())
    except ClientGone:
        await relay.close("client_disconnected")
        call.line.end(499, "disconnected")
        call.finish(None, 0)
        return Response(b"", status_code=499)
    except ApiError as exc:
        await relay.close(_close_reason(exc))
        call.finish(None, 0)
        raise
    headers = {"X-Request-Id": call.request_id}
    if job.stream:
        return Stream(
            call.sse(relay),
            media_type="text/event-stream",
            headers={**_SSE_HEADERS, **headers},
            # A client gone before the first byte never starts the generator, so its
            # clean-up never runs: this does it (a no-op once the stream closed itself).
            background=BackgroundTask(_abandon, call, relay),
        )
    try:
        body = await _unless_gone(request, call.complete(relay))
    except ClientGone:
        return Response(b"", status_code=499)
    return Response(body, media_type="application/json", headers=headers)


async def _abandon(call: ChatCall, relay: Relay) -> None:
    """After a stream response: close the relay and log the request if its stream never ran."""
    await relay.close("client_disconnected")
    call.line.end(499, "disconnected")
    call.finish(None, 0)


async def _stream_turn(call: ChatCall, job: schemas.Job) -> Stream:
    """An /api/chat turn: unlike /v1, its stream starts as soon as the job is queued.

    The caller's limits and the queue bound are still JSON 4xx/429s; after them the
    client gets `event: conversation` at once, then `event: queue` every QUEUE_EVENT_S
    while the job waits, then the engine's events. The engine's refusal (a prompt too
    long for the context, …) is an `event: error`, as any failure mid-stream.
    """
    relay = await call.open(job)
    return Stream(
        _turn_events(call, relay),
        media_type="text/event-stream",
        headers={**_SSE_HEADERS, "X-Request-Id": call.request_id},
        background=BackgroundTask(_abandon, call, relay),
    )


QUEUE_EVENT_S = 1.0


async def _turn_events(call: ChatCall, relay: Relay) -> AsyncIterator[bytes]:
    prelude, call.prelude = call.prelude, b""
    if prelude:
        yield prelude
    job, bus, monitor = relay.job, call.services.bus, call.services.monitor
    accepted = asyncio.ensure_future(relay.accepted())
    try:
        while not (await asyncio.wait({accepted}, timeout=QUEUE_EVENT_S))[0]:
            where = await queue_position.place(bus, monitor, job.model, job.priority, relay._seq)
            if where is not None and not accepted.done():
                yield b"event: queue\ndata: " + _json.encode(where) + b"\n\n"
        accepted.result()
    except ApiError as exc:
        call.line.end(exc.status, exc.code)
        call.finish(None, 0)
        await relay.close(_close_reason(exc))
        yield sse_error(exc, call.request_id)
        return
    finally:
        accepted.cancel()  # a client gone while queued (_abandon closes the relay)
    async for part in call.sse(relay):
        yield part


def _queue_priority(priority: object) -> tuple[Priority, bool]:
    """chatq's queue priority, and whether the body carries chatq's (string) field."""
    if priority == "background":
        return "background", True
    return "interactive", isinstance(priority, str)


async def _openai(request: Request, services: Services, endpoint: Endpoint) -> Response[bytes] | Stream:  # type: ignore[type-arg]
    """An OpenAI request: read what chatq acts on, queue the body as sent, answer."""
    head: ChatRequestHead | CompletionRequestHead
    if endpoint == "chat":
        line, raw, chat = await _begin(request, ChatRequestHead)
        if chat.messages is None:
            raise InvalidRequest("`messages` is required", param="messages")
        head, messages = chat, chat.messages
        max_tokens = chat.max_completion_tokens or chat.max_tokens
    else:
        line, raw, text = await _begin(request, CompletionRequestHead)
        if text.prompt is None:
            raise InvalidRequest("`prompt` is required", param="prompt")
        prompt = text.prompt if isinstance(text.prompt, str) else _json.encode(text.prompt).decode()
        head, messages = text, [InMessage(role="user", content=prompt)]
        max_tokens = text.max_tokens
    call = ChatCall(services, line, principal_of(request))
    model = call.model(head.model)
    priority, ours = _queue_priority(head.priority)
    job = call.job(
        model=model,
        endpoint=endpoint,
        body=_without_priority(raw) if ours else raw,
        stream=bool(head.stream),
        messages=[m.to_chat() for m in messages],
        max_tokens=max_tokens,
        user=head.user,
        priority=priority,
    )
    return await _answer(request, call, job)


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request, services: NamedDependency[Services]) -> Response[bytes] | Stream:  # type: ignore[type-arg]
    """OpenAI-compatible chat completions, streaming or not; served by the engine's OpenAI layer."""
    return await _logged(request, _openai(request, services, "chat"))


@post("/v1/completions", status_code=200)
async def completions(request: Request, services: NamedDependency[Services]) -> Response[bytes] | Stream:  # type: ignore[type-arg]
    """OpenAI-compatible (legacy) text completions, streaming or not."""
    return await _logged(request, _openai(request, services, "completions"))


@post("/api/chat", status_code=200)
async def simple_chat(request: Request, services: NamedDependency[Services]) -> Response[bytes] | Stream:  # type: ignore[type-arg]
    """The original plan's endpoint: {messages, model, temperature, max_tokens} → SSE with usage."""
    return await _logged(request, _simple_chat(request, services))


async def _simple_chat(request: Request, services: Services) -> Response[bytes] | Stream:  # type: ignore[type-arg]
    line, _, body = await _begin(request, SimpleChatRequest)
    principal = principal_of(request)
    call = ChatCall(services, line, principal)
    if body.messages is not None:
        new = [m.to_chat() for m in body.messages]
    elif body.message is not None:
        new = [schemas.ChatMessage(role="user", content=body.message)]
    else:
        raise InvalidRequest("send the new turn as `message` (or `messages`)", param="message")
    if principal.user_id is None:
        if body.conversation_id is not None:
            raise Forbidden(
                "conversations belong to user accounts: log in, or use a key made with POST /api/keys",
                code="account_required",
            )
        return await _chat_turn(request, call, body, new, UserSettings(), None)
    prefs = await load_settings(services, principal.user_id)
    return await _chat_turn(request, call, body, new, prefs, principal.user_id)


async def _chat_turn(
    request: Request,  # type: ignore[type-arg]
    call: ChatCall,
    body: SimpleChatRequest,
    new: list[schemas.ChatMessage],
    prefs: UserSettings,
    user_id: int | None,
) -> Response[bytes] | Stream:
    """One turn: the stored history (when there is an account) plus the new messages, queued."""
    services, settings = call.services, call.services.settings
    conversation: dict[str, object] | None = None
    if user_id is not None and body.conversation_id is not None:
        async with services.db() as conn:
            conversation = await conversations.fetch(conn, user_id, body.conversation_id)
    stored_model = conversation["model"] if conversation else None
    model = call.model(
        body.model
        or (stored_model if isinstance(stored_model, str) else None)
        or prefs.model
        or services.known_models()[0]
    )
    params = prefs.params
    temperature = body.temperature if body.temperature is not None else params.temperature
    max_tokens = body.max_tokens or params.max_tokens
    top_p = body.top_p if body.top_p is not None else params.top_p
    messages, meta = new, None
    if user_id is None and body.system_prompt:
        messages = [schemas.ChatMessage(role="system", content=body.system_prompt), *new]
    previous: str | None = None
    conversation_id: str | None = None
    if body.replace_last and conversation is None:
        raise InvalidRequest(
            "`replace_last` replaces the last turn of a conversation: send its `conversation_id`",
            param="replace_last",
        )
    if user_id is not None:
        if conversation is None:
            system_prompt = body.system_prompt or prefs.system_prompt
            if new[0].role == "system":
                system_prompt, new = new[0].content, new[1:]
                if not new:
                    raise InvalidRequest(
                        "the new turn has no message besides the system prompt", param="messages"
                    )
            async with services.db() as conn:
                created = await conversations.create(
                    conn, user_id, title=None, system_prompt=system_prompt, model=model
                )
            conversation_id, position = created.id, 0
            history: list[schemas.ChatMessage] = []
        else:
            conversation_id = str(conversation["id"])
            raw_previous = conversation["last_request_id"]
            previous = raw_previous if isinstance(raw_previous, str) else None
            await conversations.wait_for_turn(services, previous)
            stored_prompt = conversation["system_prompt"]
            system_prompt = body.system_prompt or (stored_prompt if isinstance(stored_prompt, str) else None)
            history, position = await conversations.history(
                services, conversation_id, without=previous if body.replace_last else None
            )
        await conversations.claim(services, user_id, conversation_id, previous, call.request_id)
        system = [schemas.ChatMessage(role="system", content=system_prompt)] if system_prompt else []
        budget = settings.vllm_max_model_len - (max_tokens or settings.default_max_tokens)
        messages = conversations.fit_history(system, history, new, budget)
        meta = schemas.RequestMeta(
            user_id=user_id,
            key_id=call.principal.key_id,
            conversation_id=conversation_id,
            position=position,
            answer_position=position + len(new),
            priority=body.priority or "interactive",
            replaces=previous if body.replace_last else None,
        )
        call.prelude = (
            b"event: conversation\ndata: "
            + _json.encode(
                {"conversation_id": conversation_id, "request_id": call.request_id, "model": model}
            )
            + b"\n\n"
        )
    openai_body: dict[str, object] = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    for name, value in (("temperature", temperature), ("max_tokens", max_tokens), ("top_p", top_p)):
        if value is not None:
            openai_body[name] = value
    try:
        job = call.job(
            model=model,
            endpoint="chat",
            body=_json.encode(openai_body),
            stream=True,
            messages=messages,
            max_tokens=max_tokens,
            user=None,
            priority=body.priority or "interactive",
            meta=meta,
        )
        return await _stream_turn(call, job)
    except BaseException:
        # Refused before it started (rate limit, full queue, the engine's 4xx): a continued
        # conversation is free again; a new one is removed (its id never reached the client).
        if conversation_id is not None and (conversation is None or not call.queued):
            with contextlib.suppress(ApiError):
                await conversations.unclaim(
                    services, conversation_id, previous, call.request_id, created=conversation is None
                )
        raise
