"""A lean streaming client for holding many streams: asyncio protocol, no HTTP library.

httpx costs about 40 µs of client CPU per SSE event; at 20 000 events/s on 2 cores
the load client then starves the server it measures. This client writes one HTTP/1.1
request per connection and only timestamps and counts events (chatq's chunk JSON is
not decoded: content chunks are recognised by their `"content":"…"` field), so the
`streams` scenario measures the server, not the client. It fills the same
RequestResult as the full client.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

from chatq.sse import SseDecoder
from loadtest.client import RequestResult

_CONTENT = '"content":"'
_EMPTY = '"content":""'


class _SseProtocol(asyncio.Protocol):
    def __init__(self, result: RequestResult, done: asyncio.Future[None]) -> None:
        self.result = result
        self.done = done
        self.buffer = b""
        self.headers_done = False
        self.finished = False
        self.sse = SseDecoder()

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter() - self.result.start
        self.buffer += data
        if not self.headers_done:
            cut = self.buffer.find(b"\r\n\r\n")
            if cut < 0:
                return
            status_line = self.buffer[: self.buffer.find(b"\r\n")]
            self.result.status = int(status_line.split()[1])
            self.buffer = self.buffer[cut + 4 :]
            self.headers_done = True
            if self.result.status != 200:
                self.result.error = (
                    "http_429"
                    if self.result.status == 429
                    else ("http_5xx" if self.result.status >= 500 else "http_4xx")
                )
                self._finish(now)
                return
        # Chunked transfer framing lines (hex sizes) sit between events: the parser takes
        # them for fields without a value and ignores them.
        for event in self.sse.feed(self.buffer):
            if event.data == "[DONE]":
                self.finished = True
                self._finish(now)
                return
            if event.event == "error":
                self.result.error = "sse_error"
                self.result.detail = event.data[-300:]
                self._finish(now)
                return
            start = event.data.find(_CONTENT)
            if start >= 0 and event.data.find(_EMPTY) < 0:
                end = event.data.find('"', start + len(_CONTENT))
                text = event.data[start + len(_CONTENT) : end]
                if self.result.ttft is None:
                    self.result.ttft = now
                self.result.chunk_times.append(now)
                self.result.chunk_chars.append(len(text))
                self.result.chunk_tokens.append(max(1, text.count(" ")))
        self.buffer = b""

    def _finish(self, now: float) -> None:
        self.result.e2e = now
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if not self.finished and self.result.error is None:
                self.result.error = "incomplete"
                self.result.detail = f"connection closed before [DONE] ({exc!r})"
            self.result.e2e = time.perf_counter() - self.result.start
            self.done.set_result(None)


class RawChatClient:
    """Same interface as ChatClient.chat for the streams scenario."""

    def __init__(self, base_url: str, body: bytes, api_key: str | None) -> None:
        url = urlsplit(base_url)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 80
        self.head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Content-Type: application/json\r\nAccept: text/event-stream\r\nConnection: close\r\n"
            + (f"Authorization: Bearer {api_key}\r\n" if api_key else "")
        ).encode()
        self.body = body

    async def chat(self, index: int, body: bytes | None = None) -> RequestResult:
        payload = body or self.body
        loop = asyncio.get_running_loop()
        result = RequestResult(index=index, start=time.perf_counter())
        done: asyncio.Future[None] = loop.create_future()
        try:
            transport, _ = await loop.create_connection(
                lambda: _SseProtocol(result, done), self.host, self.port
            )
        except OSError as exc:
            result.error, result.detail = "connection", repr(exc)[:300]
            result.e2e = time.perf_counter() - result.start
            return result
        transport.write(self.head + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        try:
            await done
        finally:
            transport.close()
        if result.ok and result.chunk_tokens:
            result.output_tokens = sum(result.chunk_tokens)
        return result
