"""Reading a Prometheus exposition text (a /metrics page), with prometheus_client's parser."""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families


def metric_sum(text: str, name: str, **labels: str) -> float | None:
    """Sum of a Prometheus series in an exposition text (the sample's full name, such as
    `x_total`), over the samples whose labels include `labels`; None if absent."""
    values = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]
    return math.fsum(values) if values else None
