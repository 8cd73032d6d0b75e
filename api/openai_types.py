"""What the API reads of OpenAI requests: the fields chatq acts on, nothing more.

The engine's own OpenAI layer validates and serves the whole body; these Structs
pick out what the API needs before queueing (model, stream, limits, the messages for
the history) and refuse the obviously malformed with a 400 naming the field. Every
field may be sent as null, which means "not given", as OpenAI clients expect.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from schemas.messages import ChatMessage

Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
MaxTokens = Annotated[int, msgspec.Meta(ge=1)]
# chatq's queue priority (a string) or vLLM's own engine priority (an integer).
PriorityField = Literal["interactive", "background"] | int | None

_ROLES = {"system", "user", "assistant", "developer", "tool"}


class ContentPart(msgspec.Struct, frozen=True):
    type: str
    text: str | None = None


class InMessage(msgspec.Struct, frozen=True):
    """A chat message as clients send it: content is text, a list of parts, or null."""

    role: str
    content: str | list[ContentPart] | None = None

    def to_chat(self) -> ChatMessage:
        if self.content is None:
            text = ""
        elif isinstance(self.content, str):
            text = self.content
        else:
            text = "".join(part.text or "" for part in self.content)
        role = self.role if self.role in _ROLES else "tool"
        return ChatMessage(role=role, content=text)  # type: ignore[arg-type]


class StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool | None = None


class ChatRequestHead(msgspec.Struct, frozen=True):
    """POST /v1/chat/completions, as far as the API reads it."""

    model: str | None = None
    messages: Annotated[list[InMessage], msgspec.Meta(min_length=1)] | None = None
    stream: bool | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    user: str | None = None
    priority: PriorityField = None


class CompletionRequestHead(msgspec.Struct, frozen=True):
    """POST /v1/completions, as far as the API reads it."""

    model: str | None = None
    prompt: str | list[Any] | None = None  # text, texts, or token ids
    stream: bool | None = None
    max_tokens: MaxTokens | None = None
    user: str | None = None
    priority: PriorityField = None


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
