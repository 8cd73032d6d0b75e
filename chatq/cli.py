"""chatq start | stop | status | logs: runs the whole service on one machine, no Docker."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from chatq.errors import ChatqError
from chatq.servers import EmbeddedPostgres, NatsServer, port_free
from chatq.settings import Settings, load

SERVICES = ("nats", "worker", "api", "persistence", "telemetry")
HEALTH_TIMEOUT_S = 900.0


def _pidfile(s: Settings) -> Path:
    return s.home / "run" / "chatq.pid"


def _logdir(s: Settings) -> Path:
    return s.home / "logs"


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


class Supervisor:
    """Starts NATS, one inference worker and the API as children, and stops them together."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.nats: NatsServer | None = None
        self.postgres: EmbeddedPostgres | None = None
        self._stopping = False

    def _log(self, name: str) -> int:
        _logdir(self.s).mkdir(parents=True, exist_ok=True)
        return os.open(_logdir(self.s) / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def _spawn(self, name: str, module: str, **extra: str) -> None:
        fd = self._log(name)
        env = {**os.environ, "CHATQ_HOME": str(self.s.home), "NATS_URL": self.s.nats_url, **extra}
        self.children[name] = subprocess.Popen(
            [sys.executable, "-m", module], stdout=fd, stderr=fd, env=env, start_new_session=True
        )
        os.close(fd)

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
        if s.embedded_nats:
            fd = self._log("nats")
            with os.fdopen(fd, "ab") as log:
                self.nats = NatsServer(
                    s.home / "nats", port=url.port or 4222, host=url.hostname or "127.0.0.1"
                ).start(log)
            print(f"chatq: NATS JetStream on {s.nats_url} (data in {s.home / 'nats'})", flush=True)
        dsn = s.database_url
        if not dsn:
            self.postgres = EmbeddedPostgres(s.home / "postgres")
            dsn = self.postgres.start()
            print(f"chatq: PostgreSQL (embedded) in {s.home / 'postgres'}", flush=True)
        self._spawn("worker", "workers.inference")
        self._spawn("api", "api")
        self._spawn("persistence", "workers.persistence", DATABASE_URL=dsn)
        self._spawn("telemetry", "workers.telemetry")
        print(
            f"chatq: starting the inference worker ({s.engine}), the API, persistence and telemetry …",
            flush=True,
        )

    def wait_healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.children.items():
                if proc.poll() is not None:
                    print(
                        f"chatq: the {name} exited with code {proc.returncode}; see "
                        f"{_logdir(self.s) / (name + '.log')}",
                        file=sys.stderr,
                    )
                    return False
            health = _health(self.s)
            if health and health.get("status") == "healthy":
                return True
            time.sleep(0.5)
        print("chatq: the service did not become healthy in time", file=sys.stderr)
        return False

    def supervise(self) -> int:
        """Block until a child dies or a signal arrives; then stop everything."""
        code = 0
        while not self._stopping:
            for name, proc in self.children.items():
                if proc.poll() is not None:
                    print(f"chatq: the {name} exited with code {proc.returncode}; stopping", file=sys.stderr)
                    code = 1
                    self._stopping = True
                    break
            time.sleep(0.5)
        self.stop()
        return code

    def request_stop(self, *_: object) -> None:
        self._stopping = True

    def stop(self) -> None:
        # The API first (no new work), the worker (drains), the event consumers, then NATS.
        for name in ("api", "worker", "persistence", "telemetry"):
            proc = self.children.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=45)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None
        if self.nats is not None:
            self.nats.stop()


def cmd_start(s: Settings, detach: bool) -> int:
    pid = _running_pid(s)
    if pid is not None:
        print(f"chatq is already running (pid {pid}) at {_api_url(s)}; ./stop stops it")
        return 1
    s.home.mkdir(parents=True, exist_ok=True)
    new_key = ensure_api_key(s)
    if new_key is not None:
        s = load()  # re-read: the key file is part of the settings
    if s.engine == "vllm" and not s.model_id:
        from chatq.model_prep import prepare_default_model

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
        print("chatq: development mode, no authentication", flush=True)
    else:
        print(f"chatq: API keys are in {s.home / 'api_keys'} or CHATQ_API_KEYS", flush=True)


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
        [sys.executable, "-m", "chatq.cli", "start"],
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


def cmd_status(s: Settings) -> int:
    pid = _running_pid(s)
    if pid is None:
        print("chatq: not running")
        return 3
    print(f"chatq: running (supervisor pid {pid}), API {_api_url(s)}")
    health = _health(s)
    print(json.dumps(health, indent=2) if health else "health: the API does not answer")
    return 0 if health and health.get("status") == "healthy" else 1


def cmd_logs(s: Settings, service: str | None, follow: bool) -> int:
    names = [service] if service else ["chatq", *SERVICES]
    paths = [_logdir(s) / f"{n}.log" for n in names]
    paths = [p for p in paths if p.exists()]
    if not paths:
        print(f"no logs yet in {_logdir(s)}")
        return 1
    args = ["tail", "-n", "100", *(["-F"] if follow else []), *map(str, paths)]
    return subprocess.call(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="run NATS, an inference worker and the API")
    start.add_argument("--detach", action="store_true", help="run in the background")
    sub.add_parser("stop", help="stop what start started")
    sub.add_parser("status", help="is it running and healthy")
    logs = sub.add_parser("logs", help="show logs")
    logs.add_argument("service", nargs="?", choices=["chatq", *SERVICES])
    logs.add_argument("-f", "--follow", action="store_true")
    args = parser.parse_args(argv)
    try:
        s = load()
        if args.command == "start":
            return cmd_start(s, args.detach)
        if args.command == "stop":
            return cmd_stop(s)
        if args.command == "status":
            return cmd_status(s)
        return cmd_logs(s, args.service, args.follow)
    except ChatqError as exc:
        print(f"chatq: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
