"""A deterministic engine at a set token rate, for measuring and testing the pipeline.

It is never the default and never stands in for vLLM on its own: only
INFERENCE_ENGINE=synthetic selects it. It answers chat and completions requests in
the OpenAI wire format; of their parameters it reads only the model, the prompt,
max_tokens, temperature, seed and the stream options.

Test-only: when the last message of a chat request starts with `!say `, the engine
streams the rest of that message word by word (whitespace kept, at most max_tokens
words) instead of its own words, so a test can make the model say something exact
(Markdown, `<script>`, …). Only this engine does it, and it is never the default.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from collections.abc import AsyncIterator

import msgspec

from chatq.errors import EngineError, invalid_field
from schemas import openai_wire as wire
from workers.inference.engine import Answer, OpenAIRequest, Progress, RequestRejected

_WORDS = (
    "the quick brown fox jumps over the lazy dog while a queue of patient requests "
    "streams tokens through the broker to every waiting reader and back again"
).split()
_decode = msgspec.json.Decoder(wire.SyntheticRequest).decode
_encode = msgspec.json.Encoder().encode
DEFAULT_MAX_TOKENS = 512
SAY = "!say "


def synthetic_token(request_id_seed: int, index: int) -> str:
    """The index-th token of a synthetic answer: a word and a space, fixed by the seed."""
    return _WORDS[(request_id_seed + index * 7) % len(_WORDS)] + " "


def said(body: wire.SyntheticRequest) -> list[str] | None:
    """The words a test told the engine to say (`!say ` + text as the last message), if any."""
    if not body.messages or not body.messages[-1].text.startswith(SAY):
        return None
    return re.findall(r"\s*\S+\s*", body.messages[-1].text.removeprefix(SAY)) or None


def prompt_seed(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big")


def _sse(payload: msgspec.Struct) -> str:
    return "data: " + _encode(payload).decode() + "\n\n"


class SyntheticEngine:
    """Emits max_tokens deterministic words: the first after ttft_s, then one per 1/rate s."""

    name = "synthetic"
    version = "synthetic"
    dead = False  # it has no engine core to lose

    def __init__(
        self,
        *,
        model: str,
        tokens_per_s: float,
        ttft_s: float,
        slots: int,
        start_s: float = 0.0,
        source: str = "",
    ) -> None:
        self.model = model
        self._start_s = start_s
        self._source = source
        self._loading_since: float | None = None
        self._loaded = False
        self._interval = 1.0 / tokens_per_s
        self._ttft_s = ttft_s
        self._slots = slots
        self.running: set[str] = set()
        self.aborted: list[str] = []

    @property
    def slots(self) -> int:
        return self._slots

    async def start(self) -> None:
        """Takes start_s, as loading a model would (to test what users see meanwhile).

        A profile whose model is a local path (it starts with / or .) that does not exist
        fails to load, as it would in vLLM: how a failed load is tested without a GPU.
        """
        self._loaded = False
        self._loading_since = time.monotonic()
        await asyncio.sleep(self._start_s)
        self._loading_since = None
        if self._source.startswith(("/", ".")) and not await asyncio.to_thread(os.path.exists, self._source):
            raise EngineError(f"the model directory {self._source} does not exist")
        self._loaded = True

    def load_fraction(self) -> float:
        """How far start() has come, by its planned duration."""
        if self._loaded:
            return 1.0
        if self._loading_since is None or self._start_s <= 0:
            return 0.0
        return min(0.99, (time.monotonic() - self._loading_since) / self._start_s)

    async def stop(self) -> None:
        self._loaded = False

    async def serve(self, request: OpenAIRequest, progress: Progress) -> Answer:
        try:
            body = _decode(request.body)
        except msgspec.ValidationError as exc:
            raise RequestRejected("invalid_request", str(exc), param=invalid_field(exc)) from None
        except msgspec.DecodeError as exc:
            raise RequestRejected("invalid_request", f"the body is not valid JSON: {exc}") from None
        prompt = body.prompt_text
        progress.prompt_tokens = len(prompt.split())
        max_tokens = body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS
        if body.temperature == 0:
            seed = prompt_seed(prompt)
        else:
            seed = body.seed if body.seed is not None else prompt_seed(request.request_id)
        script = said(body)
        if script is not None:
            max_tokens = min(max_tokens, len(script))
        tokens = self._tokens(request.request_id, seed, max_tokens, progress, script)
        chat = request.endpoint == "chat"
        rid = request.request_id if chat else "cmpl-" + request.request_id.removeprefix("chatcmpl-")
        created = int(time.time())
        if request.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return self._stream(tokens, rid, created, chat=chat, include_usage=usage, progress=progress)
        text = "".join([token async for token in tokens])
        usage_out = wire.UsageOut(progress.prompt_tokens, max_tokens, progress.prompt_tokens + max_tokens)
        if chat:
            message = wire.OutMessage("assistant", text)
            answer: msgspec.Struct = wire.ChatCompletion(
                rid, created, self.model, [wire.Choice(0, message, "length")], usage_out
            )
        else:
            answer = wire.Completion(
                rid, created, self.model, [wire.TextChoice(0, text, "length")], usage_out
            )
        return _encode(answer).decode()

    async def _tokens(
        self, rid: str, seed: int, max_tokens: int, progress: Progress, script: list[str] | None = None
    ) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        self.running.add(rid)
        finished = False
        try:
            # Sleeping to absolute times keeps the rate exact however late a wake-up is.
            start = loop.time()
            for index in range(max_tokens):
                due = start + self._ttft_s + index * self._interval
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                token = script[index] if script is not None else synthetic_token(seed, index)
                progress.add(token, 1)
                if index == max_tokens - 1:
                    progress.finish_reason = "length"
                    finished = True
                yield token
        finally:
            self.running.discard(rid)
            if not finished:
                self.aborted.append(rid)

    async def _stream(
        self,
        tokens: AsyncIterator[str],
        rid: str,
        created: int,
        *,
        chat: bool,
        include_usage: bool,
        progress: Progress,
    ) -> AsyncIterator[str]:
        model = self.model
        first = True
        # A plain token event differs from the next only in its text: encode the rest once
        # (at thousands of events a second this engine must not be what is measured).
        if chat:
            blank = wire.ChatCompletionChunk(
                rid, created, model, [wire.ChunkChoice(0, wire.Delta(content=""))]
            )
            head, tail = _sse(blank).split('"content":""', 1)
            head += '"content":'
        else:
            blank_text = wire.CompletionChunk(rid, created, model, [wire.TextChoice(0, "")])
            head, tail = _sse(blank_text).split('"text":""', 1)
            head += '"text":'
        async for token in tokens:
            last = progress.finish_reason is not None
            if not (first or last):
                yield head + _encode(token).decode() + tail
            elif chat:
                delta = wire.Delta(role="assistant" if first else None, content=token)
                choice = wire.ChunkChoice(0, delta, "length" if last else None)
                yield _sse(wire.ChatCompletionChunk(rid, created, model, [choice]))
            else:
                text_choice = wire.TextChoice(0, token, "length" if last else None)
                yield _sse(wire.CompletionChunk(rid, created, model, [text_choice]))
            first = False
        if include_usage:
            p, c = progress.prompt_tokens, progress.completion_tokens
            usage = wire.UsageOut(p, c, p + c)
            kind = wire.ChatCompletionChunk if chat else wire.CompletionChunk
            yield _sse(kind(rid, created, model, [], usage=usage))
        yield "data: [DONE]\n\n"
