"""chatq start | stop | status | logs: runs the whole service on one machine, no Docker."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import urlparse

from catalog.profiles import settle_model_profile
from chatq.errors import ChatqError
from chatq.logs import url_for_log
from chatq.settings import Settings, load
from stack.servers import EmbeddedPostgres, NatsServer, RedisServer, port_free

SERVICES = ("nats", "worker", "api", "persistence", "telemetry")
HEALTH_TIMEOUT_S = 900.0
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


def _pidfile(s: Settings) -> Path:
    return s.home / "run" / "chatq.pid"


def _logdir(s: Settings) -> Path:
    return s.home / "logs"


def _children_file(s: Settings) -> Path:
    return s.home / "run" / "children.json"


def _tail(path: Path, lines: int, indent: str = "") -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return f"{indent}(no log)"
    return "\n".join(indent + line for line in text)


def _killpg(pid: int) -> None:
    """SIGKILL a child's whole process group: its id is the child's pid (start_new_session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _has_exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the child has exited, leaving it unreaped where the platform allows: while it
    is a zombie its pid, and so its process group id, cannot be given to another process."""
    if proc.returncode is not None:
        return True
    if hasattr(os, "waitid"):
        try:
            return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            pass
    return proc.poll() is not None


def _wait_exited(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not _has_exited(proc):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _running_pid(s: Settings) -> int | None:
    try:
        pid = int(_pidfile(s).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _alive(pid) else None


def _api_url(s: Settings) -> str:
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
    return f"http://{host}:{s.port}"


def _health(s: Settings) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(_api_url(s) + "/health", timeout=2) as resp:
            data: dict[str, object] = json.loads(resp.read())
            return data
    except (urllib.error.URLError, OSError, ValueError):
        return None


def ensure_api_key(s: Settings) -> str | None:
    """Outside development mode, make sure one API key exists; returns a new key once."""
    if s.dev_mode or s.api_keys:
        return None
    key = "cq-" + secrets.token_urlsafe(32)
    path = s.home / "api_keys"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(key + "\n")
    return key


def ensure_jwt_secret(s: Settings) -> bool:
    """Make sure a random JWT signing secret exists (JWT_SECRET or the state folder's
    jwt_secret file, mode 0600); True when one was made now."""
    if s.jwt_secret:
        return False
    path = s.home / "jwt_secret"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # an empty file left by an interrupted start
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(48) + "\n")
    return True


@dataclass
class Child:
    """One supervised child process, and what the supervisor remembers about it."""

    name: str
    module: str
    extra_env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    pid: int | None = None
    state: str = "running"  # running | restarting | gave-up | stopped
    started: float = 0.0  # monotonic, for its uptime
    started_at: float = 0.0  # wall clock, for ./status
    restarts: int = 0
    last_exit: int | None = None
    backoff_s: float = RESTART_BACKOFF_S
    fast_crashes: int = 0  # in a row, each within FAST_CRASH_S of its start
    restart_at: float | None = None  # monotonic time of the pending restart

    def summary(self) -> dict[str, object]:
        return {
            "pid": self.pid,
            "state": self.state,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "started_at": self.started_at,
        }


class Supervisor:
    """Starts NATS, PostgreSQL, one inference worker, the API, persistence and telemetry;
    restarts a child that dies (with backoff), gives up on one that keeps crashing at start,
    and stops them together."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.children: dict[str, Child] = {}
        self.nats: NatsServer | None = None
        self.postgres: EmbeddedPostgres | None = None
        self.redis: RedisServer | None = None
        self._stopping = False
        self._written: str | None = None

    def _log(self, name: str) -> int:
        _logdir(self.s).mkdir(parents=True, exist_ok=True)
        return os.open(_logdir(self.s) / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def add(self, name: str, module: str, **extra: str) -> None:
        """Start `python -m module` as a supervised child (extra: environment variables)."""
        self.children[name] = child = Child(name, module, extra)
        self._spawn(child)

    def _spawn(self, child: Child) -> None:
        fd = self._log(child.name)
        env = {**os.environ, "CHATQ_HOME": str(self.s.home), "NATS_URL": self.s.nats_url, **child.extra_env}
        try:
            child.proc = subprocess.Popen(
                [sys.executable, "-m", child.module], stdout=fd, stderr=fd, env=env, start_new_session=True
            )
        finally:
            os.close(fd)
        child.pid = child.proc.pid
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
        path = _children_file(self.s)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, path)
        self._written = text

    def _check_ports(self, nats_host: str, nats_port: int) -> None:
        """Fail before starting anything if a port chatq needs is taken."""
        s = self.s
        wanted = [
            ("CHATQ_PORT", s.host, s.port),
            ("WORKER_METRICS_PORT", s.host, s.worker_metrics_port),
            ("TELEMETRY_PORT", s.host, s.telemetry_port),
        ]
        if s.embedded_nats:
            wanted.append(("NATS_URL", nats_host, nats_port))
        for name, host, port in wanted:
            if port and not port_free(host, port):
                raise ChatqError(
                    f"{host}:{port} is already in use ({name}); stop what uses it or choose "
                    "another port"
                    + (" (or CHATQ_EMBEDDED_NATS=0 to use that NATS server)" if name == "NATS_URL" else "")
                )

    def start(self) -> None:
        s = self.s
        url = urlparse(s.nats_url)
        self._check_ports(url.hostname or "127.0.0.1", url.port or 4222)
        _children_file(s).unlink(missing_ok=True)  # a previous run's
        if s.embedded_nats:
            fd = self._log("nats")
            with os.fdopen(fd, "ab") as log:
                self.nats = NatsServer(
                    s.home / "nats", port=url.port or 4222, host=url.hostname or "127.0.0.1"
                ).start(log)
            where = url_for_log(s.nats_url)
            print(f"chatq: NATS JetStream on {where} (data in {s.home / 'nats'})", flush=True)
        dsn = s.database_url
        if not dsn:
            self.postgres = EmbeddedPostgres(s.home / "postgres")
            dsn = self.postgres.start()
            print(f"chatq: PostgreSQL (embedded) in {s.home / 'postgres'}", flush=True)
        redis_url = s.redis_url
        if not redis_url:
            fd = self._log("redis")
            with os.fdopen(fd, "ab") as log:
                self.redis = RedisServer(s.home / "redis").start(log)
            redis_url = self.redis.url
            where = url_for_log(redis_url)
            print(
                f"chatq: Redis (embedded, rate limits) on {where} (data in {s.home / 'redis'})",
                flush=True,
            )
        self.add("worker", "workers.inference")
        self.add("api", "api", DATABASE_URL=dsn, REDIS_URL=redis_url)
        self.add("persistence", "workers.persistence", DATABASE_URL=dsn)
        self.add("telemetry", "workers.telemetry")
        print(
            f"chatq: starting the inference worker ({s.engine}), the API, persistence and telemetry …",
            flush=True,
        )

    def tend(self) -> bool:
        """Restart the children that died, each after its backoff; False once one is given up on."""
        now = time.monotonic()
        ok = True
        for child in self.children.values():
            if child.state == "running" and child.proc is not None and _has_exited(child.proc):
                self._exited(child, child.proc, now)
                if child.state == "gave-up":
                    ok = False
                    break
            elif child.state == "restarting" and child.restart_at is not None and now >= child.restart_at:
                self._spawn(child)
        self._write_state()
        return ok

    def _exited(self, child: Child, proc: subprocess.Popen[bytes], now: float) -> None:
        """A child died: kill what is left of its process group, then schedule its restart."""
        # Its engine processes (vLLM's engine core) are in its group: none may outlive it.
        # The dead child is reaped only afterwards, so its pid (the group id) is not reused.
        _killpg(proc.pid)
        code = child.last_exit = proc.wait()
        child.proc = None
        uptime = now - child.started
        if uptime >= STABLE_AFTER_S:
            child.backoff_s = RESTART_BACKOFF_S
        child.fast_crashes = child.fast_crashes + 1 if uptime < FAST_CRASH_S else 0
        log = _logdir(self.s) / f"{child.name}.log"
        if child.fast_crashes >= GIVE_UP_AFTER:
            child.state = "gave-up"
            print(
                f"chatq: giving up on the {child.name}: it exited {child.fast_crashes} times in a row "
                f"within {FAST_CRASH_S:g} s of its start (last exit code {code}); stopping chatq. "
                f"Its log, {log}, ends with:",
                file=sys.stderr,
            )
            print(_tail(log, 10, indent="  "), file=sys.stderr, flush=True)
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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._stopping:
            if not self.tend():
                return False
            health = _health(self.s)
            if health and health.get("status") == "healthy":
                return True
            time.sleep(0.5)
        if not self._stopping:
            print("chatq: the service did not become healthy in time", file=sys.stderr)
        return False

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

    def stop(self) -> None:
        # The API first (no new work), the worker (drains), the event consumers, then NATS.
        first = [n for n in ("api", "worker", "persistence", "telemetry") if n in self.children]
        for name in first + [n for n in self.children if n not in first]:
            child = self.children[name]
            if child.proc is None:
                continue
            proc = child.proc
            if not _has_exited(proc):
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                _wait_exited(proc, STOP_TIMEOUT_S)
            # The child if it did not stop in time, and any grandchild left behind.
            _killpg(proc.pid)
            child.last_exit = proc.wait()
            child.proc = None
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


def cmd_start(s: Settings, detach: bool) -> int:
    pid = _running_pid(s)
    if pid is not None:
        print(f"chatq is already running (pid {pid}) at {_api_url(s)}; ./stop stops it")
        return 1
    s.home.mkdir(parents=True, exist_ok=True)
    new_key = ensure_api_key(s)
    if ensure_jwt_secret(s) or new_key is not None:
        s = load()  # re-read: the key and secret files are part of the settings
    settle_model_profile(s)  # a MODEL_PROFILE naming no profile stops here, before anything starts
    from stack.web import ensure_built

    ensure_built()  # the web interface, when its sources changed (a failure only warns)
    if s.engine == "vllm" and not s.model_id:
        from catalog.model_prep import prepare_default_model

        path = prepare_default_model(s.models_dir, progress=True)
        print(f"chatq: model ready at {path}", flush=True)
    if detach:
        return _detach(s, new_key)
    return _run(s, new_key)


def _banner(s: Settings, new_key: str | None) -> None:
    print(f"chatq is up: {_api_url(s)}  (OpenAI base_url {_api_url(s)}/v1)", flush=True)
    if new_key:
        print(f"chatq: your API key (saved in {s.home / 'api_keys'}): {new_key}", flush=True)
    elif s.dev_mode and not s.api_keys:
        print("chatq: DEVELOPMENT MODE: calls without credentials act as admin", flush=True)
    else:
        print(f"chatq: service API keys are in {s.home / 'api_keys'} or CHATQ_API_KEYS", flush=True)
    if s.dev_mode:
        print("chatq: DEVELOPMENT MODE: test accounts admin/admin123 and test/test", flush=True)
    else:
        print(
            "chatq: accounts: create the first admin with\n"
            "         .venv/bin/chatq users add NAME --role admin\n"
            "       then log in with POST /api/auth/login (docs/accounts.md)",
            flush=True,
        )


def _run(s: Settings, new_key: str | None) -> int:
    _pidfile(s).parent.mkdir(parents=True, exist_ok=True)
    _pidfile(s).write_text(str(os.getpid()))
    sup = Supervisor(s)
    signal.signal(signal.SIGTERM, sup.request_stop)
    signal.signal(signal.SIGINT, sup.request_stop)
    try:
        sup.start()
        if not sup.wait_healthy(HEALTH_TIMEOUT_S):
            sup.stop()
            return 1
        _banner(s, new_key)
        return sup.supervise()
    finally:
        sup.stop()
        _pidfile(s).unlink(missing_ok=True)


def _detach(s: Settings, new_key: str | None) -> int:
    _logdir(s).mkdir(parents=True, exist_ok=True)
    log = open(_logdir(s) / "chatq.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "stack.cli", "start"],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(f"chatq failed to start; see {_logdir(s) / 'chatq.log'}:", file=sys.stderr)
            tail = (_logdir(s) / "chatq.log").read_text(errors="replace").splitlines()[-15:]
            print("\n".join(tail), file=sys.stderr)
            return 1
        health = _health(s)
        if health and health.get("status") == "healthy":
            _banner(s, new_key)
            print("chatq: running in the background; ./status, ./logs, ./stop", flush=True)
            return 0
        time.sleep(0.5)
    print("chatq: not healthy in time; ./logs shows why, ./stop stops it", file=sys.stderr)
    return 1


def cmd_stop(s: Settings) -> int:
    pid = _running_pid(s)
    if pid is None:
        print("chatq is not running")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 90
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        print(f"chatq (pid {pid}) did not stop in time", file=sys.stderr)
        return 1
    print("chatq stopped")
    return 0


def _children_table(s: Settings) -> str | None:
    """The supervisor's children.json as a table, or None when there is none."""
    try:
        children = json.loads(_children_file(s).read_text())
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(children, dict) or not children:
        return None
    rows = [("PROCESS", "PID", "STATE", "RESTARTS", "LAST EXIT", "UP")]
    now = time.time()
    for name, c in children.items():
        if not isinstance(c, dict):
            continue
        state = str(c.get("state", "?"))
        up = "-"
        started = c.get("started_at")
        if state == "running" and isinstance(started, (int, float)) and started:
            up = _duration(now - started)
        last = c.get("last_exit")
        rows.append(
            (
                str(name),
                str(c.get("pid") or "-"),
                state,
                str(c.get("restarts", 0)),
                "-" if last is None else str(last),
                up,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def cmd_status(s: Settings, as_json: bool = False) -> int:
    """The supervisor's processes and the API's /api/admin/status, as tables or as JSON."""
    from stack import status_table

    pid = _running_pid(s)
    health = _health(s)
    if pid is None and health is None:
        print(json.dumps({"status": "not running"}) if as_json else "chatq: not running")
        return 3
    # A service key acts as an admin; in development mode no key is needed.
    key = None if s.dev_mode or not s.api_keys else sorted(s.api_keys)[0]
    status, problem = status_table.fetch(_api_url(s), key)
    if status is None:
        status = {
            "status": "degraded" if health else "down",
            "reasons": [problem],
            "health": health,
        }
    try:
        children = json.loads(_children_file(s).read_text()) if pid is not None else None
    except (FileNotFoundError, ValueError):
        children = None
    if as_json:
        print(json.dumps({**status, "supervisor": {"pid": pid, "processes": children}}, indent=2))
    else:
        where = f"supervisor pid {pid}" if pid is not None else "not started by ./start"
        print(f"chatq: running ({where}), API {_api_url(s)}")
        table = _children_table(s) if pid is not None else None
        if table:
            print(table)
        print()
        print(status_table.render(status))
    return 0 if status.get("status") == "healthy" else 1


def cmd_logs(
    s: Settings, service: str | None, follow: bool, request: str | None = None, as_json: bool = False
) -> int:
    if request:
        return _request_logs(s, request, service, as_json)
    names = [service] if service else ["chatq", *SERVICES]
    paths = [_logdir(s) / f"{n}.log" for n in names]
    paths = [p for p in paths if p.exists()]
    if not paths:
        print(f"no logs yet in {_logdir(s)}")
        return 1
    args = ["tail", "-n", "100", *(["-F"] if follow else []), *map(str, paths)]
    return subprocess.call(args)


def _request_logs(s: Settings, request_id: str, service: str | None, as_json: bool) -> int:
    """Every service's log lines about one request, in time order (docs/logging.md)."""
    paths = [_logdir(s) / f"{service}.log"] if service else sorted(_logdir(s).glob("*.log"))
    found: list[tuple[str, int, int, str, dict[str, object]]] = []
    for order, path in enumerate(paths):
        try:
            lines = path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            continue
        for number, line in enumerate(lines):
            if request_id not in line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue  # not chatq's (NATS, a crash on stderr)
            if not isinstance(record, dict):
                continue
            if request_id in str(record.get("request_id") or "") or request_id in str(record.get("msg")):
                found.append((str(record.get("ts", "")), order, number, line, record))
    if not found:
        print(f"no log line names {request_id} in {_logdir(s)}", file=sys.stderr)
        return 1
    found.sort(key=lambda item: item[:3])
    for _, _, _, line, record in found:
        print(line if as_json else _pretty(record))
    return 0


def _pretty(record: dict[str, object]) -> str:
    """A JSON log line for people: local time, service, level, logger, message, then key=value."""
    ts = str(record.get("ts", ""))
    with contextlib.suppress(ValueError):
        moment = datetime.fromisoformat(ts.replace("Z", "+00:00")).astimezone()
        ts = moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}"
    head = " ".join(str(record.get(key, "-")) for key in ("service", "level", "logger"))
    skip = {"ts", "service", "level", "logger", "msg", "exc", "stack"}
    extras = " ".join(
        f"{key}={json.dumps(value) if isinstance(value, str) and (' ' in value or not value) else value}"
        for key, value in record.items()
        if key not in skip and value is not None
    )
    text = f"{ts} {head}: {record.get('msg', '')}" + (f"  {extras}" if extras else "")
    for key in ("exc", "stack"):
        if record.get(key):
            text += "\n" + "\n".join("    " + part for part in str(record[key]).splitlines())
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="run NATS, an inference worker and the API")
    start.add_argument("--detach", action="store_true", help="run in the background")
    sub.add_parser("stop", help="stop what start started")
    status = sub.add_parser("status", help="is it running and healthy: processes, workers, queues, GPUs")
    status.add_argument("--json", action="store_true", help="print GET /api/admin/status as JSON")
    logs = sub.add_parser("logs", help="show logs")
    logs.add_argument("service", nargs="?", choices=["chatq", *SERVICES])
    logs.add_argument("-f", "--follow", action="store_true")
    logs.add_argument(
        "--request", metavar="ID", help="every service's lines about one request (its id), in time order"
    )
    logs.add_argument("--json", action="store_true", help="with --request: the JSON lines as they are")
    from stack import admin_cli  # migrate, users, keys

    admin_cli.add_parsers(sub)
    args = parser.parse_args(argv)
    try:
        s = load()
        if args.command in admin_cli.COMMANDS:
            return admin_cli.run(s, args)
        if args.command == "start":
            return cmd_start(s, args.detach)
        if args.command == "stop":
            return cmd_stop(s)
        if args.command == "status":
            return cmd_status(s, args.json)
        return cmd_logs(s, args.service, args.follow, args.request, args.json)
    except ChatqError as exc:
        print(f"chatq: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
