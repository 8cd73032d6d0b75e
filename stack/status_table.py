"""./status: fetch GET /api/admin/status and print it as plain tables."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any


def fetch(api_url: str, key: str | None, timeout: float = 5.0) -> tuple[dict[str, Any] | None, str | None]:
    """The API's /api/admin/status answer, or None and why not."""
    request = urllib.request.Request(api_url + "/api/admin/status")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data, None
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        return None, f"/api/admin/status answered {exc.code}: {message}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return None, f"the API does not answer ({exc})"


def table(rows: Sequence[Sequence[str]]) -> str:
    """Rows as left-aligned columns; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _age(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"
    return f"{int(seconds) // 3600}h{int(seconds) % 3600 // 60:02d}m"


def _gib(n: Any) -> str:
    return f"{n / (1 << 30):.1f}" if isinstance(n, (int, float)) else "-"


def _or_dash(value: Any, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def render(status: dict[str, Any]) -> str:
    """The status answer as a few plain tables."""
    out: list[str] = []
    reasons = status.get("reasons") or []
    out.append(f"status: {status.get('status', '?')}" + (f" ({'; '.join(reasons)})" if reasons else ""))
    services = status.get("services") or {}
    tel = services.get("telemetry") or {}
    counts = services.get("workers") or {}
    telemetry = str(tel.get("status", "?"))
    if tel.get("snapshot_age_s") is not None:
        telemetry += f" (snapshot {_age(tel['snapshot_age_s'])} old, every {tel.get('interval_s', '?')}s)"
    out.append(
        f"NATS {services.get('nats', '?')} · telemetry {telemetry} · workers "
        f"{counts.get('ready', 0)}/{counts.get('total', 0)} ready, "
        f"{counts.get('free_slots', 0)}/{counts.get('slots', 0)} slots free"
    )
    workers = status.get("workers") or []
    out.append("")
    if workers:
        rows = [["WORKER", "HOST", "MODEL", "ENGINE", "VERSION", "STATE", "FREE/SLOTS", "LAST SEEN"]]
        for w in workers:
            state = str(w.get("state", "?"))
            if w.get("progress") and w["progress"] != state:
                state += f" ({w['progress']})"
            rows.append(
                [
                    str(w.get("id", "?")),
                    _or_dash(w.get("host")),
                    str(w.get("model", "?")),
                    str(w.get("engine", "?")),
                    _or_dash(w.get("engine_version")),
                    state,
                    f"{w.get('free_slots', 0)}/{w.get('slots', 0)}",
                    _age(w.get("last_seen_age_s")) + " ago",
                ]
            )
        out.append(table(rows))
    else:
        out.append("no inference workers")
    queues = status.get("queues") or []
    # Idle queues of models nobody serves (every profile has its queues) are only counted.
    served = {w.get("model") for w in workers}
    shown = [
        q
        for q in queues
        if q.get("model") in served or q.get("depth") or q.get("in_flight") or q.get("redelivered")
    ]
    if shown:
        rows = [["QUEUE", "PRIORITY", "WAITING", "IN FLIGHT", "REDELIVERED", "OLDEST"]]
        for q in shown:
            rows.append(
                [
                    str(q.get("model", "?")),
                    str(q.get("priority", "?")),
                    str(q.get("depth", 0)),
                    str(q.get("in_flight", 0)),
                    str(q.get("redelivered", 0)),
                    _age(q.get("oldest_age_s")),
                ]
            )
        out += ["", table(rows)]
    if len(shown) < len(queues):
        hidden = len(queues) - len(shown)
        out.append(f"({hidden} idle queues of models no worker serves not shown; --json lists them)")
    events = status.get("events") or []
    if events:
        rows = [["EVENTS CONSUMER", "PENDING"]]
        rows += [[str(e.get("consumer", "?")), str(e.get("pending", 0))] for e in events]
        out += ["", table(rows)]
    gpus = status.get("gpus") or []
    if gpus:
        rows = [["GPU", "NAME", "UTIL", "MEMORY GiB", "TEMP", "POWER"]]
        for g in gpus:
            rows.append(
                [
                    str(g.get("index", "?")),
                    str(g.get("name", "?")),
                    f"{100 * g.get('utilization_ratio', 0):.0f}%",
                    f"{_gib(g.get('memory_used_bytes'))}/{_gib(g.get('memory_total_bytes'))}",
                    _or_dash(g.get("temperature_celsius"), "{:.0f}°C"),
                    _or_dash(g.get("power_watts"), "{:.0f} W"),
                ]
            )
        out += ["", table(rows)]
    notes = status.get("notes") or []
    if notes:
        out += ["", *(f"note: {n}" for n in notes)]
    return "\n".join(out)
