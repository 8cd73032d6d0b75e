"""Test helpers: chatq processes on free loopback ports, and an SSE reader."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats

from broker import topology
from loadtest.probes import metric_sum
from stack.servers import NatsServer, free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-key-0123456789abcdef"
JWT_SECRET = "k3Xq9vR2mW7pL4tZ8nB5cY1hJ6fD0sGaQeUoIiPr"


@dataclass
class Proc:
    """A chatq process (API or worker) started by a test, with its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def spawn(name: str, module: str, env: dict[str, str], logdir: Path) -> Proc:
    logdir.mkdir(parents=True, exist_ok=True)
    log = logdir / f"{name}.log"
    full_env = {**os.environ, **env}
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", module],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=ROOT,
            start_new_session=True,
        )
    return Proc(name, proc, log, env)


def nats_with_streams(root: Path) -> NatsServer:
    """A NATS server under `root` with chatq's streams declared (no model queues yet)."""
    server = NatsServer(root / "nats").start(root / "nats.log")

    async def declare() -> None:
        nc = await nats.connect(server.url)
        await topology.ensure_streams(nc.jetstream(), jobs_max_msgs=100)
        await nc.close()

    asyncio.run(declare())
    return server


def base_env(nats_url: str, home: Path, **extra: str) -> dict[str, str]:
    env = {
        "NATS_URL": nats_url,
        "CHATQ_HOME": str(home),
        "CHATQ_API_KEYS": API_KEY,
        "JWT_SECRET": JWT_SECRET,
        "CHATQ_DEV": "0",
        "DEVELOPMENT_MODE": "0",
        "LOG_LEVEL": "INFO",
    }
    env.update(extra)
    return env


def start_api(env: dict[str, str], logdir: Path, name: str = "api") -> tuple[Proc, str]:
    port = free_port()
    proc = spawn(name, "api", {**env, "CHATQ_PORT": str(port)}, logdir)
    try:
        wait_for_port("127.0.0.1", port, 60, proc.proc)
    except Exception:  # noqa: BLE001 - re-raised with the log tail
        raise RuntimeError(f"API did not start:\n{proc.tail()}") from None
    return proc, f"http://127.0.0.1:{port}"


def start_worker(env: dict[str, str], logdir: Path, name: str = "worker") -> tuple[Proc, int]:
    port = free_port()
    proc = spawn(
        name, "workers.inference", {**env, "WORKER_METRICS_PORT": str(port), "WORKER_ID": name}, logdir
    )
    return proc, port


def wait_for_workers(base_url: str, count: int, timeout: float, procs: list[Proc] | None = None) -> None:
    """Wait until /health counts `count` ready workers."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        for p in procs or []:
            if p.proc.poll() is not None:
                raise RuntimeError(f"{p.name} exited with {p.proc.returncode}:\n{p.tail()}")
        try:
            last = httpx.get(base_url + "/health", timeout=2).json()
            if last["services"]["workers"]["ready"] >= count:
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{count} workers not ready after {timeout} s; last health: {last}")


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class SseEvent:
    event: str | None
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


def sse_events(lines: Iterator[str]) -> Iterator[SseEvent]:
    """Parse a text/event-stream into events."""
    event: str | None = None
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield SseEvent(event, "\n".join(data))
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    if data:
        yield SseEvent(event, "\n".join(data))


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus series, filtered by labels; KeyError when it is absent."""
    value = metric_sum(text, name, **labels)
    if value is None:
        raise KeyError(f"{name} {labels} not in metrics")
    return value


async def find_event(nats_url: str, request_id: str, kind: str, timeout: float = 10.0) -> Any:
    """The `kind` event of a request from the EVENTS stream (waits for it to appear)."""
    import asyncio

    import nats

    import schemas
    from broker import names

    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sub = await js.subscribe(names.event_subject(kind), ordered_consumer=True)
            try:
                while True:
                    try:
                        msg = await sub.next_msg(timeout=0.5)
                    except Exception:  # noqa: BLE001 - nats TimeoutError: no more messages
                        break
                    event = schemas.decode_event(msg.data)
                    if event.request_id == request_id:
                        return event
            finally:
                await sub.unsubscribe()
            await asyncio.sleep(0.2)
        raise TimeoutError(f"no {kind} event for {request_id}")
    finally:
        await nc.close()


async def jobs_in_queue(nats_url: str, model: str) -> int:
    """How many jobs of a model are in the JOBS stream (waiting or in flight)."""
    import nats

    from broker import names

    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().stream_info(names.JOBS_STREAM, subjects_filter=names.job_subject(model))
        return sum((info.state.subjects or {}).values())
    finally:
        await nc.close()


def wait_for_model(base_url: str, model: str, timeout: float, procs: list[Proc] | None = None) -> None:
    """Wait until /health counts a ready worker for `model`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs or []:
            if p.proc.poll() is not None:
                raise RuntimeError(f"{p.name} exited with {p.proc.returncode}:\n{p.tail()}")
        try:
            if httpx.get(base_url + "/health", timeout=2).json()["services"]["workers"]["models"].get(model):
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"no ready worker for {model} after {timeout} s")


@dataclass
class Stack:
    """nats-server, an API and a worker, each a real process on free loopback ports."""

    nats: NatsServer
    url: str
    env: dict[str, str]
    logdir: Path
    api: Proc
    worker: Proc
    worker_metrics: int


@contextmanager
def synthetic_stack(root: Path, model: str, **env: str) -> Iterator[Stack]:
    """A whole pipeline with the synthetic engine serving `model`; `env` adds settings."""
    nats = NatsServer(root / "nats").start(root / "nats.log")
    full = base_env(nats.url, root / "home", INFERENCE_ENGINE="synthetic", MODEL_NAME=model, **env)
    procs: list[Proc] = []
    try:
        api, url = start_api(full, root / "logs")
        procs.append(api)
        worker, metrics_port = start_worker(full, root / "logs")
        procs.append(worker)
        wait_for_workers(url, 1, 60, [worker, api])
        yield Stack(nats, url, full, root / "logs", api, worker, metrics_port)
    finally:
        for proc in reversed(procs):
            proc.stop()
        nats.stop()


@dataclass
class AccountsStack:
    """The whole service with accounts: NATS, PostgreSQL, Redis, persistence, synthetic
    worker, and `len(urls)` API processes sharing them."""

    urls: list[str]
    dsn: str
    nats_url: str
    redis: Any  # stack.servers.RedisServer
    pg: Any  # stack.servers.EmbeddedPostgres
    env: dict[str, str]
    logdir: Path
    procs: list[Proc]

    @property
    def url(self) -> str:
        return self.urls[0]


@contextmanager
def accounts_stack(
    root: Path, model: str, *, apis: int = 1, nats_token: str | None = None, **env: str
) -> Iterator[AccountsStack]:
    """`nats_token`: the processes' NATS_URL carries it (`nats://TOKEN@host:port`); the
    test server asks for none, so it is only there to be kept out of the logs."""
    from stack.servers import EmbeddedPostgres, RedisServer

    nats = NatsServer(root / "nats").start(root / "nats.log")
    pg = EmbeddedPostgres(root / "pg")
    redis: RedisServer | None = None
    procs: list[Proc] = []
    try:
        dsn = pg.start()
        redis = RedisServer(root / "redis").start(root / "redis.log")
        nats_url = nats.url if nats_token is None else nats.url.replace("://", f"://{nats_token}@", 1)
        full = base_env(
            nats_url,
            root / "home",
            INFERENCE_ENGINE="synthetic",
            MODEL_NAME=model,
            DATABASE_URL=dsn,
            REDIS_URL=redis.url,
            **env,
        )
        logdir = root / "logs"
        urls = []
        for i in range(apis):
            api, url = start_api(full, logdir, name=f"api{i}")
            procs.append(api)
            urls.append(url)
        worker, _ = start_worker(full, logdir)
        procs.append(worker)
        procs.append(spawn("persistence", "workers.persistence", full, logdir))
        for url in urls:
            wait_for_workers(url, 1, 60, procs)
        yield AccountsStack(urls, dsn, nats.url, redis, pg, full, logdir, procs)
    finally:
        for proc in reversed(procs):
            proc.stop()
        if redis is not None:
            redis.stop()
        pg.stop()
        nats.stop()


def login(url: str, username: str, password: str) -> dict[str, str]:
    """Log in; the Authorization header of the session."""
    response = httpx.post(
        url + "/api/auth/login", json={"username": username, "password": password}, timeout=30
    )
    response.raise_for_status()
    return {"Authorization": f"Bearer {response.json()['access_token']}"}
