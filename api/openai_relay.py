"""The OpenAI endpoints: POST /v1/chat/completions and /v1/completions.

The API reads only what it acts on (model, stream, limits, messages), queues the
client's body as it came, and relays the engine's own OpenAI output byte for byte.
Nothing is sent before the engine has accepted the request, so everything the engine
refuses (a prompt longer than the context, a bad parameter) is a 4xx, never a 200
followed by an error event (/api/chat, api/chat_turn.py, is the exception).
"""

from __future__ import annotations

import msgspec
from litestar import Request, post
from litestar.background_tasks import BackgroundTask
from litestar.di import NamedDependency
from litestar.response import Response, Stream

import schemas
from api.auth import principal_of
from api.generation import (
    SSE_HEADERS,
    ChatCall,
    ClientGone,
    abandon,
    begin,
    close_reason,
    logged,
    unless_gone,
)
from api.services import Services
from chatq.errors import ApiError, InvalidRequest
from schemas.messages import Endpoint, Priority
from schemas.openai_wire import ChatRequestHead, CompletionRequestHead, InMessage

_json = msgspec.json.Encoder()


def _without_priority(body: bytes) -> bytes:
    """The body less chatq's own `priority` (vLLM's field of that name is an integer)."""
    raw = msgspec.json.decode(body)
    raw.pop("priority", None)
    return _json.encode(raw)


async def _answer(request: Request, call: ChatCall, job: schemas.Job) -> Response[bytes] | Stream:  # type: ignore[type-arg]
    """Queue the job and answer once the engine accepted it (or refused it: a 4xx)."""
    relay = await call.open(job)
    try:
        await unless_gone(request, relay.accepted())
    except ClientGone:
        # Slot and log line first: they must not wait for (or depend on) the clean-up.
        call.line.end(499, "disconnected")
        call.finish(None, 0)
        await relay.close("client_disconnected")
        return Response(b"", status_code=499)
    except ApiError as exc:
        call.finish(None, 0, refused=True)
        await relay.close(close_reason(exc))
        raise
    headers = {"X-Request-Id": call.request_id}
    if job.stream:
        return Stream(
            call.sse(relay),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **headers},
            # A client gone before the first byte never starts the generator, so its
            # clean-up never runs: this does it (a no-op once the stream closed itself).
            background=BackgroundTask(abandon, call, relay),
        )
    try:
        body = await unless_gone(request, call.complete(relay))
    except ClientGone:
        return Response(b"", status_code=499)
    return Response(body, media_type="application/json", headers=headers)


def _queue_priority(priority: object) -> tuple[Priority, bool]:
    """chatq's queue priority, and whether the body carries chatq's (string) field."""
    if priority == "background":
        return "background", True
    return "interactive", isinstance(priority, str)


async def _openai(request: Request, services: Services, endpoint: Endpoint) -> Response[bytes] | Stream:  # type: ignore[type-arg]
    """An OpenAI request: read what chatq acts on, queue the body as sent, answer."""
    head: ChatRequestHead | CompletionRequestHead
    if endpoint == "chat":
        line, raw, chat = await begin(request, ChatRequestHead)
        if chat.messages is None:
            raise InvalidRequest("`messages` is required", param="messages")
        head, messages = chat, chat.messages
        max_tokens = chat.max_completion_tokens or chat.max_tokens
    else:
        line, raw, text = await begin(request, CompletionRequestHead)
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


# A JSON answer, or with "stream": true an SSE stream.
_ANSWERS = ["application/json", "text/event-stream"]


@post(
    "/v1/chat/completions",
    status_code=200,
    opt={"body": ChatRequestHead, "generates": True, "media": _ANSWERS},
)
async def chat_completions(request: Request, services: NamedDependency[Services]) -> Response[bytes] | Stream:  # type: ignore[type-arg]
    """OpenAI-compatible chat completions, streaming or not; served by the engine's OpenAI layer."""
    return await logged(request, _openai(request, services, "chat"))


@post(
    "/v1/completions",
    status_code=200,
    opt={"body": CompletionRequestHead, "generates": True, "media": _ANSWERS},
)
async def completions(request: Request, services: NamedDependency[Services]) -> Response[bytes] | Stream:  # type: ignore[type-arg]
    """OpenAI-compatible (legacy) text completions, streaming or not."""
    return await logged(request, _openai(request, services, "completions"))
