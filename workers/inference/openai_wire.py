"""The OpenAI wire format the synthetic engine writes (vLLM's engine writes its own)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

MaxTokens = Annotated[int, msgspec.Meta(ge=1)]


class TextPart(msgspec.Struct, frozen=True):
    type: str
    text: str = ""


class InMessage(msgspec.Struct, frozen=True):
    role: str
    content: str | list[TextPart] | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool | None = None


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
