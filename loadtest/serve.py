"""python -m loadtest.serve: start one target as the load test would, and keep it up.

For outside clients (vLLM's own benchmark client, curl, the openai SDK): prints the base
URL, model and API key, then waits until Ctrl-C or SIGTERM and stops everything it
started.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from loadtest.cli import STREAMS_TOKENS_PER_S, default_model_dir
from loadtest.config import API_KEY, MODEL_NAME, TARGET_KINDS, EngineConfig, RunConfig, SynthConfig
from loadtest.targets import TargetError, make_target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.serve", description=__doc__)
    p.add_argument("--target", choices=TARGET_KINDS, default="chatq")
    p.add_argument("--slots", type=int, default=16, help="vLLM max_num_seqs = chatq WORKER_SLOTS")
    p.add_argument("--queue-max", type=int, help="CHATQ_QUEUE_MAX (default: chatq's)")
    p.add_argument("--synth-tokens-per-s", type=float, default=STREAMS_TOKENS_PER_S)
    p.add_argument("--synth-ttft-ms", type=float, default=50.0)
    p.add_argument("--synth-slots", type=int, default=2000)
    p.add_argument("--logs", type=Path, default=Path("loadtest/results/serve"), help="log directory")
    args = p.parse_args(argv)

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    cfg = RunConfig(
        scenario="steps",
        targets=(args.target,),
        queue_max=args.queue_max,
        model_dir=default_model_dir(),
        model_name=MODEL_NAME,
        out_dir=args.logs.resolve(),
        engine=EngineConfig(max_num_seqs=args.slots),
        synth=SynthConfig(
            tokens_per_s=args.synth_tokens_per_s, ttft_ms=args.synth_ttft_ms, slots=args.synth_slots
        ),
    )
    target = make_target(args.target, cfg)
    print(f"starting {args.target} (logs in {cfg.out_dir / 'logs' / args.target}) ...", flush=True)
    try:
        with target:
            print(f"base URL: {target.base_url}", flush=True)
            print(f"model:    {target.model}", flush=True)
            print(f"API key:  {API_KEY}", flush=True)
            for url in target.worker_metrics_urls:
                print(f"worker metrics: {url}", flush=True)
            print("Ctrl-C to stop", flush=True)
            while True:
                time.sleep(1)
                target.check_alive()
    except KeyboardInterrupt:
        pass
    except TargetError as exc:
        print(f"{args.target} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
