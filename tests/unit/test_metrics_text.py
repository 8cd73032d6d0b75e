"""Reading Prometheus text (chatq.metrics_text.metric_sum, tests.metrics.metric_value): whole
sample names and whole label values, as prometheus_client's parser reads them."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from chatq.metrics_text import metric_sum
from tests.metrics import metric_value


def exposition() -> str:
    registry = CollectorRegistry()
    tokens = Counter("x_tokens", "tokens", ["model", "submodel"], registry=registry)
    tokens.labels(model="a", submodel="x").inc(2)
    tokens.labels(model="x", submodel="b").inc(3)
    Gauge("x_tokens_active", "active", registry=registry).set(7)
    return generate_latest(registry).decode()


def test_labels_match_whole_values_not_substrings() -> None:
    text = exposition()
    assert metric_value(text, "x_tokens_total", model="x") == 3  # not submodel="x"
    assert metric_value(text, "x_tokens_total", submodel="x") == 2
    assert metric_value(text, "x_tokens_total") == 5


def test_sample_names_match_whole() -> None:
    text = exposition()
    # Neither the family's name nor its _created samples nor a longer name sharing the prefix.
    assert metric_sum(text, "x_tokens") is None
    assert metric_value(text, "x_tokens_active") == 7
    with pytest.raises(KeyError):
        metric_value(text, "x_tokens_total", model="nobody")
