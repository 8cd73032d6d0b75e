"""One pipeline (nats-server, API, synthetic worker) for every test in this folder."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import Stack
from tests.pipeline import pipeline_stack


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with pipeline_stack(tmp_path_factory.mktemp("stack")) as stack:
        yield stack
