"""How fast a model's workers start jobs, from successive readings of its JetStream consumer.

Every API process reads the same consumer, so every process derives the same rates
from the same shared counters (`started`: jobs workers have acked, which they do at the
first token); nothing here counts this process's own requests.

Two rates come out of the readings:

- `rate()`: jobs started per second over the last RATE_WINDOW_S, whatever the load. At
  low load it is the arrival rate, not what the workers could do; it serves the queue
  place's expected wait (api/queue_position.py).
- `capacity()`: jobs started per second while a backlog waited, i.e. while every slot
  was busy, so the workers started jobs as fast as they can. Only intervals between two
  readings that both show jobs waiting count: with a backlog all along, no slot sat idle.
  The most recent RATE_WINDOW_S of such busy time is used, and it is remembered for
  CAPACITY_MEMORY_S after the last backlog, so that the next burst is met with what
  the workers did the last time rather than with no estimate at all. Below
  MIN_RATE_SPAN_S of busy time there is no estimate (None).

A counter that goes backwards (the consumer made anew, a NATS restart) drops what was
measured before it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

# The drain rate is measured over this window: long enough that the burst of jobs an
# idle worker takes at once does not read as the steady rate.
RATE_WINDOW_S = 10.0
MIN_RATE_SPAN_S = 2.0
# How long the workers' measured capacity is believed after the last backlog. A model
# switch or a worker added changes it; within this time the old figure is forgotten
# (and, while there is a backlog, the newest RATE_WINDOW_S of it dominates anyway).
CAPACITY_MEMORY_S = 60.0


@dataclass
class DrainEstimator:
    """Start rates of one queue, fed with consumer readings (monotonic seconds)."""

    # (at, started) of every reading within RATE_WINDOW_S
    samples: deque[tuple[float, int]] = field(default_factory=deque)
    # (end, seconds, jobs started) of each interval that had a backlog at both ends
    busy: deque[tuple[float, float, int]] = field(default_factory=deque)
    _last: tuple[float, int, int] | None = None  # (at, started, pending) of the last reading

    def observe(self, at: float, started: int, pending: int) -> None:
        """Record one reading of the consumer: jobs started so far and jobs waiting."""
        last = self._last
        if last is not None and (started < last[1] or at < last[0]):
            self.samples.clear()
            self.busy.clear()
            last = None
        if last is not None and last[2] > 0 and pending > 0 and at > last[0]:
            self.busy.append((at, at - last[0], started - last[1]))
        self._last = (at, started, pending)
        self.samples.append((at, started))
        # Samples older than the window go, even after an idle spell with no readings.
        while len(self.samples) > 1 and at - self.samples[0][0] > RATE_WINDOW_S:
            self.samples.popleft()
        self._forget(at)

    def _forget(self, now: float) -> None:
        while self.busy and now - self.busy[0][0] > CAPACITY_MEMORY_S:
            self.busy.popleft()

    def rate(self) -> float | None:
        """Jobs started per second over the last RATE_WINDOW_S of readings, or None."""
        if len(self.samples) < 2:
            return None
        (t0, n0), (t1, n1) = self.samples[0], self.samples[-1]
        if t1 - t0 < MIN_RATE_SPAN_S:
            return None
        return max(0, n1 - n0) / (t1 - t0)

    def capacity(self, now: float) -> float | None:
        """Jobs started per second while a backlog waited (the newest RATE_WINDOW_S of it), or None."""
        self._forget(now)
        seconds, started = 0.0, 0
        for _, span, jobs in reversed(self.busy):
            seconds += span
            started += jobs
            if seconds >= RATE_WINDOW_S:
                break
        if seconds < MIN_RATE_SPAN_S:
            return None
        return started / seconds
