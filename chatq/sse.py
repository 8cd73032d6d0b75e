"""Reading a text/event-stream: the one SSE parser of the tests and the load tests.

Events are separated by a blank line; within one, `event:` names it, `data:` lines join
with newlines, a line starting with `:` is a comment and any other field is ignored (the
SSE spec). An event without data is not dispatched, as a keep-alive is not. Lines may end
with CRLF, LF or CR. Stray lines between events (HTTP/1.1 chunk sizes, when the caller
reads the raw connection) are fields without a colon and so ignored.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One dispatched event: its name (None: the default, "message") and its data."""

    event: str | None
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


def _event(lines: Iterable[str]) -> SseEvent | None:
    """The event of one block of lines, or None when it has no data."""
    name: str | None = None
    data: list[str] = []
    for line in lines:
        field, colon, value = line.partition(":")
        if not colon or not field:
            continue  # a field without a value, or a comment
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            data.append(value)
        elif field == "event":
            name = value
    return SseEvent(name, "\n".join(data)) if data else None


def sse_events(lines: Iterable[str]) -> Iterator[SseEvent]:
    """The events of a stream already split into lines (httpx's iter_lines)."""
    block: list[str] = []
    for line in lines:
        if line:
            block.append(line)
            continue
        event = _event(block)
        block = []
        if event is not None:
            yield event
    event = _event(block)  # a last event the stream did not end with a blank line
    if event is not None:
        yield event


class SseDecoder:
    """An incremental parser of raw bytes: feed() what arrived, get the events it completed."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[SseEvent]:
        buffer = self._buffer + chunk
        if b"\r" in buffer:
            # A CR at the very end may be the first half of a CRLF: it waits for the next chunk.
            held = b"\r" if buffer.endswith(b"\r") else b""
            buffer = buffer[: len(buffer) - len(held)].replace(b"\r\n", b"\n").replace(b"\r", b"\n") + held
        events: list[SseEvent] = []
        while True:
            cut = buffer.find(b"\n\n")
            if cut < 0:
                break
            block, buffer = buffer[:cut], buffer[cut + 2 :]
            event = _event(block.decode(errors="replace").split("\n"))
            if event is not None:
                events.append(event)
        self._buffer = buffer
        return events

    def close(self) -> list[SseEvent]:
        """The event left unterminated when the stream ended, if any."""
        buffer, self._buffer = self._buffer, b""
        event = _event(buffer.decode(errors="replace").replace("\r", "\n").split("\n"))
        return [event] if event is not None else []
