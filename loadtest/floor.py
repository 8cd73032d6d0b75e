"""The HTTP floor: a bare Litestar SSE endpoint with a canned answer, no queue, no engine.

python -m loadtest.floor [--port 18999]

Measured with the same client and scenario as chatq's synthetic target, it shows what
HTTP, Litestar, uvicorn and the load client cost by themselves, so that the synthetic
figures can be split into that floor and what the queue pipeline adds on top.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import uvicorn
from litestar import Litestar, Request, post
from litestar.response import Stream

_HEAD = b'data: {"id":"floor","created":1,"model":"SmolLM2-135M-Instruct","object":"chat.completion.chunk",'
_ANSWER = (
    _HEAD + b'"choices":[{"index":0,"delta":{"role":"assistant","content":"hi"},"finish_reason":null}]}\n\n',
    _HEAD + b'"choices":[{"index":0,"delta":{"content":""},"finish_reason":"length"}]}\n\n',
    _HEAD + b'"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}\n\n',
    b"data: [DONE]\n\n",
)


async def _answer() -> AsyncIterator[bytes]:
    for event in _ANSWER:
        yield event


@post("/v1/chat/completions", status_code=200)
async def chat(request: Request) -> Stream:  # type: ignore[type-arg]
    """Read the body, answer with one canned token."""
    await request.body()
    return Stream(_answer(), media_type="text/event-stream")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=18999)
    args = parser.parse_args()
    uvicorn.run(
        Litestar([chat]),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
    )


if __name__ == "__main__":
    main()
