"""An offline model of the admission scenario: what a bound can reach with perfect information.

Not a benchmark (it runs no chatq part): an M/D/c queue in the admission scenario's
shape (c slots, Poisson arrivals at `load` × capacity, each job holding its slot for its
TTFT plus its tokens), under two bounds computed from exact, instantaneous state:

- `depth`: the rate bound of api/admission.py, `max(1, free + floor(capacity × T))`;
- `release`: the release-time bound, the free slots plus the releases due within T.

It prints each one's queue wait p50 / p90 / p99 over many steps of `--seconds`, starting
empty (a step's start) or with the slots' phases spread (a long-running steady state).
It showed that the rate bound's measured 3× TTFT p99 (~1.25 s) is what that bound
reaches even with perfect information, in a 30 s step that starts with a burst: the
burst leaves the slots' releases clustered, and the first in line waits for the next
cluster. Usage: `python -m loadtest.simulate_admission [--load 3] [--seconds 30]`.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random


def run(
    *,
    load: float,
    seconds: float,
    seed: int,
    policy: str,
    slots: int = 8,
    ttft_s: float = 0.5,
    token_s: float = 0.05,
    tokens: int = 16,
    range_ratio: float = 0.0,
    target_s: float = 0.25,
    spread: bool = False,
) -> list[float]:
    """The queue waits (seconds) of the admitted requests of one step."""
    rnd = random.Random(seed)
    hold = ttft_s + (tokens - 1) * token_s
    capacity = slots / hold
    ends: list[float] = []  # when the running jobs free their slots
    queue: list[float] = []  # arrival times of the admitted jobs that wait, in order
    waits: list[float] = []

    def job_s() -> float:
        if not range_ratio:
            return hold
        n = rnd.randint(int(tokens * (1 - range_ratio)), int(tokens * (1 + range_ratio)))
        return ttft_s + (n - 1) * token_s

    if spread:
        for _ in range(slots):
            heapq.heappush(ends, rnd.uniform(0, hold))
    now = 0.0
    while now < seconds:
        now += rnd.expovariate(load * capacity)
        while ends and ends[0] <= now:
            freed = heapq.heappop(ends)
            if queue:
                waits.append(freed - queue.pop(0))
                heapq.heappush(ends, freed + job_s())
        free = slots - len(ends)
        if policy == "depth":
            admit = len(queue) < max(1, free + int(capacity * target_s))
        else:
            due = sum(1 for at in ends if at <= now + target_s)
            admit = len(queue) < free + due
        if admit:
            if free:
                waits.append(0.0)
                heapq.heappush(ends, now + job_s())
            else:
                queue.append(now)
    return waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", type=float, default=3.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--range-ratio", type=float, default=0.0)
    args = parser.parse_args()
    shape = "8 slots, TTFT 500 ms, 16 tokens at 20/s"
    print(f"load {args.load}×, {args.steps} steps of {args.seconds:g} s, {shape}")
    print("policy   start     wait ms p50 / p90 / p99")
    for policy in ("depth", "release"):
        for spread in (False, True):
            waits = sorted(
                itertools.chain.from_iterable(
                    run(
                        load=args.load,
                        seconds=args.seconds,
                        seed=seed,
                        policy=policy,
                        range_ratio=args.range_ratio,
                        spread=spread,
                    )
                    for seed in range(args.steps)
                )
            )
            p = [waits[int(q * (len(waits) - 1))] * 1000 for q in (0.5, 0.9, 0.99)]
            start = "spread" if spread else "empty"
            print(f"{policy:8s} {start:8s}  {p[0]:.0f} / {p[1]:.0f} / {p[2]:.0f}")


if __name__ == "__main__":
    main()
