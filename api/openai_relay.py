"""The OpenAI endpoints: POST /v1/chat/completions and /v1/completions.

The API reads only what it acts on (model, stream, limits, messages), queues the
client's body as it came, and relays the engine's own OpenAI output byte for byte.
Nothing is sent before the engine has accepted the request, so everything the engine
refuses (a prompt longer than the context, a bad parameter) is a 4xx, never a 200
followed by an error event (/api/chat, api/chat_turn.py, is the exception).
"""

from __future__ import annotations

from typing import Any

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
from api.system_prompt import operator_prompt
from chatq.errors import ApiError, ContentRefused, InvalidRequest
from schemas.messages import Endpoint, Priority
from schemas.openai_wire import ChatRequestHead, CompletionRequestHead, InMessage

_json = msgspec.json.Encoder()


def _as_queued(body: bytes, *, ours: bool, system_prompt: str | None) -> bytes:
    """The body less chatq's own `priority` (vLLM's field of that name is an integer) and
    with the operator's system prompt first; as sent when neither applies."""
    if not ours and system_prompt is None:
        return body
    raw = msgspec.json.decode(body)
    if ours:
        raw.pop("priority", None)
    if system_prompt is not None:
        raw["messages"] = [{"role": "system", "content": system_prompt}, *raw["messages"]]
    return _json.encode(raw)


def _prompt_texts(prompt: str | list[Any]) -> list[tuple[str, str]]:
    """A completion prompt's texts for the input policies; token ids cannot be checked."""
    if isinstance(prompt, str):
        return [("prompt", prompt)]
    if all(isinstance(p, str) for p in prompt):
        return [(f"prompt.{i}", p) for i, p in enumerate(prompt)]
    raise ContentRefused(
        "this server checks prompts against its input policies: send the prompt as text, not token ids",
        param="prompt",
    )


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
    principal = principal_of(request)
    policies = services.policies
    if endpoint == "chat":
        line, raw, chat = await begin(request, ChatRequestHead)
        if chat.messages is None:
            raise InvalidRequest("`messages` is required", param="messages")
        head, messages = chat, chat.messages
        max_tokens = chat.max_completion_tokens or chat.max_tokens
        if policies.input:
            policies.check_input((f"messages.{i}.content", m.text) for i, m in enumerate(messages))
    else:
        line, raw, text = await begin(request, CompletionRequestHead)
        if text.prompt is None:
            raise InvalidRequest("`prompt` is required", param="prompt")
        if policies.input:
            policies.check_input(_prompt_texts(text.prompt))
        prompt = text.prompt if isinstance(text.prompt, str) else _json.encode(text.prompt).decode()
        head, messages = text, [InMessage(role="user", content=prompt)]
        max_tokens = text.max_tokens
    call = ChatCall(services, line, principal)
    model = call.model(head.model)
    operator = operator_prompt(services, model, principal)
    if endpoint == "chat":
        operator.check_roles(m.role for m in messages)
    elif operator.locked:
        # A raw prompt is the whole text the model sees: no system prompt could be kept first.
        raise operator.refuse("prompt")
    priority, ours = _queue_priority(head.priority)
    job = call.job(
        model=model,
        endpoint=endpoint,
        body=_as_queued(raw, ours=ours, system_prompt=operator.prompt if endpoint == "chat" else None),
        stream=bool(head.stream),
        messages=[*(operator.first() if endpoint == "chat" else []), *(m.to_chat() for m in messages)],
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
