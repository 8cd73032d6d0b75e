"""The supervisor: starts a chatq stack in a state folder, keeps it up, and stops it.

The stack is the embedded servers (NATS, PostgreSQL, Redis, each only where no URL names an
outside one and a process needs it) and a process table: a list of ProcessSpec rows, started
in order. `./start` runs PROCESS_TABLE and tends it (restarts a child that dies); a test
fixture or a load-test target calls launch() with a table of its own and does not tend it,
so a child it kills on purpose stays dead.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from broker import permissions
from chatq.errors import ChatqError, ConfigError
from chatq.logs import url_for_log
from chatq.settings import Settings, load
from stack import nats_auth, state
from stack.process_table import PORT_SETTINGS, PROCESS_TABLE, ProcessSpec
from stack.processes import Process, module_argv, spawn, tail, wait_http
from stack.servers import EmbeddedPostgres, NatsServer, RedisServer, port_free

# A child that dies is restarted after a backoff that doubles from 1 s up to 30 s, and
# starts again from 1 s once the child has stayed up a minute. A child that dies within
# 10 s of its start 5 times in a row is broken, not unlucky: chatq gives up and stops.
RESTART_BACKOFF_S = 1.0
RESTART_BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0
FAST_CRASH_S = 10.0
GIVE_UP_AFTER = 5
TEND_INTERVAL_S = 0.25
STOP_TIMEOUT_S = 45.0


@dataclass
class Child:
    """One supervised child process, and what the supervisor remembers about it."""

    spec: ProcessSpec
    process: Process | None = None
    pid: int | None = None
    state: str = "running"  # running | restarting | gave-up | stopped
    started: float = 0.0  # monotonic, for its uptime
    started_at: float = 0.0  # wall clock, for ./status
    restarts: int = 0
    last_exit: int | None = None
    backoff_s: float = RESTART_BACKOFF_S
    fast_crashes: int = 0  # in a row, each within FAST_CRASH_S of its start
    restart_at: float | None = None  # monotonic time of the pending restart

    @property
    def name(self) -> str:
        return self.spec.name

    def summary(self) -> dict[str, object]:
        return {
            "pid": self.pid,
            "state": self.state,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "started_at": self.started_at,
        }


class Supervisor:
    """Starts the embedded servers and a process table; restarts a child that dies (with
    backoff) while tended, gives up on one that keeps crashing at start, and stops them
    together.

    `env` is what every child gets on top of this process's environment (the settings `s`
    were read from it); `logdir` is where the logs go (default: the state folder's);
    `announce` prints what was started.
    """

    def __init__(
        self,
        s: Settings,
        *,
        env: Mapping[str, str] | None = None,
        logdir: Path | None = None,
        cwd: Path | None = None,
        announce: bool = True,
    ) -> None:
        self.s = s
        self.announce = announce
        self.env = dict(env or {})
        self.logdir = logdir or state.logdir(s)
        self.cwd = cwd
        self.children: dict[str, Child] = {}
        self.nats: NatsServer | None = None
        self.postgres: EmbeddedPostgres | None = None
        self.redis: RedisServer | None = None
        self.nats_passwords: dict[str, str] = {}
        self.database_url = s.database_url
        self.redis_url = s.redis_url
        self._stopping = False
        self._written: str | None = None

    # --- what a caller reads ------------------------------------------------------------

    @property
    def nats_url(self) -> str:
        return self.s.nats_url

    def port(self, spec: ProcessSpec) -> int:
        """The port a row's process listens on (0: none)."""
        if spec.port_env is None:
            return 0
        value = spec.env.get(spec.port_env)
        return int(value) if value else int(getattr(self.s, PORT_SETTINGS[spec.port_env]))

    @property
    def api_urls(self) -> list[str]:
        """The URL of every API process, in the order of the table."""
        return [
            state.api_url(self.s, self.port(c.spec))
            for c in self.children.values()
            if c.spec.port_env == "CHATQ_PORT"
        ]

    def process(self, name: str) -> Process:
        """The running process of a child."""
        process = self.children[name].process
        if process is None:
            raise ChatqError(f"the {name} is not running")
        return process

    # --- starting -----------------------------------------------------------------------

    def _announce(self, what: str) -> None:
        if self.announce:
            print(f"chatq: {what}", flush=True)

    def _log(self, name: str) -> int:
        self.logdir.mkdir(parents=True, exist_ok=True)
        return os.open(self.logdir / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def add(self, name: str, module: str, **extra: str) -> None:
        """Start `python -m module` as a supervised child (extra: environment variables)."""
        self.start_process(ProcessSpec(name, module, extra))

    def start_process(self, spec: ProcessSpec) -> Child:
        """Start one row of a process table as a supervised child."""
        self.children[spec.name] = child = Child(spec)
        self._spawn(child)
        return child

    def _child_env(self, spec: ProcessSpec) -> dict[str, str]:
        env = {**self.env, "CHATQ_HOME": str(self.s.home), "NATS_URL": self.s.nats_url}
        if self.nats_passwords:
            # The embedded server's users: each process logs in as its service, or as no one.
            env.pop("NATS_USER", None)
            env.pop("NATS_PASSWORD", None)
            if spec.nats_service is not None:
                env["NATS_USER"] = user = permissions.user_name(spec.nats_service)
                env["NATS_PASSWORD"] = self.nats_passwords[user]
        if "database" in spec.needs and self.database_url:
            env["DATABASE_URL"] = self.database_url
        if "redis" in spec.needs and self.redis_url:
            env["REDIS_URL"] = self.redis_url
        return {**env, **spec.env}

    def _spawn(self, child: Child) -> None:
        spec = child.spec
        child.process = spawn(
            spec.name, module_argv(spec.module), self._child_env(spec), self.logdir, cwd=self.cwd
        )
        child.pid = child.process.pid
        child.state = "running"
        child.restart_at = None
        child.started = time.monotonic()
        child.started_at = time.time()
        self._write_state()

    def _write_state(self) -> None:
        """children.json for ./status, rewritten (atomically) when something in it changed."""
        text = json.dumps({name: c.summary() for name, c in self.children.items()}, indent=2)
        if text == self._written:
            return
        path = state.children_file(self.s)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, path)
        self._written = text

    def _check_ports(self, processes: Sequence[ProcessSpec], nats_host: str, nats_port: int) -> None:
        """Fail before starting anything if a port chatq needs is taken."""
        wanted = [(spec.port_env, self.s.host, self.port(spec)) for spec in processes if spec.port_env]
        if self.s.embedded_nats:
            wanted.append(("NATS_URL", nats_host, nats_port))
        for name, host, port in wanted:
            if port and not port_free(host, port):
                raise ChatqError(
                    f"{host}:{port} is already in use ({name}); stop what uses it or choose "
                    "another port"
                    + (" (or CHATQ_EMBEDDED_NATS=0 to use that NATS server)" if name == "NATS_URL" else "")
                )

    def start_servers(self, needs: set[str]) -> None:
        """NATS (when embedded), its streams where `needs` names them, and PostgreSQL and
        Redis where it names them and no URL names an outside one."""
        s = self.s
        # The embedded server is one, at the first URL (NATS_URL may list a cluster's).
        url = urlparse(s.nats_url.split(",")[0])
        if s.embedded_nats:
            self.nats_passwords = nats_auth.ensure_passwords(s.home)
            fd = self._log("nats")
            with os.fdopen(fd, "ab") as log:
                self.nats = NatsServer(
                    s.home / "nats",
                    port=url.port or 4222,
                    host=url.hostname or "127.0.0.1",
                    config=nats_auth.write_config(s.home, self.nats_passwords),
                    login=nats_auth.admin_login(self.nats_passwords),
                ).start(log)
            self._announce(f"NATS JetStream on {url_for_log(s.nats_url)} (data in {s.home / 'nats'})")
        elif s.nats_users_file is not None:
            # An outside server with chatq's users: each process logs in as its service.
            self.nats_passwords = nats_auth.outside_passwords(s.nats_users_file)
        if "streams" in needs:
            self._declare_streams()
        if "database" in needs and not self.database_url:
            self.postgres = EmbeddedPostgres(s.home / "postgres")
            self.database_url = self.postgres.start()
            self._announce(f"PostgreSQL (embedded) in {s.home / 'postgres'}")
        if "redis" in needs and not self.redis_url:
            fd = self._log("redis")
            with os.fdopen(fd, "ab") as log:
                self.redis = RedisServer(s.home / "redis").start(log)
            self.redis_url = self.redis.url
            where = url_for_log(self.redis_url)
            self._announce(f"Redis (embedded, rate limits) on {where} (data in {s.home / 'redis'})")

    def _declare_streams(self) -> None:
        """The JetStream streams, declared before any process starts: an event consumer that
        starts before the API or a worker has declared them would find none."""
        from broker import topology
        from broker.connect import NatsLogin, connect

        login = NatsLogin.of(self.s)
        if self.nats_passwords:
            login = NatsLogin(*nats_auth.admin_login(self.nats_passwords), ca_file=login.ca_file)

        async def declare() -> None:
            # A server that is not there: given up on after ~10 s, not waited for forever.
            nc = await connect(self.s.nats_url, "chatq-start", login, attempts=20)
            try:
                await topology.ensure_streams(
                    nc.jetstream(), jobs_max_msgs=self.s.jobs_max_msgs, replicas=self.s.nats_stream_replicas
                )
            finally:
                await nc.close()

        try:
            asyncio.run(declare())
        except ConfigError:
            raise  # a refused login, an untrusted certificate, NATS_STREAM_REPLICAS too high
        except Exception as exc:  # noqa: BLE001 - nats-py raises several kinds; all mean the same here
            where = url_for_log(self.s.nats_url)
            raise ChatqError(f"cannot declare the streams on {where}: {type(exc).__name__}") from None

    def start(self, processes: Sequence[ProcessSpec] = PROCESS_TABLE) -> None:
        """The servers the table needs, then its processes in order."""
        url = urlparse(self.s.nats_url.split(",")[0])
        self._check_ports(processes, url.hostname or "127.0.0.1", url.port or 4222)
        state.children_file(self.s).unlink(missing_ok=True)  # a previous run's
        self.start_servers({need for spec in processes for need in spec.needs})
        for spec in processes:
            self.start_process(spec)
        names = ", ".join(spec.name for spec in processes)
        workers = sum(spec.module == "workers.inference" for spec in processes)
        apis = sum(spec.port_env == "CHATQ_PORT" for spec in processes)
        if tuple(processes) == PROCESS_TABLE:
            names = f"the inference worker ({self.s.engine}), the API, persistence and telemetry"
        elif workers > 1 or apis > 1:
            names = f"{workers} inference workers ({self.s.engine}), {apis} API processes, {names}"
        self._announce(f"starting {names} …")

    # --- keeping it up ------------------------------------------------------------------

    def tend(self) -> bool:
        """Restart the children that died, each after its backoff; False once one is given up on."""
        now = time.monotonic()
        ok = True
        for child in self.children.values():
            if child.state == "running" and child.process is not None and not child.process.alive():
                self._exited(child, child.process, now)
                if child.state == "gave-up":
                    ok = False
                    break
            elif child.state == "restarting" and child.restart_at is not None and now >= child.restart_at:
                self._spawn(child)
        self._write_state()
        return ok

    def _exited(self, child: Child, process: Process, now: float) -> None:
        """A child died: kill what is left of its process group, then schedule its restart."""
        # Its engine processes (vLLM's engine core) are in its group: none may outlive it.
        code = child.last_exit = process.kill()
        child.process = None
        uptime = now - child.started
        if uptime >= STABLE_AFTER_S:
            child.backoff_s = RESTART_BACKOFF_S
        child.fast_crashes = child.fast_crashes + 1 if uptime < FAST_CRASH_S else 0
        if child.fast_crashes >= GIVE_UP_AFTER:
            child.state = "gave-up"
            print(
                f"chatq: giving up on the {child.name}: it exited {child.fast_crashes} times in a row "
                f"within {FAST_CRASH_S:g} s of its start (last exit code {code}); stopping chatq. "
                f"Its log, {process.log}, ends with:",
                file=sys.stderr,
            )
            print(tail(process.log, 10, indent="  "), file=sys.stderr, flush=True)
            return
        delay = child.backoff_s
        child.backoff_s = min(delay * 2, RESTART_BACKOFF_MAX_S)
        child.restarts += 1
        child.restart_at = now + delay
        child.state = "restarting"
        print(
            f"chatq: the {child.name} exited with code {code}; restarting in {delay:g} s "
            f"(restart {child.restarts})",
            flush=True,
        )

    def wait_healthy(self, timeout: float) -> bool:
        """Tend the children until the API's /health says healthy; False on give-up or timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._stopping:
            if not self.tend():
                return False
            health = state.health(state.api_url(self.s))
            if health and health.get("status") == "healthy":
                return True
            time.sleep(0.5)
        if not self._stopping:
            print("chatq: the service did not become healthy in time", file=sys.stderr)
        return False

    def wait_ready(self, ready: Callable[[dict[str, Any]], bool], timeout: float) -> None:
        """Without tending: wait until every API's /health satisfies `ready`; LaunchError as
        soon as a child exits."""
        deadline = time.monotonic() + timeout
        procs = [c.process for c in self.children.values() if c.process is not None]
        for url in self.api_urls:
            left = max(0.0, deadline - time.monotonic())
            wait_http(url + "/health", lambda r: ready(r.json()), left, procs, f"{url}/health")

    def supervise(self) -> int:
        """Keep the children up until a signal arrives or one is given up on; then stop everything."""
        code = 0
        while not self._stopping:
            if not self.tend():
                code = 1
                break
            time.sleep(TEND_INTERVAL_S)
        self.stop()
        return code

    def request_stop(self, *_: object) -> None:
        self._stopping = True

    # --- stopping -----------------------------------------------------------------------

    def stop(self) -> None:
        """Every child in stop_rank order (each SIGTERM, then its group SIGKILLed), then the servers."""
        for child in sorted(self.children.values(), key=lambda c: c.spec.stop_rank):
            if child.process is None:
                continue
            child.last_exit = child.process.stop(STOP_TIMEOUT_S)
            child.process = None
            child.state = "stopped"
        for child in self.children.values():
            if child.state == "restarting":
                child.state = "stopped"
        if self.children:
            self._write_state()
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        if self.nats is not None:
            self.nats.stop()


def healthy(health: dict[str, Any]) -> bool:
    """/health says healthy."""
    return health.get("status") == "healthy"


def launch(
    home: Path,
    env: Mapping[str, str],
    processes: Sequence[ProcessSpec],
    *,
    ready: Callable[[dict[str, Any]], bool] = healthy,
    timeout: float = 60.0,
    logdir: Path | None = None,
    cwd: Path | None = None,
) -> Supervisor:
    """A stack with state in `home`: the servers `processes` need and those processes, each
    given `env` (settings, ports) on top of this process's environment; returns once every
    API's /health satisfies `ready`. Not tended. On a failure, what was started is stopped."""
    env = {**env, "CHATQ_HOME": str(home)}
    sup = Supervisor(load({**os.environ, **env}), env=env, logdir=logdir, cwd=cwd, announce=False)
    try:
        sup.start(processes)
        sup.wait_ready(ready, timeout)
    except BaseException:
        sup.stop()
        raise
    return sup


@contextmanager
def launched(
    home: Path, env: Mapping[str, str], processes: Sequence[ProcessSpec], **options: Any
) -> Iterator[Supervisor]:
    """launch() as a context: the stack is stopped on leaving it."""
    sup = launch(home, env, processes, **options)
    try:
        yield sup
    finally:
        sup.stop()


def workers_ready(count: int) -> Callable[[dict[str, Any]], bool]:
    """A `ready` for launch(): /health counts at least `count` ready workers."""

    def ready(health: dict[str, Any]) -> bool:
        return int(health["services"]["workers"]["ready"]) >= count

    return ready
