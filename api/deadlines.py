"""Bounds on how long a client may take to send its request: the head, then the body.

uvicorn bounds only the idle time between requests (timeout_keep_alive). A client that
connects and sends nothing, trickles its header a byte at a time, or promises a body it
never sends would otherwise hold its connection (and a file descriptor, and for a body
a handler task) for as long as it likes; a few hundred such sockets starve the server.

- The head (request line and headers) must arrive within HTTP_HEADER_TIMEOUT_S of the
  connection opening, or of the first byte of the next request on a kept-alive
  connection: `HeaderDeadlineProtocol`, uvicorn's httptools protocol with a timer armed
  at `connection_made` and `on_message_begin`, cancelled by `on_headers_complete`. When
  it fires the client gets 408 (the standard error body) and the connection is closed.
  Bytes arriving do not re-arm it, so trickling does not help.
- The head may be at most MAX_HEAD_BYTES (64 KiB, request line and headers together;
  nginx's default allows 32 KiB): the same protocol counts what arrives until the
  headers are complete and answers 431 (the standard error body) and closes beyond it,
  so a client cannot make the parser buffer an endless header.
- The body must arrive within HTTP_BODY_TIMEOUT_S of the head: `BodyDeadline`, an ASGI
  wrapper of `receive`. A handler waiting for the rest of the body gets `RequestTimeout`
  (408, the standard body, through the app's error handler) and the response says
  `connection: close`, so uvicorn closes the connection after it. Once the body is in,
  `receive` is passed through unbounded (a stream waits on it for the client to leave).
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, ReceiveMessage, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from chatq.errors import ClientError, RequestHeaderTooLarge, RequestTimeout, error_body

MAX_HEAD_BYTES = 64 * 1024


def _closing_response(exc: ClientError, reason: str) -> bytes:
    """A whole error response: the standard error body, then the connection closes."""
    body = msgspec.json.encode(error_body(exc, None))
    head = (
        f"HTTP/1.1 {exc.status} {reason}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


def _head_timeout_response(timeout_s: float) -> bytes:
    return _closing_response(
        RequestTimeout(f"the request head did not arrive within {timeout_s:g} s"), "Request Timeout"
    )


def _head_too_large_response() -> bytes:
    message = f"the request line and headers are larger than {MAX_HEAD_BYTES} bytes"
    return _closing_response(RequestHeaderTooLarge(message), "Request Header Fields Too Large")


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; the request head must arrive within `header_timeout_s`
    and be at most MAX_HEAD_BYTES."""

    header_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_head = True
        self._head_bytes = 0
        self._parsed_head_bytes = 0
        self._head_too_large = False

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # Still in the head after all of this: every byte since it began is head.
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._refuse_head()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        # A head that came whole in one read: counted as the parser hands it over.
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count(self, size: int) -> None:
        self._parsed_head_bytes += size
        if self._parsed_head_bytes > MAX_HEAD_BYTES:
            self._head_too_large = True
            raise ValueError("request head too large")  # the parser stops; see send_400_response

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:
            self._refuse_head()
        else:
            super().send_400_response(msg)

    def _refuse_head(self) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(_head_too_large_response())
        self.transport.close()

    @classmethod
    def bounded(cls, header_timeout_s: float) -> type[HeaderDeadlineProtocol]:
        """This protocol with its bound, as uvicorn.Config's `http` (a class it instantiates)."""
        return type(cls.__name__, (cls,), {"header_timeout_s": header_timeout_s})

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        # Not in the middle of the previous response on this connection (pipelining).
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(_head_timeout_response(self.header_timeout_s))
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes, self._parsed_head_bytes = True, 0, 0
        self._arm()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


class BodyDeadline:
    """ASGI wrapper: an HTTP request's body must arrive within `timeout_s` of its head."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        state = {"body_done": False, "timed_out": False}

        async def bounded_receive() -> ReceiveMessage:
            if state["body_done"]:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                state["timed_out"] = True
                raise RequestTimeout(f"the request body did not arrive within {self.timeout_s:g} s") from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["body_done"] = True
            return message

        async def closing_send(message: Message) -> None:
            if state["timed_out"] and message["type"] == "http.response.start":
                # The rest of the body may still come: uvicorn closes after this response.
                headers = [*message.get("headers", ()), (b"connection", b"close")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, bounded_receive, closing_send)
