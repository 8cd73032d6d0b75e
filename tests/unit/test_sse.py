"""chatq.sse: the one SSE parser, over lines and over raw bytes as they arrive."""

from __future__ import annotations

from chatq.sse import SseDecoder, SseEvent, sse_events

STREAM = (
    b'data: {"a": 1}\n\n: keep-alive\n\nevent: error\ndata: {"error": {}}\n\n'
    b"data: x\ndata: y\n\ndata: [DONE]\n\n"
)
EVENTS = [
    SseEvent(None, '{"a": 1}'),
    SseEvent("error", '{"error": {}}'),
    SseEvent(None, "x\ny"),
    SseEvent(None, "[DONE]"),
]


def test_lines_give_events_and_skip_comments() -> None:
    assert list(sse_events(STREAM.decode().split("\n"))) == EVENTS


def test_a_last_event_without_its_blank_line_is_kept() -> None:
    assert list(sse_events(["data: last"])) == [SseEvent(None, "last")]


def test_bytes_split_anywhere_give_the_same_events() -> None:
    for size in (1, 2, 3, 7, len(STREAM)):
        decoder = SseDecoder()
        events = [e for i in range(0, len(STREAM), size) for e in decoder.feed(STREAM[i : i + size])]
        assert events + decoder.close() == EVENTS, size


def test_crlf_line_ends_and_chunk_size_lines_between_events() -> None:
    raw = b'1a\r\ndata: {"a": 1}\r\n\r\n\r\n0e\r\ndata: [DONE]\r\n\r\n'
    decoder = SseDecoder()
    events = [e for i in range(len(raw)) for e in decoder.feed(raw[i : i + 1])]
    assert events == [SseEvent(None, '{"a": 1}'), SseEvent(None, "[DONE]")]
    assert events[0].json() == {"a": 1}
