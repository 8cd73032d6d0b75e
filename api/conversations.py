"""Conversations: CRUD for their owner, and the history a new /api/chat turn is built on.

No race with the persistence worker: the API writes a conversation's row (title, system
prompt, model, `last_request_id`), the persistence worker its messages. A new turn first
waits until the previous turn (`last_request_id`) is stored as finished, with its
messages, then claims the conversation with a compare-and-set of `last_request_id`. So
the turn sent right after an answer ended sees that answer, and two turns sent at once
on one conversation cannot both be answered from the same history: the second gets 409
`conversation_busy`. Every state involved is in PostgreSQL: any API process serves any
turn.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from typing import Annotated, Any

import msgspec
from litestar import Response, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import Parameter
from psycopg.rows import dict_row

from api.accounts import AnyRequest, json_response
from api.auth import principal_of
from api.body import decode_body
from api.models import model_setting
from api.services import Services
from chatq.errors import Conflict, InvalidRequest, NotFound
from schemas import ChatMessage

Title = Annotated[str, msgspec.Meta(max_length=200)]
Prompt = Annotated[str, msgspec.Meta(max_length=20_000)]
# Roughly how many characters a token holds, counted low so a trimmed history fits.
CHARS_PER_TOKEN = 3
MESSAGE_OVERHEAD_TOKENS = 8


class Conversation(msgspec.Struct):
    id: str
    title: str | None
    system_prompt: str | None
    model: str | None
    created_at: dt.datetime
    updated_at: dt.datetime


class StoredMessage(msgspec.Struct):
    position: int
    role: str
    content: str
    request_id: str
    created_at: dt.datetime
    token_in: int | None = None
    token_out: int | None = None


class ConversationWithMessages(Conversation):
    messages: list[StoredMessage]


class NewConversation(msgspec.Struct, forbid_unknown_fields=True):
    title: Title | None = None
    system_prompt: Prompt | None = None
    model: str | None = None


class ConversationChange(msgspec.Struct, forbid_unknown_fields=True):
    title: Title | msgspec.UnsetType = msgspec.UNSET
    system_prompt: Prompt | msgspec.UnsetType | None = msgspec.UNSET
    model: str | msgspec.UnsetType | None = msgspec.UNSET


_COLUMNS = "id::text AS id, title, system_prompt, model, created_at, updated_at"


def _uuid(value: str) -> str:
    """A conversation id as stored; anything else cannot name one (404, not 400)."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise NotFound(f"no conversation {value!r}", param="conversation_id") from None


async def fetch(conn: Any, user_id: int, conversation_id: str) -> dict[str, Any]:
    """The caller's conversation row; someone else's or a deleted one is a 404."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        f"SELECT {_COLUMNS}, last_request_id FROM conversations "
        "WHERE id = %s AND user_id = %s AND deleted_at IS NULL",
        (_uuid(conversation_id), user_id),
    )
    row: dict[str, Any] | None = await cur.fetchone()
    if row is None:
        raise NotFound(f"no conversation {conversation_id!r}", param="conversation_id")
    return row


async def create(
    conn: Any, user_id: int, *, title: str | None, system_prompt: str | None, model: str | None
) -> Conversation:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        f"INSERT INTO conversations (id, user_id, title, system_prompt, model) VALUES (%s, %s, %s, %s, %s) "
        f"RETURNING {_COLUMNS}",
        (str(uuid.uuid4()), user_id, title, system_prompt, model),
    )
    return msgspec.convert(await cur.fetchone(), Conversation)


async def stored_messages(conn: Any, conversation_id: str) -> list[StoredMessage]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT position, role, content, request_id, created_at, token_in, token_out FROM messages "
        "WHERE conversation_id = %s ORDER BY position",
        (conversation_id,),
    )
    return [msgspec.convert(row, StoredMessage) for row in await cur.fetchall()]


# --- the next turn --------------------------------------------------------------------------

_TURN_STATE = """
SELECT r.status,
       EXISTS (SELECT 1 FROM messages m WHERE m.request_id = r.request_id AND m.role <> 'assistant')
FROM requests r WHERE r.request_id = %s
"""
_TERMINAL = {"completed", "cancelled", "failed"}


async def wait_for_turn(services: Services, previous: str | None) -> None:
    """Wait until the previous turn is stored as finished (its messages included).

    The common case: the answer ended a moment ago and the persistence worker writes it
    within milliseconds. Still running or never stored within CONVERSATION_WAIT_S: 409.
    A previous turn with no row at all by then was never queued (its API process died in
    between): it does not hold the conversation up.
    """
    if previous is None:
        return
    deadline = time.monotonic() + services.settings.conversation_wait_s
    delay = 0.005
    state: tuple[str, bool] | None = None
    while True:
        async with services.db() as conn:
            cur = await conn.execute(_TURN_STATE, (previous,))
            state = await cur.fetchone()
        if state is not None and state[0] in _TERMINAL and state[1]:
            return
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)
    if state is None:
        return
    raise Conflict(
        "this conversation's previous answer is still being generated or stored; "
        "send the next message when it has finished",
        code="conversation_busy",
        param="conversation_id",
    )


async def claim(
    services: Services, user_id: int, conversation_id: str, previous: str | None, request_id: str
) -> None:
    """Make request_id the conversation's newest turn, unless another turn got there first."""
    async with services.db() as conn:
        cur = await conn.execute(
            "UPDATE conversations SET last_request_id = %s, updated_at = now() "
            "WHERE id = %s AND user_id = %s AND last_request_id IS NOT DISTINCT FROM %s",
            (request_id, conversation_id, user_id, previous),
        )
        if cur.rowcount == 0:
            raise Conflict(
                "another message is being answered in this conversation; wait for it to finish",
                code="conversation_busy",
                param="conversation_id",
            )


async def unclaim(
    services: Services, conversation_id: str, previous: str | None, request_id: str, *, created: bool
) -> None:
    """Undo a turn that did not start: give the conversation back, or, when the turn was
    to start it, remove the conversation (the client never learnt its id; its claim may
    have failed, leaving no turn on it)."""
    async with services.db() as conn:
        if created:
            await conn.execute(
                "DELETE FROM conversations WHERE id = %s "
                "AND (last_request_id IS NULL OR last_request_id = %s)",
                (conversation_id, request_id),
            )
            return
        await conn.execute(
            "UPDATE conversations SET last_request_id = %s WHERE id = %s AND last_request_id = %s",
            (previous, conversation_id, request_id),
        )


def estimate_tokens(message: ChatMessage) -> int:
    return len(message.content.encode()) // CHARS_PER_TOKEN + MESSAGE_OVERHEAD_TOKENS


def fit_history(
    system: list[ChatMessage], history: list[ChatMessage], new: list[ChatMessage], budget: int
) -> list[ChatMessage]:
    """System prompt + as much of the history as fits (oldest dropped first) + the new turn."""
    used = sum(estimate_tokens(m) for m in (*system, *new))
    kept: list[ChatMessage] = []
    for message in reversed(history):
        used += estimate_tokens(message)
        if used > budget:
            break
        kept.append(message)
    kept.reverse()
    # A history never starts with an answer whose question was dropped.
    while kept and kept[0].role == "assistant":
        kept.pop(0)
    return [*system, *kept, *new]


async def history(
    services: Services, conversation_id: str, *, without: str | None = None
) -> tuple[list[ChatMessage], int]:
    """The stored messages of a conversation for its next prompt, and where the turn goes.

    A turn that failed left its question without an answer: it is not sent again.
    `without`: the request whose turn the new one replaces; its messages are left out and
    the new turn takes their place.
    """
    async with services.db() as conn:
        cur = await conn.execute(
            "SELECT m.position, m.role, m.content, COALESCE(r.status, 'completed'), m.request_id "
            "FROM messages m LEFT JOIN requests r ON r.request_id = m.request_id "
            "WHERE m.conversation_id = %s ORDER BY m.position",
            (conversation_id,),
        )
        rows = await cur.fetchall()
    kept = [row for row in rows if row[4] != without]
    messages = [
        ChatMessage(role=role, content=content) for _, role, content, status, _ in kept if status != "failed"
    ]
    replaced = [row[0] for row in rows if row[4] == without]
    position = min(replaced) if replaced else (rows[-1][0] + 1 if rows else 0)
    return messages, position


# --- routes -----------------------------------------------------------------------------------


@post("/api/conversations", status_code=201, opt={"body": NewConversation, "body_optional": True})
async def create_conversation(request: AnyRequest, services: NamedDependency[Services]) -> Response[bytes]:
    user_id = principal_of(request).require_account()
    raw = await request.body()
    body: NewConversation = decode_body(raw, NewConversation) if raw.strip() else NewConversation()
    body = msgspec.structs.replace(body, model=model_setting(services, body.model))
    async with services.db() as conn:
        conversation = await create(
            conn, user_id, title=body.title, system_prompt=body.system_prompt, model=body.model
        )
    return json_response(conversation, 201)


@get("/api/conversations")
async def list_conversations(
    request: AnyRequest,
    services: NamedDependency[Services],
    limit: Annotated[int, Parameter(ge=1, le=200)] = 50,
    before: str | None = None,
    q: Annotated[str | None, Parameter(max_length=200)] = None,
) -> Response[bytes]:
    """The caller's conversations, most recently updated first; `before` is the previous page's `next`."""
    user_id = principal_of(request).require_account()
    where = ["user_id = %s", "deleted_at IS NULL"]
    params: list[object] = [user_id]
    if before:
        stamp, _, last_id = before.partition("_")
        try:
            params += [dt.datetime.fromisoformat(stamp), str(uuid.UUID(last_id))]
        except ValueError:
            raise InvalidRequest("`before` is the `next` value of a previous page", param="before") from None
        where.append("(updated_at, id) < (%s, %s)")
    if q:
        where.append("title ILIKE %s")
        params.append("%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
    params.append(limit + 1)
    async with services.db() as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(
            f"SELECT {_COLUMNS} FROM conversations WHERE {' AND '.join(where)} "
            "ORDER BY updated_at DESC, id DESC LIMIT %s",
            params,
        )
        rows = [msgspec.convert(row, Conversation) for row in await cur.fetchall()]
    page, more = rows[:limit], len(rows) > limit
    # UTC with a Z: nothing in it needs escaping in a query string.
    stamp = page[-1].updated_at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ") if more else ""
    following = f"{stamp}_{page[-1].id}" if more else None
    return json_response({"conversations": page, "next": following})


@get("/api/conversations/{conversation_id:str}")
async def get_conversation(
    conversation_id: str, request: AnyRequest, services: NamedDependency[Services]
) -> Response[bytes]:
    """A conversation and its messages in order."""
    user_id = principal_of(request).require_account()
    async with services.db() as conn:
        row = await fetch(conn, user_id, conversation_id)
        row.pop("last_request_id")
        messages = await stored_messages(conn, row["id"])
    return json_response(ConversationWithMessages(**row, messages=messages))


@patch("/api/conversations/{conversation_id:str}", opt={"body": ConversationChange})
async def change_conversation(
    conversation_id: str, request: AnyRequest, services: NamedDependency[Services]
) -> Response[bytes]:
    """Rename, or change the system prompt or model of later turns."""
    user_id = principal_of(request).require_account()
    body: ConversationChange = decode_body(await request.body(), ConversationChange)
    if isinstance(body.model, str):
        body = msgspec.structs.replace(body, model=model_setting(services, body.model))
    changes = {k: v for k, v in msgspec.structs.asdict(body).items() if v is not msgspec.UNSET}
    async with services.db() as conn:
        row = await fetch(conn, user_id, conversation_id)
        if changes:
            sets = ", ".join(f"{column} = %s" for column in changes)  # column names from the Struct
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                f"UPDATE conversations SET {sets}, updated_at = now() WHERE id = %s RETURNING {_COLUMNS}",
                [*changes.values(), row["id"]],
            )
            updated: dict[str, Any] | None = await cur.fetchone()
            row = updated or row
        else:
            row.pop("last_request_id")
    return json_response(msgspec.convert(row, Conversation))


@delete("/api/conversations/{conversation_id:str}", status_code=204)
async def delete_conversation(
    conversation_id: str, request: AnyRequest, services: NamedDependency[Services]
) -> None:
    user_id = principal_of(request).require_account()
    async with services.db() as conn:
        row = await fetch(conn, user_id, conversation_id)
        await conn.execute("UPDATE conversations SET deleted_at = now() WHERE id = %s", (row["id"],))


ROUTES = [create_conversation, list_conversations, get_conversation, change_conversation, delete_conversation]
