"""Side measurements around a step: process CPU (psutil) and the worker's Prometheus counters."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
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

    # name → the processes it adds up (pid, mode of cpu_seconds): "api" is every API process
    pids: dict[str, list[tuple[int, str]]]
    _t0: float = 0.0
    _c0: dict[str, float | None] | None = None

    def _seconds(self, name: str) -> float | None:
        found = [cpu_seconds(pid, mode=mode) for pid, mode in self.pids[name]]
        return None if None in found else sum(x for x in found if x is not None)

    def begin(self) -> None:
        self._t0 = time.perf_counter()
        self._c0 = {name: self._seconds(name) for name in self.pids}

    def end(self) -> dict[str, float | None]:
        wall = time.perf_counter() - self._t0
        out: dict[str, float | None] = {}
        for name in self.pids:
            before = (self._c0 or {}).get(name)
            after = self._seconds(name)
            if before is None or after is None or wall <= 0:
                out[name] = None
            else:
                out[name] = round(100.0 * (after - before) / wall, 1)
        return out


def cpu_probe(api_pids: Sequence[int], worker_pids: Sequence[int]) -> CpuProbe:
    """The client itself, the API processes, and the engine side: chatq's workers with
    their vLLM engine cores, or the engine core processes under vLLM's own server. Several
    API processes (or workers) add up: 150 % is one and a half cores."""
    pids: dict[str, list[tuple[int, str]]] = {"client": [(os.getpid(), "self")]}
    if api_pids:
        pids["api"] = [(pid, "self") for pid in api_pids]
    if worker_pids and list(worker_pids) != list(api_pids):
        pids["worker"] = [(pid, "tree") for pid in worker_pids]
    elif worker_pids:
        pids["worker"] = [(pid, "children") for pid in worker_pids]  # vLLM's server: its engine core
    return CpuProbe(pids)


async def worker_counters(http: httpx.AsyncClient, urls: Sequence[str]) -> dict[str, float | None]:
    """The workers' chunk and token counters now, added up ({} when there are no metrics
    URLs; None for a counter a worker did not answer)."""
    if not urls:
        return {}
    total: dict[str, float | None] = dict.fromkeys(WORKER_COUNTERS, 0.0)
    for url in urls:
        try:
            response = await http.get(url, timeout=5)
            text = response.text
        except httpx.HTTPError:
            return dict.fromkeys(WORKER_COUNTERS)
        for name in WORKER_COUNTERS:
            # A worker that has served nothing yet has no counter lines: 0.
            value, so_far = metric_sum(text, name) or 0.0, total[name]
            total[name] = None if so_far is None else so_far + value
    return total


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
