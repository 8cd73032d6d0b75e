"""One child process of chatq's and its log: started in a session of its own, so its process
group (its id is the child's pid) holds whatever it starts (vLLM's engine core), and stopping
it stops them too. Only processes started here are ever signalled."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from chatq.errors import LaunchError


def tail(path: Path, lines: int, indent: str = "") -> str:
    """The last `lines` lines of a log file, each indented."""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return f"{indent}(no log)"
    return "\n".join(indent + line for line in text)


def killpg(pid: int) -> None:
    """SIGKILL a child's whole process group: its id is the child's pid (start_new_session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def has_exited(proc: subprocess.Popen[bytes]) -> bool:
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


def wait_exited(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait up to `timeout` s for the child to exit, without reaping it; False if it did not."""
    deadline = time.monotonic() + timeout
    while not has_exited(proc):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


@dataclass
class Process:
    """A started child: its Popen, its log file and the environment it was given on top of
    the parent's."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return not has_exited(self.proc)

    def kill(self) -> int:
        """SIGKILL the process group, then reap the child; its exit code."""
        # Only while the child is unreaped is its pid, the group id, still ours to signal.
        if self.proc.returncode is None:
            killpg(self.proc.pid)
        return self.proc.wait()

    def stop(self, timeout: float = 45.0) -> int:
        """SIGTERM, up to `timeout` s to exit, then SIGKILL to what is left of its group."""
        if not has_exited(self.proc):
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            wait_exited(self.proc, timeout)
        # The child if it did not stop in time, and any grandchild left behind.
        return self.kill()

    def tail(self, lines: int = 40) -> str:
        return tail(self.log, lines)


def module_argv(module: str) -> list[str]:
    """The command line of `python -m module` with this interpreter."""
    return [sys.executable, "-m", module]


def spawn(
    name: str, argv: Sequence[str], env: Mapping[str, str], logdir: Path, *, cwd: Path | None = None
) -> Process:
    """Start argv in a session of its own, output appended to logdir/<name>.log, with `env`
    on top of this process's environment."""
    logdir.mkdir(parents=True, exist_ok=True)
    log = logdir / f"{name}.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        proc = subprocess.Popen(
            list(argv),
            stdout=fd,
            stderr=fd,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env},
            cwd=cwd,
            start_new_session=True,
        )
    finally:
        os.close(fd)
    return Process(name, proc, log, dict(env))


def wait_http(
    url: str,
    ok: Callable[[httpx.Response], Any],
    timeout: float,
    procs: Sequence[Process],
    what: str,
    headers: dict[str, str] | None = None,
) -> None:
    """Poll `url` until ok(response) is true; LaunchError, with its log's end, as soon as
    one of procs exits, or after `timeout` s."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive():
                raise LaunchError(f"{p.name} exited with {p.proc.poll()}:\n{p.tail()}")
        try:
            response = httpx.get(url, timeout=3, headers=headers)
            if ok(response):
                return
            last = f"{response.status_code} {response.text[:200]}"
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise LaunchError(f"{what} not ready after {timeout:g} s (last: {last})")
