"""The workloads: closed-loop steps, open-loop rate and overload, and many held streams.

Each step records every request (RequestResult), the step's start and end, and the
probes around it (process CPU, the worker's chunk and token counters). A step that is
interrupted (Ctrl-C, SIGTERM: the running task is cancelled) still keeps the requests
that had finished, marked `interrupted`.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from loadtest.client import ChatClient, RequestResult, make_http_client
from loadtest.config import DEFAULT_RATES, RunConfig, SynthConfig
from loadtest.probes import counter_delta, cpu_probe, worker_counters
from loadtest.prompts import PromptSet
from loadtest.rawclient import RawChatClient
from loadtest.targets import Target

PAUSE_BETWEEN_STEPS_S = 1.0
STREAMS_SETTLE_S = 1.0
OPEN_LOOP_KEEPALIVE = 32
CHATQ_MAX_TOKENS = 4096  # chatq's default CHATQ_MAX_TOKENS
KPI_SESSIONS = 5  # the plan's requests/min KPI is at 5 concurrent sessions


@dataclass
class StepResult:
    target: str
    kind: str
    scenario: str
    label: str
    x: float  # concurrency, arrival rate or number of streams
    params: dict[str, Any]
    results: list[RequestResult]
    t0: float  # perf_counter at the step's start
    t1: float  # perf_counter when its last request ended
    probes: dict[str, Any] = field(default_factory=dict)
    window: tuple[float, float] | None = None  # steady window (streams), perf_counter
    synth: SynthConfig | None = None
    interrupted: bool = False  # cut short: only the requests that had finished


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def synthetic_token_count(text: str) -> int:
    """The synthetic engine's tokens are one word and a space each."""
    return text.count(" ")


@dataclass
class TargetRun:
    """Runs a scenario's steps against one started target."""

    target: Target
    cfg: RunConfig
    prompts: PromptSet
    warmup_prompts: PromptSet
    # kpi: prompts whose model input is cfg.kpi_context_tokens long (the TTFT step)
    context_prompts: PromptSet | None = None
    tick: Callable[[str], None] = _stderr  # the periodic progress lines
    steps: list[StepResult] = field(default_factory=list)
    _counter: Iterator[int] = field(default_factory=itertools.count)

    def next_prompt(self, prompts: PromptSet | None = None) -> tuple[int, str]:
        """The next request's index and prompt; the same sequence for every target."""
        index = next(self._counter)
        return index, (prompts or self.prompts)[index]

    def client(self, http: httpx.AsyncClient, max_tokens: int | None = None) -> ChatClient:
        t = self.target
        return ChatClient(
            http,
            t.base_url,
            model=t.model,
            api_key=t.api_key,
            max_tokens=max_tokens or self.cfg.max_tokens,
            temperature=self.cfg.temperature,
            output_range_ratio=self.cfg.output_range_ratio,
            seed=self.cfg.seed,
            token_counter=synthetic_token_count if t.kind == "synthetic" else None,
        )

    async def run(self, progress: Callable[[str], None]) -> list[StepResult]:
        """Warm up, then measure every step; finished steps stay in self.steps on failure."""
        cfg = self.cfg
        async with httpx.AsyncClient() as probe_http:
            await self.warm_up(progress)
            if cfg.scenario == "steps":
                for n in cfg.concurrency:
                    await self.measure(probe_http, f"c={n}", n, self.closed_loop(n), progress)
                    await self.between_steps()
            elif cfg.scenario == "kpi":
                # TTFT at a long context, one session (the prompt alone, no queueing),
                # then requests/min at the plan's 5 sessions with the ordinary prompts.
                context = self.context_prompts
                assert context is not None, "the kpi scenario needs context_prompts"
                label = f"ctx={cfg.kpi_context_tokens}"
                await self.measure(probe_http, label, 1, self.closed_loop(1, context), progress)
                await self.between_steps()
                n = KPI_SESSIONS
                await self.measure(probe_http, f"c={n}", n, self.closed_loop(n), progress)
            elif cfg.scenario == "admission":
                # Each rate is a multiple of the synthetic worker's capacity (cfg.loads).
                for load, rate in zip(cfg.loads, cfg.rates, strict=True):
                    label = f"{load:g}x={rate:g}/s"
                    await self.measure(probe_http, label, rate, self.open_loop(rate, load), progress)
                    await self.between_steps()
            elif cfg.scenario in ("rate", "overload"):
                for rate in cfg.rates or DEFAULT_RATES[cfg.scenario]:
                    await self.measure(probe_http, f"r={rate:g}/s", rate, self.open_loop(rate), progress)
                    await self.between_steps()
            else:
                self.steps.append(await self.streams(probe_http, progress))
        return self.steps

    async def between_steps(self) -> None:
        self.target.check_alive()
        await asyncio.sleep(PAUSE_BETWEEN_STEPS_S)

    async def warm_up(self, progress: Callable[[str], None]) -> None:
        """A few requests first (not recorded): the first requests of an engine are slow."""
        if self.cfg.warmup <= 0:
            return
        async with make_http_client(2, self.cfg.request_timeout_s) as http:
            client = self.client(http)
            for i in range(self.cfg.warmup):
                result = await client.chat(-1 - i, self.warmup_prompts[i])
                if not result.ok:
                    progress(f"  warm-up request failed: {result.error} {result.detail[:200]}")

    async def measure(
        self,
        probe_http: httpx.AsyncClient,
        label: str,
        x: float,
        workload: _Workload,
        progress: Callable[[str], None],
    ) -> StepResult:
        """Run one step; it goes to self.steps when it ends, or when it is cancelled."""
        t = self.target
        cpu = cpu_probe(t.api_pids, t.worker_pids)
        before = await worker_counters(probe_http, t.worker_metrics_urls)
        cpu.begin()
        t0 = time.perf_counter()
        ticker = asyncio.create_task(self.tick_progress(label, workload, t0))
        try:
            results, params = await workload.run()
        except asyncio.CancelledError:
            # Interrupted: keep what had finished; no awaiting here (the task is going away).
            done = list(workload.results)
            params = {**workload.params(), "interrupted": True}
            self.steps.append(self._step(label, x, params, done, t0, cpu.end(), {}, interrupted=True))
            progress(f"  {t.name} {label}: interrupted; {len(done)} finished requests kept")
            raise
        finally:
            ticker.cancel()
        usage = cpu.end()
        after = await worker_counters(probe_http, t.worker_metrics_urls)
        step = self._step(label, x, params, results, t0, usage, counter_delta(before, after))
        self.steps.append(step)
        ok = sum(1 for r in results if r.ok)
        progress(f"  {t.name} {label}: {len(results)} requests, {ok} ok, {step.t1 - t0:.1f} s")
        return step

    def _step(
        self,
        label: str,
        x: float,
        params: dict[str, Any],
        results: list[RequestResult],
        t0: float,
        usage: dict[str, float | None],
        counters: dict[str, Any],
        interrupted: bool = False,
    ) -> StepResult:
        t = self.target
        return StepResult(
            target=t.name,
            kind=t.kind,
            scenario=self.cfg.scenario,
            label=label,
            x=x,
            params=params,
            results=results,
            t0=t0,
            t1=max((r.end for r in results), default=time.perf_counter()),
            probes={"cpu_percent": usage, **counters},
            synth=t.synth,
            interrupted=interrupted,
        )

    async def tick_progress(self, label: str, workload: _Workload, t0: float) -> None:
        """Every cfg.progress_s: the step, elapsed of its planned seconds, requests and errors."""
        total = self.cfg.step_seconds
        while True:
            await asyncio.sleep(self.cfg.progress_s)
            elapsed = time.perf_counter() - t0
            done = workload.results
            errors = sum(1 for r in done if not r.ok)
            tail = "" if elapsed <= total else " (waiting for the last requests)"
            self.tick(
                f"progress: {self.target.name} {label} {elapsed:.0f}/{total:.0f} s, "
                f"{len(done)} requests, {errors} errors{tail}"
            )

    # --- workloads ------------------------------------------------------------------

    def closed_loop(self, sessions: int, prompts: PromptSet | None = None) -> _Workload:
        return _ClosedLoop(self, sessions, prompts)

    def open_loop(self, rate: float, load: float | None = None) -> _Workload:
        return _OpenLoop(self, rate, load)

    async def streams(self, probe_http: httpx.AsyncClient, progress: Callable[[str], None]) -> StepResult:
        """Hold K streams at the synthetic engine's pace; measure over a steady window."""
        cfg, t = self.cfg, self.target
        k = cfg.streams
        rate = cfg.synth.tokens_per_s
        ramp = cfg.ramp_seconds
        hold = cfg.step_seconds
        max_tokens = math.ceil((ramp + STREAMS_SETTLE_S + hold + 1.0) * rate) + 1
        if max_tokens > CHATQ_MAX_TOKENS:
            progress(
                f"  note: streams need max_tokens={max_tokens}, above chatq's default limit "
                f"CHATQ_MAX_TOKENS={CHATQ_MAX_TOKENS}: shorten --step-seconds or --ramp-seconds"
            )
        cpu = cpu_probe(t.api_pids, t.worker_pids)
        before = await worker_counters(probe_http, t.worker_metrics_urls)
        usage: dict[str, float | None] = {}
        # One request per stream: no connection is worth keeping (see make_http_client).
        async with make_http_client(None, cfg.request_timeout_s, keepalive=0) as http:
            client = self.client(http, max_tokens)
            # The lean client by default: httpx's per-event cost would starve the server.
            raw = RawChatClient(t.base_url, b"", t.api_key) if cfg.lean_client else None
            t0 = time.perf_counter()
            w0, w1 = t0 + ramp + STREAMS_SETTLE_S, t0 + ramp + STREAMS_SETTLE_S + hold

            async def probe() -> None:
                await asyncio.sleep(max(0.0, w0 - time.perf_counter()))
                cpu.begin()
                await asyncio.sleep(max(0.0, w1 - time.perf_counter()))
                usage.update(cpu.end())

            probing = asyncio.create_task(probe())
            tasks: list[asyncio.Task[RequestResult]] = []
            max_lag = 0.0
            for i in range(k):
                due = t0 + ramp * i / k
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                max_lag = max(max_lag, time.perf_counter() - due)
                index, prompt = self.next_prompt()
                if raw is not None:
                    tasks.append(asyncio.create_task(raw.chat(index, client.body(prompt, max_tokens))))
                else:
                    tasks.append(asyncio.create_task(client.chat(index, prompt)))
            results = list(await asyncio.gather(*tasks))
            await probing
        t1 = max((r.end for r in results), default=time.perf_counter())
        after = await worker_counters(probe_http, t.worker_metrics_urls)
        ok = sum(1 for r in results if r.ok)
        progress(f"  {t.name} K={k}: {len(results)} streams, {ok} ok, {t1 - t0:.1f} s")
        return StepResult(
            target=t.name,
            kind=t.kind,
            scenario="streams",
            label=f"K={k}",
            x=k,
            params={
                "streams": k,
                "tokens_per_s": rate,
                "max_tokens": max_tokens,
                "ramp_s": ramp,
                "settle_s": STREAMS_SETTLE_S,
                "hold_s": hold,
                "max_schedule_lag_ms": round(max_lag * 1000, 1),
            },
            results=results,
            t0=t0,
            t1=t1,
            probes={"cpu_percent": usage, **counter_delta(before, after)},
            window=(w0, w1),
            synth=t.synth,
        )


class _Workload:
    """A step's load; `results` holds every request that has finished so far."""

    results: list[RequestResult]

    async def run(self) -> tuple[list[RequestResult], dict[str, Any]]:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """The step's parameters as far as they are known before it ends."""
        raise NotImplementedError


class _ClosedLoop(_Workload):
    """N sessions, each sending its next request as soon as the previous one ended."""

    def __init__(self, run: TargetRun, sessions: int, prompts: PromptSet | None = None) -> None:
        self.runner = run
        self.sessions = sessions
        self.prompts = prompts
        self.results = []

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"concurrency": self.sessions, "seconds": self.runner.cfg.step_seconds}
        if self.prompts is not None:
            out["prompt_tokens"] = self.prompts.tokens
            out["context_tokens"] = self.prompts.rendered_tokens
        return out

    async def run(self) -> tuple[list[RequestResult], dict[str, Any]]:
        cfg = self.runner.cfg
        async with make_http_client(self.sessions, cfg.request_timeout_s) as http:
            client = self.runner.client(http)
            end = time.perf_counter() + cfg.step_seconds

            async def session() -> None:
                while time.perf_counter() < end:
                    index, prompt = self.runner.next_prompt(self.prompts)
                    result = await client.chat(index, prompt)
                    self.results.append(result)
                    if not result.ok:
                        await asyncio.sleep(0.05)  # a failing server must not be spun on

            await asyncio.gather(*(session() for _ in range(self.sessions)))
        return self.results, self.params()


class _OpenLoop(_Workload):
    """Requests arrive at a fixed mean rate (Poisson or evenly spaced), whatever the answers."""

    def __init__(self, run: TargetRun, rate: float, load: float | None = None) -> None:
        self.runner = run
        self.rate = rate
        self.load = load  # admission: the rate as a multiple of the worker's capacity
        self.results = []

    def params(self) -> dict[str, Any]:
        cfg = self.runner.cfg
        out: dict[str, Any] = {"rate": self.rate, "arrival": cfg.arrival, "seconds": cfg.step_seconds}
        if self.load is not None:
            out["load"] = self.load
        return out

    def arrivals(self) -> list[float]:
        cfg = self.runner.cfg
        rng = random.Random(cfg.seed)
        times: list[float] = []
        t = 0.0
        while True:
            t += rng.expovariate(self.rate) if cfg.arrival == "poisson" else 1.0 / self.rate
            if t >= cfg.step_seconds:
                return times
            times.append(t)

    async def run(self) -> tuple[list[RequestResult], dict[str, Any]]:
        cfg = self.runner.cfg
        arrivals = self.arrivals()
        tasks: list[asyncio.Task[RequestResult]] = []
        dropped = 0
        max_lag = 0.0
        inflight = 0

        def finished(task: asyncio.Task[RequestResult]) -> None:
            nonlocal inflight
            inflight -= 1
            if not task.cancelled() and task.exception() is None:
                self.results.append(task.result())

        async with make_http_client(None, cfg.request_timeout_s, keepalive=OPEN_LOOP_KEEPALIVE) as http:
            client = self.runner.client(http)
            start = time.perf_counter()
            refusals = itertools.count()

            async def request(index: int, prompt: str) -> RequestResult:
                result = await client.chat(index, prompt)
                if (
                    cfg.scenario != "admission"
                    or result.error != "http_429"
                    or next(refusals) % cfg.retry_every
                ):
                    return result
                # Is the Retry-After honest? Retry once after it, while the load still runs.
                wait = float(result.retry_after or 0)
                if time.perf_counter() + wait > start + cfg.step_seconds:
                    return result
                await asyncio.sleep(wait)
                result.retry_ok = (await client.chat(index, prompt)).ok
                return result

            for at in arrivals:
                delay = start + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                max_lag = max(max_lag, time.perf_counter() - start - at)
                if inflight >= cfg.max_inflight:
                    dropped += 1
                    continue
                index, prompt = self.runner.next_prompt()
                task = asyncio.create_task(request(index, prompt))
                inflight += 1
                task.add_done_callback(finished)
                tasks.append(task)
            results = list(await asyncio.gather(*tasks))
        return results, {
            **self.params(),
            "scheduled": len(arrivals),
            "dropped_by_client": dropped,
            "max_schedule_lag_ms": round(max_lag * 1000, 1),
        }
