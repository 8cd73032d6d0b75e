"""Reading a Prometheus /metrics page in tests, with prometheus_client's parser."""

from __future__ import annotations

from chatq.metrics_text import metric_sum


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of a series (its sample name, `x_total` for a counter) over the samples whose
    labels include `labels`, compared whole (`model="x"` is not `submodel="x"`); KeyError
    when there is none."""
    value = metric_sum(text, name, **labels)
    if value is None:
        raise KeyError(f"{name} {labels} not in metrics")
    return value
