"""The streaming client: one POST /v1/chat/completions (stream=true), timed chunk by chunk.

Times are time.perf_counter() seconds. TTFT is send → the first non-empty content delta;
every later non-empty content delta is a chunk whose arrival time is recorded (chatq may
coalesce several tokens into one chunk; vLLM's server sends about one per token). Output
tokens come from the usage chunk (stream_options.include_usage).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec

from chatq.sse import SseDecoder, SseEvent
from loadtest.config import request_max_tokens

# Error classes, in the order the tables show them.
ERROR_CLASSES = ("http_429", "http_5xx", "http_4xx", "connection", "timeout", "sse_error", "incomplete")


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta = msgspec.field(default_factory=_Delta)
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Event(msgspec.Struct):
    choices: list[_Choice] = msgspec.field(default_factory=list)
    usage: _Usage | None = None
    error: Any = None


_decode_event = msgspec.json.Decoder(_Event).decode


@dataclass(slots=True)
class RequestResult:
    """One request as the client saw it; times relative to `start` (seconds)."""

    index: int
    start: float
    status: int | None = None
    error: str | None = None  # one of ERROR_CLASSES, None when the stream completed
    detail: str = ""
    ttft: float | None = None
    e2e: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # content chunks, incl. the first
    chunk_chars: list[int] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)  # only when the client can count them
    output_tokens: int | None = None
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    retry_after: str | None = None
    # admission: a 429 retried once after its Retry-After: whether the retry got in
    retry_ok: bool | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def end(self) -> float:
        return self.start + (self.e2e or 0.0)

    def gaps(self) -> list[float]:
        """Inter-chunk gaps (seconds) between consecutive content chunks."""
        t = self.chunk_times
        return [b - a for a, b in itertools.pairwise(t)]

    def tpot(self) -> float | None:
        """(e2e − ttft) / (output tokens − 1): time per output token after the first."""
        if self.ttft is None or self.e2e is None or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "start": round(self.start, 6),
            "status": self.status,
            "error": self.error,
            "detail": self.detail,
            "ttft": self.ttft,
            "e2e": self.e2e,
            "tpot": self.tpot(),
            "output_tokens": self.output_tokens,
            "prompt_tokens": self.prompt_tokens,
            "finish_reason": self.finish_reason,
            "retry_after": self.retry_after,
            "retry_ok": self.retry_ok,
            "chunk_times": [round(t, 6) for t in self.chunk_times],
            "chunk_chars": self.chunk_chars,
            "chunk_tokens": self.chunk_tokens or None,
        }


def make_http_client(
    connections: int | None, timeout_s: float, keepalive: int | None = None
) -> httpx.AsyncClient:
    """One connection pool for the whole run; None = no limit (open-loop scenarios).

    Keep `keepalive` small when there are many connections: httpcore's pool scans every
    connection for each idle one whenever a request starts or ends (quadratic), which
    costs seconds of client CPU with hundreds of idle connections.
    """
    return httpx.AsyncClient(
        limits=httpx.Limits(
            max_connections=connections,
            max_keepalive_connections=connections if keepalive is None else keepalive,
        ),
        timeout=httpx.Timeout(connect=30.0, read=timeout_s, write=30.0, pool=None),
    )


class ChatClient:
    """Streams chat completions from one base URL with one model and API key."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        base_url: str,
        *,
        model: str,
        api_key: str | None,
        max_tokens: int,
        temperature: float,
        token_counter: Callable[[str], int] | None = None,
        output_range_ratio: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.http = http
        self.url = base_url.rstrip("/") + "/v1/chat/completions"
        self.model = model
        self.headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.max_tokens = max_tokens
        self.output_range_ratio = output_range_ratio
        self.seed = seed
        self.temperature = temperature
        self.token_counter = token_counter

    def body(self, prompt: str, max_tokens: int | None = None) -> bytes:
        return msgspec.json.encode(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens or self.max_tokens,
                "temperature": self.temperature,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )

    async def chat(self, index: int, prompt: str, max_tokens: int | None = None) -> RequestResult:
        """Send one streaming request and time it; never raises for HTTP or stream errors."""
        tokens = max_tokens or request_max_tokens(self.max_tokens, self.output_range_ratio, self.seed, index)
        body = self.body(prompt, tokens)
        start = time.perf_counter()
        result = RequestResult(index=index, start=start)
        try:
            async with self.http.stream("POST", self.url, content=body, headers=self.headers) as response:
                result.status = response.status_code
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    result.e2e = time.perf_counter() - start
                    result.retry_after = response.headers.get("retry-after")
                    result.error = _status_class(response.status_code)
                    result.detail = text[:300]
                    return result
                await _read_stream(response, result, self.token_counter)
        except httpx.TimeoutException as exc:
            result.error, result.detail = "timeout", f"{type(exc).__name__}: {exc}"[:300]
        except httpx.TransportError as exc:
            result.error, result.detail = "connection", f"{type(exc).__name__}: {exc}"[:300]
        if result.e2e is None:
            result.e2e = time.perf_counter() - start
        return result


def _status_class(status: int) -> str:
    if status == 429:
        return "http_429"
    if status >= 500:
        return "http_5xx"
    return "http_4xx"


async def _read_stream(
    response: httpx.Response, result: RequestResult, counter: Callable[[str], int] | None
) -> None:
    """Parse the SSE stream into `result` (chunk times, usage, errors)."""
    start = result.start
    decoder = SseDecoder()
    done = False
    async for data in response.aiter_raw():
        now = time.perf_counter() - start
        for event in decoder.feed(data):
            kind = _handle_event(event, now, result, counter)
            if kind == "done":
                done = True
            elif kind == "error":
                result.e2e = now
                return
    result.e2e = time.perf_counter() - start
    if not done:
        result.error = "incomplete"
        result.detail = "the stream ended without data: [DONE]"
    elif result.ttft is None:
        result.error = "incomplete"
        result.detail = "the stream had no content"


def _handle_event(
    event: SseEvent, now: float, result: RequestResult, counter: Callable[[str], int] | None
) -> str | None:
    """One SSE event: returns 'done', 'error' or None."""
    payload = event.data
    if event.event == "error":
        result.error = "sse_error"
        result.detail = payload[:300]
        return "error"
    if payload == "[DONE]":
        return "done"
    try:
        message = _decode_event(payload)
    except msgspec.DecodeError as exc:
        result.error = "sse_error"
        result.detail = f"undecodable event: {exc}"[:300]
        return "error"
    if message.error is not None:
        result.error = "sse_error"
        result.detail = payload[:300]
        return "error"
    for choice in message.choices[:1]:
        content = choice.delta.content
        if content:
            if result.ttft is None:
                result.ttft = now
            result.chunk_times.append(now)
            result.chunk_chars.append(len(content))
            if counter is not None:
                result.chunk_tokens.append(counter(content))
        if choice.finish_reason is not None:
            result.finish_reason = choice.finish_reason
    if message.usage is not None:
        result.output_tokens = message.usage.completion_tokens
        result.prompt_tokens = message.usage.prompt_tokens
    return None
