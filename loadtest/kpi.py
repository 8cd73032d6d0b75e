"""The original plan's KPIs, read from a kpi run's steps and judged against their targets.

- TTFT p50 at a 2k-token context, one session: below 1.5 s.
- Completed requests per minute at 5 concurrent sessions: at least 30.
- 5xx responses over every request of the run (both steps): below 1 %.

A KPI whose step is missing (the target failed) has no value and neither passes nor fails.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from loadtest.report import Row, num, render

Comparison = Literal["below", "at_least"]


@dataclass(frozen=True)
class Kpi:
    id: str
    title: str
    limit: float
    comparison: Comparison
    unit: str
    value: Callable[[list[Row]], float | None]  # from one target's rows

    def passes(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return value < self.limit if self.comparison == "below" else value >= self.limit

    def target_text(self) -> str:
        sign = "<" if self.comparison == "below" else "≥"
        return f"{sign} {self.limit:g}{self.unit}"

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "limit": self.limit,
            "comparison": self.comparison,
            "unit": self.unit.strip(),
        }


def _step(rows: list[Row], prefix: str) -> Row | None:
    return next((r for r in rows if str(r["label"]).startswith(prefix)), None)


def _ttft_p50_s(rows: list[Row]) -> float | None:
    row = _step(rows, "ctx=")
    p50 = row["summary"]["ttft_ms"].get("p50") if row else None
    return None if p50 is None else round(p50 / 1000, 3)


def _req_per_min(rows: list[Row]) -> float | None:
    row = _step(rows, "c=")
    return None if row is None or not row["summary"]["requests"] else float(row["summary"]["req_per_min"])


def _http_5xx_pct(rows: list[Row]) -> float | None:
    sent: int = sum(r["summary"]["requests"] for r in rows)
    if not sent:
        return None
    failed: int = sum(r["summary"]["errors"]["http_5xx"] for r in rows)
    return round(100 * failed / sent, 3)


def kpis(context_tokens: int, sessions: int) -> tuple[Kpi, ...]:
    return (
        Kpi("ttft_p50_s", f"TTFT p50, {context_tokens}-token context", 1.5, "below", " s", _ttft_p50_s),
        Kpi("req_per_min", f"requests/min, {sessions} sessions", 30.0, "at_least", "", _req_per_min),
        Kpi("http_5xx_pct", "5xx rate, all requests", 1.0, "below", " %", _http_5xx_pct),
    )


def evaluate(rows: list[Row], targets: list[str], context_tokens: int, sessions: int) -> dict[str, Any]:
    """The report's "kpi" section: the definitions, and per target each value and verdict."""
    defs = kpis(context_tokens, sessions)
    by_target: dict[str, Any] = {}
    for target in targets:
        mine = [r for r in rows if r["target"] == target]
        results: dict[str, Any] = {}
        for k in defs:
            value = k.value(mine)
            results[k.id] = {"value": value, "pass": k.passes(value)}
        verdicts = [v["pass"] for v in results.values()]
        by_target[target] = {
            "kpis": results,
            "all_pass": None if None in verdicts else all(verdicts),
            "interrupted": any(r.get("interrupted") for r in mine),
        }
    return {
        "context_tokens": context_tokens,
        "sessions": sessions,
        "definitions": [k.describe() for k in defs],
        "targets": by_target,
    }


def _cell(value: float | None, verdict: bool | None, unit: str) -> str:
    if value is None:
        return "n/a"
    return f"{num(value)}{unit}  {'PASS' if verdict else 'FAIL'}"


def table(section: dict[str, Any]) -> str:
    """KPI rows, one column per target: the value and PASS/FAIL against the plan's target."""
    defs = kpis(section["context_tokens"], section["sessions"])
    targets = list(section["targets"])
    headers = ["KPI", "target", *targets]
    lines = []
    for k in defs:
        measured = [section["targets"][t]["kpis"][k.id] for t in targets]
        cells = [_cell(m["value"], m["pass"], k.unit) for m in measured]
        lines.append([k.title, k.target_text(), *cells])
    out = render(headers, lines)
    cut = [t for t in targets if section["targets"][t]["interrupted"]]
    if cut:
        out += f"\n(interrupted: {', '.join(cut)}; their figures cover the requests that finished)"
    return out
