"""Test helpers: chatq stacks and processes from the launcher (stack.supervisor) on free
loopback ports; requests, accounts, events and queues; waiting for a condition with a deadline."""

from __future__ import annotations

import asyncio
import inspect
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import httpx
import nats

import schemas
from broker import permissions, topology
from chatq.sse import SseEvent as SseEvent
from chatq.sse import sse_events as sse_events
from schemas.messages import Priority
from stack import nats_auth, process_table, processes
from stack.process_table import ProcessSpec
from stack.processes import Process as Proc
from stack.processes import module_argv
from stack.processes import wait_http as wait_http
from stack.servers import EmbeddedPostgres, NatsServer, RedisServer, free_port, wait_for_port
from stack.supervisor import launched, workers_ready

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-key-0123456789abcdef"
JWT_SECRET = "k3Xq9vR2mW7pL4tZ8nB5cY1hJ6fD0sGaQeUoIiPr"

T = TypeVar("T")


def wait_until(what: str, check: Callable[[], T], timeout: float, interval: float = 0.1) -> T:
    """`check()`'s first truthy result, asked every `interval` s; TimeoutError naming `what`
    (and the last result) once `timeout` s have passed."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s (last: {found!r})")
        time.sleep(interval)


async def eventually(
    what: str, check: Callable[[], T | Awaitable[T]], timeout: float, interval: float = 0.1
) -> T:
    """wait_until for asyncio tests: `check` may be a coroutine function, and the loop runs
    the test's other tasks between two checks."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if inspect.isawaitable(found):
            found = await found
        if found:
            return found  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s (last: {found!r})")
        await asyncio.sleep(interval)


def spawn(name: str, module: str, env: dict[str, str], logdir: Path) -> Proc:
    """`python -m module` as a process of its own, not supervised: a test may kill it.

    Where the state folder has NATS users (a launcher's stack), it logs in as its service's
    user, as the launcher's own processes do."""
    return processes.spawn(name, module_argv(module), nats_login_env(env, module), logdir, cwd=ROOT)


def nats_login_env(env: dict[str, str], module: str) -> dict[str, str]:
    """`env` with NATS_USER and NATS_PASSWORD of the service `module` runs, where the state
    folder (CHATQ_HOME) has the embedded server's users and `env` names no user itself."""
    service = next((s.nats_service for s in process_table.PROCESS_TABLE if s.module == module), None)
    if service is None or "NATS_USER" in env or "CHATQ_HOME" not in env:
        return env
    user = permissions.user_name(service)
    password = nats_auth.read_passwords(Path(env["CHATQ_HOME"])).get(user)
    return env if password is None else {**env, "NATS_USER": user, "NATS_PASSWORD": password}


def log_lines(proc: Proc, pattern: str) -> list[str]:
    """The lines of the process's log that match `pattern`."""
    return [line for line in proc.log.read_text(errors="replace").splitlines() if re.search(pattern, line)]


def wait_log(proc: Proc, pattern: str, timeout: float = 20, count: int = 1) -> str:
    """The `count`-th line of the process's log that matches `pattern` (waits for it)."""

    def nth() -> str | None:
        lines = log_lines(proc, pattern)
        return lines[count - 1] if len(lines) >= count else None

    try:
        return wait_until(f"line {count} matching {pattern!r}", nth, timeout)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc} in {proc.name}'s log:\n{proc.tail()}") from None


def run_python(
    *args: str, env: dict[str, str], timeout: float = 120, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`python ARGS` (e.g. `-m stack.cli status`) from the repository root, its output captured."""
    return subprocess.run(
        [sys.executable, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )


def one_line_job(model: str) -> schemas.Job:
    """A job of one short user message for `model`, a new request id, a minute to run."""
    now = time.time()
    return schemas.Job(
        request_id=uuid.uuid4().hex,
        model=model,
        messages=[schemas.ChatMessage(role="user", content="x")],
        sampling=schemas.Sampling(),
        created=now,
        deadline=now + 60,
    )


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
        "CHATQ_EMBEDDED_NATS": "1",
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


async def jobs_in_queue(nats_url: str, model: str, priority: Priority = "interactive") -> int:
    """How many jobs of a model and priority are in the JOBS stream (waiting or in flight)."""
    import nats

    from broker import names

    nc = await nats.connect(nats_url)
    try:
        subject = names.job_subject(model, priority)
        info = await nc.jetstream().stream_info(names.JOBS_STREAM, subjects_filter=subject)
        return sum((info.state.subjects or {}).values())
    finally:
        await nc.close()


async def _last_job_seq(nats_url: str) -> int:
    import nats

    from broker import names

    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().stream_info(names.JOBS_STREAM)
        return int(info.state.last_seq)
    finally:
        await nc.close()


def jobs_published(nats_url: str) -> int:
    """How many jobs were ever published to the JOBS stream (its last sequence number)."""
    import asyncio

    return asyncio.run(_last_job_seq(nats_url))


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


def _api_spec(name: str = "api", **env: str) -> ProcessSpec:
    return replace(process_table.API.with_env(CHATQ_PORT=str(free_port()), **env), name=name)


def _worker_spec(name: str = "worker") -> ProcessSpec:
    return process_table.INFERENCE_WORKER.with_env(WORKER_METRICS_PORT=str(free_port()), WORKER_ID=name)


@contextmanager
def synthetic_stack(root: Path, model: str, **env: str) -> Iterator[Stack]:
    """A whole pipeline with the synthetic engine serving `model`; `env` adds settings."""
    full = base_env(_nats_url(), root / "home", INFERENCE_ENGINE="synthetic", MODEL_NAME=model, **env)
    # No database, no Redis: the API runs without accounts.
    api = replace(_api_spec(), needs=())
    worker = _worker_spec()
    with launched(
        root / "home", full, [api, worker], ready=workers_ready(1), logdir=root / "logs", cwd=ROOT
    ) as sup:
        assert sup.nats is not None
        yield Stack(
            sup.nats,
            sup.api_urls[0],
            full,
            root / "logs",
            sup.process("api"),
            sup.process("worker"),
            sup.port(worker),
        )


@dataclass
class AccountsStack:
    """The whole service with accounts: NATS, PostgreSQL, Redis, persistence, synthetic
    worker, and `len(urls)` API processes sharing them."""

    urls: list[str]
    dsn: str
    nats_url: str
    redis: RedisServer
    pg: EmbeddedPostgres
    env: dict[str, str]
    logdir: Path
    procs: list[Proc]

    @property
    def url(self) -> str:
        return self.urls[0]


@contextmanager
def accounts_stack(
    root: Path, model: str, *, apis: int = 1, nats_url: str | None = None, **env: str
) -> Iterator[AccountsStack]:
    """The launcher's stack with `apis` API processes, a synthetic worker and persistence;
    processes a test adds to `procs` are stopped with it. With `nats_url` it uses those
    NATS servers (a cluster's) instead of starting its own."""
    outside = {} if nats_url is None else {"CHATQ_EMBEDDED_NATS": "0"}
    full = base_env(
        nats_url or _nats_url(),
        root / "home",
        INFERENCE_ENGINE="synthetic",
        MODEL_NAME=model,
        **outside,
        **env,
    )
    specs = [_api_spec(f"api{i}") for i in range(apis)]
    specs += [_worker_spec(), process_table.PERSISTENCE]
    logdir = root / "logs"
    with launched(root / "home", full, specs, ready=workers_ready(1), logdir=logdir, cwd=ROOT) as sup:
        assert sup.database_url and sup.redis_url and sup.redis and sup.postgres
        assert sup.nats or nats_url
        full = {**full, "DATABASE_URL": sup.database_url, "REDIS_URL": sup.redis_url}
        started = [sup.process(spec.name) for spec in specs]
        stack = AccountsStack(
            sup.api_urls,
            sup.database_url,
            sup.nats.url if sup.nats else full["NATS_URL"],
            sup.redis,
            sup.postgres,
            full,
            logdir,
            list(started),
        )
        try:
            yield stack
        finally:
            for proc in reversed(stack.procs):
                if proc not in started:
                    proc.stop()


def _nats_url() -> str:
    """A URL for the stack's own nats-server, on a free port."""
    return f"nats://127.0.0.1:{free_port()}"


def no_rate_limits(*roles: str) -> dict[str, str]:
    """The settings that turn off every rate limit of these roles ("user", "admin")."""
    limits = ("RPM", "TPM", "CONCURRENCY")
    return {f"RATE_LIMIT_{role.upper()}_{limit}": "0" for role in roles for limit in limits}


@dataclass
class Account:
    username: str
    password: str
    id: int


def create_account(url: str, username: str, role: str = "user") -> Account:
    """A new account, created with the service key (which acts as an admin); its password
    is `pw-<username>-12345`."""
    password = f"pw-{username}-12345"
    created = httpx.post(
        url + "/api/users",
        json={"username": username, "password": password, "role": role},
        headers=auth(),
        timeout=30,
    )
    assert created.status_code == 201, created.text
    return Account(username, password, created.json()["id"])


def logged_in(url: str, username: str, role: str = "user") -> dict[str, str]:
    """A new account (create_account), logged in: the Authorization header of its session."""
    account = create_account(url, username, role)
    return login(url, account.username, account.password)


def login(url: str, username: str, password: str) -> dict[str, str]:
    """Log in; the Authorization header of the session."""
    response = httpx.post(
        url + "/api/auth/login", json={"username": username, "password": password}, timeout=30
    )
    response.raise_for_status()
    return {"Authorization": f"Bearer {response.json()['access_token']}"}
