"""How many jobs a worker takes: its engine's slots, or with WORKER_TTFT_HOLD only as many
as the engine starts promptly; and the time a job holds a slot (WorkerStatus.job_s).

An engine given more slots than it starts promptly (vLLM's CPU build with 16 on 2 cores)
queues what it took inside itself, where admission cannot see it. With the hold on, the
worker takes no job while one has waited for its first token longer than `ttft_hold`
times the quickest recent first token, and it learns how many jobs to run at once:
additive increase on each first token on time, multiplicative decrease on a late one.
What the worker leaves in JetStream, admission counts as waiting (api/admission.py).

It also tells admission when its slots free up (WorkerStatus.releases): each running job's
expected end, from its own token rate and its max_tokens once it streams, or from its
fetch and the average slot time before.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Collection, Iterable
from typing import Protocol

# Each completed job's weight in the average slot time: about the last 20 jobs count.
JOB_S_WEIGHT = 0.05
# The quickest of this many recent first tokens stands for the engine's unloaded TTFT.
TTFT_MEMORY = 50
# A late first token cuts the jobs run at once to this share of those running.
CUT = 0.7


class Started(Protocol):
    fetched_at: float
    first_token_at: float | None


class Running(Started, Protocol):
    @property
    def tokens(self) -> int: ...

    @property
    def max_tokens(self) -> int: ...


class HasSlots(Protocol):
    @property
    def slots(self) -> int: ...


class Pacing:
    """One engine's pace, made anew when the worker switches engines."""

    def __init__(self, engine: HasSlots, ttft_hold: float) -> None:
        # The engine, not its slots now: vLLM knows its slots (max_num_seqs) only once started.
        self.engine = engine
        self.ttft_hold = ttft_hold
        self.job_s = 0.0  # the average slot time of completed jobs (WorkerStatus.job_s)
        self.limit: float | None = None  # jobs to run at once, learnt (with the hold); None: all
        self._ttfts: deque[float] = deque(maxlen=TTFT_MEMORY)  # fetch to first token, recent jobs
        self._cut_at = float("-inf")

    @property
    def slots(self) -> int:
        """The jobs to run at once: the engine's slots, or with the hold what it has learnt."""
        if self.ttft_hold <= 0 or self.limit is None:
            return self.engine.slots
        return max(1, min(self.engine.slots, int(self.limit)))

    def held(self, active: Iterable[Started]) -> bool:
        """Whether one of the running jobs has waited for its first token too long."""
        if self.ttft_hold <= 0 or not self._ttfts:
            return False
        late = time.monotonic() - self.ttft_hold * min(self._ttfts)
        return any(a.first_token_at is None and a.fetched_at < late for a in active)

    def first_token(self, ttft: float, now: float, running: int) -> bool:
        """One first token's lesson; True when it may end a hold (wake the pull loop).

        Late (over ttft_hold times the quickest recent one): the jobs run at once are cut to
        CUT of those running, at most once per quickest TTFT (the late ones of one burst
        are one lesson). On time: 1 / limit more, so a full round of prompt starts adds one.
        """
        if self.ttft_hold <= 0:
            return False
        if self._ttfts:
            quickest = min(self._ttfts)
            limit = float(self.slots)
            if ttft > self.ttft_hold * quickest:
                if now - self._cut_at > quickest:
                    self.limit = max(1.0, CUT * min(limit, running))
                    self._cut_at = now
            elif self.limit is not None:
                self.limit = min(float(self.engine.slots), self.limit + 1 / self.limit)
        self._ttfts.append(ttft)
        return True

    def completed(self, held_s: float) -> None:
        """A job completed after holding its slot for held_s seconds."""
        self.job_s = held_s if not self.job_s else self.job_s + JOB_S_WEIGHT * (held_s - self.job_s)

    def release_at(self, job: Running, now: float) -> float | None:
        """When a running job is expected to end (monotonic), or None before anything is known.

        Streaming: at its own token rate so far, at max_tokens (an earlier stop only frees
        the slot sooner; past max_tokens, one the engine does not enforce, as many tokens
        again). Before its second token: its fetch plus the average slot time, and never
        sooner than half that from now (its decoding is still ahead). A job still running
        is never announced as due already: admission would count its slot as free.
        """
        if job.first_token_at is not None and job.tokens >= 2 and now > job.first_token_at:
            per_token = (now - job.first_token_at) / (job.tokens - 1)
            left = job.max_tokens - job.tokens
            return now + (left if left > 0 else job.tokens) * per_token
        if self.job_s:
            return max(job.fetched_at + self.job_s, now + self.job_s / 2)
        return None

    def releases(self, active: Collection[Running], now: float) -> list[float]:
        """The times the running jobs are expected to free a slot (monotonic), soonest first.

        With fewer slots learnt than jobs running, the first ends free none; a job whose end
        is not known yet frees none either (admission then counts on it later, not sooner).
        """
        ends = sorted(at for at in (self.release_at(job, now) for job in active) if at is not None)
        return ends[max(0, len(active) - self.slots) :]
