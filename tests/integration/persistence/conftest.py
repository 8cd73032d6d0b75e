"""One persistence worker (with its NATS and PostgreSQL) for every test in this folder."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import nats
import pytest

from tests.persistence import Env, persistence_worker


@pytest.fixture(scope="package")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with persistence_worker(tmp_path_factory.mktemp("persist")) as env:
        yield env


@pytest.fixture
async def js(env: Env) -> AsyncIterator[nats.js.JetStreamContext]:
    nc = await nats.connect(env.nats.url)
    yield nc.jetstream()
    await nc.close()
