"""The OpenAI wire format, one set of Structs for every reader and writer in chatq.

Requests: what the API reads before queueing (model, stream, limits, the messages for
the history) and what the synthetic engine reads to answer; the engine's own OpenAI
layer (vLLM's) validates and serves the whole body, so these pick out only the fields
chatq acts on and refuse the obviously malformed with a 400 naming the field. Every
field may be sent as null, which means "not given", as OpenAI clients expect.
Responses: what the synthetic engine writes (vLLM's engine writes its own).
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


# --- requests ------------------------------------------------------------------------


class ContentPart(msgspec.Struct, frozen=True):
    type: str
    text: str | None = None


class InMessage(msgspec.Struct, frozen=True):
    """A chat message as clients send it: content is text, a list of parts, or null."""

    role: str
    content: str | list[ContentPart] | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)

    def to_chat(self) -> ChatMessage:
        role = self.role if self.role in _ROLES else "tool"
        return ChatMessage(role=role, content=self.text)  # type: ignore[arg-type]


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


class SyntheticRequest(msgspec.Struct, frozen=True):
    """The fields of a chat or completions request the synthetic engine reads."""

    model: str | None = None
    messages: list[InMessage] = []
    prompt: str | list[Any] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    seed: int | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None

    @property
    def prompt_text(self) -> str:
        if self.prompt is not None:
            return self.prompt if isinstance(self.prompt, str) else "\n".join(map(str, self.prompt))
        return "\n".join(m.text for m in self.messages)


# --- responses -----------------------------------------------------------------------


class Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    finish_reason: str | None = None


class TextChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None = None


class UsageOut(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    usage: UsageOut | None = None


class CompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[TextChoice]
    object: Literal["text_completion"] = "text_completion"
    usage: UsageOut | None = None


class OutMessage(msgspec.Struct):
    role: str
    content: str


class Choice(msgspec.Struct):
    index: int
    message: OutMessage
    finish_reason: str


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[Choice]
    usage: UsageOut
    object: Literal["chat.completion"] = "chat.completion"


class Completion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[TextChoice]
    usage: UsageOut
    object: Literal["text_completion"] = "text_completion"
