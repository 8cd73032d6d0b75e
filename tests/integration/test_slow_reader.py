"""A client that stops reading its stream: bounded memory, its job cancelled, others unaffected.

Real processes (nats-server, API, worker with the synthetic engine) and a raw socket
client that sends its request, reads the response headers and then reads nothing.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

import schemas
from broker.bus import StreamOverflow, StreamSubscription
from tests.helpers import (
    API_KEY,
    Stack,
    auth,
    find_event,
    sse_events,
    synthetic_stack,
)
from workers.inference.synthetic import prompt_seed, synthetic_token

MODEL = "SmolLM2-135M-Instruct"
BUFFER_BYTES = 65536
TOKENS_PER_S = 2000
# Far more than the kernel's socket buffers plus the API's bound hold (see tokens_budget).
SLOW_MAX_TOKENS = 100_000
NORMAL_TOKENS = 3000


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with synthetic_stack(
        tmp_path_factory.mktemp("slow-reader"),
        MODEL,
        SYNTH_TOKENS_PER_S=str(TOKENS_PER_S),
        SYNTH_TTFT_MS="20",
        STREAM_BUFFER_BYTES=str(BUFFER_BYTES),
        CHATQ_MAX_TOKENS=str(SLOW_MAX_TOKENS),
        STREAM_WATCHDOG_S="5",
        STREAM_HEARTBEAT_S="0.5",
    ) as stack:
        yield stack


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


class RssPeak:
    """The highest RSS of a process, sampled every 50 ms in a thread from now until stop()."""

    def __init__(self, pid: int, baseline: int) -> None:
        self.pid, self.peak = pid, baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def chat_body(content: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }


def expected_text(content: str, tokens: int) -> str:
    seed = prompt_seed(content)
    return "".join(synthetic_token(seed, i) for i in range(tokens))


def stream_text(url: str, content: str, max_tokens: int) -> tuple[str, int]:
    """A normal client: the whole streamed answer's text, and its size on the wire."""
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json=chat_body(content, max_tokens), headers=auth(), timeout=60
    ) as resp:
        assert resp.status_code == 200, resp.read()
        raw = b"".join(resp.iter_bytes())
    events = list(sse_events(iter(raw.decode().splitlines())))
    assert events[-1].data == "[DONE]", events[-3:]
    assert not [e for e in events if e.event == "error"]
    text = "".join(
        e.json()["choices"][0]["delta"].get("content", "") for e in events[:-1] if e.json()["choices"]
    )
    return text, len(raw)


def tokens_budget(bytes_per_token: float) -> int:
    """The most tokens a stalled client may cost before its job is cancelled.

    What the kernel holds for the connection (the API's send buffer grows up to
    tcp_wmem's maximum; the client's receive buffer is small), the API's bound and the
    transport's buffer, plus one second of generation for the cancel to reach the worker.
    """
    wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    buffered = wmem_max + 2 * BUFFER_BYTES + (256 << 10)
    return int(buffered / bytes_per_token) + TOKENS_PER_S


class StalledClient:
    """Sends a streaming request over a raw socket, reads the headers, then stops reading."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        parts = urlsplit(url)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Small before connecting, so the advertised window stays small.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(30)
        self.sock.connect((parts.hostname, parts.port))
        payload = json.dumps(body).encode()
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\n"
            f"Host: {parts.netloc}\r\n"
            f"Authorization: Bearer {API_KEY}\r\n"
            "Content-Type: application/json\r\n"
            "Accept: text/event-stream\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        )
        self.sock.sendall(head.encode() + payload)
        raw = b""
        while b"\r\n\r\n" not in raw:
            byte = self.sock.recv(1)
            assert byte, f"connection closed before the headers: {raw!r}"
            raw += byte
        lines = raw.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)
        }

    def read_until(self, marker: bytes, timeout: float) -> bytes:
        """Start reading again: everything up to `marker` (or what came before the timeout)."""
        data = b""
        deadline = time.monotonic() + timeout
        while marker not in data and time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                part = self.sock.recv(1 << 16)
            except TimeoutError:
                break
            if not part:
                break
            data += part
        return data

    def close(self) -> None:
        self.sock.close()


def test_a_stalled_reader_is_cut_off_and_its_job_cancelled(stack: Stack) -> None:
    pid = stack.api.proc.pid
    # Warm up (imports, first-request allocations), then take the baseline.
    text, size = stream_text(stack.url, "warm up", 2000)
    assert text == expected_text("warm up", 2000)
    bytes_per_token = size / 2000
    budget = tokens_budget(bytes_per_token)
    assert budget < SLOW_MAX_TOKENS // 2, "this machine's socket buffers are too large for the test"
    baseline = rss_bytes(pid)

    client = StalledClient(stack.url, chat_body("x", SLOW_MAX_TOKENS))
    started = time.time()
    try:
        assert client.status == 200
        request_id = client.headers["x-request-id"]

        # Normal clients streaming all the while (until after the cancel) get complete answers.
        normal: dict[str, Any] = {"answers": 0}
        cancel_found = threading.Event()

        def normal_client() -> None:
            try:
                while True:
                    last = cancel_found.is_set()
                    text, _ = stream_text(stack.url, "a normal reader", NORMAL_TOKENS)
                    assert text == expected_text("a normal reader", NORMAL_TOKENS)
                    normal["answers"] += 1
                    if last:
                        return
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread
                normal["error"] = exc

        thread = threading.Thread(target=normal_client)
        thread.start()

        sampler = RssPeak(pid, baseline)
        try:
            try:
                cancelled = asyncio.run(find_event(stack.nats.url, request_id, "cancelled", timeout=60))
            finally:
                cancel_found.set()
            cancel_seen = time.time()
            thread.join(60)
            # Keep sampling a while: nothing may grow after the cancel either.
            time.sleep(1.0)
        finally:
            peak = sampler.stop()

        assert not thread.is_alive()
        assert "error" not in normal, normal.get("error")
        assert normal["answers"] >= 2

        tokens = cancelled.usage.completion_tokens
        growth = peak - baseline
        took = cancelled.time - started
        print(
            f"\nslow reader: cancelled after {tokens} of {SLOW_MAX_TOKENS} tokens (budget {budget}, "
            f"{bytes_per_token:.0f} bytes/token), {took:.2f} s after the headers "
            f"(seen {cancel_seen - started:.2f} s); {normal['answers']} normal answers meanwhile; "
            f"API RSS {baseline / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB, "
            f"growth {growth / 2**20:.1f} MiB"
        )
        assert cancelled.reason == "stream_failed"
        assert 0 < tokens < budget
        assert took < budget / TOKENS_PER_S + 2
        assert growth < 20 * 2**20

        failed = asyncio.run(find_event(stack.nats.url, request_id, "failed"))
        assert failed.code == "client_too_slow"

        # The API is neither dead nor wedged.
        assert httpx.get(stack.url + "/health", timeout=5).status_code == 200
        assert stack.api.proc.poll() is None

        # Once the client reads again it gets the standard error event, after what was
        # already on its way: the stream ends cleanly, not with a hole and a hang.
        rest = client.read_until(b"\r\n0\r\n\r\n", timeout=20)  # the last chunk
        assert rest.endswith(b"\r\n0\r\n\r\n"), rest[-500:]
        error = rest[rest.rindex(b"event: error") :]
        assert b'"code":"client_too_slow"' in error
        assert f'"request_id":"{request_id}"'.encode() in error
    finally:
        client.close()


async def test_the_subscription_is_bounded() -> None:
    overflows: list[int] = []
    sub = StreamSubscription(max_bytes=1000, on_overflow=lambda: overflows.append(1))
    beat = schemas.encode(schemas.Heartbeat(worker_id="w", next_seq=0))
    big = schemas.encode(schemas.Chunk(seq=0, text="", tokens=1, worker_id="w", data=b"x" * 5000))

    # One message is always kept, however large (a non-streaming answer comes in one).
    sub.put(big)
    assert isinstance(await sub.next(0.1), schemas.Chunk)
    assert sub.buffered_bytes() == 0

    # A reader that keeps up never overflows.
    for _ in range(1000):
        sub.put(beat)
        assert isinstance(await sub.next(0.1), schemas.Heartbeat)
    assert not sub.overflowed

    # One that does not: at most max_msgs (max_bytes / 64, at least 16) wait, then the
    # whole stream is dropped.
    sent = 0
    while not sub.overflowed:
        sub.put(beat)
        sent += 1
    assert sent == 17
    assert overflows == [1]
    assert sub.waiting() == 0
    assert sub.buffered_bytes() == 0
    sub.put(beat)
    assert overflows == [1]
    with pytest.raises(StreamOverflow):
        await sub.next(0.1)
    with pytest.raises(StreamOverflow):
        await sub.next(0.1)


async def test_the_subscription_is_bounded_in_bytes() -> None:
    overflows: list[int] = []
    sub = StreamSubscription(max_bytes=10_000, on_overflow=lambda: overflows.append(1))
    chunk = schemas.encode(schemas.Chunk(seq=0, text="", tokens=1, worker_id="w", data=b"x" * 1000))
    sent = 0
    while not sub.overflowed:
        sub.put(chunk)
        sent += 1
        assert sub.buffered_bytes() <= 10_000
    assert sent == 10_000 // len(chunk) + 1
    assert overflows == [1]
    with pytest.raises(StreamOverflow):
        await sub.next(0.1)


async def test_a_waiting_reader_is_woken_by_the_overflow() -> None:
    sub = StreamSubscription(max_bytes=4096, max_msgs=2)
    beat = schemas.encode(schemas.Heartbeat(worker_id="w", next_seq=0))
    reader = asyncio.ensure_future(sub.next(5))
    await asyncio.sleep(0)
    # Three messages arrive before the reader runs: the third overflows the bound of two.
    sub.put(beat)
    sub.put(beat)
    sub.put(beat)
    assert sub.overflowed
    with pytest.raises(StreamOverflow):
        await asyncio.wait_for(reader, 1)


STALLED = 8  # clients that stop reading for good
SLOW = 2  # clients that keep reading, far slower than the stream comes
SLOW_READ = (512, 0.05)  # bytes per read, seconds between reads: ~10 KB/s


def chunk_gaps(url: str, content: str, tokens: int) -> list[float]:
    """A normal client's answer: the seconds between its consecutive chunks (it must be whole)."""
    gaps: list[float] = []
    text = ""
    last: float | None = None
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json=chat_body(content, tokens), headers=auth(), timeout=60
    ) as resp:
        assert resp.status_code == 200, resp.read()
        for event in sse_events(resp.iter_lines()):
            assert event.event != "error", event.data
            if event.data == "[DONE]":
                break
            now = time.monotonic()
            if last is not None:
                gaps.append(now - last)
            last = now
            for choice in event.json()["choices"]:
                text += choice["delta"].get("content") or ""
    assert text == expected_text(content, tokens)
    return gaps


def figures(gaps: list[float]) -> str:
    ordered = sorted(gaps)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return f"{len(gaps)} gaps, p50 {at(0.5):.1f} ms, p99 {at(0.99):.1f} ms, max {ordered[-1] * 1000:.1f} ms"


class SlowClient(StalledClient):
    """Reads on, SLOW_READ at a time, in a thread of its own until the response ends."""

    def start(self) -> None:
        self.data = b""
        self.ended_at: float | None = None
        # Once set, it reads what is left at full speed: the kernel's buffers alone hold
        # minutes of reading at SLOW_READ.
        self.hurry = threading.Event()
        self.thread = threading.Thread(target=self._read)
        self.thread.start()

    def _read(self) -> None:
        size, pause = SLOW_READ
        self.sock.settimeout(60)
        try:
            while not self.data.endswith(b"\r\n0\r\n\r\n"):
                part = self.sock.recv(1 << 16 if self.hurry.is_set() else size)
                if not part:
                    break
                self.data += part
                if not self.hurry.is_set():
                    time.sleep(pause)
        except OSError:
            pass
        self.ended_at = time.monotonic()


def test_many_stalled_and_slow_readers_neither_grow_the_api_nor_slow_other_streams(stack: Stack) -> None:
    pid = stack.api.proc.pid
    stream_text(stack.url, "warm up", 2000)
    alone = chunk_gaps(stack.url, "a reader alone", NORMAL_TOKENS)
    baseline = rss_bytes(pid)

    started, started_wall = time.monotonic(), time.time()
    stalled = [StalledClient(stack.url, chat_body(f"stalled {i}", SLOW_MAX_TOKENS)) for i in range(STALLED)]
    slow = [SlowClient(stack.url, chat_body(f"slow {i}", SLOW_MAX_TOKENS)) for i in range(SLOW)]
    sampler = RssPeak(pid, baseline)
    try:
        assert all(c.status == 200 for c in stalled + slow)
        for c in slow:
            c.start()
        # While they fall behind (each has its own generation running at full speed).
        crowded = chunk_gaps(stack.url, "a reader among stalled ones", NORMAL_TOKENS)

        async def outcomes() -> list[tuple[Any, Any]]:
            return [
                (
                    await find_event(stack.nats.url, c.headers["x-request-id"], "cancelled", timeout=60),
                    await find_event(stack.nats.url, c.headers["x-request-id"], "failed", timeout=60),
                )
                for c in stalled + slow
            ]

        ended = asyncio.run(outcomes())
        all_cut = time.monotonic()
        for c in slow:
            c.hurry.set()
            c.thread.join(60)
        # Read what each stalled client had coming: its stream ends with the error event.
        rests = [c.read_until(b"\r\n0\r\n\r\n", timeout=20) for c in stalled]
        time.sleep(1.0)
        after = rss_bytes(pid)
    finally:
        peak = sampler.stop()
        for c in stalled + slow:
            c.close()

    tokens = sorted(cancelled.usage.completion_tokens for cancelled, _ in ended)
    cut_after = sorted(cancelled.time - started_wall for cancelled, _ in ended)
    print(
        f"\n{STALLED} stalled and {SLOW} slow readers: all cut off within {all_cut - started:.2f} s "
        f"(each after {cut_after[0]:.2f}–{cut_after[-1]:.2f} s, {tokens[0]}–{tokens[-1]} of "
        f"{SLOW_MAX_TOKENS} tokens); API RSS {baseline / 2**20:.1f} MiB before, peak {peak / 2**20:.1f} MiB, "
        f"{after / 2**20:.1f} MiB after\n"
        f"a normal reader alone: {figures(alone)}\n"
        f"the same among them:   {figures(crowded)}"
    )
    for cancelled, failed in ended:
        assert cancelled.reason == "stream_failed"
        assert failed.code == "client_too_slow"
        assert cancelled.usage.completion_tokens < SLOW_MAX_TOKENS // 2
    for rest in rests:
        assert rest.endswith(b"\r\n0\r\n\r\n"), rest[-300:]
        assert b'"code":"client_too_slow"' in rest[rest.rindex(b"event: error") :]
    for c in slow:
        assert c.ended_at is not None and c.data.endswith(b"\r\n0\r\n\r\n"), c.data[-300:]
        assert b'"code":"client_too_slow"' in c.data[c.data.rindex(b"event: error") :]
    # Generous: ten cut-off clients may not cost the API more than 40 MiB, even at the peak.
    assert peak - baseline < 40 * 2**20
    assert stack.api.proc.poll() is None
    assert httpx.get(stack.url + "/health", timeout=5).status_code == 200
