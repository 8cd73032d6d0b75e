"""The command line: parse, build prompts, run each target in turn, report.

The report (report.json, requests.jsonl) is written again after every target, so a run
that dies later, or is interrupted, keeps what it measured; the chart comes last and
only if matplotlib is there.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from loadtest.config import (
    DEFAULT_RATES,
    DEFAULT_TARGETS,
    MODEL_NAME,
    SCENARIOS,
    TARGET_KINDS,
    EngineConfig,
    RunConfig,
    Scenario,
    SynthConfig,
    known_target,
    parse_list,
    scaled_shape,
    synthetic_capacity,
)
from loadtest.targets import REPO_ROOT, Target, TargetError, external_target, make_target

if TYPE_CHECKING:
    from loadtest.prompts import PromptSet

DEFAULT_OUT = REPO_ROOT / "loadtest" / "results"
STREAMS_TOKENS_PER_S = 20.0
OTHER_TOKENS_PER_S = 50.0
EXIT_INTERRUPTED = 130  # as a shell reports a process ended by SIGINT
NO_CHART = (
    "chart: not drawn, matplotlib is not installed; `scripts/bootstrap.sh loadtest` installs it "
    "(the `loadtest` extra). The report above is complete."
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Streaming load test: chatq vs vLLM's own server vs chatq's synthetic engine.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--scenario", choices=SCENARIOS, default="steps")
    p.add_argument(
        "--targets",
        help="comma-separated, from chatq, vllm-server, synthetic (default: chatq,vllm-server,synthetic "
        "for steps and rate, chatq,vllm-server for kpi, chatq for overload, synthetic for streams)",
    )
    p.add_argument("--concurrency", default="1,5,10", help="steps: concurrent sessions per step")
    p.add_argument("--step-seconds", type=float, default=30.0, help="length of each step / window")
    p.add_argument("--prompt-tokens", type=int, default=256, help="tokens of each prompt's text")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request")
    p.add_argument(
        "--output-range-ratio", type=float, default=0.0,
        help="spread each request's max_tokens uniformly over --max-tokens × [1 − r, 1 + r] "
        "(the output half of vLLM bench's --random-range-ratio; 0: every request the same)",
    )  # fmt: skip
    p.add_argument(
        "--rate", help="rate/overload: arrival rates in requests/s, comma-separated (default 2; overload 20)"
    )
    p.add_argument("--arrival", choices=("poisson", "uniform"), default="poisson")
    p.add_argument(
        "--load", default="1,3",
        help="admission: arrival rates as multiples of the synthetic worker's capacity "
        "(--slots / (TTFT + --max-tokens / pace))",
    )  # fmt: skip
    p.add_argument(
        "--admission-wait-target-s", type=float,
        help="ADMISSION_WAIT_TARGET_S of the latency policy for every chatq target (default: chatq's)",
    )  # fmt: skip
    p.add_argument(
        "--admission-policy", choices=("depth", "latency"),
        help="ADMISSION_POLICY of the chatq, synthetic and scaled targets (default: chatq's; "
        "synthetic-depth and synthetic-latency keep their own)",
    )  # fmt: skip
    p.add_argument(
        "--retry-every", type=int, default=4, help="admission: retry every n-th 429 after Retry-After"
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results go to OUT/<timestamp>/")
    p.add_argument("--url", help="measure this already running server instead of starting targets")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="with --url")
    p.add_argument("--label", default="external", help="with --url: the target's name in the report")
    p.add_argument("--metrics-url", help="with --url: a chatq worker's /metrics, for messages per token")
    p.add_argument("--model-dir", type=Path, help="model directory (default: chatq's prepared SmolLM2)")
    p.add_argument("--model-name", default=MODEL_NAME)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy: the same output everywhere")
    p.add_argument("--num-prompts", type=int, default=1000, help="size of the seeded prompt pool")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--warmup", type=int, default=2, help="unrecorded requests per target before measuring")
    p.add_argument("--streams", type=int, default=1000, help="streams: concurrent streams held")
    p.add_argument("--ramp-seconds", type=float, default=5.0, help="streams: time to open them all")
    p.add_argument(
        "--httpx-streams",
        action="store_true",
        help="streams: use the full httpx client instead of the lean one (it costs ~40 µs of CPU per event)",
    )
    p.add_argument(
        "--synth-tokens-per-s", type=float, help=f"synthetic engine pace (default {OTHER_TOKENS_PER_S:g}; "
        f"streams {STREAMS_TOKENS_PER_S:g})",
    )  # fmt: skip
    p.add_argument("--synth-ttft-ms", type=float, default=50.0, help="synthetic engine time to first token")
    p.add_argument("--synth-slots", type=int, default=2000, help="synthetic WORKER_SLOTS (overload: --slots)")
    p.add_argument("--slots", type=int, default=16, help="vLLM max_num_seqs = chatq WORKER_SLOTS")
    p.add_argument("--queue-max", type=int, help="CHATQ_QUEUE_MAX for chatq targets (default: chatq's)")
    p.add_argument("--overload-queue-max", type=int, default=4, help="CHATQ_QUEUE_MAX in overload")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--max-inflight", type=int, default=5000, help="open loop: arrivals beyond are dropped")
    p.add_argument(
        "--kpi-context-tokens", type=int, default=2048,
        help="kpi: model input tokens (chat template included) of the TTFT step",
    )  # fmt: skip
    p.add_argument("--dtype", default=EngineConfig.dtype, help="vLLM dtype of both vLLM targets")
    p.add_argument(
        "--gpu-memory-utilization", type=float, default=EngineConfig.gpu_memory_utilization,
        help="vLLM gpu_memory_utilization of both vLLM targets (CPU build: share of host memory)",
    )  # fmt: skip
    p.add_argument("--minutes", type=float, default=30.0, help="soak: how long the steady load lasts")
    p.add_argument("--sessions", type=int, default=10, help="soak: concurrent closed-loop streaming sessions")
    p.add_argument("--progress-seconds", type=float, default=10.0, help="a progress line on stderr so often")
    return p


def build_config(args: argparse.Namespace, out_dir: Path, model_dir: Path) -> RunConfig:
    scenario: Scenario = args.scenario
    if args.url:
        targets: tuple[str, ...] = (args.label,)
    elif args.targets:
        targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
        unknown = [t for t in targets if not known_target(t)]
        if unknown:
            raise SystemExit(
                f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGET_KINDS)}, "
                "or synthetic-<N>w / synthetic-<M>api / synthetic-<N>w-<M>api (N workers, M API processes)"
            )
    else:
        targets = DEFAULT_TARGETS[scenario]
    if scenario == "admission" and (args.url or any(not t.startswith("synthetic") for t in targets)):
        raise SystemExit(
            "--scenario admission measures synthetic targets only (synthetic-depth, synthetic-latency)"
        )
    if (
        scenario == "streams"
        and not args.url
        and any(t != "synthetic" and not scaled_shape(t) for t in targets)
    ):
        raise SystemExit(
            "--scenario streams measures synthetic targets only "
            "(synthetic, or scaled ones such as synthetic-2api)"
        )
    rates: tuple[float, ...] = ()
    if scenario in ("rate", "overload"):
        rates = parse_list(args.rate, float) if args.rate else DEFAULT_RATES[scenario]
    tokens_per_s = args.synth_tokens_per_s or (
        STREAMS_TOKENS_PER_S if scenario == "streams" else OTHER_TOKENS_PER_S
    )
    synth = SynthConfig(tokens_per_s=tokens_per_s, ttft_ms=args.synth_ttft_ms, slots=args.synth_slots)
    loads = parse_list(args.load, float)
    if scenario == "admission":
        capacity = synthetic_capacity(args.slots, synth, args.max_tokens)
        rates = tuple(round(capacity * load, 3) for load in loads)
    if not 0 <= args.output_range_ratio < 1:
        raise SystemExit("--output-range-ratio must be at least 0 and below 1")
    if min(args.prompt_tokens, args.max_tokens, args.step_seconds, args.progress_seconds) <= 0:
        raise SystemExit("--prompt-tokens, --max-tokens, --step-seconds, --progress-seconds must be positive")
    room = EngineConfig.max_model_len
    if scenario == "kpi" and args.kpi_context_tokens + args.max_tokens > room:
        raise SystemExit(f"--kpi-context-tokens + --max-tokens must fit in max_model_len ({room} tokens)")
    return RunConfig(
        scenario=scenario,
        targets=targets,
        concurrency=parse_list(args.concurrency, int),
        rates=rates,
        arrival=args.arrival,
        step_seconds=args.step_seconds,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        output_range_ratio=args.output_range_ratio,
        temperature=args.temperature,
        num_prompts=args.num_prompts,
        seed=args.seed,
        warmup=args.warmup,
        streams=args.streams,
        ramp_seconds=args.ramp_seconds,
        lean_client=not args.httpx_streams,
        queue_max=args.queue_max,
        overload_queue_max=args.overload_queue_max,
        request_timeout_s=args.request_timeout,
        start_timeout_s=args.start_timeout,
        max_inflight=args.max_inflight,
        loads=loads,
        admission_wait_target_s=args.admission_wait_target_s,
        admission_policy=args.admission_policy,
        retry_every=max(1, args.retry_every),
        kpi_context_tokens=args.kpi_context_tokens,
        progress_s=args.progress_seconds,
        model_dir=model_dir,
        model_name=args.model_name,
        out_dir=out_dir,
        url=args.url,
        api_key=args.api_key,
        label=args.label,
        metrics_url=args.metrics_url,
        engine=EngineConfig(
            dtype=args.dtype, gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.slots
        ),
        synth=synth,
    )


def default_model_dir() -> Path:
    """chatq's default model, prepared under CHATQ_HOME/models (built once if missing)."""
    from catalog.model_prep import prepare_default_model

    home = Path(os.environ.get("CHATQ_HOME") or REPO_ROOT / ".chatq")
    return prepare_default_model(home / "models")


def _say(text: str) -> None:
    print(text, flush=True)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Outside the event loop (a target starting or stopping): unwinds through the
    # `with target:` blocks, so every started process is stopped, and the report of what
    # was measured so far is still written.
    raise KeyboardInterrupt


async def _cancel_on_sigterm(work: Any) -> Any:
    """Await `work`; SIGTERM cancels it as Ctrl-C does, so the step in progress is kept."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await work
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _on_sigterm)


def run_target(
    target: Target, cfg: RunConfig, prompts: Any, warm: Any, context: Any, into: list[Any]
) -> None:
    """Run the scenario against a started target; its steps go to `into`, even on failure.

    Ctrl-C or SIGTERM while it runs: the step in progress keeps its finished requests
    (marked interrupted) and KeyboardInterrupt is raised.
    """
    from loadtest.scenarios import TargetRun

    runner = TargetRun(target, cfg, prompts, warm, context_prompts=context)
    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as loop:
            loop.run(_cancel_on_sigterm(runner.run(_say)))
    except asyncio.CancelledError:  # SIGTERM (Ctrl-C comes out of the runner as KeyboardInterrupt)
        raise KeyboardInterrupt from None
    finally:
        into += runner.steps


def context_prompts(tokenizer: Any, cfg: RunConfig, overhead: int) -> PromptSet | None:
    """kpi: prompts whose whole model input is cfg.kpi_context_tokens long; else None."""
    from loadtest.prompts import build_prompts

    if cfg.scenario != "kpi":
        return None
    tokens = cfg.kpi_context_tokens - overhead
    if tokens < 1:
        raise SystemExit(f"--kpi-context-tokens must exceed the chat template's {overhead} tokens")
    return build_prompts(tokenizer, tokens=tokens, count=cfg.num_prompts, seed=cfg.seed + 2)


class RunReport:
    """What the run has measured so far, written to report.json and requests.jsonl."""

    def __init__(self, cfg: RunConfig, machine: dict[str, Any], prompts: dict[str, Any]) -> None:
        self.cfg = cfg
        self.machine = machine
        self.prompts = prompts
        self.started = time.monotonic()
        self.steps: list[Any] = []
        self.described: dict[str, Any] = {}
        self.failures: dict[str, str] = {}
        self.interrupted = False
        self.files: dict[str, str] = {"samples": "requests.jsonl"}
        self.json_path = cfg.out_dir / "report.json"
        self.samples_path = cfg.out_dir / "requests.jsonl"

    def rows(self) -> list[dict[str, Any]]:
        from loadtest.stats import summarize

        return [
            {
                "target": s.target,
                "kind": s.kind,
                "label": s.label,
                "x": s.x,
                "params": s.params,
                "interrupted": s.interrupted,
                "summary": summarize(s),
            }
            for s in self.steps
        ]

    def kpi(self, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        from loadtest import kpi
        from loadtest.scenarios import KPI_SESSIONS

        if self.cfg.scenario != "kpi":
            return None
        return kpi.evaluate(rows, list(self.cfg.targets), self.cfg.kpi_context_tokens, KPI_SESSIONS)

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Both files, each replaced whole (a reader never sees half a report)."""
        from loadtest import report
        from loadtest.stats import paired

        cfg = self.cfg
        body: dict[str, Any] = {
            "tool": "chatq loadtest",
            "format": 1,
            "scenario": cfg.scenario,
            "interrupted": self.interrupted,
            "config": {**cfg.to_json(), "prompts": self.prompts},
            "machine": self.machine,
            "targets": self.described,
            "steps": rows,
            "ratios": {
                "numerator": report.RATIO_NUMERATOR,
                "denominator": report.RATIO_DENOMINATOR,
                "by_step": report.ratios(rows),
                "paired_by_step": paired(self.steps),
            },
            "files": self.files,
            "failures": self.failures,
            "wall_seconds": round(time.monotonic() - self.started, 1),
        }
        kpi = self.kpi(rows)
        if kpi is not None:
            body["kpi"] = kpi
        samples_tmp = self.samples_path.with_name(self.samples_path.name + ".tmp")
        report.write_samples(samples_tmp, self.steps)
        samples_tmp.replace(self.samples_path)
        json_tmp = self.json_path.with_name(self.json_path.name + ".tmp")
        report.write_json(json_tmp, body)
        json_tmp.replace(self.json_path)


def draw_chart(run: RunReport, rows: list[dict[str, Any]]) -> None:
    """chart.png if matplotlib imports; otherwise one line saying how to get it."""
    try:
        import matplotlib  # noqa: F401  - only to know whether the chart can be drawn
    except ImportError:
        _say(NO_CHART)
        return
    from loadtest.chart import write_chart

    cfg, machine = run.cfg, run.machine
    path = cfg.out_dir / "chart.png"
    title = (
        f"chatq loadtest — {cfg.scenario}, prompt {cfg.prompt_tokens} tok, max_tokens {cfg.max_tokens}, "
        f"{machine['cores']} cores, {machine['date']}"
    )
    try:
        write_chart(path, cfg.scenario, rows, title)
    except Exception as exc:  # noqa: BLE001 - the chart is optional; the report is already written
        _say(f"chart: not drawn ({exc!r}); the report is complete")
        return
    run.files["chart"] = path.name
    run.write(rows)  # the report lists the chart now
    _say(f"chart:   {path}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = (args.out / stamp).resolve()
    if args.scenario == "soak":  # the whole stack with the synthetic engine; no model, no targets
        from loadtest import soak

        return soak.main(args, out_dir.with_name(f"{stamp}-soak"))
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir.resolve() if args.model_dir else default_model_dir()
    cfg = build_config(args, out_dir, model_dir)

    from loadtest import kpi, report
    from loadtest.prompts import build_prompts, load_tokenizer

    _say(f"loadtest: scenario {cfg.scenario}, targets {', '.join(cfg.targets)}; results in {out_dir}")
    started = time.monotonic()
    tokenizer = load_tokenizer(model_dir)
    prompts = build_prompts(tokenizer, tokens=cfg.prompt_tokens, count=cfg.num_prompts, seed=cfg.seed)
    warm = build_prompts(tokenizer, tokens=cfg.prompt_tokens, count=max(1, cfg.warmup), seed=cfg.seed + 1)
    context = context_prompts(tokenizer, cfg, prompts.template_overhead)
    described_prompts = prompts.describe()
    if context is not None:
        described_prompts["kpi_context"] = context.describe()
    _say(
        f"prompts: {len(prompts.prompts)} × {prompts.tokens} tokens "
        f"(+{prompts.template_overhead} chat-template tokens) in {time.monotonic() - started:.1f} s"
    )
    run = RunReport(cfg, report.machine(), described_prompts)

    for name in cfg.targets:
        target = external_target(cfg) if cfg.url else make_target(name, cfg)
        _say(f"[{name}] starting ...")
        load_before = [round(x, 2) for x in os.getloadavg()]
        try:
            with target:
                _say(f"[{name}] ready at {target.base_url} after {target.start_seconds} s")
                run_target(target, cfg, prompts, warm, context, run.steps)
        except (TargetError, OSError) as exc:
            run.failures[name] = str(exc)
            _say(f"[{name}] FAILED: {exc}")
        except KeyboardInterrupt:
            run.failures[name] = "interrupted"
            run.interrupted = True
            _say(f"[{name}] interrupted; writing the report of what was measured")
        finally:
            run.described[name] = {
                **target.describe(),
                "load_average_before": load_before,
                "load_average_after": [round(x, 2) for x in os.getloadavg()],
            }
            if name in run.failures:
                run.described[name]["failure"] = run.failures[name]
        _say(f"[{name}] stopped")
        run.write(run.rows())  # what this target measured is safe before anything else runs
        if run.interrupted:
            break

    rows = run.rows()
    run.write(rows)
    report.print_tables(cfg.scenario, rows, _say)
    section = run.kpi(rows)
    if section is not None:
        _say("")
        _say("== kpi: the plan's targets")
        _say(kpi.table(section))
    _say("")
    _say(f"report:  {run.json_path}")
    _say(f"samples: {run.samples_path}")
    if rows and not run.interrupted:
        draw_chart(run, rows)
    return EXIT_INTERRUPTED if run.interrupted else 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
