"""The soak: steady load on the whole service for a long while, then what leaked and what was lost.

`python -m loadtest --scenario soak --minutes 30 [--sessions 10] [--max-tokens 32]`:
the launcher's stack with accounts (NATS, PostgreSQL, Redis, the API, persistence,
telemetry, one synthetic worker) and `sessions` closed-loop streaming clients, each as a
user's API key, for `minutes`. It reports the RSS of every process of the stack at the
start (after a warm-up) and at the end, every request that failed (errors: must be 0),
and what PostgreSQL holds for the requests sent: a `requests` row and an answer in
`messages` each (lost: must be 0). Exit status 1 when anything failed or was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from loadtest.targets import REPO_ROOT, _user_key, stack_env
from stack import process_table
from stack.servers import free_port
from stack.supervisor import launched, workers_ready

MODEL = "soak-model"
WARMUP_S = 10.0
SAMPLE_EVERY_S = 30.0
PERSIST_WAIT_S = 120.0


@dataclass
class Sent:
    request_id: str | None
    status: int | None
    ok: bool
    error: str | None
    seconds: float


def process_rss(home: Path) -> dict[str, int]:
    """RSS in bytes of every process of the stack (under this one, or with its state folder on
    its command line: NATS, PostgreSQL and its backends), summed by a readable name."""
    procs = {p.pid: p for p in psutil.Process(os.getpid()).children(recursive=True)}
    for p in psutil.process_iter():
        try:
            if str(home) in " ".join(p.cmdline()):
                procs.setdefault(p.pid, p)
        except psutil.Error:
            continue
    found: dict[str, int] = {}
    for child in procs.values():
        try:
            cmd = child.cmdline()
            rss = child.memory_info().rss
            name = child.name()
        except psutil.Error:
            continue
        python = "python" in name or "python" in Path(cmd[0] if cmd else "").name
        if python and "-m" in cmd and cmd.index("-m") + 1 < len(cmd):
            name = cmd[cmd.index("-m") + 1]
        elif python:
            name = "python (other)"
        found[name] = found.get(name, 0) + rss
    return found


async def session(
    http: httpx.AsyncClient, key: str, index: int, until: float, max_tokens: int, sent: list[Sent]
) -> None:
    n = 0
    while time.monotonic() < until:
        n += 1
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"soak session {index} request {n}"}],
            "max_tokens": max_tokens,
            "stream": True,
        }
        started = time.monotonic()
        rid: str | None = None
        status: int | None = None
        try:
            async with http.stream(
                "POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
            ) as resp:
                status = resp.status_code
                rid = resp.headers.get("x-request-id")
                raw = (await resp.aread()).decode()
            ok = status == 200 and "event: error" not in raw and raw.rstrip().endswith("data: [DONE]")
            error = None if ok else f"{status}: {raw[-300:]}"
        except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
            ok, error = False, repr(exc)
        sent.append(Sent(rid, status, ok, error, time.monotonic() - started))


def stored(dsn: str, ids: list[str]) -> tuple[int, int]:
    """Of these request ids: how many have a finished `requests` row, how many an answer."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT count(*) FROM requests WHERE request_id = ANY(%s) AND status = 'completed'"
            " AND completion_tokens > 0",
            (ids,),
        ).fetchone()
        answers = conn.execute(
            "SELECT count(DISTINCT request_id) FROM messages"
            " WHERE request_id = ANY(%s) AND role = 'assistant'",
            (ids,),
        ).fetchone()
    return int(rows[0] if rows else 0), int(answers[0] if answers else 0)


def run(minutes: float, sessions: int, max_tokens: int, tokens_per_s: float, out: Path) -> int:
    home = Path(tempfile.mkdtemp(prefix="loadtest-soak-")) / "home"
    env = stack_env(
        INFERENCE_ENGINE="synthetic",
        MODEL_NAME=MODEL,
        SYNTH_TOKENS_PER_S=f"{tokens_per_s:g}",
        SYNTH_TTFT_MS="20",
        # Limits far above the load, but on: every request runs every check.
        RATE_LIMIT_USER_RPM="100000000",
        RATE_LIMIT_USER_TPM="1000000000",
        RATE_LIMIT_USER_CONCURRENCY="100000",
    )
    specs = [
        process_table.INFERENCE_WORKER.with_env(WORKER_METRICS_PORT=str(free_port()), WORKER_ID="soak"),
        process_table.API.with_env(CHATQ_PORT=str(free_port())),
        process_table.PERSISTENCE,
        process_table.TELEMETRY.with_env(TELEMETRY_PORT=str(free_port())),
    ]
    out.mkdir(parents=True, exist_ok=True)
    samples: list[dict[str, Any]] = []
    with launched(
        home, env, specs, ready=workers_ready(1), timeout=300, logdir=out / "logs", cwd=REPO_ROOT
    ) as sup:
        assert sup.database_url
        key = _user_key(sup.database_url)
        url = sup.api_urls[0]
        sent: list[Sent] = []

        async def load() -> None:
            limits = httpx.Limits(max_connections=sessions + 4, max_keepalive_connections=sessions + 4)
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
                warm: list[Sent] = []
                await asyncio.gather(
                    *(
                        session(http, key, i, time.monotonic() + WARMUP_S, max_tokens, warm)
                        for i in range(sessions)
                    )
                )
                sent.extend(warm)  # sent too: they must be stored like the rest
                samples.append({"t": 0.0, "rss": process_rss(home)})
                print(
                    f"soak: warm ({len(warm)} requests); {sessions} sessions for {minutes:g} min", flush=True
                )
                t0 = time.monotonic()
                until = t0 + minutes * 60
                tasks = [
                    asyncio.ensure_future(session(http, key, i, until, max_tokens, sent))
                    for i in range(sessions)
                ]
                while not all(t.done() for t in tasks):
                    await asyncio.wait(tasks, timeout=SAMPLE_EVERY_S)
                    samples.append({"t": round(time.monotonic() - t0, 1), "rss": process_rss(home)})
                    errors = sum(not s.ok for s in sent)
                    print(
                        f"soak: {samples[-1]['t']:.0f} s, {len(sent)} requests, {errors} errors", flush=True
                    )
                await asyncio.gather(*tasks)

        started = time.monotonic()
        asyncio.run(load())
        duration = time.monotonic() - started
        ids = [s.request_id for s in sent if s.request_id]
        deadline = time.monotonic() + PERSIST_WAIT_S
        rows, answers = stored(sup.database_url, ids)
        while (rows < len(sent) or answers < len(sent)) and time.monotonic() < deadline:
            time.sleep(1.0)
            rows, answers = stored(sup.database_url, ids)
        end_rss = process_rss(home)
        alive = {
            name: child.process is not None and child.process.alive() for name, child in sup.children.items()
        }
        restarts = {name: child.restarts for name, child in sup.children.items()}

    errors = [s for s in sent if not s.ok]
    first, last = samples[0]["rss"], end_rss
    report = {
        "scenario": "soak",
        "minutes": minutes,
        "sessions": sessions,
        "max_tokens": max_tokens,
        "synth_tokens_per_s": tokens_per_s,
        "duration_s": round(duration, 1),
        "requests_sent": len(sent),
        "requests_per_s": round(len(sent) / duration, 2),
        "errors": len(errors),
        "error_kinds": dict(Counter((e.error or "")[:80] for e in errors).most_common(10)),
        "without_request_id": len(sent) - len(ids),
        "rows_in_requests": rows,
        "answers_in_messages": answers,
        "lost_rows": len(sent) - rows,
        "lost_answers": len(sent) - answers,
        "slowest_request_s": round(max((s.seconds for s in sent), default=0.0), 3),
        "rss_mib": {
            name: {
                "start": round(first.get(name, 0) / 2**20, 1),
                "end": round(last.get(name, 0) / 2**20, 1),
                "peak": round(max(s["rss"].get(name, 0) for s in [*samples, {"rss": last}]) / 2**20, 1),
            }
            for name in sorted(set(first) | set(last))
        },
        "children_alive_at_end": alive,
        "restarts": restarts,
        "samples": samples,
        "first_errors": [asdict(e) for e in errors[:20]],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"soak: {minutes:g} min, {sessions} sessions, max_tokens {max_tokens}, "
        f"synthetic engine at {tokens_per_s:g} tokens/s per stream",
        f"requests sent {len(sent)} ({report['requests_per_s']}/s), errors {len(errors)}, "
        f"rows in requests {rows} (lost {report['lost_rows']}), answers in messages {answers} "
        f"(lost {report['lost_answers']}), slowest {report['slowest_request_s']} s",
        f"children alive at the end: {alive}; restarts: {restarts}",
        "RSS (MiB)            start    end   peak",
        *(
            f"  {name:<18} {r['start']:>6} {r['end']:>6} {r['peak']:>6}"
            for name, r in report["rss_mib"].items()  # type: ignore[attr-defined]
        ),
    ]
    (out / "report.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    failed = errors or report["lost_rows"] or report["lost_answers"] or not all(alive.values())
    return 1 if failed else 0


def main(args: argparse.Namespace, out: Path) -> int:
    """The soak scenario of `python -m loadtest`; results in `out`."""
    return run(args.minutes, args.sessions, args.max_tokens, args.synth_tokens_per_s or 50.0, out)
