"""POST /api/chat: one conversation turn, built from the stored history, streamed at once.

With an account the turn continues (or starts) a conversation: the stored history plus
the new messages, trimmed to the served model's context (api/conversations.py owns the
history and the claim on the conversation). Unlike /v1 its stream starts as soon as the
job is queued, with its place in the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Literal

import msgspec
from litestar import Request, post
from litestar.background_tasks import BackgroundTask
from litestar.di import NamedDependency
from litestar.response import Response, Stream

import schemas
from api import conversations, queue_position
from api.accounts import UserSettings, load_settings
from api.auth import principal_of
from api.generation import SSE_HEADERS, ChatCall, abandon, begin, close_reason, logged, sse_error
from api.relay import Relay
from api.services import Services
from api.system_prompt import SYSTEM_ROLES, operator_prompt
from chatq.errors import ApiError, Forbidden, InvalidRequest
from schemas.openai_wire import InMessage, MaxTokens, Temperature

_json = msgspec.json.Encoder()
# The roles a conversation turn stores (/v1 passes any role on to the engine, as vLLM does).
TURN_ROLES = ("user", "assistant", "system")


class SimpleChatRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """POST /api/chat, the original plan's endpoint; always answered as SSE.

    `message` (or `messages`) is the new turn; with `conversation_id` it continues that
    conversation from its stored history, without one it starts a new conversation.
    Sampling fields not given come from the user's settings (GET /api/me/settings).
    """

    messages: Annotated[list[InMessage], msgspec.Meta(min_length=1)] | None = None
    message: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    conversation_id: str | None = None
    model: str | None = None
    temperature: Temperature | None = None
    max_tokens: MaxTokens | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None
    system_prompt: Annotated[str, msgspec.Meta(max_length=20_000)] | None = None
    priority: Literal["interactive", "background"] | None = None
    # Replace the conversation's last turn (its question and answer) with this one:
    # regenerate an answer, or edit and resend the last question.
    replace_last: bool = False


@post(
    "/api/chat",
    status_code=200,
    opt={"body": SimpleChatRequest, "generates": True, "media": ["text/event-stream"]},
)
async def simple_chat(request: Request, services: NamedDependency[Services]) -> Response[bytes] | Stream:  # type: ignore[type-arg]
    """The original plan's endpoint: {messages, model, temperature, max_tokens} → SSE with usage."""
    return await logged(request, _simple_chat(request, services))


async def _simple_chat(request: Request, services: Services) -> Response[bytes] | Stream:  # type: ignore[type-arg]
    line, _, body = await begin(request, SimpleChatRequest)
    principal = principal_of(request)
    call = ChatCall(services, line, principal)
    if body.messages is not None:
        for i, m in enumerate(body.messages):
            if m.role not in TURN_ROLES:
                raise InvalidRequest(
                    f"a turn's messages are from {', '.join(TURN_ROLES)}, not {m.role!r}",
                    param=f"messages.{i}.role",
                )
        new = [m.to_chat() for m in body.messages]
    elif body.message is not None:
        new = [schemas.ChatMessage(role="user", content=body.message)]
    else:
        raise InvalidRequest("send the new turn as `message` (or `messages`)", param="message")
    if services.policies.input:
        texts = [
            ("message" if body.messages is None else f"messages.{i}.content", m.content)
            for i, m in enumerate(new)
        ]
        if body.system_prompt:
            texts.append(("system_prompt", body.system_prompt))
        services.policies.check_input(texts)
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
    operator = operator_prompt(services, model, call.principal)
    if operator.locked and body.system_prompt:
        raise operator.refuse("system_prompt")
    operator.check_roles(m.role for m in new)
    params = prefs.params
    temperature = body.temperature if body.temperature is not None else params.temperature
    max_tokens = body.max_tokens or params.max_tokens
    top_p = body.top_p if body.top_p is not None else params.top_p
    sent = [schemas.ChatMessage(role="system", content=body.system_prompt)] if body.system_prompt else []
    # Without an account the turn is all there is; with one, replaced below by the history's.
    messages, meta = [*operator.first(), *sent, *new], None
    previous: str | None = None
    conversation_id: str | None = None
    if body.replace_last and conversation is None:
        raise InvalidRequest(
            "`replace_last` replaces the last turn of a conversation: send its `conversation_id`",
            param="replace_last",
        )
    if user_id is not None:
        if conversation is None:
            # Locked: the caller's stored defaults are not used (a sent prompt was refused).
            system_prompt = None if operator.locked else body.system_prompt or prefs.system_prompt
            if new[0].role == "system":
                system_prompt, new = new[0].content, new[1:]
                if not new:
                    raise InvalidRequest(
                        "the new turn has no message besides the system prompt", param="messages"
                    )
            _check_stored_prompt(services, system_prompt, body)
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
            if operator.locked:
                system_prompt = None
            _check_stored_prompt(services, system_prompt, body)
            history, position = await conversations.history(
                services, conversation_id, without=previous if body.replace_last else None
            )
            if operator.locked:
                history = [m for m in history if m.role not in SYSTEM_ROLES]
    try:
        if user_id is not None and conversation_id is not None:
            await conversations.claim(services, user_id, conversation_id, previous, call.request_id)
            own = [schemas.ChatMessage(role="system", content=system_prompt)] if system_prompt else []
            system = [*operator.first(), *own]
            budget = _context_len(call, model) - (max_tokens or settings.default_max_tokens)
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
        # Refused before it started (the claim, rate limit, full queue, the engine's 4xx): a
        # continued conversation is free again; a new one is removed (its id never reached
        # the client).
        if conversation_id is not None and (conversation is None or not call.queued):
            with contextlib.suppress(ApiError):
                await conversations.unclaim(
                    services, conversation_id, previous, call.request_id, created=conversation is None
                )
        raise


def _check_stored_prompt(services: Services, system_prompt: str | None, body: SimpleChatRequest) -> None:
    """The input policies on a system prompt the caller stored earlier (settings, conversation)."""
    if system_prompt and system_prompt != body.system_prompt:
        services.policies.check_input([("system_prompt", system_prompt)])


def _context_len(call: ChatCall, model: str) -> int:
    """The served model's context length: its profile's max_model_len, else VLLM_MAX_MODEL_LEN."""
    profile = call.services.profiles.get(model)
    return profile.engine.max_model_len if profile is not None else call.services.settings.vllm_max_model_len


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
        headers={**SSE_HEADERS, "X-Request-Id": call.request_id},
        background=BackgroundTask(abandon, call, relay),
    )


QUEUE_EVENT_S = 1.0


async def _turn_events(call: ChatCall, relay: Relay) -> AsyncIterator[bytes]:
    prelude, call.prelude = call.prelude, b""
    if prelude:
        yield prelude
    job, monitor = relay.job, call.services.monitor
    accepted = asyncio.ensure_future(relay.accepted())
    try:
        while not (await asyncio.wait({accepted}, timeout=QUEUE_EVENT_S))[0]:
            where = await queue_position.place(monitor, job.model, job.priority, relay._seq)
            if where is not None and not accepted.done():
                yield b"event: queue\ndata: " + _json.encode(where) + b"\n\n"
        accepted.result()
    except ApiError as exc:
        call.line.end(exc.status, exc.code)
        call.finish(None, 0, refused=True)
        await relay.close(close_reason(exc))
        yield sse_error(exc, call.request_id)
        return
    finally:
        accepted.cancel()  # a client gone while queued (abandon closes the relay)
    async for part in call.sse(relay):
        yield part
