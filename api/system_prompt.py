"""The operator's system prompt of a model, and whether callers may send their own.

A model profile may set `system_prompt` (the operator's: the first message of every
chat request to that model, on /v1/chat/completions and /api/chat) and
`system_prompt_locked` (true, or a list of roles). For a locked caller a system prompt
of their own is refused with 400 `system_prompt_locked` rather than quietly replaced,
so the client learns why its instructions have no effect: a `system` or `developer`
message, `system_prompt` on /api/chat, and /v1/completions, whose raw prompt would
bypass any system prompt. The defaults a caller stored earlier (their settings', a
conversation's system prompt) are not refused but not used either.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

import schemas
from api.auth import Principal
from api.services import Services
from chatq.errors import ContentRefused

# The roles by which a message instructs the model as a system prompt does.
SYSTEM_ROLES = frozenset({"system", "developer"})


class OperatorPrompt(msgspec.Struct, frozen=True):
    """What the operator decides of one request's system prompt."""

    model: str
    prompt: str | None = None
    locked: bool = False

    def first(self) -> list[schemas.ChatMessage]:
        """The operator's system message, to go before every other message (or nothing)."""
        return [] if self.prompt is None else [schemas.ChatMessage(role="system", content=self.prompt)]

    def refuse(self, param: str) -> ContentRefused:
        """The error for a system prompt a locked caller sent."""
        return ContentRefused(
            f"the system prompt of model {self.model!r} is set by the operator: "
            "send no system prompt (no system or developer message)",
            code="system_prompt_locked",
            param=param,
        )

    def check_roles(self, roles: Iterable[str]) -> None:
        """Refuse, when locked, the first message with a system role (`messages.<i>.role`)."""
        if not self.locked:
            return
        for i, role in enumerate(roles):
            if role in SYSTEM_ROLES:
                raise self.refuse(f"messages.{i}.role")


def operator_prompt(services: Services, model: str, principal: Principal) -> OperatorPrompt:
    """The operator's system prompt of the model (by its profile) for this caller."""
    profile = services.profiles.get(model)
    if profile is None:
        return OperatorPrompt(model)
    return OperatorPrompt(model, profile.system_prompt, profile.locks_system_prompt(principal.role))
