"""chatq status: the supervisor's process table and the API's /api/admin/status."""

from __future__ import annotations

import json
import time

from chatq.settings import Settings
from stack import state


def _children_table(s: Settings) -> str | None:
    """The supervisor's children.json as a table, or None when there is none."""
    try:
        children = json.loads(state.children_file(s).read_text())
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(children, dict) or not children:
        return None
    rows = [("PROCESS", "PID", "STATE", "RESTARTS", "LAST EXIT", "UP")]
    now = time.time()
    for name, c in children.items():
        if not isinstance(c, dict):
            continue
        child_state = str(c.get("state", "?"))
        up = "-"
        started = c.get("started_at")
        if child_state == "running" and isinstance(started, (int, float)) and started:
            up = _duration(now - started)
        last = c.get("last_exit")
        rows.append(
            (
                str(name),
                str(c.get("pid") or "-"),
                child_state,
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

    pid = state.running_pid(s)
    health = state.health(state.api_url(s))
    if pid is None and health is None:
        print(json.dumps({"status": "not running"}) if as_json else "chatq: not running")
        return 3
    # A service key acts as an admin; in development mode no key is needed.
    key = None if s.dev_mode or not s.api_keys else sorted(s.api_keys)[0]
    status, problem = status_table.fetch(state.api_url(s), key)
    if status is None:
        status = {
            "status": "degraded" if health else "down",
            "reasons": [problem],
            "health": health,
        }
    try:
        children = json.loads(state.children_file(s).read_text()) if pid is not None else None
    except (FileNotFoundError, ValueError):
        children = None
    if as_json:
        print(json.dumps({**status, "supervisor": {"pid": pid, "processes": children}}, indent=2))
    else:
        where = f"supervisor pid {pid}" if pid is not None else "not started by ./start"
        print(f"chatq: running ({where}), API {state.api_url(s)}")
        table = _children_table(s) if pid is not None else None
        if table:
            print(table)
        print()
        print(status_table.render(status))
    return 0 if status.get("status") == "healthy" else 1
