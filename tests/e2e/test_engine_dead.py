"""vLLM's engine core dies mid-stream, with the real vLLM CPU engine and the bundled SmolLM2.

The stack is the launcher's (NATS, PostgreSQL, Redis, the API, persistence and one vLLM
worker), tended as `./start` tends it. While three streams run, vLLM's EngineCore process
(a child of the worker, `VLLM::EngineCore`) is killed with SIGKILL. Each stream must end
with the standard error event (`engine_error`) within seconds, its request stored as failed
with the tokens it had streamed; the worker must leave the queue and exit non-zero; the
supervisor restarts it; a request sent just after the kill is answered by the restarted
worker. The synthetic variant (tests/unit/test_worker_engine_dead.py) covers the worker's
side alone, fast; this one proves vLLM really fails so.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import pytest

from stack import process_table
from stack.servers import free_port
from stack.supervisor import Supervisor, launched, workers_ready
from tests.helpers import auth, base_env, find_event, no_rate_limits, sse_events, wait_until

pytestmark = pytest.mark.vllm

MODEL = "SmolLM2-135M-Instruct"
STREAMS = 3
MAX_TOKENS = 1500  # with ignore_eos: far longer than the test lets them run
END_WITHIN_S = 30  # every stream ends this long after the kill, or the test fails


@dataclass
class Stream:
    """One streaming request, read in its own thread."""

    content: str
    request_id: str | None = None
    text: str = ""
    chunks: int = 0
    error: dict[str, Any] | None = None
    done: bool = False
    ended_at: float | None = None
    status: int | None = None
    failure: str | None = None
    started: threading.Event = field(default_factory=threading.Event)


def stream(url: str, s: Stream, **extra: Any) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": s.content}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        **extra,
    }
    try:
        with httpx.stream(
            "POST", url + "/v1/chat/completions", json=body, headers=auth(), timeout=300
        ) as resp:
            s.status = resp.status_code
            s.request_id = resp.headers.get("x-request-id")
            for event in sse_events(resp.iter_lines()):
                if event.event == "error":
                    s.error = event.json()["error"]
                elif event.data == "[DONE]":
                    s.done = True
                else:
                    for choice in event.json().get("choices") or ():
                        piece = choice["delta"].get("content") or ""
                        if piece:
                            s.text += piece
                            s.chunks += 1
                            s.started.set()
    except Exception as exc:  # noqa: BLE001 - reported by the test
        s.failure = repr(exc)
    finally:
        s.ended_at = time.monotonic()
        s.started.set()


def engine_cores(worker_pid: int) -> list[psutil.Process]:
    """vLLM's engine core processes under the worker (V1 runs the core in a child process)."""
    found = []
    for child in psutil.Process(worker_pid).children(recursive=True):
        try:
            if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def tended(sup: Supervisor, stop: threading.Event) -> None:
    """What ./start does while it runs: restart the children that died."""
    while not stop.is_set():
        sup.tend()
        time.sleep(0.2)


@dataclass
class Outcome:
    streams: list[Stream]
    killed_at: float
    worker_pid: int
    new_worker_pid: int
    restarted_after_s: float
    late: Stream
    database_url: str
    nats_url: str
    worker_log: Path
    worker_exit: int | None


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outcome]:
    from chatq.settings import load

    root = tmp_path_factory.mktemp("engine-dead")
    home = root / "home"
    home.mkdir()
    # The prepared model lives in the default CHATQ_HOME (./test prepares it once).
    (home / "models").symlink_to(load({}).models_dir, target_is_directory=True)
    env = base_env(
        f"nats://127.0.0.1:{free_port()}",
        home,
        STREAM_WATCHDOG_S="30",
        **no_rate_limits("user", "admin"),
    )
    api = replace(process_table.API.with_env(CHATQ_PORT=str(free_port())), name="api")
    worker = process_table.INFERENCE_WORKER.with_env(WORKER_METRICS_PORT=str(free_port()), WORKER_ID="vllm")
    specs = [api, worker, process_table.PERSISTENCE]
    with launched(home, env, specs, ready=workers_ready(1), timeout=600, logdir=root / "logs") as sup:
        assert sup.database_url and sup.nats
        url = sup.api_urls[0]
        worker_pid = sup.process("worker").pid
        cores = wait_until("vLLM's engine core process", lambda: engine_cores(worker_pid), 30)
        assert len(cores) == 1, cores

        streams = [Stream(f"Tell me a long story about the number {i}.") for i in range(STREAMS)]
        threads = [
            threading.Thread(target=stream, args=(url, s), kwargs={"ignore_eos": True}) for s in streams
        ]
        for t in threads:
            t.start()
        for s in streams:
            assert s.started.wait(120), "no stream started"
        wait_until("every stream has some text", lambda: all(s.chunks >= 3 for s in streams), 60)
        assert not [s.failure for s in streams if s.failure], streams

        stop = threading.Event()
        tender = threading.Thread(target=tended, args=(sup, stop))
        tender.start()
        try:
            cores[0].kill()
            killed = time.monotonic()
            time.sleep(1.0)
            late = Stream("What is the capital of France?")
            late_thread = threading.Thread(target=stream, args=(url, late), kwargs={"max_tokens": 32})
            late_thread.start()
            for t in threads:
                t.join(END_WITHIN_S)
            old = sup.children["worker"]
            new_pid = wait_until(
                "the worker restarted by the supervisor",
                lambda: old.pid if old.pid != worker_pid and old.state == "running" else None,
                120,
            )
            health = lambda: httpx.get(url + "/health", timeout=5).json()["services"]["workers"]["ready"]  # noqa: E731
            wait_until("the restarted worker is ready", health, 600, interval=0.5)
            back = time.monotonic() - killed
            late_thread.join(300)
        finally:
            stop.set()
            tender.join()
        yield Outcome(
            streams,
            killed,
            worker_pid,
            int(new_pid),
            back,
            late,
            sup.database_url,
            sup.nats.url,
            root / "logs" / "worker.log",
            old.last_exit,
        )


def test_every_stream_ends_with_engine_error_within_seconds(outcome: Outcome) -> None:
    for s in outcome.streams:
        print(
            f"\nstream {s.request_id}: {s.chunks} chunks, {len(s.text)} chars, then "
            f"{s.error and s.error['code']} {(s.ended_at or 0) - outcome.killed_at:.2f} s after the kill"
        )
        assert s.failure is None, s.failure
        assert s.status == 200
        assert s.ended_at is not None and s.ended_at - outcome.killed_at < END_WITHIN_S
        assert s.error is not None and s.error["code"] == "engine_error", s
        assert s.error["request_id"] == s.request_id
        assert '"error"' not in s.text  # vLLM's own error object is not passed off as text


def test_the_tokens_streamed_so_far_are_stored_with_the_failure(outcome: Outcome) -> None:
    for s in outcome.streams:
        assert s.request_id is not None
        cancelled = asyncio.run(find_event(outcome.nats_url, s.request_id, "cancelled"))
        assert cancelled.reason == "engine_error"
        assert cancelled.usage.completion_tokens >= s.chunks > 0
        assert cancelled.text.startswith(s.text)

    def rows() -> list[tuple[Any, ...]] | None:
        with psycopg.connect(outcome.database_url) as conn:
            found = conn.execute(
                "SELECT request_id, status, error_code, completion_tokens FROM requests"
                " WHERE request_id = ANY(%s)",
                ([s.request_id for s in outcome.streams],),
            ).fetchall()
        done = [r for r in found if r[1] == "failed" and r[3]]
        return found if len(done) == len(outcome.streams) else None

    stored = wait_until("the failed requests stored with their tokens", rows, 30)
    print("\nstored:", stored)
    assert all(r[2] == "engine_error" for r in stored)


def test_the_worker_left_the_queue_and_exited_non_zero(outcome: Outcome) -> None:
    log = outcome.worker_log.read_text(errors="replace")
    assert "is dead: no more jobs" in log
    assert outcome.worker_exit not in (None, 0), outcome.worker_exit


def test_the_supervisor_restarted_the_worker_and_a_request_sent_meanwhile_is_answered(
    outcome: Outcome,
) -> None:
    late = outcome.late
    print(
        f"\nworker {outcome.worker_pid} → {outcome.new_worker_pid}, ready again "
        f"{outcome.restarted_after_s:.1f} s after the kill; the request sent 1 s after the kill: "
        f"{late.status} {late.text!r} {late.error}"
    )
    assert outcome.new_worker_pid != outcome.worker_pid
    assert late.failure is None and late.status == 200 and late.error is None, late
    assert late.done and "Paris" in late.text
