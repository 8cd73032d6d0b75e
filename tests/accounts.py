"""What the accounts tests share: the stack's model, users, and one /api/chat turn."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from tests.helpers import (
    AccountsStack,
    create_account,
    login,
    sse_events,
)

MODEL = "acct-model"
CACHE_S = 1.0


@dataclass
class User:
    name: str
    id: int
    headers: dict[str, str]


def make_user(stack: AccountsStack, name: str, role: str = "user") -> User:
    account = create_account(stack.url, name, role)
    return User(name, account.id, login(stack.url, name, account.password))


@dataclass
class Turn:
    conversation_id: str
    request_id: str
    text: str
    usage: dict[str, int]


def chat(
    url: str, headers: dict[str, str], message: str, conversation_id: str | None = None, **extra: Any
) -> Turn:
    body: dict[str, Any] = {"message": message, **extra}
    if conversation_id:
        body["conversation_id"] = conversation_id
    with httpx.stream("POST", url + "/api/chat", json=body, headers=headers, timeout=60) as response:
        assert response.status_code == 200, response.read().decode()
        events = list(sse_events(response.iter_lines()))
    assert events[0].event == "conversation", events[0]
    head = events[0].json()
    text, usage = "", {}
    for event in events[1:]:
        if event.data == "[DONE]":
            break
        chunk = event.json()
        for choice in chunk.get("choices", []):
            text += choice["delta"].get("content") or ""
        usage = chunk.get("usage") or usage
    return Turn(head["conversation_id"], head["request_id"], text, usage)


def words(*texts: str) -> int:
    return sum(len(t.split()) for t in texts)
