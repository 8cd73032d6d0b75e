"""One API process relays at most API_MAX_STREAMS streams: the next is refused with 429
`api_busy` and Retry-After before anything is queued, and every way a stream ends gives
its place back (real nats-server, API and synthetic worker)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import nats
import pytest

from broker import names
from tests.helpers import Stack, auth, sse_events, synthetic_stack

MODEL = "stream-cap-model"
CAP = 3
# Slow enough that a held stream is still running while the test looks.
TOKENS_PER_S = 20


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with synthetic_stack(
        tmp_path_factory.mktemp("stream-cap"),
        MODEL,
        API_MAX_STREAMS=str(CAP),
        SYNTH_TOKENS_PER_S=str(TOKENS_PER_S),
        SYNTH_TTFT_MS="20",
    ) as stack:
        yield stack


def body(max_tokens: int, stream: bool = True) -> dict[str, object]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hold on"}],
        "stream": stream,
        "max_tokens": max_tokens,
    }


async def published_jobs(stack: Stack) -> int:
    """The JOBS stream's last sequence: it grows by one per job ever queued."""
    nc = await nats.connect(stack.nats.url)
    try:
        info = await nc.jetstream().stream_info(names.JOBS_STREAM)
        return int(info.state.last_seq)
    finally:
        await nc.close()


async def hold(client: httpx.AsyncClient, url: str, started: asyncio.Event, release: asyncio.Event) -> str:
    """A stream that reads its first chunk, then waits for `release` before reading on."""
    async with client.stream("POST", url + "/v1/chat/completions", json=body(2000), headers=auth()) as resp:
        assert resp.status_code == 200
        lines = resp.aiter_lines()
        async for line in lines:
            if line.startswith("data:"):
                break
        started.set()
        await release.wait()
    return "closed"


async def one_request(client: httpx.AsyncClient, url: str) -> httpx.Response:
    return await client.post(url + "/v1/chat/completions", json=body(3, stream=False), headers=auth())


async def test_past_the_cap_a_request_is_refused_with_api_busy_and_nothing_is_queued(stack: Stack) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        release = asyncio.Event()
        started = [asyncio.Event() for _ in range(CAP)]
        holders = [asyncio.create_task(hold(client, stack.url, s, release)) for s in started]
        await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), 20)
        before = await published_jobs(stack)

        refused = await one_request(client, stack.url)
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert error["code"] == "api_busy"
        assert "API_MAX_STREAMS" in error["message"]
        assert int(refused.headers["retry-after"]) >= 1
        assert await published_jobs(stack) == before  # refused before anything was queued

        # The held streams go (the clients hang up): their places come back.
        release.set()
        await asyncio.gather(*holders)

        async def admitted() -> httpx.Response:
            for _ in range(50):
                answer = await one_request(client, stack.url)
                if answer.status_code != 429:
                    return answer
                await asyncio.sleep(0.1)
            return answer

        answer = await admitted()
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"]


async def test_every_way_a_stream_ends_gives_its_place_back(stack: Stack) -> None:
    """Completed, refused as invalid, hung up mid-stream, non-streamed: many more than
    CAP of each, one after another, then CAP streams at once are all admitted."""
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(CAP + 2):
            assert (await one_request(client, stack.url)).status_code == 200
            bad = await client.post(
                stack.url + "/v1/chat/completions", json={**body(3), "max_tokens": -1}, headers=auth()
            )
            assert bad.status_code == 400
            async with client.stream(
                "POST", stack.url + "/v1/chat/completions", json=body(2000), headers=auth()
            ) as resp:
                async for line in resp.aiter_lines():
                    if line.startswith("data:"):
                        break  # hang up after the first chunk

        async def complete_stream() -> int:
            async with client.stream(
                "POST", stack.url + "/v1/chat/completions", json=body(5), headers=auth()
            ) as resp:
                events = list(sse_events([line async for line in resp.aiter_lines()]))
                assert events[-1].data == "[DONE]"
                return resp.status_code

        for _ in range(10):
            statuses = await asyncio.gather(*(complete_stream() for _ in range(CAP)), return_exceptions=True)
            if statuses == [200] * CAP:
                break
            await asyncio.sleep(0.2)  # a hung-up stream's clean-up may still be running
        assert statuses == [200] * CAP
