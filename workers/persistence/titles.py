"""Conversation titles: the background job that asks the model for one, and its cleaning.

Once a conversation's first answer is stored, the persistence worker queues one title job
(request id `title-<conversation id>`, background priority) on the conversation's model;
the job's Completed event comes back through the same worker, which writes the cleaned
answer as the title where none is set yet.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

import schemas

TITLE_MAX_TOKENS = 24
TITLE_TEMPERATURE = 0.2
TITLE_DEADLINE_S = 600.0
TITLE_MAX_CHARS = 80
# How much of the first question and of its answer the title job shows the model.
EXCERPT_CHARS = 1000
INSTRUCTION = (
    "Write a short title, at most 6 words, for the conversation below. "
    "Reply with the title only: no quotes, no punctuation at the end."
)


def title_request_id(conversation_id: str) -> str:
    """One title job per conversation: its id doubles as the JetStream de-duplication id."""
    return f"title-{conversation_id}"


@dataclass(frozen=True, slots=True)
class TitleSource:
    """A conversation that has its first question and answer stored and no title yet."""

    conversation_id: str
    model: str
    user_id: int | None
    key_id: int | None
    question: str
    answer: str


def _excerpt(text: str) -> str:
    text = text.strip()
    if len(text) <= EXCERPT_CHARS:
        return text
    return text[:EXCERPT_CHARS].rstrip() + " …"


def title_job(source: TitleSource, now: float | None = None) -> schemas.Job:
    """The background job that asks the conversation's model for a title."""
    now = time.time() if now is None else now
    messages = [
        schemas.ChatMessage("system", INSTRUCTION),
        schemas.ChatMessage(
            "user",
            f"User: {_excerpt(source.question)}\n\nAssistant: {_excerpt(source.answer)}",
        ),
    ]
    body = {
        "model": source.model,
        "messages": [{"role": m.role, "content": m.content} for m in messages],
        "max_tokens": TITLE_MAX_TOKENS,
        "temperature": TITLE_TEMPERATURE,
    }
    return schemas.Job(
        request_id=title_request_id(source.conversation_id),
        model=source.model,
        messages=messages,
        sampling=schemas.Sampling(temperature=TITLE_TEMPERATURE, max_tokens=TITLE_MAX_TOKENS),
        created=now,
        deadline=now + TITLE_DEADLINE_S,
        priority="background",
        endpoint="chat",
        body=json.dumps(body, ensure_ascii=False).encode(),
        stream=False,
        meta=schemas.RequestMeta(
            user_id=source.user_id,
            key_id=source.key_id,
            conversation_id=source.conversation_id,
            purpose="title",
            priority="background",
        ),
    )


# A label some models put first ("Title: ...").
_LABEL = re.compile(r"^(?:title|conversation title)\s*[:\-–—]\s*", re.IGNORECASE)
# Markdown before the text: headings, block quotes, list bullets.
_LEADING = "#>*-•+ \t"
# Markdown within it: emphasis and code marks (an underscore inside a word stays), links.
_EMPHASIS = re.compile(r"\*+|`+|~~|(?<!\w)_+|_+(?!\w)")
_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_QUOTES = "\"'“”‘’«»„‚‹›`"
_TRAILING_PUNCT = ".,;:!?…。、-–—"


def clean_title(text: str) -> str | None:
    """The title in a model's answer, or None when nothing usable is left.

    The first non-empty line, less a "Title:" label, markdown (headings, bullets,
    emphasis, code) and quotes around it, and punctuation at its end; at most
    TITLE_MAX_CHARS characters, cut at a word boundary where there is one.
    """
    line = next((stripped for raw in text.splitlines() if (stripped := raw.strip())), "")
    line = _EMPHASIS.sub("", _LINK.sub(r"\1", line))
    previous = None
    while line != previous:
        previous = line
        line = line.lstrip(_LEADING)
        line = _LABEL.sub("", line)
        line = line.strip(_QUOTES).strip()
        line = line.rstrip(_TRAILING_PUNCT).rstrip()
    line = " ".join(line.split())
    if len(line) > TITLE_MAX_CHARS:
        cut = line[: TITLE_MAX_CHARS + 1]
        space = cut.rfind(" ")
        line = cut[:space] if space > TITLE_MAX_CHARS // 2 else line[:TITLE_MAX_CHARS]
        line = line.rstrip(_TRAILING_PUNCT + _QUOTES + " ")
    return line or None
