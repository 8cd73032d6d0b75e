"""The same streams straight on the vLLM engine, in-process: what chatq costs on top.

python -m loadtest.engine_direct [--concurrency 1,5] [--requests 20] [--prompt-tokens 256]
                                 [--max-tokens 32]

Starts chatq's own VllmEngine (same settings and OpenAI layer as the worker), then for each concurrency
level keeps N requests in flight until --requests have finished, and prints TTFT and
output tokens/s. No HTTP, no NATS: the floor that chatq and vLLM's server add to.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path

from chatq.settings import load
from loadtest.prompts import build_prompts, load_tokenizer
from loadtest.stats import dist
from workers.inference.engine import OpenAIRequest, Progress
from workers.inference.vllm_engine import VllmEngine


async def one(engine: VllmEngine, prompt: str, max_tokens: int) -> tuple[float | None, float, int]:
    """TTFT (s), end-to-end (s) and output tokens of one request, through vLLM's OpenAI layer."""
    body = {
        "model": engine.model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0.8,
        "max_tokens": max_tokens,
        "stream": True,
    }
    request = OpenAIRequest(uuid.uuid4().hex, "chat", json.dumps(body).encode(), stream=True)
    start = time.perf_counter()
    first: list[float] = []
    progress = Progress(on_first_token=lambda: first.append(time.perf_counter() - start))
    answer = await engine.serve(request, progress)
    assert not isinstance(answer, str)
    async for _ in answer:
        pass
    return (first[0] if first else None), time.perf_counter() - start, progress.completion_tokens


async def level(
    engine: VllmEngine, prompts: list[str], concurrency: int, max_tokens: int
) -> dict[str, object]:
    queue = list(prompts)
    results: list[tuple[float | None, float, int]] = []

    async def session() -> None:
        while queue:
            results.append(await one(engine, queue.pop(), max_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(session() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    tokens = sum(r[2] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "ttft_ms": dist(r[0] for r in results),
        "e2e_ms": dist(r[1] for r in results),
        "output_tokens_per_s": round(tokens / wall, 2),
        "requests_per_min": round(len(results) / wall * 60, 2),
    }


async def main_async(args: argparse.Namespace) -> list[dict[str, object]]:
    settings = load()
    engine = VllmEngine(settings)
    started = time.perf_counter()
    await engine.start()
    print(f"engine start: {time.perf_counter() - started:.1f} s ({engine.slots} slots)", flush=True)
    model_dir = settings.models_dir / settings.model_name
    prompts = build_prompts(load_tokenizer(model_dir), tokens=args.prompt_tokens, count=args.requests, seed=1)
    try:
        await level(engine, list(prompts.prompts[:2]), 1, 4)  # warm-up
        rows = []
        for concurrency in args.concurrency:
            row = await level(engine, list(prompts.prompts), concurrency, args.max_tokens)
            rows.append(row)
            ttft = row["ttft_ms"]
            assert isinstance(ttft, dict)
            print(
                f"in-process vLLM  c={concurrency:<3} TTFT p50 {ttft.get('p50')} ms  "
                f"p99 {ttft.get('p99')} ms  {row['output_tokens_per_s']} tok/s  "
                f"{row['requests_per_min']} req/min",
                flush=True,
            )
        return rows
    finally:
        await engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 5])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    rows = asyncio.run(main_async(args))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":  # vLLM spawns its engine core: the guard is required
    main()
