"""chatq logs: the services' log files, or every line about one request in time order."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from datetime import datetime

from chatq.settings import Settings
from stack import state

SERVICES = ("nats", "worker", "api", "persistence", "telemetry")


def cmd_logs(
    s: Settings, service: str | None, follow: bool, request: str | None = None, as_json: bool = False
) -> int:
    if request:
        return _request_logs(s, request, service, as_json)
    names = [service] if service else ["chatq", *SERVICES]
    # `worker` and `api` are every one of them (worker-2.log, api-1.log, …).
    paths = [p for n in names for p in sorted(state.logdir(s).glob(f"{n}*.log"))]
    if not paths:
        print(f"no logs yet in {state.logdir(s)}")
        return 1
    args = ["tail", "-n", "100", *(["-F"] if follow else []), *map(str, paths)]
    return subprocess.call(args)


def _request_logs(s: Settings, request_id: str, service: str | None, as_json: bool) -> int:
    """Every service's log lines about one request, in time order (docs/logging.md)."""
    paths = sorted(state.logdir(s).glob(f"{service}*.log" if service else "*.log"))
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
        print(f"no log line names {request_id} in {state.logdir(s)}", file=sys.stderr)
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
