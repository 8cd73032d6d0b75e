"""Summaries of a step's raw samples: percentiles, throughput, errors, added latencies.

Latencies are in milliseconds. Percentiles interpolate linearly between samples (as
numpy's default does). ITL is pooled over every gap between consecutive content chunks
of every successful request.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from loadtest.client import ERROR_CLASSES, RequestResult
from loadtest.scenarios import StepResult

PERCENTILES = (50, 95, 99)


# The TTFT bounds (seconds) of the goodput figures.
GOODPUT_TTFT_S = (2.0, 5.0, 10.0)


def percentile(sorted_values: list[float], p: float) -> float:
    """The p-th percentile of an already sorted, non-empty list."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    rank = (len(sorted_values) - 1) * p / 100.0
    low = int(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def dist(values: Iterable[float | None], scale: float = 1000.0) -> dict[str, Any]:
    """n, mean, min, max and p50/p90/p95/p99 of the values (seconds → ms by default)."""
    data = sorted(v * scale for v in values if v is not None)
    if not data:
        return {"n": 0}
    out: dict[str, Any] = {
        "n": len(data),
        "mean": round(sum(data) / len(data), 3),
        "min": round(data[0], 3),
        "max": round(data[-1], 3),
    }
    for p in (50, 90, 95, 99):
        out[f"p{p}"] = round(percentile(data, p), 3)
    return out


def token_itl(result: RequestResult) -> list[float]:
    """Per-token inter-token latency: each gap divided by the tokens of the chunk it ends.

    Tokens per chunk are exact when the client counted them (synthetic engine), or when
    the request had as many chunks as output tokens (one token each); otherwise they are
    apportioned to the chunks by their text length (an estimate).
    """
    gaps = result.gaps()
    if not gaps:
        return []
    tokens = _chunk_tokens(result)
    if tokens is None:
        return []
    return [gap / max(tok, 1e-9) for gap, tok in zip(gaps, tokens[1:], strict=False) if tok > 0]


def _chunk_tokens(result: RequestResult) -> list[float] | None:
    chunks = len(result.chunk_times)
    if result.chunk_tokens and len(result.chunk_tokens) == chunks:
        return [float(t) for t in result.chunk_tokens]
    total = result.output_tokens
    if not total:
        return None
    if total == chunks:
        return [1.0] * chunks
    chars = sum(result.chunk_chars)
    if chars <= 0:
        return None
    return [total * c / chars for c in result.chunk_chars]


def summarize(step: StepResult) -> dict[str, Any]:
    results = step.results
    ok = [r for r in results if r.ok]
    errors = Counter(r.error for r in results if r.error is not None)
    duration = max(step.t1 - step.t0, 1e-9)
    out_tokens = sum(r.output_tokens or 0 for r in ok)
    chunks = sum(len(r.chunk_times) for r in ok)
    gaps = [g for r in ok for g in r.gaps()]
    samples: dict[str, list[str]] = {}
    for r in results:
        if r.error is not None and len(samples.setdefault(r.error, [])) < 3:
            samples[r.error].append(r.detail[:200])
    summary: dict[str, Any] = {
        "requests": len(results),
        "ok": len(ok),
        "errors": {cls: errors.get(cls, 0) for cls in ERROR_CLASSES},
        "errors_total": sum(errors.values()),
        "error_samples": samples,
        "duration_s": round(duration, 3),
        "req_per_min": round(len(ok) / duration * 60, 2),
        "output_tokens": out_tokens,
        "output_tok_per_s": round(out_tokens / duration, 2),
        "content_chunks": chunks,
        "tokens_per_chunk": round(out_tokens / chunks, 3) if chunks else None,
        "output_tokens_per_request": dist((r.output_tokens for r in ok), scale=1.0),
        "prompt_tokens_per_request": dist((r.prompt_tokens for r in ok), scale=1.0),
        "finish_reasons": dict(Counter(r.finish_reason or "none" for r in ok)),
        "ttft_ms": dist(r.ttft for r in ok),
        "itl_ms": dist(gaps),
        "itl_token_ms": dist(g for r in ok for g in token_itl(r)),
        "tpot_ms": dist(r.tpot() for r in ok),
        "e2e_ms": dist(r.e2e for r in ok),
        "probes": step.probes,
    }
    # Goodput: completed requests whose first token came within each bound, a minute and
    # as a share of all sent (refused and failed ones count as sent, never as good).
    summary["goodput"] = {
        f"ttft_le_{bound:g}s": {
            "count": (good := sum(1 for r in ok if r.ttft is not None and r.ttft <= bound)),
            "per_min": round(good / duration * 60, 2),
            "share_of_sent": round(good / len(results), 4) if results else None,
        }
        for bound in GOODPUT_TTFT_S
    }
    rejected = [r for r in results if r.error == "http_429"]
    if rejected or step.scenario in ("overload", "admission"):
        summary["rejected_429_latency_ms"] = dist(r.e2e for r in rejected)
        summary["retry_after_values"] = dict(Counter(r.retry_after or "none" for r in rejected))
        retried = [r.retry_ok for r in rejected if r.retry_ok is not None]
        summary["retried_after_retry_after"] = {"retried": len(retried), "ok": sum(retried)}
    if step.synth is not None:
        summary["synthetic"] = synthetic_overhead(step, ok)
    if step.window is not None:
        summary["steady_window"] = steady_window(step, ok)
    return summary


def synthetic_overhead(step: StepResult, ok: list[RequestResult]) -> dict[str, Any]:
    """What the pipeline adds to the synthetic engine's exact pace.

    added_first_chunk = TTFT − SYNTH_TTFT_MS; added_gap = observed gap − tokens in the
    chunk / SYNTH_TOKENS_PER_S (= gap − 1/rate for one-token chunks).
    """
    synth = step.synth
    assert synth is not None
    interval = 1.0 / synth.tokens_per_s
    added_gaps = [g - tok * interval for r in ok for g, tok in _gaps_with_tokens(r)]
    return {
        "tokens_per_s": synth.tokens_per_s,
        "ttft_ms_setting": synth.ttft_ms,
        "slots": synth.slots,
        "added_first_chunk_ms": dist(r.ttft - synth.ttft_ms / 1000 for r in ok if r.ttft is not None),
        "added_gap_ms": dist(added_gaps),
        "late_ms": dist(x for r in ok for x in lateness(r, synth.tokens_per_s)),
    }


def lateness(result: RequestResult, rate: float, window: tuple[float, float] | None = None) -> list[float]:
    """How late each chunk after the first is against the engine's exact schedule.

    The synthetic engine emits token k at first + k/rate; a chunk ending with token k
    is due (at the client) at the first chunk's arrival + k/rate. Unlike gaps, this
    stays meaningful when chunks bunch up (several arriving in one read: gaps of 0
    followed by a long one) and it shows a growing backlog as growing lateness.
    """
    times, tokens = result.chunk_times, result.chunk_tokens
    if len(tokens) != len(times) or not times:
        return []
    out = []
    produced = tokens[0]
    for i in range(1, len(times)):
        produced += tokens[i]
        if window is not None and not window[0] <= result.start + times[i] < window[1]:
            continue
        out.append(times[i] - (times[0] + (produced - tokens[0]) / rate))
    return out


def _gaps_with_tokens(
    result: RequestResult, window: tuple[float, float] | None = None
) -> list[tuple[float, int]]:
    times, tokens = result.chunk_times, result.chunk_tokens
    if len(tokens) != len(times):
        tokens = [1] * len(times)
    out = []
    for i in range(1, len(times)):
        if window is not None and not window[0] <= result.start + times[i] < window[1]:
            continue
        out.append((times[i] - times[i - 1], tokens[i]))
    return out


def steady_window(step: StepResult, ok: list[RequestResult]) -> dict[str, Any]:
    """Streams: gaps whose chunk arrived inside the steady window (all K streams open)."""
    assert step.window is not None
    window = step.window
    everyone = [r for r in step.results if r.chunk_times]
    pairs = [p for r in everyone for p in _gaps_with_tokens(r, window)]
    out: dict[str, Any] = {
        "seconds": round(window[1] - window[0], 3),
        "chunks": len(pairs),
        "chunks_per_s": round(len(pairs) / max(window[1] - window[0], 1e-9), 1),
        "gap_ms": dist(g for g, _ in pairs),
        "streams_ok": len(ok),
    }
    if step.synth is not None:
        interval = 1.0 / step.synth.tokens_per_s
        out["added_gap_ms"] = dist(g - tok * interval for g, tok in pairs)
        rate = step.synth.tokens_per_s
        out["late_ms"] = dist(x for r in everyone for x in lateness(r, rate, window))
    return out


def paired(steps: list[StepResult], a: str = "chatq", b: str = "vllm-server") -> dict[str, Any]:
    """Per-prompt differences a − b at each step: the same request index (the same prompt)
    answered by both with the same number of output tokens (greedy decoding makes the
    answers identical). Less noisy than comparing two distributions of a few samples."""
    out: dict[str, Any] = {}
    mine = {s.label: s for s in steps if s.target == a}
    theirs = {s.label: s for s in steps if s.target == b}
    for label, sa in mine.items():
        sb = theirs.get(label)
        if sb is None:
            continue
        other = {r.index: r for r in sb.results if r.ok}
        pairs = [
            (r, other[r.index])
            for r in sa.results
            if r.ok and r.index in other and r.output_tokens == other[r.index].output_tokens
        ]
        out[label] = {
            "pairs": len(pairs),
            "ttft_diff_ms": dist((x.ttft or 0.0) - (y.ttft or 0.0) for x, y in pairs),
            "e2e_diff_ms": dist((x.e2e or 0.0) - (y.e2e or 0.0) for x, y in pairs),
        }
    return out
