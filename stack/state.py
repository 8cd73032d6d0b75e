"""Where a running chatq keeps its state in CHATQ_HOME, and how to reach its API."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from chatq.settings import Settings


def pidfile(s: Settings) -> Path:
    return s.home / "run" / "chatq.pid"


def logdir(s: Settings) -> Path:
    return s.home / "logs"


def children_file(s: Settings) -> Path:
    """The supervisor's process table, for ./status."""
    return s.home / "run" / "children.json"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_pid(s: Settings) -> int | None:
    """The pid of the supervisor ./start left running in this state folder, if any."""
    try:
        pid = int(pidfile(s).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if alive(pid) else None


def api_url(s: Settings, port: int | None = None) -> str:
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
    return f"http://{host}:{port or s.port}"


def health(url: str) -> dict[str, object] | None:
    """GET <url>/health, or None when it does not answer."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            data: dict[str, object] = json.loads(resp.read())
            return data
    except (urllib.error.URLError, OSError, ValueError):
        return None
