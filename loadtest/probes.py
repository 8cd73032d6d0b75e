"""Side measurements around a step: process CPU (psutil) and the worker's Prometheus counters."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any

import httpx
import psutil

from chatq.metrics_text import metric_sum

WORKER_COUNTERS = ("chatq_worker_chunks_total", "chatq_worker_output_tokens_total")


def cpu_seconds(pid: int, *, mode: str = "self") -> float | None:
    """User + system CPU seconds of a process: "self", "tree" (with its live descendants)
    or "children" (its live descendants only)."""
    try:
        root = psutil.Process(pid)
        procs = [] if mode == "children" else [root]
        if mode in ("tree", "children"):
            procs += root.children(recursive=True)
    except psutil.Error:
        return None
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += float(t.user + t.system)
    return total


@dataclass
class CpuProbe:
    """CPU use of a few processes between begin() and end(), in % of one core."""

    pids: dict[str, tuple[int, str]]  # name → (pid, mode of cpu_seconds)
    _t0: float = 0.0
    _c0: dict[str, float | None] | None = None

    def begin(self) -> None:
        self._t0 = time.perf_counter()
        self._c0 = {name: cpu_seconds(pid, mode=mode) for name, (pid, mode) in self.pids.items()}

    def end(self) -> dict[str, float | None]:
        wall = time.perf_counter() - self._t0
        out: dict[str, float | None] = {}
        for name, (pid, mode) in self.pids.items():
            before = (self._c0 or {}).get(name)
            after = cpu_seconds(pid, mode=mode)
            if before is None or after is None or wall <= 0:
                out[name] = None
            else:
                out[name] = round(100.0 * (after - before) / wall, 1)
        return out


def cpu_probe(api_pid: int | None, worker_pid: int | None) -> CpuProbe:
    """The client itself, the API process, and the engine side: chatq's worker with its
    vLLM engine core, or the engine core processes under vLLM's own server."""
    pids: dict[str, tuple[int, str]] = {"client": (os.getpid(), "self")}
    if api_pid is not None:
        pids["api"] = (api_pid, "self")
    if worker_pid is not None and worker_pid != api_pid:
        pids["worker"] = (worker_pid, "tree")
    elif worker_pid is not None:
        pids["worker"] = (worker_pid, "children")  # vLLM's server: its engine core
    return CpuProbe(pids)


async def worker_counters(http: httpx.AsyncClient, url: str | None) -> dict[str, float | None]:
    """The worker's chunk and token counters now (None when there is no metrics URL)."""
    if url is None:
        return {}
    try:
        response = await http.get(url, timeout=5)
        text = response.text
    except httpx.HTTPError:
        return dict.fromkeys(WORKER_COUNTERS)
    return {name: metric_sum(text, name) for name in WORKER_COUNTERS}


def counter_delta(before: dict[str, float | None], after: dict[str, float | None]) -> dict[str, Any]:
    """Chunks, tokens and chunk messages per output token between two scrapes."""
    if not before or not after:
        return {}
    chunks0, chunks1 = before.get(WORKER_COUNTERS[0]), after.get(WORKER_COUNTERS[0])
    tokens0, tokens1 = before.get(WORKER_COUNTERS[1]), after.get(WORKER_COUNTERS[1])
    if None in (chunks0, chunks1, tokens0, tokens1):
        return {}
    assert chunks0 is not None and chunks1 is not None and tokens0 is not None and tokens1 is not None
    chunks, tokens = chunks1 - chunks0, tokens1 - tokens0
    return {
        "worker_chunks": chunks,
        "worker_tokens": tokens,
        "messages_per_token": round(chunks / tokens, 4) if tokens > 0 else None,
    }
