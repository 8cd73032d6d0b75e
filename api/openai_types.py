"""The OpenAI chat-completions wire format (the subset chatq serves), as msgspec Structs."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from schemas.messages import ChatMessage

Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
MaxTokens = Annotated[int, msgspec.Meta(ge=1)]


class TextPart(msgspec.Struct, frozen=True):
    type: Literal["text"]
    text: str


class InMessage(msgspec.Struct, frozen=True):
    """A chat message as clients send it: content is text or a list of text parts."""

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None

    def to_chat(self) -> ChatMessage:
        if self.content is None:
            text = ""
        elif isinstance(self.content, str):
            text = self.content
        else:
            text = "".join(part.text for part in self.content)
        return ChatMessage(role=self.role, content=text)


class StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool = False


class ChatCompletionRequest(msgspec.Struct, frozen=True):
    """POST /v1/chat/completions; unknown fields are ignored, as OpenAI clients expect."""

    model: str
    messages: Annotated[list[InMessage], msgspec.Meta(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=1)] = 1
    user: str | None = None
    # chatq's extension (openai SDK: extra_body={"priority": "background"}): background
    # jobs (titles, batch work) wait until no interactive job does.
    priority: Literal["interactive", "background"] = "interactive"


class SimpleChatRequest(msgspec.Struct, frozen=True):
    """POST /api/chat, the original plan's endpoint; always answered as SSE."""

    messages: Annotated[list[InMessage], msgspec.Meta(min_length=1)]
    model: str | None = None
    temperature: Temperature | None = None
    max_tokens: MaxTokens | None = None


class Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    finish_reason: str | None


class UsageOut(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionChunk(msgspec.Struct, omit_defaults=True):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    object: str = "chat.completion.chunk"
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
    object: str = "chat.completion"


class ModelCard(msgspec.Struct):
    id: str
    created: int
    owned_by: str = "chatq"
    object: str = "model"


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"
